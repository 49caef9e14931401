"""Mamba-2 (Mamba2ForCausalLM): blocks of a Mamba-2 mixer alone, x + mixer(norm(x)), and a final norm_f.

Loom holds this as model.layers {pattern: [mamba2], feed_forward: false} with model.mamba2. HF fuses each mixer's
input projection and convolution; Loom splits them by logical part (framework/models/mamba2.py):
    in_proj.weight [2 inner + 2 G N + H, d] rows = [z | x | B | C | dt]  <-> in_z, in_x, in_B, in_C, in_dt
    conv1d.weight [inner + 2 G N, 1, K] (and .bias) channels = [x | B | C]  <-> x_conv, B_conv, C_conv (+ _bias)
    norm.weight (the gated RMSNorm over G groups) <-> norm_weight; dt_bias, A_log, D and out_proj one to one.
`mixer` is shared with Bamba, whose Mamba layers are the same module under another prefix.

HF switches Loom has no equivalent for are refused on import: use_bias (biases on in_proj / out_proj) and a
time_step_limit other than (0, inf) (a clamp of dt). residual_in_fp32 is accepted either way and exported true
(transformers' default): it is the dtype of a half-precision HF model's residual adds, not a weight; Loom's
residual stream follows its own precision setup (fp32 in fp32 runs and under single-device autocast, where the
weights stay fp32; the compute dtype under FSDP2's mixed precision). time_step_min / time_step_max set model.mamba2.dt_min / dt_max (init
only); time_step_floor, time_step_rank, rescale_prenorm_residual and initializer_range are init-only too.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from framework.config.errors import ConfigError
from framework.config.schema import LayersConfig, Mamba2Config, ModelConfig
from framework.convert.hf.llama import _require
from framework.convert.hf.mapping import Rename, copy

LAYER = "backbone.layers.{i}."
DT_LIMIT = (0.0, math.inf)
"""transformers' default time_step_limit: dt unclamped, what Loom's Mamba2 computes."""


def _fused(loom: list[str], hf: str, sizes: list[int], dim: int = 0) -> Rename:
    """One HF tensor = Loom's parts concatenated along `dim` (rows of in_proj, channels of conv1d)."""

    def split(fused: torch.Tensor) -> list[torch.Tensor]:
        return [t.contiguous() for t in fused.split(sizes, dim=dim)]

    return Rename(tuple(loom), hf, lambda parts: torch.cat(parts, dim=dim), split)


def _conv_weight(loom: list[str], hf: str, sizes: list[int]) -> Rename:
    """conv1d.weight [C, 1, K] <-> Loom's [C_part, K] taps (the same tap order: both are nn.Conv1d's)."""

    def split(fused: torch.Tensor) -> list[torch.Tensor]:
        return [t.contiguous() for t in fused[:, 0].split(sizes)]

    return Rename(tuple(loom), hf, lambda parts: torch.cat(parts)[:, None], split)


def mixer(cfg: ModelConfig, src: str, dst: str) -> list[Rename]:
    """Renames of one Mamba-2 mixer: Loom's module at `src` (e.g. layers.3.mamba.), HF's at `dst`."""
    m = cfg.mamba2
    assert m is not None
    gn = m.groups * m.state_dim
    parts = ["in_z", "in_x", "in_B", "in_C", "in_dt"]
    out = [
        _fused(
            [f"{src}{p}.weight" for p in parts], f"{dst}in_proj.weight", [m.inner, m.inner, gn, gn, m.heads]
        )
    ]
    conv = [m.inner, gn, gn]
    out.append(_conv_weight([f"{src}{n}_conv" for n in "xBC"], f"{dst}conv1d.weight", conv))
    if m.conv_bias:
        out.append(_fused([f"{src}{n}_conv_bias" for n in "xBC"], f"{dst}conv1d.bias", conv))
    out += [copy(f"{src}{k}", f"{dst}{k}") for k in ("dt_bias", "A_log", "D", "out_proj.weight")]
    out.append(copy(f"{src}norm_weight", f"{dst}norm.weight"))
    return out


def renames(cfg: ModelConfig) -> list[Rename]:
    out = [
        copy("tok_embeddings.weight", "backbone.embeddings.weight"),
        copy("norm.weight", "backbone.norm_f.weight"),
    ]
    for i in range(cfg.n_layers):
        layer = LAYER.format(i=i)
        out.append(copy(f"layers.{i}.attention_norm.weight", f"{layer}norm.weight"))
        out += mixer(cfg, f"layers.{i}.mamba.", f"{layer}mixer.")
    if not cfg.tie_embeddings:
        out.append(copy("output.weight", "lm_head.weight"))
    return out


def from_files(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Older Mamba-2 files name the embedding `backbone.embedding.weight`; Mamba2Model's load_state_dict hook
    renames it to `embeddings`, and so does the import."""
    old, new = "backbone.embedding.weight", "backbone.embeddings.weight"
    return {new if k == old and new not in state else k: v for k, v in state.items()}


def optional(name: str) -> bool:
    """A tied lm_head may be stored beside the embedding."""
    return name == "lm_head.weight"


def check_mixer(hf: Any, *, bias: str, dt_limit: str = "time_step_limit") -> None:
    """Refuse the mixer switches Loom's Mamba2 lacks: projection biases (`bias` names the field) and a dt clamp."""
    _require(hf, bias, not getattr(hf, bias), "false: Loom's Mamba-2 projections have no bias")
    limit = getattr(hf, dt_limit, None)
    unclamped = limit is None or tuple(float(v) for v in limit) == DT_LIMIT
    _require(hf, dt_limit, unclamped, "(0.0, inf): Loom's Mamba-2 does not clamp dt")
    _require(hf, "hidden_act", hf.hidden_act == "silu", "silu (the conv and gate activation)")


def expand(cfg: ModelConfig) -> int:
    """transformers' integer `expand`: inner = expand x d_model (the caller checked it divides)."""
    assert cfg.mamba2 is not None
    return cfg.mamba2.inner // cfg.d_model


def model_config(hf: Any) -> dict[str, Any]:
    """ModelConfig fields of a transformers Mamba2Config."""
    check_mixer(hf, bias="use_bias")
    if hf.num_heads * hf.head_dim != int(hf.expand * hf.hidden_size):
        raise ConfigError(
            "config.json", "num_heads", hf.num_heads, "num_heads x head_dim must equal expand x hidden_size",
            "import a consistent Mamba2 config",
        )  # fmt: skip
    return {
        "family": "decoder",
        "vocab_size": hf.vocab_size,
        "d_model": hf.hidden_size,
        "n_layers": hf.num_hidden_layers,
        # no attention: the head fields only have to validate; the SSM heads serve
        "n_heads": hf.num_heads,
        "head_dim": hf.head_dim,
        "norm": "rmsnorm",
        "norm_eps": hf.layer_norm_epsilon,
        "bias": False,
        "position": "none",
        # Mamba-2 has no length limit; an export records Loom's as n_positions
        "max_seq_len": int(getattr(hf, "n_positions", None) or 4096),
        "tie_embeddings": bool(hf.tie_word_embeddings),
        "layers": LayersConfig(pattern=["mamba2"], feed_forward=False),
        "mamba2": mamba2_section(
            hf,
            ("num_heads", "head_dim", "state_size", "n_groups", "conv_kernel", "use_conv_bias", "chunk_size"),
        ),  # fmt: skip
    }


def mamba2_section(hf: Any, names: tuple[str, ...]) -> Mamba2Config:
    """model.mamba2 from the transformers fields `names` (heads, head_dim, state, groups, conv taps, conv bias,
    chunk, in that order); dt_min / dt_max from time_step_min / time_step_max where the config has
    them (Bamba does not: Loom's defaults, which equal Mamba2Config's)."""
    values = [getattr(hf, n) for n in names]
    keys = ("heads", "head_dim", "state_dim", "groups", "conv_kernel", "conv_bias", "chunk_size")
    section = dict(zip(keys, values, strict=True))
    section["conv_bias"] = bool(section["conv_bias"])
    if hasattr(hf, "time_step_min"):
        section |= {"dt_min": float(hf.time_step_min), "dt_max": float(hf.time_step_max)}
    return Mamba2Config(**section)
