"""Name-by-name mapping between a Loom state dict and a Hugging Face one, shared by every family.

A family lists `Rename`s: which Loom tensors make which HF tensor and how. Most are one-to-one copies; the
exceptions are RoPE projections (Loom rotates interleaved channel pairs, HF `rotate_half` rotates the two halves
of each head, so rows are permuted) and BLOOM's fused query/key/value matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from framework.config.errors import ConfigError

Tensor = torch.Tensor


def _same(tensors: list[Tensor]) -> Tensor:
    return tensors[0]


def _one(tensor: Tensor) -> list[Tensor]:
    return [tensor]


@dataclass(frozen=True)
class Rename:
    """HF tensor `hf` = to_hf(Loom tensors `loom`); from_hf is the exact inverse (a permutation or a split)."""

    loom: tuple[str, ...]
    hf: str
    to_hf: Callable[[list[Tensor]], Tensor] = field(default=_same)
    from_hf: Callable[[Tensor], list[Tensor]] = field(default=_one)
    export_only: bool = False
    """A duplicate HF expects to find (a tied copy); written on export, ignored on import."""


def copy(loom: str, hf: str) -> Rename:
    return Rename((loom,), hf)


def duplicate(loom: str, hf: str) -> Rename:
    return Rename((loom,), hf, export_only=True)


def interleaved_to_halves(x: Tensor, heads: int, rotated: int | None = None) -> Tensor:
    """Per head, rows (0, 1, 2, 3, ..., d-1) in Loom's pair order -> (0, 2, 4, ..., 1, 3, 5, ...): channel
    pair i = (2i, 2i+1) becomes HF's (i, i + d/2). Works on weights [H*d, in], biases [H*d] and norms [d].
    rotated: with partial rotary, only each head's first `rotated` rows are permuted (d = rotated)."""
    return _permute_heads(x, heads, rotated, (-1, 2))


def halves_to_interleaved(x: Tensor, heads: int, rotated: int | None = None) -> Tensor:
    """Inverse of interleaved_to_halves."""
    return _permute_heads(x, heads, rotated, (2, -1))


def _permute_heads(x: Tensor, heads: int, rotated: int | None, pairs: tuple[int, int]) -> Tensor:
    """Per head, the first `rotated` rows viewed as `pairs` and transposed (the rest unchanged)."""
    per_head = x.shape[0] // heads
    rotated = per_head if rotated is None else rotated
    by_head = x.unflatten(0, (heads, per_head))
    turned = by_head[:, :rotated].unflatten(1, pairs).transpose(1, 2).flatten(1, 2)
    return torch.cat((turned, by_head[:, rotated:]), dim=1).flatten(0, 1).contiguous()


def rope(loom: str, hf: str, heads: int, rotated: int | None = None) -> Rename:
    """A tensor whose leading dimension holds `heads` RoPE-rotated heads (q/k projections, their biases,
    QK-norm weights with heads=1); `rotated`: the rotated rows per head under partial rotary."""
    return Rename(
        (loom,),
        hf,
        lambda t: interleaved_to_halves(t[0], heads, rotated),
        lambda t: [halves_to_interleaved(t, heads, rotated)],
    )


def to_hf_state(renames: list[Rename], state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Loom state -> HF state; every Loom tensor must be used exactly once (nothing silently dropped)."""
    missing = sorted({name for r in renames for name in r.loom if name not in state})
    unused = sorted(set(state) - {name for r in renames for name in r.loom})
    _refuse("checkpoint", missing, unused)
    out = {r.hf: r.to_hf([state[name] for name in r.loom]).contiguous() for r in renames}
    # safetensors refuses tensors sharing memory: duplicates get their own copy
    return {r.hf: out[r.hf].clone() if r.export_only else out[r.hf] for r in renames}


def from_hf_state(
    renames: list[Rename], state: Mapping[str, Tensor], optional: Callable[[str], bool] = lambda _: False
) -> dict[str, Tensor]:
    """HF state -> Loom state. HF tensors matched by `optional` (duplicates of tied weights, buffers) may be
    present without being used."""
    used = [r for r in renames if not r.export_only]
    duplicates = {r.hf for r in renames if r.export_only}
    missing = sorted(r.hf for r in used if r.hf not in state)
    unused = sorted(k for k in set(state) - {r.hf for r in used} - duplicates if not optional(k))
    _refuse("Hugging Face weights", missing, unused)
    out: dict[str, Tensor] = {}
    for r in used:
        out.update(zip(r.loom, r.from_hf(state[r.hf]), strict=True))
    return out


def _refuse(what: str, missing: list[str], unused: list[str]) -> None:
    if missing or unused:
        parts = [f"missing {_names(missing)}"] if missing else []
        parts += [f"unexpected {_names(unused)}"] if unused else []
        raise ConfigError(
            None,
            what,
            "tensors",
            f"do not match the architecture: {'; '.join(parts)}",
            "convert a checkpoint of the architecture its config describes (config and weights must agree)",
        )


def _names(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_shapes(state: Mapping[str, Tensor], expected: Mapping[str, Tensor], what: str) -> None:
    """ConfigError naming the first tensor whose shape differs from the architecture's."""
    for name, tensor in state.items():
        want = expected[name].shape
        if tensor.shape != want:
            raise ConfigError(
                None,
                what,
                name,
                f"has shape {tuple(tensor.shape)}, the architecture needs {tuple(want)}",
                "check that config.json belongs to these weights",
            )


def layer_period(pattern: list[str]) -> list[str]:
    """The shortest prefix that repeats into the whole per-layer list (Loom's model.layers.pattern repeats from
    the start), so [m, m, a, m, m, a] imports as [m, m, a]; the full list when nothing shorter repeats."""
    n = len(pattern)
    size = next(p for p in range(1, n + 1) if all(pattern[i] == pattern[i % p] for i in range(n)))
    return pattern[:size]
