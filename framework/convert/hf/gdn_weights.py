"""Gated DeltaNet weights between transformers' Qwen3NextGatedDeltaNet layout and Loom's GatedDeltaNet.

transformers fuses the input projections per key-head group g (r = heads / key_heads value heads per group):
`in_proj_qkvz.weight` rows are, for g = 0 .. key_heads-1, [q_g (dk), k_g (dk), v_g (r*dv), z_g (r*dv)], and
`in_proj_ba.weight` rows are, per group, [b_g (r), a_g (r)] (fix_query_key_value_ordering). Value head g*r + i is
the i-th of group g, so the per-group v / z / b / a blocks stacked in group order are Loom's head-major wv / wz /
wb / wa. `conv1d.weight` [2*key_dim + value_dim, 1, K] is over the channels [q, k, v] in head-major order (after
the split), i.e. Loom's q_conv, k_conv, v_conv stacked. Keys are relative to the mixer (no layer prefix).
"""

from __future__ import annotations

import torch

from framework.config.schema import ModelConfig

Tensor = torch.Tensor
SAME = {"A_log": "A_log", "dt_bias": "dt_bias", "norm.weight": "norm_weight", "out_proj.weight": "wo.weight"}
"""transformers name -> Loom name for the tensors kept as they are."""


def _sizes(cfg: ModelConfig) -> tuple[int, int, int, int]:
    gdn = cfg.gdn
    key_heads = gdn.resolved_key_heads
    return key_heads, gdn.heads // key_heads, gdn.key_head_dim, gdn.value_head_dim


def from_hf_gdn_state(hf_state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """transformers Qwen3NextGatedDeltaNet state dict -> Loom GatedDeltaNet state dict."""
    key_heads, r, dk, dv = _sizes(cfg)
    d = cfg.d_model
    qkvz = hf_state["in_proj_qkvz.weight"].reshape(key_heads, 2 * dk + 2 * r * dv, d)
    q, k, v, z = qkvz.split([dk, dk, r * dv, r * dv], dim=1)
    b, a = hf_state["in_proj_ba.weight"].reshape(key_heads, 2 * r, d).split([r, r], dim=1)
    conv = hf_state["conv1d.weight"].squeeze(1)
    q_conv, k_conv, v_conv = conv.split([key_heads * dk, key_heads * dk, key_heads * r * dv], dim=0)
    out = {"wq.weight": q, "wk.weight": k, "wv.weight": v, "wz.weight": z, "wb.weight": b, "wa.weight": a}
    out = {name: t.reshape(-1, d) for name, t in out.items()}
    out |= {"q_conv": q_conv, "k_conv": k_conv, "v_conv": v_conv}
    out |= {loom: hf_state[hf] for hf, loom in SAME.items()}
    return {name: t.contiguous() for name, t in out.items()}


def to_hf_gdn_state(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Loom GatedDeltaNet state dict -> transformers Qwen3NextGatedDeltaNet state dict (inverse of the above)."""
    key_heads, r, dk, dv = _sizes(cfg)
    d = cfg.d_model

    def grouped(name: str) -> Tensor:  # [rows, d] -> [key_heads, rows / key_heads, d]
        return state[name].reshape(key_heads, -1, d)

    qkvz = torch.cat([grouped(f"w{x}.weight") for x in "qkvz"], dim=1).reshape(-1, d)
    ba = torch.cat([grouped("wb.weight"), grouped("wa.weight")], dim=1).reshape(-1, d)
    conv = torch.cat([state["q_conv"], state["k_conv"], state["v_conv"]], dim=0).unsqueeze(1)
    out = {"in_proj_qkvz.weight": qkvz, "in_proj_ba.weight": ba, "conv1d.weight": conv}
    out |= {hf: state[loom] for hf, loom in SAME.items()}
    return {name: t.contiguous() for name, t in out.items()}
