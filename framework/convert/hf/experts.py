"""Expert weights of the MoE families in both Hugging Face layouts, and Loom's renames onto them.

transformers 5 holds each layer's experts as two 3-D tensors, `mlp.experts.gate_up_proj` [E, 2H, D] (gate rows
then up rows) and `mlp.experts.down_proj` [E, D, H], beside the router `mlp.gate.weight` [E, D]. Checkpoint files
(the Hub's, and what `save_pretrained` writes by default) keep one Linear per expert instead, under
family-specific names (`FileLayout`). Loom's renames target the fused in-memory names, which are one-to-one with
Loom's stacked w1/w3/w2 [E, H, D] / [E, D, H]; `to_files` / `from_files` convert between the two layouts, so an
export is readable by any tool that reads the Hub checkpoints and an import accepts either layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from framework.config.errors import ConfigError
from framework.config.schema import ModelConfig
from framework.convert.hf.mapping import Rename, copy
from framework.convert.hf.mtp import mtp_hf_layers

Tensor = torch.Tensor
FUSED = re.compile(
    r"^(?P<layer>model\.layers\.\d+)\.mlp\.(?P<rest>gate\.weight|experts\.(gate_up|down)_proj)$"
)


@dataclass(frozen=True)
class FileLayout:
    """Per-expert names in a family's files: the MoE block's module name and its gate/up/down projections."""

    block: str
    gate: str
    up: str
    down: str


def _fuse(tensors: list[Tensor]) -> Tensor:
    return torch.cat(tensors, dim=1)  # [E, H, D] gate, [E, H, D] up -> [E, 2H, D], transformers' chunk order


def _unfuse(fused: Tensor) -> list[Tensor]:
    gate, up = fused.chunk(2, dim=1)
    return [gate.contiguous(), up.contiguous()]


def moe_renames(i: int, layer: str) -> list[Rename]:
    """Router and experts of Loom block i onto transformers' fused names under `layer` (model.layers.{i}.).
    Both routers are a bias-free Linear [E, D] whose row e scores expert e, so it is a plain copy."""
    src, dst = f"layers.{i}.feed_forward.", f"{layer}mlp."
    return [
        copy(f"{src}router.gate.weight", f"{dst}gate.weight"),
        Rename((f"{src}experts.w1", f"{src}experts.w3"), f"{dst}experts.gate_up_proj", _fuse, _unfuse),
        copy(f"{src}experts.w2", f"{dst}experts.down_proj"),
    ]


def to_files(state: dict[str, Tensor], files: FileLayout) -> dict[str, Tensor]:
    """Fused MoE tensors -> one Linear weight per expert under the family's file names; others unchanged."""
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        match = FUSED.match(name)
        if match is None:
            out[name] = tensor
            continue
        base = f"{match['layer']}.{files.block}."
        if match["rest"] == "gate.weight":
            out[base + "gate.weight"] = tensor
        elif match["rest"] == "experts.down_proj":
            out |= {f"{base}experts.{e}.{files.down}.weight": t.contiguous() for e, t in enumerate(tensor)}
        else:
            gate, up = _unfuse(tensor)
            out |= {f"{base}experts.{e}.{files.gate}.weight": t.contiguous() for e, t in enumerate(gate)}
            out |= {f"{base}experts.{e}.{files.up}.weight": t.contiguous() for e, t in enumerate(up)}
    return out


def from_files(state: dict[str, Tensor], files: FileLayout, cfg: ModelConfig) -> dict[str, Tensor]:
    """Either layout -> the fused one. Per-expert tensors of cfg's MoE layers (the MTP depths' too, HF layers
    n_layers + k) are stacked (every expert 0..E-1 must be present); anything else passes through for the
    name-by-name check."""
    assert cfg.moe is not None
    out = dict(state)
    for i in cfg.moe_layers + [j for j in mtp_hf_layers(cfg) if cfg.is_moe_layer(j)]:
        base = f"model.layers.{i}.{files.block}."
        if base + "gate.weight" in out:  # a fused-layout file names the block `mlp` and has no such key
            out[f"model.layers.{i}.mlp.gate.weight"] = out.pop(base + "gate.weight")
        per_expert = {
            p: _pop_experts(out, base, p, cfg.moe.n_experts) for p in (files.gate, files.up, files.down)
        }
        if all(t is None for t in per_expert.values()):
            continue  # already fused (save_pretrained(save_original_format=False))
        fused = f"model.layers.{i}.mlp.experts."
        out[fused + "gate_up_proj"] = _fuse(
            [_need(per_expert, files.gate, base), _need(per_expert, files.up, base)]
        )
        out[fused + "down_proj"] = _need(per_expert, files.down, base)
    return out


def _pop_experts(state: dict[str, Tensor], base: str, proj: str, n_experts: int) -> Tensor | None:
    """Stack base.experts.{e}.proj.weight for e < n_experts ([E, out, in]); None if no expert has it."""
    names = [f"{base}experts.{e}.{proj}.weight" for e in range(n_experts)]
    present = [n for n in names if n in state]
    if not present:
        return None
    if len(present) != len(names):
        missing = sorted(set(names) - set(present))
        raise ConfigError(
            None, "Hugging Face weights", missing[0],
            f"is missing ({len(missing)} of {n_experts} experts' {proj} tensors absent)",
            "convert a complete checkpoint whose config.json has this num_experts",
        )  # fmt: skip
    return torch.stack([state.pop(n) for n in names])


def _need(per_expert: dict[str, Tensor | None], proj: str, base: str) -> Tensor:
    tensor = per_expert[proj]
    if tensor is None:
        raise ConfigError(
            None, "Hugging Face weights", f"{base}experts.0.{proj}.weight",
            "is missing while other projections of these experts are present",
            "convert a complete checkpoint",
        )  # fmt: skip
    return tensor
