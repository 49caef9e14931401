import copy
import json

import pytest
import torch
import torch.nn.functional as F
from train_helpers import assert_bitwise_equal, make_batch, make_batches, make_model, make_recipe, snapshot

from framework.checkpoint.tree import split_tensors
from framework.train import TrainModule


def _module(tmp_path, overrides=None, model=None) -> TrainModule:
    return TrainModule(model or make_model(), make_recipe(tmp_path, overrides), "cpu")


def _train(module: TrainModule, batches, veto=None) -> list[dict]:
    out = []
    for batch in batches:
        module.train_batch([batch])
        out.append(module.optim_step(veto=veto))
    return out


def _poison_gradient(param: torch.nn.Parameter, value: float):
    """Hook that writes `value` into one element of the parameter's gradient during backward."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad.view(-1)[0] = value
        return grad

    return param.register_hook(hook)


def _varied_labels_batch(seed: int) -> dict[str, torch.Tensor]:
    """16 rows whose labelled-token counts differ a lot (row i keeps i % 9 labels; some rows keep none)."""
    batch = make_batch(torch.Generator().manual_seed(seed), batch=16, seq=8, ignore_prob=0.0)
    keep = torch.arange(8).view(1, -1) < (torch.arange(16) % 9).view(-1, 1)
    batch["labels"] = batch["labels"].masked_fill(~keep, -100)
    return batch


def _on_optimizer_step(module: TrainModule, fn) -> None:
    """Run fn() right before the optimizer updates (after clipping): it sees the gradients the update uses."""

    def hook(optimizer, args, kwargs) -> None:
        fn()

    module.optimizer.register_step_pre_hook(hook)


def _grads(module: TrainModule) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.model.named_parameters()}


def test_accumulating_four_micro_batches_equals_one_big_batch(tmp_path):
    batch = _varied_labels_batch(0)
    micro = [{k: v[i * 4 : (i + 1) * 4] for k, v in batch.items()} for i in range(4)]
    counts = [int((mb["labels"] != -100).sum()) for mb in micro]
    assert len(set(counts)) > 1  # the micro-batches really hold different numbers of labelled tokens
    overrides = {"train.global_batch_size": 16, "train.micro_batch_size": 4}
    accumulated = _module(tmp_path, overrides)
    big = _module(tmp_path, overrides, model=copy.deepcopy(accumulated.model))
    reference = copy.deepcopy(accumulated.model)

    out_acc = accumulated.train_batch(micro)
    out_big = big.train_batch([batch])
    # Independent reference: plain PyTorch mean cross-entropy over the labelled tokens of the whole batch.
    logits = reference(batch["input_ids"])
    loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    loss.backward()

    torch.testing.assert_close(out_acc["loss"], loss.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_big["loss"], loss.detach(), rtol=1e-6, atol=1e-6)
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    for name, grad in _grads(accumulated).items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grad, _grads(big)[name], rtol=1e-5, atol=1e-7)


def test_nan_gradient_skips_step_leaving_params_and_optimizer_bitwise_unchanged(tmp_path):
    module = _module(tmp_path, {"schedule.warmup_steps": 5})
    batches = make_batches(4)
    _train(module, batches[:2])  # optimizer state exists and is non-trivial
    before, lr_before = snapshot(module), module.lr
    optim_groups_before = copy.deepcopy(module.optimizer.state_dict()["param_groups"])

    handle = _poison_gradient(module.model.w1.weight, float("nan"))
    metrics = _train(module, batches[2:3])[0]
    handle.remove()

    assert metrics["skipped"] and metrics["skip_reason"] == "nonfinite"
    assert metrics["skipped_steps"] == 1 and metrics["consecutive_skips"] == 1 and metrics["updates"] == 2
    assert metrics["step"] == 3 and module.step == 3
    assert_bitwise_equal(snapshot(module), before)
    assert module.optimizer.state_dict()["param_groups"] == optim_groups_before
    assert module.lr == lr_before  # the schedule follows applied updates only
    assert all(p.grad is None for p in module.model.parameters())  # nothing leaks into the next step

    after = _train(module, batches[3:4])[0]
    assert not after["skipped"] and after["consecutive_skips"] == 0 and after["skipped_steps"] == 1
    assert not torch.equal(module.model.w1.weight, before["param/w1.weight"])


def test_nonfinite_loss_is_skipped(tmp_path):
    module = _module(tmp_path)
    before = snapshot(module)
    handle = module.model.output.register_forward_hook(lambda m, i, out: out * float("inf"))
    metrics = _train(module, make_batches(1))[0]
    handle.remove()
    assert metrics["skipped"] and metrics["skip_reason"] == "nonfinite"
    assert_bitwise_equal(snapshot(module), before)


def test_skip_nonfinite_off_applies_the_update(tmp_path):
    module = _module(tmp_path, {"train.skip_nonfinite": False})
    handle = _poison_gradient(module.model.w1.weight, float("nan"))
    metrics = _train(module, make_batches(1))[0]
    handle.remove()
    assert not metrics["skipped"] and metrics["updates"] == 1
    assert torch.isnan(module.model.w1.weight).any()


def test_fp16_loss_scale_backs_off_on_overflow_and_grows_after_interval(tmp_path):
    overrides = {
        "precision.dtype": "fp16",
        "precision.loss_scale_init": 1024.0,
        "precision.loss_scale_growth_interval": 3,
        "precision.loss_scale_growth_factor": 4.0,
        "precision.loss_scale_backoff_factor": 0.25,
    }
    module = _module(tmp_path, overrides)
    batches = make_batches(7)
    before = snapshot(module)
    handle = _poison_gradient(module.model.w2.weight, float("inf"))
    first = _train(module, batches[:1])[0]
    handle.remove()
    assert first["skipped"] and first["loss_scale"] == 256.0  # 1024 x backoff 0.25
    assert_bitwise_equal(snapshot(module), before)
    scales = [m["loss_scale"] for m in _train(module, batches[1:])]
    # Growth by 4 after every 3 consecutive clean steps.
    assert scales == [256.0, 256.0, 1024.0, 1024.0, 1024.0, 4096.0]
    assert module.precision.scaler.get_scale() == 4096.0


def test_fp16_real_overflow_from_a_huge_scale(tmp_path):
    module = _module(tmp_path, {"precision.dtype": "fp16", "precision.loss_scale_init": 2.0**100})
    before = snapshot(module)
    metrics = _train(module, make_batches(1))[0]
    assert metrics["skipped"] and metrics["loss_scale"] == 2.0**99
    assert_bitwise_equal(snapshot(module), before)


def test_grad_norm_is_the_global_norm_and_clipping_scales_to_it(tmp_path):
    module = _module(tmp_path, {"optim.grad_clip": 0.05})
    seen: dict[str, list[torch.Tensor]] = {}

    def capture_pre_clip(stats):  # runs after backward, before clipping and the update
        seen["pre"] = [p.grad.double().clone() for p in module.model.parameters()]
        return None

    _on_optimizer_step(
        module, lambda: seen.setdefault("post", [p.grad.double().clone() for p in module.model.parameters()])
    )
    metrics = _train(module, make_batches(1), veto=capture_pre_clip)[0]
    naive = sum(float((g * g).sum()) for g in seen["pre"]) ** 0.5
    assert metrics["grad_norm"] == pytest.approx(naive, rel=1e-6)
    assert naive > 0.05
    clipped = sum(float((g * g).sum()) for g in seen["post"]) ** 0.5
    assert clipped == pytest.approx(0.05, rel=1e-4)
    for pre, post in zip(seen["pre"], seen["post"]):
        torch.testing.assert_close(post, pre * (0.05 / (naive + 1e-6)), rtol=1e-5, atol=1e-9)


def test_clipping_disabled_leaves_gradients(tmp_path):
    module = _module(tmp_path, {"optim.grad_clip": 0.0})
    seen = {}
    _on_optimizer_step(module, lambda: seen.setdefault("post", _grads(module)))
    _train(module, make_batches(1), veto=lambda stats: seen.setdefault("pre", _grads(module)) and None)
    for name, grad in seen["pre"].items():
        assert torch.equal(grad, seen["post"][name])


def test_veto_skips_like_a_nonfinite_step(tmp_path):
    module = _module(tmp_path)
    before = snapshot(module)
    metrics = _train(module, make_batches(1), veto=lambda stats: "because")[0]
    assert metrics["skipped"] and metrics["skip_reason"] == "because" and metrics["skipped_steps"] == 1
    assert_bitwise_equal(snapshot(module), before)


def test_lr_follows_warmup_per_applied_update(tmp_path):
    module = _module(tmp_path, {"schedule.warmup_steps": 4, "optim.lr": 1.0})
    batches = make_batches(5)
    lrs = [m["lr"] for m in _train(module, batches[:2])]
    lrs += [m["lr"] for m in _train(module, batches[2:3], veto=lambda s: "skip")]
    lrs += [m["lr"] for m in _train(module, batches[3:])]
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 0.75, 1.0])


def test_z_loss_reported_separately(tmp_path):
    module = _module(tmp_path, {"train.z_loss": 1e-2})
    metrics = _train(module, make_batches(1))[0]
    assert metrics["z_loss"] > 0 and metrics["loss"] > 0
    assert metrics["labelled_tokens"] > 0


def test_eval_batch_returns_sum_and_count_in_eval_mode(tmp_path):
    module = _module(tmp_path, model=make_model(dropout=0.5))
    batch = make_batches(1)[0]
    loss_sum, tokens = module.eval_batch(batch)
    again, _ = module.eval_batch(batch)
    assert torch.equal(loss_sum, again)  # dropout is off
    reference = F.cross_entropy(
        module.model(batch["input_ids"]).flatten(0, 1), batch["labels"].flatten(), reduction="sum"
    )
    torch.testing.assert_close(loss_sum, reference.detach())
    assert int(tokens) == int((batch["labels"] != -100).sum())
    module.train_batch([batch])
    assert module.model.training


def test_bf16_autocast_trains_fp32_master_weights(tmp_path):
    module = _module(tmp_path, {"precision.dtype": "bf16"})
    metrics = _train(module, make_batches(2))
    assert all(not m["skipped"] and m["loss_scale"] is None for m in metrics)
    assert all(p.dtype == torch.float32 for p in module.model.parameters())


def test_state_dict_non_tensor_part_is_plain_json(tmp_path):
    module = _module(tmp_path, {"precision.dtype": "fp16"})
    _train(module, make_batches(1))
    tensors, plain = split_tensors(module.state_dict())
    json.dumps(plain, allow_nan=False)
    assert any(key.startswith("optimizer/state/w1.weight/") for key in tensors)
    assert plain["counters"]["step"] == 1 and plain["precision"]["scale"] == 65536.0


def test_model_on_wrong_device_is_refused(tmp_path):
    with pytest.raises(ValueError, match="materialise"):
        TrainModule(make_model(), make_recipe(tmp_path), torch.device("meta"))
