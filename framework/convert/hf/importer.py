"""`loom convert HF_DIR --from hf OUT`: a Hugging Face folder -> a Loom checkpoint + recipe for continued
pretraining.

OUT/recipe.yaml points checkpoint.dir at OUT/checkpoints, so `loom train OUT/recipe.yaml --resume auto` starts
from the imported weights at step 0 (fresh optimizer state; the schedule begins with its warmup).
"""

from __future__ import annotations

from pathlib import Path

import torch

from framework.config.errors import ConfigError
from framework.config.schema import ModelConfig, Recipe
from framework.convert.hf.convert import config_from_hf, import_state
from framework.convert.hf.weights import load_weights

OBJECTIVE = {"decoder": "causal", "encoder": "mlm", "encoder_decoder": "span_corruption"}


def read_hf(directory: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(Loom ModelConfig, Loom model state dict) of a Hugging Face model folder."""
    from transformers import AutoConfig

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ConfigError(
            None, "source", str(directory), "has no config.json",
            "pass a folder written by save_pretrained (or by loom convert --to hf)",
        )  # fmt: skip
    state = {k: v.float() for k, v in load_weights(directory).items()}  # Loom keeps fp32 master weights
    cfg = config_from_hf(AutoConfig.from_pretrained(str(directory), local_files_only=True), state)
    return cfg, import_state(cfg, state)


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


def import_hf(source: str | Path, out: str | Path) -> Path:
    """Write OUT/checkpoints/step_00000000 and OUT/recipe.yaml; returns the checkpoint path."""
    cfg, state = read_hf(source)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return write_imported(cfg, state, out, _copy_tokenizer(Path(source), out))


def write_imported(
    cfg: ModelConfig, state: dict[str, torch.Tensor], out: Path, tokenizer: Path | None
) -> Path:
    """OUT/checkpoints/step_00000000 holding `state` (a Loom model state dict) and OUT/recipe.yaml around cfg,
    written exactly as training writes a checkpoint; shared by every `loom convert --from` format."""
    from framework.checkpoint import get_rng_state, save_checkpoint
    from framework.config.loader import dump_recipe, recipe_to_dict
    from framework.models import build_model
    from framework.train import TrainModule

    out.mkdir(parents=True, exist_ok=True)
    recipe = import_recipe(cfg, out, tokenizer)
    model = build_model(cfg)
    model.load_state_dict(state, strict=True)
    module = TrainModule(model, recipe, torch.device("cpu"))
    # the same metadata the training Checkpointer writes, for a run that has not taken a step yet
    metadata = {"tokens": 0, "recipe": recipe_to_dict(recipe), "data_state": None,
                "rng": get_rng_state(torch.device("cpu")), "callbacks": {}}  # fmt: skip
    path = save_checkpoint(out / "checkpoints", 0, module.state_dict(), metadata)
    (out / "recipe.yaml").write_text(dump_recipe(recipe))
    return path


def _copy_tokenizer(source: Path, out: Path) -> Path | None:
    """The sentencepiece model beside the weights (written by loom convert --to hf), if any."""
    found = source / "tokenizer.model"
    if not found.is_file():
        return None
    target = out / "tokenizer.model"
    target.write_bytes(found.read_bytes())
    return target
