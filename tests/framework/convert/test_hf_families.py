"""Every family: Loom -> HF folder -> transformers gives the same logits, loss and greedy decode; HF folder ->
Loom gives back the same weights bit for bit; a transformers-initialised model imports with the same logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from framework.config.schema import ModelConfig
from framework.convert.hf.configs import build_hf_model
from framework.convert.hf.convert import save_hf
from framework.convert.hf.importer import read_hf
from framework.models import build_model
from framework.models.generate import greedy_decode
from framework.train.loss import compute_loss
from tests.framework.convert.conftest import CONFIGS, SEQ, random_model, routing_margins

TOL = 1e-4
ROUTING_MARGIN = 1e-4  # MoE: smallest k-th vs (k+1)-th router score gap, far above fp32 differences
AUTO = {
    "decoder": "AutoModelForCausalLM",
    "encoder": "AutoModelForMaskedLM",
    "encoder_decoder": "AutoModelForSeq2SeqLM",
}


def _inputs(cfg: ModelConfig, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (2, SEQ), generator=gen)
    batch = {"input_ids": ids}
    if cfg.family == "encoder":
        batch["token_type_ids"] = torch.randint(0, cfg.type_vocab_size, (2, SEQ), generator=gen)
    if cfg.family == "encoder_decoder":
        batch["decoder_input_ids"] = torch.randint(0, cfg.vocab_size, (2, SEQ - 5), generator=gen)
    return batch


def _hf_logits(hf: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return hf(**batch).logits


def _load_hf(cfg: ModelConfig, path: Path) -> torch.nn.Module:
    return getattr(transformers, AUTO[cfg.family]).from_pretrained(path, dtype=torch.float32).eval()


def _loom_loss(cfg: ModelConfig, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Loom's training loss on the batch the objective would build (causal: next token; others: given labels)."""
    labels = batch.get("decoder_input_ids", batch["input_ids"])
    if cfg.family == "decoder":
        logits, labels = logits[:, :-1], labels[:, 1:]
    labels = labels.clone()
    labels[:, ::3] = -100  # some ignored positions, as objectives produce
    return compute_loss(logits, labels, (labels != -100).sum(), 0.0).loss, labels


def _hf_loss(
    cfg: ModelConfig, hf: torch.nn.Module, batch: dict[str, torch.Tensor], labels: torch.Tensor
) -> torch.Tensor:
    if cfg.family == "decoder":  # HF shifts causal labels itself
        labels = torch.cat([torch.full_like(labels[:, :1], -100), labels], dim=1)
    with torch.no_grad():
        return hf(**batch, labels=labels).loss


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_logits_loss_and_import_round_trip(name: str, tmp_path: Path) -> None:
    cfg = CONFIGS[name]
    model = random_model(cfg)
    save_hf(cfg, model.state_dict(), tmp_path)
    hf = _load_hf(cfg, tmp_path)
    batch = _inputs(cfg)
    with torch.no_grad(), routing_margins(model) as margins:
        ours = model(**batch)
    assert min(margins, default=1.0) > ROUTING_MARGIN, "pick a seed whose routing has no near-ties"
    theirs = _hf_logits(hf, batch)
    diff = (ours - theirs).abs().max().item()
    print(f"{name}: max |logit diff| = {diff:.2e}")
    assert diff <= TOL and ours.std() > 0.1  # and not trivially equal (e.g. constant) logits
    loss, labels = _loom_loss(cfg, ours, batch)
    assert abs(loss.item() - _hf_loss(cfg, hf, batch, labels).item()) <= TOL
    cfg_back, state_back = read_hf(tmp_path)
    assert cfg_back == cfg
    original = model.state_dict()
    assert state_back.keys() == original.keys()
    for key, tensor in original.items():
        assert torch.equal(state_back[key], tensor), key


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_import_model_built_by_transformers(name: str, tmp_path: Path) -> None:
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    hf = build_hf_model(cfg).eval()  # transformers' own random init, no download
    hf.save_pretrained(tmp_path)
    cfg_back, state = read_hf(tmp_path)
    model = build_model(cfg_back)
    model.load_state_dict(state)
    model.eval()
    batch = _inputs(cfg, seed=2)
    with torch.no_grad(), routing_margins(model) as margins:
        diff = (model(**batch) - _hf_logits(hf, batch)).abs().max().item()
    assert min(margins, default=1.0) > ROUTING_MARGIN, "pick a seed whose routing has no near-ties"
    print(f"{name}: imported max |logit diff| = {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("name", [n for n in sorted(CONFIGS) if CONFIGS[n].family != "encoder"])
def test_greedy_decode_matches_transformers(name: str, tmp_path: Path) -> None:
    cfg = CONFIGS[name]
    model = random_model(cfg, seed=3)
    save_hf(cfg, model.state_dict(), tmp_path)
    hf = _load_hf(cfg, tmp_path)
    prompt = _inputs(cfg, seed=4)["input_ids"][:1, :6]
    start = 0 if cfg.family == "encoder_decoder" else None
    with routing_margins(model) as routing:
        ours, margins = greedy_decode(model, prompt, 20, decoder_start_id=start)
    assert margins.min().item() > 1e-4, "pick a seed whose greedy path has no near-ties"
    assert min(routing, default=1.0) > ROUTING_MARGIN, "pick a seed whose routing has no near-ties"
    # transformers' T5 cache is sized by the encoder's layer count, so it breaks when the decoder has more
    use_cache = cfg.family != "encoder_decoder"
    generated = hf.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, eos_token_id=None,
                            pad_token_id=0, use_cache=use_cache)  # fmt: skip
    theirs = generated[:, -20:]
    assert torch.equal(ours, theirs)
