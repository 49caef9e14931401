"""The multi-token prediction loss in the train module (framework/train/mtp_loss.py) and its logged metrics."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from train_helpers import VOCAB, make_batches, make_recipe

from framework.config.schema import ModelConfig, MTPConfig
from framework.models import build_model, init_weights
from framework.train import MetricsLogger, Trainer, TrainModule
from framework.train.loss import IGNORE_INDEX

MODEL = dict(vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, ffn_hidden=32, max_seq_len=16)


def module(tmp_path, micro_batch: int, weight: float = 0.5) -> TrainModule:
    overrides = {"train.micro_batch_size": micro_batch, "data.seq_len": 10}
    recipe = make_recipe(tmp_path, overrides)
    recipe.model = ModelConfig(**MODEL, mtp=MTPConfig(depth=2, loss_weight=weight))
    recipe.validate()
    model = build_model(recipe.model)
    init_weights(model, recipe.model, 0)
    return TrainModule(model, recipe, "cpu")


def naive_step_losses(m: TrainModule, batch: dict[str, torch.Tensor]) -> tuple[float, list[float]]:
    """Main CE and each depth's CE over the whole batch, each summed and divided by the main labelled count."""
    m.model.train()
    with torch.no_grad():
        main = m.model(batch["input_ids"])
        depths = m.model.mtp_logits
    m.model.mtp_logits = None
    labels, total = batch["labels"], (batch["labels"] != IGNORE_INDEX).sum()
    ce = (
        F.cross_entropy(main.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        / total
    )
    out = []
    for k, logits in enumerate(depths, 1):
        s = labels.shape[1]
        sums = F.cross_entropy(
            logits[:, : s - k].flatten(0, 1),
            labels[:, k:].flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        out.append((sums / total).item())
    return ce.item(), out


def test_step_logs_main_and_per_depth_losses_like_one_batch(tmp_path) -> None:
    (batch,) = make_batches(1, seq=10)
    whole, split = module(tmp_path, 4), module(tmp_path, 2)
    main, depths = naive_step_losses(whole, batch)
    halves = [{k: v[i : i + 2] for k, v in batch.items()} for i in (0, 2)]
    stats = []
    for m, micro in ((whole, [batch]), (split, halves)):  # accumulation normalises like one batch
        m.train_batch(micro)
        stats.append(m.optim_step())
    for s in stats:
        assert abs(s["loss"] - main) < 1e-5  # `loss` stays the main next-token loss
        assert abs(s["mtp_loss_1"] - depths[0]) < 1e-5 and abs(s["mtp_loss_2"] - depths[1]) < 1e-5
        assert abs(s["mtp_loss"] - sum(depths) / 2) < 1e-5
    assert abs(stats[0]["grad_norm"] - stats[1]["grad_norm"]) < 1e-5


def test_backward_adds_the_weighted_mean(tmp_path) -> None:
    """The gradient of a step is that of main + weight x mean_k CE_k: with weight 0 the MTP blocks get none."""
    (batch,) = make_batches(1, seq=10)
    m = module(tmp_path, 4, weight=0.0)
    m.train_batch([batch])
    grads = {n: p.grad for n, p in m.model.named_parameters()}
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if n.startswith("mtp."))
    m = module(tmp_path, 4, weight=0.5)
    m.train_batch([batch])
    assert m.model.mtp[1].eh_proj.weight.grad.abs().sum() > 0


def test_metrics_file_holds_the_mtp_losses(tmp_path) -> None:
    m = module(tmp_path, 4)
    logger = MetricsLogger(m.recipe.logging, total_steps=2)
    m.recipe.train.steps = 2
    Trainer(m, make_batches(2, seq=10), [logger], m.recipe).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert train and all({"mtp_loss", "mtp_loss_1", "mtp_loss_2"} <= r.keys() for r in train)
