"""Multi-token prediction depths (model.mtp) <-> the MTP layers of Hugging Face checkpoints, for any family.

DeepSeek-V3 and GLM-4.5 checkpoints store depth k (0-based) as one more decoder layer after the main stack,
`model.layers.{L + k}.` with L = num_hidden_layers, holding the block's own tensors (named as any layer of the
family) plus

    enorm.weight, hnorm.weight, eh_proj.weight, shared_head.norm.weight      -> Loom mtp.{k}.enorm / hnorm / eh_proj / norm
    embed_tokens.weight, shared_head.head.weight                            copies of the shared embedding and head

(transformers' MtpModel reads the same names: its MtpLayer post_norm is shared_head.norm). The copies are not
Loom tensors: they are accepted and ignored on import (`is_shared_copy`) and not written on export. The block's
tensors are renamed by the family's own per-layer renames for layer index L + k, with Loom's `layers.{L + k}.`
prefix replaced by `mtp.{k}.block.`, so the block converts exactly as a main-stack layer of the same index would
(its mixer and MoE-ness follow that index, as in framework/models/mtp.py).

`loom convert --to hf` drops the depths (Hugging Face causal-LM classes do not load them: they are in their
`_keys_to_ignore_on_load_unexpected`); a family that exports them can use `mtp_renames` in both directions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from framework.config.schema import ModelConfig, MTPConfig
from framework.convert.hf.mapping import Rename, copy

LayerRenames = Callable[[ModelConfig, int], list[Rename]]
"""A family's renames of one block: (cfg, layer index i) -> Renames from Loom `layers.{i}.*` to HF names."""

EXTRA = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
         "norm.weight": "shared_head.norm.weight"}  # fmt: skip
"""Loom suffix under mtp.{k}. -> HF suffix under model.layers.{L + k}. (besides the block's own tensors)."""
SHARED_COPIES = ("embed_tokens.weight", "shared_head.head.weight")
"""Per-depth copies of the shared embedding and head that HF checkpoints may carry."""
HF_DEPTH_KEYS = ("num_nextn_predict_layers", "num_mtp_layers")


def mtp_depth(hf: Any) -> int:
    """MTP depths a transformers config declares (num_nextn_predict_layers / num_mtp_layers; 0 when absent)."""
    for key in HF_DEPTH_KEYS:
        value = getattr(hf, key, None)
        if value:
            return int(value)
    return 0


def mtp_config_fields(hf: Any, depth: int | None = None) -> dict[str, Any]:
    """{"mtp": MTPConfig(depth)} for a config with MTP layers (`depth`: override, e.g. what the weights hold),
    else {}. The loss weight is not part of a checkpoint: MTPConfig's default."""
    depth = mtp_depth(hf) if depth is None else depth
    return {"mtp": MTPConfig(depth=depth)} if depth > 0 else {}


def depth_in_state(state: dict[str, torch.Tensor], n_layers: int, layer: str = "model.layers.{i}.") -> int:
    """How many MTP layers a checkpoint's tensors hold: consecutive layers L, L + 1, ... with an eh_proj."""
    depth = 0
    while layer.format(i=n_layers + depth) + "eh_proj.weight" in state:
        depth += 1
    return depth


def mtp_renames(
    cfg: ModelConfig, layer_renames: LayerRenames, layer: str = "model.layers.{i}."
) -> list[Rename]:
    """Renames of every MTP depth of `cfg` (none without model.mtp): for depth k (0-based) and i = n_layers + k,
    the family's `layer_renames(cfg, i)` with Loom `layers.{i}.` -> `mtp.{k}.block.`, plus enorm, hnorm, eh_proj
    and the final norm (`EXTRA`). `layer`: the HF prefix of layer i (default model.layers.{i}.).

    Use: a family's `renames(cfg)` returns its main renames + mtp_renames(cfg, its_block_renames), and its
    `optional(name)` accepts `is_shared_copy(cfg, name)`; `model_config(hf)` adds `mtp_config_fields(hf)`.
    Families whose MoE experts are split per file (`to_files` / `from_files`) must cover HF layers
    `mtp_hf_layers(cfg)` too."""
    out: list[Rename] = []
    for k, i in enumerate(mtp_hf_layers(cfg)):
        ours, theirs = f"mtp.{k}.", layer.format(i=i)
        out += [_moved(r, f"layers.{i}.", f"{ours}block.") for r in layer_renames(cfg, i)]
        out += [copy(ours + loom, theirs + hf) for loom, hf in EXTRA.items()]
    return out


def mtp_hf_layers(cfg: ModelConfig) -> list[int]:
    """HF layer indices of the MTP depths: n_layers .. n_layers + D - 1."""
    depth = cfg.mtp.depth if cfg.mtp is not None else 0
    return list(range(cfg.n_layers, cfg.n_layers + depth))


def is_shared_copy(cfg: ModelConfig, name: str, layer: str = "model.layers.{i}.") -> bool:
    """An MTP layer's copy of the shared embedding or head (ignored on import)."""
    return any(name == layer.format(i=i) + c for i in mtp_hf_layers(cfg) for c in SHARED_COPIES)


def without_mtp(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """A Loom model state without its MTP depths, and how many depths were dropped (export to HF)."""
    kept = {k: v for k, v in state.items() if not k.startswith("mtp.")}
    depths = {k.split(".")[1] for k in state if k.startswith("mtp.")}
    return kept, len(depths)


def _moved(rename: Rename, old: str, new: str) -> Rename:
    """`rename` with its Loom names' prefix `old` replaced by `new` (the HF side unchanged)."""
    loom = tuple(new + name[len(old) :] if name.startswith(old) else name for name in rename.loom)
    return Rename(loom, rename.hf, rename.to_hf, rename.from_hf, rename.export_only)
