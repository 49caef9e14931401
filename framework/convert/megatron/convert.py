"""`loom convert --from megatron` and `--to megatron`: megatron-core torch_dist checkpoints <-> Loom checkpoints,
without importing megatron-core (docs/megatron.md).

Import: megatron_config.yaml (or Megatron-LM's args in common.pt) -> ModelConfig; torch_dist tensors (any TP/PP/EP layout: DCP stores global shapes)
-> canonical names -> Loom state -> a step-0 Loom checkpoint + recipe, loadable on any Loom layout.
Export: a Loom checkpoint of any layout -> canonical names -> torch_dist keys -> OUT (DCP + metadata.json +
common.pt) and OUT/megatron_config.yaml, which megatron-core loads with `dist_checkpointing.load` into a
GPTModel built from that YAML (local layer spec) at any parallel layout.
"""

from __future__ import annotations

from pathlib import Path

import torch

from framework.config.errors import ConfigError
from framework.config.schema import ModelConfig
from framework.convert.hf.mapping import Rename
from framework.convert.megatron import config as mconfig
from framework.convert.megatron import mapping, torch_dist
from framework.convert.output import check, require_source, staged


def read_megatron(
    source: str | Path, megatron_config: str | Path | None = None, trust: bool = False
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(Loom ModelConfig, Loom model state dict, fp32) of a torch_dist checkpoint (an iter_XXXXXXX folder, or a
    Megatron-LM save folder: its latest iteration). Model arguments: the YAML
    megatron_config, else SOURCE/megatron_config.yaml, else Megatron-LM's `args` in SOURCE/common.pt (read with an
    allowlist; fully unpickled only with `trust`)."""
    source = torch_dist.resolve(source)
    args = _model_args(source, megatron_config, trust)
    cfg = mconfig.model_config(args)
    saved = torch_dist.read_tensors(source, keep=mapping.is_model_key)
    canonical = mapping.canonical(saved, cfg.n_layers)
    rules = mapping.renames(cfg, bool(args["transformer_config"].get("rotary_interleaved", False)))
    _check_shapes(cfg, rules, canonical)  # before any fused tensor is split by the configured head counts
    state = mapping.from_megatron(rules, canonical)
    return cfg, {k: v.float() for k, v in state.items()}  # Loom keeps fp32 master weights


def _model_args(source: Path, megatron_config: str | Path | None, trust: bool) -> dict[str, dict]:
    if megatron_config is None and not (source / mconfig.FILE).is_file():
        from framework.convert.megatron.common import lm_sections, read_lm_args

        return lm_sections(read_lm_args(source, trust))
    return mconfig.read_args(megatron_config if megatron_config is not None else source / mconfig.FILE)


def _check_shapes(cfg: ModelConfig, rules: list[Rename], canonical: dict[str, torch.Tensor]) -> None:
    """ConfigError naming the first checkpoint tensor whose shape differs from what the configured model's
    tensors map to (meta tensors: nothing is allocated)."""
    from framework.models import build_model

    with torch.device("meta"):
        expected = mapping.to_megatron(rules, build_model(cfg).state_dict())
    for name, tensor in canonical.items():
        if name in expected and tensor.shape != expected[name].shape:
            raise ConfigError(
                mconfig.FILE, name, tuple(tensor.shape),
                f"the checkpoint's tensor has this shape, the configured model needs {tuple(expected[name].shape)}",
                "pass the model arguments this checkpoint was trained with",
            )  # fmt: skip


def import_megatron(
    source: str | Path,
    out: str | Path,
    megatron_config: str | Path | None = None,
    trust: bool = False,
    *,
    overwrite: bool = False,
) -> Path:
    """Write OUT/checkpoints/step_00000000 and OUT/recipe.yaml (all at once); returns the checkpoint path. OUT
    follows the write rule of framework/outputs.py (inputs: SOURCE and the megatron_config YAML)."""
    from framework.convert.hf.importer import write_imported

    require_source(source, "a megatron-core torch_dist checkpoint")
    out = check(out, [source, megatron_config], overwrite)
    cfg, state = read_megatron(source, megatron_config, trust)
    with staged(out, "convert-import", overwrite=overwrite) as tmp:
        checkpoint = write_imported(cfg, state, out, None, into=tmp)
    return checkpoint


def export_megatron(checkpoint: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """A committed Loom checkpoint of any layout -> OUT (torch_dist) + OUT/megatron_config.yaml, all at once."""
    from framework.convert.consolidate import read_model_state
    from framework.convert.hf.convert import recipe_from_metadata

    out = check(out, [checkpoint], overwrite)  # before the (long) read
    loaded = read_model_state(checkpoint)  # a damaged shard: one line (verify.load_tensors)
    cfg = recipe_from_metadata(loaded.meta, loaded.path).model
    args = mconfig.megatron_args(cfg)  # refuses before anything is written
    state = mapping.to_megatron(mapping.renames(cfg), {k: v.detach() for k, v in loaded.tensors.items()})
    with staged(out, "convert-megatron", overwrite=overwrite) as tmp:
        torch_dist.write_tensors(mapping.torch_dist_keys(state, cfg), tmp)
        mconfig.write_args(args, tmp / mconfig.FILE)
    return Path(out)
