"""One Mamba-2 mixer's weights between transformers' Mamba2Mixer and Loom's `Mamba2` (framework/models/mamba2.py).

HF fuses the input projection and the convolution; Loom splits them by logical part:
    in_proj.weight [inner + conv_dim + H, d] rows = [z (inner), x (inner), B (G*N), C (G*N), dt (H)]
    conv1d.weight  [conv_dim, 1, K], conv1d.bias [conv_dim], channels = [x (inner), B (G*N), C (G*N)]
    dt_bias, A_log, D [H]; norm.weight [inner] -> norm_weight; out_proj.weight unchanged.
Keys are relative to one mixer (HF's `backbone.layers.{i}.mixer.`, Loom's mixer module); the model-level
conversion adds the prefixes. HF's use_bias (in_proj / out_proj biases) is not mapped: Loom's Mamba2 has none.
"""

from __future__ import annotations

import torch

from framework.config.schema import ModelConfig

_SAME = ("dt_bias", "A_log", "D", "out_proj.weight")


def _widths(cfg: ModelConfig) -> tuple[int, int, int]:
    m = cfg.mamba2
    return m.inner, m.groups * m.state_dim, m.heads


def from_hf_mamba2_state(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Loom `Mamba2` state dict from one HF Mamba2Mixer's state dict."""
    inner, gn, heads = _widths(cfg)
    z, x, B, C, dt = hf_state["in_proj.weight"].split([inner, inner, gn, gn, heads], dim=0)
    out = {"in_z.weight": z, "in_x.weight": x, "in_B.weight": B, "in_C.weight": C, "in_dt.weight": dt}
    for name, w in zip(("x", "B", "C"), hf_state["conv1d.weight"][:, 0].split([inner, gn, gn]), strict=True):
        out[f"{name}_conv"] = w
    if "conv1d.bias" in hf_state:
        for name, b in zip(("x", "B", "C"), hf_state["conv1d.bias"].split([inner, gn, gn]), strict=True):
            out[f"{name}_conv_bias"] = b
    out["norm_weight"] = hf_state["norm.weight"]
    out.update({k: hf_state[k] for k in _SAME})
    return {k: v.clone() for k, v in out.items()}


def to_hf_mamba2_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """One HF Mamba2Mixer's state dict from a Loom `Mamba2` state dict (the inverse of from_hf_mamba2_state)."""
    parts = ("in_z", "in_x", "in_B", "in_C", "in_dt")
    out = {"in_proj.weight": torch.cat([state[f"{p}.weight"] for p in parts], dim=0)}
    out["conv1d.weight"] = torch.cat([state[f"{n}_conv"] for n in ("x", "B", "C")], dim=0)[:, None]
    if "x_conv_bias" in state:
        out["conv1d.bias"] = torch.cat([state[f"{n}_conv_bias"] for n in ("x", "B", "C")], dim=0)
    out["norm.weight"] = state["norm_weight"]
    out.update({k: state[k] for k in _SAME})
    return {k: v.clone() for k, v in out.items()}
