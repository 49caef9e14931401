"""`loom convert HF_DIR --from hf OUT`: a Hugging Face folder -> a Loom checkpoint + recipe for continued
pretraining.

OUT/recipe.yaml points checkpoint.dir at OUT/checkpoints, so `loom train OUT/recipe.yaml --resume auto` starts
from the imported weights at step 0 (fresh optimizer state; the schedule begins with its warmup).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from framework.config.errors import ConfigError, first_line
from framework.config.schema import ModelConfig, Recipe
from framework.convert.hf.convert import config_from_hf, import_state
from framework.convert.hf.weights import load_weights
from framework.convert.output import check, require_source, staged
from framework.outputs import read_json_file

TOKENIZER = "tokenizer.model"
OBJECTIVE = {"decoder": "causal", "encoder": "mlm", "encoder_decoder": "span_corruption"}


def read_hf(directory: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(Loom ModelConfig, Loom model state dict) of a Hugging Face model folder."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ConfigError(
            None, "source", str(directory), "has no config.json",
            "pass a folder written by save_pretrained (or by loom convert --to hf)",
        )  # fmt: skip
    hf = _hf_config(directory / "config.json")
    state = {k: v.float() for k, v in load_weights(directory).items()}  # Loom keeps fp32 master weights
    cfg = config_from_hf(hf, state)
    return cfg, import_state(cfg, state)


def _hf_config(path: Path) -> Any:
    """The transformers config object of config.json; a malformed file is one ConfigError naming it."""
    from transformers import AutoConfig

    fields = read_json_file(path, "Hugging Face config.json", key="source")
    if not isinstance(fields, dict) or not isinstance(fields.get("model_type"), str):
        rule = "is not a Hugging Face config (a JSON object with a model_type string)"
        raise ConfigError(None, "source", str(path), rule, "pass a folder written by save_pretrained")
    try:
        return AutoConfig.from_pretrained(str(path.parent), local_files_only=True)
    except Exception as error:  # noqa: BLE001 - transformers' refusals (e.g. huggingface_hub's strict dataclass
        # validation) share no base class; any of them means this config.json is not one it reads
        rule = f"is not a config transformers can read ({type(error).__name__}: {first_line(error)})"
        raise ConfigError(None, "source", str(path), rule, "fix or restore config.json") from None


def import_recipe(cfg: ModelConfig, out: Path, tokenizer: Path | None) -> Recipe:
    """A training recipe around the imported model; data paths stay the defaults unless a tokenizer came along."""
    recipe = Recipe(model=cfg)
    recipe.data.objective = OBJECTIVE[cfg.family]
    recipe.data.seq_len = min(recipe.data.seq_len, cfg.max_seq_len)
    if tokenizer is not None:
        recipe.data.tokenizer = str(tokenizer)
    recipe.logging.run_dir = str(out / "run")
    recipe.checkpoint.dir = str(out / "checkpoints")
    recipe.validate()
    return recipe


def import_hf(source: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write OUT/checkpoints/step_00000000 and OUT/recipe.yaml (all at once: a staged folder renamed onto OUT);
    returns the checkpoint path. OUT may not be SOURCE, nor hold or lie inside it; an existing non-empty OUT is
    refused unless `overwrite`, which replaces it whole (never a new checkpoint beside an old run's)."""
    source = require_source(source, "a Hugging Face model folder")
    out = check(out, [source], overwrite)
    cfg, state = read_hf(source)
    tokenizer = source / TOKENIZER  # the sentencepiece model loom convert --to hf puts beside the weights
    with staged(out, "convert-import", overwrite=overwrite) as tmp:
        checkpoint = write_imported(cfg, state, out, tokenizer if tokenizer.is_file() else None, into=tmp)
    return checkpoint


def write_imported(
    cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    out: Path,
    tokenizer: Path | None,
    *,
    into: Path | None = None,
) -> Path:
    """OUT/checkpoints/step_00000000 holding `state` (a Loom model state dict) and OUT/recipe.yaml around cfg,
    written exactly as training writes a checkpoint; shared by every `loom convert --from` format. The files go
    into `into` (a staging folder that becomes OUT) when given; the recipe's paths always name OUT. A
    sentencepiece `tokenizer` is copied to OUT/tokenizer.model and named by the recipe."""
    from framework.checkpoint import get_rng_state, save_checkpoint
    from framework.config.loader import dump_recipe, recipe_to_dict
    from framework.models import build_model
    from framework.train import TrainModule

    out = Path(out)
    into = out if into is None else Path(into)
    into.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, into / TOKENIZER)
    recipe = import_recipe(cfg, out, out / TOKENIZER if tokenizer is not None else None)
    model = build_model(cfg)
    model.load_state_dict(state, strict=True)
    module = TrainModule(model, recipe, torch.device("cpu"))
    # the same metadata the training Checkpointer writes, for a run that has not taken a step yet
    metadata = {"tokens": 0, "recipe": recipe_to_dict(recipe), "data_state": None,
                "rng": get_rng_state(torch.device("cpu")), "callbacks": {}}  # fmt: skip
    path = save_checkpoint(into / "checkpoints", 0, module.state_dict(), metadata)
    (into / "recipe.yaml").write_text(dump_recipe(recipe))
    return out / "checkpoints" / path.name
