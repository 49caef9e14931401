"""Mixtral and Qwen3-MoE beyond the per-family proofs of test_hf_families: the Hub's per-expert file layout, the
fused layout transformers can also save, foreign sparse-layer placements, the CLI round trip, and refusals of
MoE settings transformers does not compute."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from framework.config.errors import ConfigError
from framework.config.loader import load_recipe
from framework.config.schema import ModelConfig
from framework.convert.hf.configs import build_hf_model, check_representable
from framework.convert.hf.convert import config_from_hf, save_hf
from framework.convert.hf.importer import read_hf
from framework.models import build_model
from framework.train import TrainModule
from framework.train.callbacks.checkpointer import Checkpointer
from framework.train.trainer import Trainer
from tests.framework.convert.conftest import CONFIGS, VOCAB, random_model, routing_margins
from tests.framework.convert.test_convert_cli import assert_user_error, run, write_checkpoint


def _logits(model: torch.nn.Module, seed: int = 5) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(), routing_margins(model) as margins:
        out = model(ids).logits if isinstance(model, transformers.PreTrainedModel) else model(ids)
    assert min(margins, default=1.0) > 1e-4
    return out


def test_export_writes_the_hub_per_expert_layout(tmp_path: Path) -> None:
    for name, expected in [
        ("mixtral", ["model.layers.0.block_sparse_moe.gate.weight", "model.layers.1.block_sparse_moe.experts.3.w3.weight"]),
        ("qwen3_moe", ["model.layers.0.mlp.up_proj.weight", "model.layers.2.mlp.experts.3.down_proj.weight"]),
    ]:  # fmt: skip
        cfg = CONFIGS[name]
        save_hf(cfg, random_model(cfg).state_dict(), tmp_path / name)
        names = set(load_file(tmp_path / name / "model.safetensors"))
        assert set(expected) <= names and not any(n.endswith("_proj") for n in names)
    config = json.loads((tmp_path / "qwen3_moe" / "config.json").read_text())
    assert (config["mlp_only_layers"], config["decoder_sparse_step"], config["norm_topk_prob"]) == (
        [0],
        1,
        False,
    )


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_import_of_the_fused_layout(name: str, tmp_path: Path) -> None:
    """transformers also saves its in-memory 3-D experts (save_original_format=False); both import alike."""
    torch.manual_seed(0)
    hf = build_hf_model(CONFIGS[name]).eval()
    hf.save_pretrained(tmp_path / "fused", save_original_format=False)
    hf.save_pretrained(tmp_path / "files")
    assert any(n.endswith("gate_up_proj") for n in load_file(tmp_path / "fused" / "model.safetensors"))
    cfg, fused = read_hf(tmp_path / "fused")
    _, files = read_hf(tmp_path / "files")
    assert fused.keys() == files.keys() and all(torch.equal(fused[k], files[k]) for k in fused)
    model = build_model(cfg)
    model.load_state_dict(fused)
    assert (_logits(model.eval()) - _logits(hf)).abs().max() <= 1e-4


def _qwen3_moe_config(**fields: object) -> transformers.Qwen3MoeConfig:
    base = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=72, moe_intermediate_size=20,
                num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2, head_dim=12, num_experts=4,
                num_experts_per_tok=2, max_position_embeddings=64)  # fmt: skip
    return transformers.Qwen3MoeConfig(**base | fields)


def test_qwen3_moe_sparse_step_imports_as_first_dense_and_every(tmp_path: Path) -> None:
    torch.manual_seed(0)
    hf = transformers.Qwen3MoeForCausalLM(
        _qwen3_moe_config(decoder_sparse_step=2)
    ).eval()  # layers 1, 3 sparse
    hf.save_pretrained(tmp_path)
    cfg, state = read_hf(tmp_path)
    assert cfg.moe is not None and (cfg.moe.first_dense, cfg.moe.every) == (1, 2) and cfg.moe_layers == [1, 3]
    model = build_model(cfg)
    model.load_state_dict(state)
    assert (_logits(model.eval()) - _logits(hf)).abs().max() <= 1e-4


def test_qwen3_moe_uneven_sparse_layers_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"makes layers \[0, 2, 3\] sparse"):
        config_from_hf(_qwen3_moe_config(mlp_only_layers=[1]))
    with pytest.raises(ConfigError, match="no sparse layer"):
        config_from_hf(_qwen3_moe_config(mlp_only_layers=[0, 1, 2, 3]))


def _moe(name: str, **fields: object) -> ModelConfig:
    cfg = CONFIGS[name]
    assert cfg.moe is not None
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **fields))


@pytest.mark.parametrize(
    ("cfg", "fields"),
    [
        # transformers is dropless; Loom drops over capacity in eval too
        (_moe("mixtral", capacity_factor=1.25), ["model.moe.capacity_factor=1.25"]),
        (_moe("qwen3_moe", capacity_factor=2.0), ["model.moe.capacity_factor=2.0"]),
        # Mixtral: every layer sparse, always renormalised
        (
            _moe("mixtral", first_dense=1, renormalize=False),
            ["model.moe.first_dense=1", "model.moe.renormalize"],
        ),
        (_moe("mixtral", every=2), ["model.moe.every=2"]),
        # DeepSeek-style routing in either family
        (
            _moe("qwen3_moe", router="sigmoid", n_shared_experts=1, route_scale=2.5, bias_update_rate=1e-3),
            [
                "model.moe.router='sigmoid'",
                "model.moe.n_shared_experts=1",
                "model.moe.route_scale=2.5",
                "model.moe.bias_update_rate=0.001",
            ],
        ),
        (_moe("mixtral", n_groups=2, topk_groups=1), ["model.moe.n_groups=2"]),
    ],
    ids=[
        "mixtral-capacity",
        "qwen3_moe-capacity",
        "mixtral-dense",
        "mixtral-every",
        "qwen3_moe-deepseek",
        "mixtral-groups",
    ],
)
def test_settings_transformers_does_not_compute_are_refused(cfg: ModelConfig, fields: list[str]) -> None:
    cfg.validate()  # a valid Loom model, only not representable
    with pytest.raises(ConfigError) as refusal:
        check_representable(cfg)
    assert all(f in refusal.value.rule for f in fields), refusal.value.rule


def test_cli_sharded_export_import_and_resume(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, demo_data: Path
) -> None:
    cfg = dataclasses.replace(CONFIGS["qwen3_moe"], vocab_size=4100)  # covers the demo tokenizer
    model = write_checkpoint(cfg, tmp_path / "ckpt", demo_data / "tokenizer.model", seed=1)
    hf_dir, back = tmp_path / "hf", tmp_path / "back"
    code, _, err = run(
        capsys, "convert", tmp_path / "ckpt", "--to", "hf", hf_dir, "--max-shard-size", "100KB"
    )
    assert code == 0, err
    assert (
        len(set(json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert (_logits(hf) - _logits(model)).abs().max() <= 1e-4
    code, _, err = run(capsys, "convert", hf_dir, "--from", "hf", back)
    assert code == 0, err
    recipe = load_recipe(back / "recipe.yaml")
    assert recipe.model == cfg
    module = TrainModule(random_model(cfg, seed=9), recipe, torch.device("cpu"))
    checkpointer, trainer = Checkpointer(recipe, resume="auto"), Trainer(module, [], [], recipe)
    checkpointer.on_fit_start(trainer)
    checkpointer.on_close(trainer)  # restores the signal handlers
    for key, tensor in model.state_dict().items():
        assert torch.equal(module.model.state_dict()[key], tensor), key


def test_bad_moe_inputs_are_one_line_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = CONFIGS["mixtral"]
    save_hf(cfg, random_model(cfg).state_dict(), tmp_path / "hf")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    dropped = {k: v for k, v in weights.items() if k != "model.layers.1.block_sparse_moe.experts.2.w1.weight"}
    save_file(dropped, tmp_path / "hf" / "model.safetensors")
    result = run(capsys, "convert", tmp_path / "hf", "--from", "hf", tmp_path / "o")
    assert_user_error(result, "model.layers.1.block_sparse_moe.experts.2.w1.weight")
    save_file(weights, tmp_path / "hf" / "model.safetensors")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config | {"num_local_experts": 3}))
    result = run(capsys, "convert", tmp_path / "hf", "--from", "hf", tmp_path / "o")
    assert_user_error(result, "unexpected model.layers.0.block_sparse_moe.experts.3")
    capped = _moe("mixtral", capacity_factor=1.0)
    write_checkpoint(capped, tmp_path / "ckpt", tmp_path / "unused.model")
    result = run(capsys, "convert", tmp_path / "ckpt", "--to", "hf", tmp_path / "o")
    assert_user_error(result, "model.moe.capacity_factor=1.0")
