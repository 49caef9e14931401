"""Loom checkpoint <-> Hugging Face folder, for the families in `FAMILIES`.

Export: recipe (from the checkpoint's meta.json) -> family -> renamed tensors -> safetensors, config.json,
generation_config.json and tokenizer files. Import: config.json -> ModelConfig -> tensors -> a step-0 Loom
checkpoint written exactly as training writes one (so `loom train --resume` continues from it) plus a recipe.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from framework.config.errors import ConfigError
from framework.config.schema import ModelConfig, Recipe
from framework.convert.hf import (
    bamba,
    bert,
    bloom,
    deepseek_v3,
    gemma,
    gemma2,
    gemma3,
    glm4_moe,
    gpt2,
    gpt_oss,
    llama,
    mamba2,
    mistral,
    mixtral,
    olmo2,
    phi3,
    qwen2,
    qwen3,
    qwen3_moe,
    qwen3_next,
    t5,
)
from framework.convert.hf.configs import check_representable, hf_config
from framework.convert.hf.mapping import check_shapes, from_hf_state, to_hf_state
from framework.convert.hf.mtp import without_mtp
from framework.convert.hf.weights import DEFAULT_SHARD_BYTES, save_weights
from framework.convert.output import check, staged

# transformers' model_type -> the module mapping that family's weights
FAMILIES: dict[str, ModuleType] = {
    "llama": llama,
    "mistral": mistral,
    "qwen3": qwen3,
    "bloom": bloom,
    "bert": bert,
    "t5": t5,
    "mixtral": mixtral,
    "qwen3_moe": qwen3_moe,
    "qwen3_next": qwen3_next,
    "glm4_moe": glm4_moe,
    "deepseek_v3": deepseek_v3,
    "kimi_k2": deepseek_v3,  # Moonshot's config.json: the DeepSeek-V3 architecture under its own model_type
    "gpt_oss": gpt_oss,
    "qwen2": qwen2,
    "phi3": phi3,
    "gpt2": gpt2,
    "gemma": gemma,
    "gemma2": gemma2,
    "gemma3_text": gemma3,
    "olmo2": olmo2,
    "olmo3": olmo2,  # OLMo 3 is OLMo 2 with per-layer windows (layer_types)
    "mamba2": mamba2,
    "bamba": bamba,
}


def _family(cfg: ModelConfig) -> ModuleType:
    """The weight mapping of cfg's HF family; a family with a config but no mapping would be refused."""
    family = check_representable(cfg)
    if family not in FAMILIES:
        raise ConfigError(
            None, "model", family, "has a Hugging Face config but no weight conversion yet",
            f"convert one of: {', '.join(FAMILIES)}",
        )  # fmt: skip
    return FAMILIES[family]


def export_state(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Loom model state dict -> HF state dict as files lay it out (ConfigError for an unrepresentable
    architecture). MoE families rename onto transformers' in-memory names, then split them per expert. The
    multi-token prediction depths (model.mtp) are dropped: HF causal-LM classes do not load them
    (framework/convert/hf/mtp.py)."""
    family = _family(cfg)
    if not getattr(family, "EXPORTS_MTP", False):  # GLM-4.5 writes its depths as layers L + k
        state, _ = without_mtp(state)
        cfg = dataclasses.replace(cfg, mtp=None)
    hf_state = to_hf_state(family.renames(cfg), state)
    return family.to_files(cfg, hf_state) if hasattr(family, "to_files") else hf_state


def import_state(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF state dict -> Loom model state dict, checked name by name and shape by shape."""
    family = _family(cfg)
    if hasattr(family, "from_files"):
        state = family.from_files(cfg, state)  # per-expert file tensors -> the in-memory names renames use
    ours = from_hf_state(family.renames(cfg), state, family.optional)
    check_shapes(ours, _expected_state(cfg), "Hugging Face weights")
    return ours


def _expected_state(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    from framework.models import build_model

    with torch.device("meta"):
        return build_model(cfg).state_dict()


def config_from_hf(hf: Any, state: dict[str, torch.Tensor] | None = None) -> ModelConfig:
    """The Loom ModelConfig of a transformers config object (ConfigError for an unsupported model_type). A family
    whose config cannot say whether the head is tied (T5 in transformers 5) decides from the weights `state`."""
    module = FAMILIES.get(hf.model_type)
    if module is None:
        raise ConfigError(
            "config.json", "model_type", hf.model_type, "no Loom mapping for this family",
            f"import one of: {', '.join(FAMILIES)}",
        )  # fmt: skip
    fields = module.model_config(hf)
    if state is not None and hasattr(module, "tied"):
        fields["tie_embeddings"] = module.tied(state)
    if state is not None and hasattr(module, "state_fields"):
        fields |= module.state_fields(
            hf, state
        )  # what only the weights say (GLM-4.5: the MTP layers present)
    cfg = ModelConfig(**fields)
    try:
        cfg.validate()
    except ConfigError as error:
        raise ConfigError("config.json", error.key, error.value, error.rule, error.fix) from None
    check_representable(cfg)  # the round trip back to HF must exist too
    return cfg


# ----------------------------------------------------------------------------------------------------- export


def save_hf(
    cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    out: str | Path,
    *,
    tokenizer: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write a Loom model state as a Hugging Face folder that `from_pretrained` loads offline."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf_state = export_state(cfg, {k: v.detach().cpu() for k, v in state.items()})
    ids = _token_ids(cfg, tokenizer)
    _, config = hf_config(cfg)
    for key, value in ids.items():
        setattr(config, key, value)
    config.architectures = [hf_config(cfg)[0]]
    if not hasattr(config, "max_position_embeddings"):
        # T5 and BLOOM have no length limit in their config; recorded so an import restores max_seq_len
        config.n_positions = cfg.max_seq_len
    config.save_pretrained(str(out))
    _generation_config(cfg, ids).save_pretrained(str(out))
    save_weights(hf_state, out, max_shard_bytes)
    if tokenizer is not None:
        _save_tokenizer(Path(tokenizer), out)
    return out


def _save_tokenizer(tokenizer: Path, out: Path) -> None:
    """An HF tokenizer's own files as they are; a sentencepiece model as the tokenizer.json transformers reads,
    plus the original (so an import trains on with exactly its ids)."""
    from framework.data.hf_tokenizer import hf_files, is_hf_tokenizer

    if is_hf_tokenizer(tokenizer):
        for name, path in hf_files(tokenizer).items():
            shutil.copyfile(path, out / name)
        return
    from framework.convert.hf.tokenizer import save_hf_tokenizer

    save_hf_tokenizer(tokenizer, out)
    shutil.copyfile(tokenizer, out / "tokenizer.model")


def _token_ids(cfg: ModelConfig, tokenizer: str | Path | None) -> dict[str, int]:
    """bos/eos/pad (and T5's decoder start = pad) ids from the tokenizer, after checking it fits the vocab."""
    if tokenizer is None:
        # Loom's tokenizer layout fixes pad = 0, which T5 also uses to start decoding
        return {"decoder_start_token_id": 0} if cfg.family == "encoder_decoder" else {}
    from framework.data.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer)
    if tok.vocab_size > cfg.vocab_size:
        raise ConfigError(
            None, "data.tokenizer", str(tokenizer),
            f"has {tok.vocab_size} pieces but model.vocab_size={cfg.vocab_size}: ids would fall outside the embedding",
            "pass the tokenizer the model was trained with (--tokenizer), or export with --no-tokenizer",
        )  # fmt: skip
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    if cfg.family == "encoder_decoder":
        ids["decoder_start_token_id"] = tok.pad_id  # what Loom's span-corruption objective starts with
    return {k: v for k, v in ids.items() if v >= 0}


def _generation_config(cfg: ModelConfig, ids: dict[str, int]) -> Any:
    from transformers import GenerationConfig

    # greedy by default: the same decode as framework.models.generate.greedy_decode
    return GenerationConfig(do_sample=False, **ids)


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    tokenizer: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    with_tokenizer: bool = True,
) -> Path:
    """`loom convert CKPT --to hf OUT`: the model of a committed checkpoint of any parallel layout (and its
    recipe's tokenizer, or `tokenizer`; `with_tokenizer=False` (--no-tokenizer): the weights and config alone). The checkpoint is verified first, and only its model tensors are read, as full tensors.
    OUT appears whole or not at all: an existing non-empty OUT is refused unless `overwrite`, which replaces it
    whole (an old sharded export never stays beside a new single file); OUT may not be or hold an input."""
    from framework.convert.consolidate import read_model_state

    out = check(out, [checkpoint, tokenizer], overwrite)  # before the (long) read
    loaded = read_model_state(checkpoint)  # a damaged shard: one line (verify.load_tensors)
    recipe = recipe_from_metadata(loaded.meta, loaded.path)
    _family(recipe.model)  # refuse before any work is written
    if tokenizer is None and with_tokenizer:
        tokenizer = _recipe_tokenizer(recipe)
        check(out, [tokenizer], overwrite)  # the recipe's tokenizer is an input too
    if not with_tokenizer:
        tokenizer = None
    with staged(out, "convert-hf", overwrite=overwrite) as tmp:
        save_hf(recipe.model, loaded.tensors, tmp, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes)
    return out


def export_note(checkpoint: str | Path) -> str:
    """What the one-line output of `loom convert --to hf` adds about the export: the multi-token prediction
    depths it left out (model.mtp), or nothing."""
    from framework.checkpoint.io import resolve_checkpoint
    from framework.convert.consolidate import read_meta_json

    step_dir = resolve_checkpoint(checkpoint)
    recipe = recipe_from_metadata(read_meta_json(step_dir / "meta.json"), step_dir)
    mtp = recipe.model.mtp
    if mtp is None:
        return ""
    if getattr(_family(recipe.model), "EXPORTS_MTP", False):
        return (
            f" (with the {mtp.depth} multi-token prediction depth(s) of model.mtp as layers after the stack)"
        )
    return (
        f" (without the {mtp.depth} multi-token prediction depth(s) of model.mtp: HF models do not load them)"
    )


def recipe_from_metadata(metadata: dict[str, Any], path: Path) -> Recipe:
    from framework.config.loader import to_dataclass

    if "recipe" not in metadata:
        raise ConfigError(
            None,
            "checkpoint",
            str(path),
            "meta.json has no recipe",
            "pass a checkpoint written by loom train",
        )
    try:
        recipe = to_dataclass(Recipe, metadata["recipe"], "")
        recipe.validate()
    except ConfigError as error:
        raise ConfigError(str(path / "meta.json"), error.key, error.value, error.rule, error.fix) from None
    return recipe


def _recipe_tokenizer(recipe: Recipe) -> Path:
    path = Path(recipe.data.tokenizer)
    if not path.exists():
        raise ConfigError(
            None, "data.tokenizer", str(path), "the checkpoint's recipe names a tokenizer that does not exist",
            "pass the tokenizer with --tokenizer PATH, or export the weights alone with --no-tokenizer",
        )  # fmt: skip
    return path
