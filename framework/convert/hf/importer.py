"""`loom convert HF_DIR --from hf OUT`: a Hugging Face folder -> a Loom checkpoint + recipe for continued
pretraining.

OUT/recipe.yaml points checkpoint.dir at OUT/checkpoints, so `loom train OUT/recipe.yaml --resume auto` starts
from the imported weights at step 0 (fresh optimizer state; the schedule begins with its warmup).

The model's tokenizer comes along: a sentencepiece `tokenizer.model` (what `loom convert --to hf` puts beside its
weights) is copied to OUT/tokenizer.model, else a Hugging Face `tokenizer.json` (with tokenizer_config.json and
special_tokens_map.json) is copied into OUT/tokenizer/, and the recipe's data.tokenizer names it. Every path in the
written recipe is absolute (OUT resolved when the import runs), so it works from any directory; move OUT and the
paths must be edited (or overridden with --set).
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
HF_TOKENIZER_DIR = "tokenizer"
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


SAME_AS = {"kimi_k2": "deepseek_v3"}
"""model_types transformers has no class for whose architecture is another family's: Moonshot's Kimi-K2 ships
model_type kimi_k2 with its own modeling code (auto_map) for DeepseekV3ForCausalLM's architecture and weights."""


def _hf_config(path: Path) -> Any:
    """The transformers config object of config.json; a malformed file is one ConfigError naming it."""
    from transformers import AutoConfig

    fields = read_json_file(path, "Hugging Face config.json", key="source")
    if not isinstance(fields, dict) or not isinstance(fields.get("model_type"), str):
        rule = "is not a Hugging Face config (a JSON object with a model_type string)"
        raise ConfigError(None, "source", str(path), rule, "pass a folder written by save_pretrained")
    try:
        if fields["model_type"] in SAME_AS:  # read as the family it is, without running the checkpoint's code
            from transformers import CONFIG_MAPPING

            known = {k: v for k, v in fields.items() if k not in ("model_type", "auto_map")}
            return CONFIG_MAPPING[SAME_AS[fields["model_type"]]](**known)
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
    with staged(out, "convert-import", overwrite=overwrite) as tmp:
        checkpoint = write_imported(cfg, state, out.resolve(), source_tokenizer(source), into=tmp)
    return checkpoint


def source_tokenizer(source: Path) -> Path | None:
    """The tokenizer an HF folder carries: Loom's sentencepiece original first (its ids are the reference), else
    the folder itself when it holds a tokenizer.json; None without either."""
    from framework.data.hf_tokenizer import TOKENIZER_JSON

    if (source / TOKENIZER).is_file():
        return source / TOKENIZER
    return source if (source / TOKENIZER_JSON).is_file() else None


def copy_tokenizer(tokenizer: Path, into: Path) -> str:
    """Copy a tokenizer into the staging folder `into`; returns its name there (a file or the tokenizer/ folder)."""
    from framework.data.hf_tokenizer import hf_files, is_hf_tokenizer

    if not is_hf_tokenizer(tokenizer):
        shutil.copyfile(tokenizer, into / TOKENIZER)
        return TOKENIZER
    (into / HF_TOKENIZER_DIR).mkdir()
    for name, path in hf_files(tokenizer).items():
        shutil.copyfile(path, into / HF_TOKENIZER_DIR / name)
    return HF_TOKENIZER_DIR


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
    `tokenizer` (a sentencepiece model, or an HF tokenizer.json / folder) is copied into OUT and named by the
    recipe (copy_tokenizer)."""
    from framework.checkpoint import get_rng_state, save_checkpoint
    from framework.config.loader import dump_recipe, recipe_to_dict
    from framework.models import build_model
    from framework.train import TrainModule

    out = Path(out)
    into = out if into is None else Path(into)
    into.mkdir(parents=True, exist_ok=True)
    name = copy_tokenizer(tokenizer, into) if tokenizer is not None else None
    recipe = import_recipe(cfg, out, out / name if name is not None else None)
    model = build_model(cfg)
    model.load_state_dict(state, strict=True)
    module = TrainModule(model, recipe, torch.device("cpu"))
    # the same metadata the training Checkpointer writes, for a run that has not taken a step yet
    metadata = {"tokens": 0, "recipe": recipe_to_dict(recipe), "data_state": None,
                "rng": get_rng_state(torch.device("cpu")), "callbacks": {}}  # fmt: skip
    path = save_checkpoint(into / "checkpoints", 0, module.state_dict(), metadata)
    (into / "recipe.yaml").write_text(dump_recipe(recipe))
    return out / "checkpoints" / path.name
