import pytest
import torch

from framework.train.loss import compute_loss, loss_sums


def _case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, 11, generator=g) * 4
    labels = torch.randint(0, 11, (3, 5), generator=g)
    labels[0, :2] = -100
    labels[2, 4] = -100
    return logits, labels


def _reference(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, int]:
    """Sum of -log softmax[label] and of (log sum exp)^2 over labelled tokens, written out in float64."""
    ce = z = 0.0
    count = 0
    for logit_row, label in zip(logits.double().reshape(-1, logits.shape[-1]), labels.reshape(-1)):
        if label == -100:
            continue
        log_z = torch.log(torch.exp(logit_row).sum())
        ce += float(log_z - logit_row[label])
        z += float(log_z) ** 2
        count += 1
    return ce, z, count


def test_sums_match_reference_with_and_without_z():
    logits, labels = _case()
    ce_ref, z_ref, _ = _reference(logits, labels)
    ce, z = loss_sums(logits, labels, with_z=True)
    assert float(ce) == pytest.approx(ce_ref, rel=1e-5) and float(z) == pytest.approx(z_ref, rel=1e-5)
    ce_only, z_zero = loss_sums(logits, labels, with_z=False)
    assert float(ce_only) == pytest.approx(ce_ref, rel=1e-5) and float(z_zero) == 0.0


def test_z_loss_is_coefficient_times_mean_squared_log_z():
    logits, labels = _case(1)
    ce_ref, z_ref, count = _reference(logits, labels)
    out = compute_loss(logits, labels, torch.tensor(count), z_coef=1e-3)
    assert float(out.z_loss) == pytest.approx(1e-3 * z_ref / count, rel=1e-5)
    assert float(out.ce) == pytest.approx(ce_ref / count, rel=1e-5)
    assert float(out.loss) == pytest.approx(float(out.ce) + float(out.z_loss), rel=1e-6)
    assert not out.ce.requires_grad


def test_normalised_by_the_global_count_not_the_micro_batch():
    logits, labels = _case(2)
    ce_ref, _, _ = _reference(logits, labels)
    out = compute_loss(logits, labels, torch.tensor(100), z_coef=0.0)
    assert float(out.loss) == pytest.approx(ce_ref / 100, rel=1e-5)


def test_no_labelled_tokens_gives_zero_not_nan():
    logits, labels = _case(3)
    out = compute_loss(logits, torch.full_like(labels, -100), torch.tensor(0), z_coef=1e-4)
    assert float(out.loss) == 0.0


def test_half_precision_logits_are_upcast():
    logits, labels = _case(4)
    ce_ref, _, _ = _reference(logits.bfloat16().float(), labels)
    ce, _ = loss_sums(logits.bfloat16(), labels, with_z=False)
    assert ce.dtype == torch.float32 and float(ce) == pytest.approx(ce_ref, rel=1e-5)
