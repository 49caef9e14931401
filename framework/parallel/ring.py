"""Ring attention (Liu et al. 2023) over the `cp_ring` ranks of context parallelism, alone or inside a hybrid with
Ulysses (USP, Fang & Zhao 2024; Megatron's a2a+p2p): `cp = cp_ulysses x cp_ring`.

Sharding. The sequence is cut into 2 x cp_ring chunks; ring rank r holds chunks r and 2 cp_ring - 1 - r (zigzag,
so every ring rank has as many causal (query, key) pairs to compute: the first chunks see few keys, the last many),
or chunk r of cp_ring without load balancing. Inside a ring rank's tokens, its cp_ulysses ranks hold consecutive
pieces; cp rank c = r x cp_ulysses + u. `token_order` is the whole permutation: cp rank c holds the c-th contiguous
slice of the sequence read in that order. Position ids are computed on the natural order first, so RoPE and the
masks see global positions.

Attention. With cp_ulysses > 1 an all-to-all first trades sequence for heads inside each ulysses group (as
framework/parallel/context.py does), so a rank holds its ring rank's tokens for heads / cp_ulysses heads. Then
`RingAttention`: the rank's queries stay, the K/V shards of the cp_ring ranks pass around the ring (one
isend / irecv per step, issued before the step's block is computed, so the transfer overlaps it), and each
block's partial output O_j with its log-sum-exp L_j is merged into the running one:
    L = log(e^L + e^L_j),  O = e^(L_old - L) O + e^(L_j - L) O_j.
A block the mask leaves empty (causal blocks in the future, blocks outside the sliding window, blocks sharing no
document) is skipped; a partial block gets the exact mask from the whole-sequence predicate
(`AttentionMask.allowed` over global token indices and the gathered document ids). Backward (flash attention's):
with the final O and L, each block's gradients are exact on their own (dS = P (dP - rowsum(dO O)), P = e^(S - L)),
so the K/V shards go around the ring once more with their dK/dV accumulators, which arrive back at their owner
after cp_ring steps.

Kernels per block: CPU's fused flash op with an additive mask (`_scaled_dot_product_flash_attention_for_cpu`, and
its backward, which takes the final O and L), elsewhere the same math written out (a block's scores are
materialised: [B, H, S/cp_ring, S/cp_ring]). Biases, soft-capping, sinks, temperatures and attention dropout are
not in the block kernel: recipes with them are refused for cp_ring > 1 (framework/parallel/dims.py).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from framework.models.attention import repeat_kv
from framework.models.masks import AttentionMask

_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_CPU_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def token_order(seq: int, ring: int, ulysses: int, *, balanced: bool = True) -> torch.Tensor:
    """[seq] natural token index of each position of the cp-rank-major order (module docstring)."""
    if ring == 1 or not balanced:
        return torch.arange(seq)
    chunks = torch.arange(seq).chunk(2 * ring)
    return torch.cat([torch.cat([chunks[r], chunks[2 * ring - 1 - r]]) for r in range(ring)])


def ring_tokens(order: torch.Tensor, ring: int, rank: int) -> torch.Tensor:
    """Natural indices of ring rank `rank`'s tokens (its ulysses pieces, in order)."""
    return order.tensor_split(ring)[rank]


@dataclasses.dataclass
class RingPlan:
    """What one ring attention call needs besides q/k/v: the ring's process group and this rank's place in it,
    the softmax scale, the whole-sequence mask (global indices) and every ring rank's token indices."""

    group: dist.ProcessGroup
    mask: AttentionMask
    tokens: list[torch.Tensor]
    """tokens[j]: natural indices [S / cp_ring] of ring rank j's keys (and queries)."""
    scale: float

    @property
    def size(self) -> int:
        return len(self.tokens)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def allowed(self, batch: int, key_rank: int) -> torch.Tensor:
        """[B, 1, Sq, Sk] bool: which of ring rank key_rank's keys each of this rank's queries sees."""
        q, k = self.tokens[self.rank], self.tokens[key_rank]
        b = torch.arange(batch, device=q.device).view(batch, 1, 1, 1)
        return self.mask.allowed(b, q.view(1, 1, -1, 1), k.view(1, 1, 1, -1)).expand(batch, 1, len(q), len(k))


class RingAttention(torch.autograd.Function):
    """out [B, H, s, D] = softmax attention of this rank's queries q [B, H, s, D] over the whole ring's keys and
    values (k, v [B, Hkv, s, D] on every ring rank), as the module docstring describes."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan) -> torch.Tensor:  # noqa: ANN001
        batch = q.shape[0]
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        for step in range(plan.size):
            pending = _shift(kv, plan) if step < plan.size - 1 else None  # overlaps the block below
            owner = (plan.rank - step) % plan.size
            allowed = plan.allowed(batch, owner)
            if allowed.any():
                block_out, block_lse = _block_forward(q, kv[0], kv[1], allowed, plan.scale)
                out, lse = _merge(out, lse, block_out, block_lse)
            if pending is not None:
                kv = _wait(pending)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        q, k, v, out, lse = ctx.saved_tensors
        plan: RingPlan = ctx.plan
        grad_out = grad_out.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        # this rank holds one block at a time with its gradient accumulators; after size shifts each is home
        held = torch.cat([torch.stack([k, v]), torch.zeros((2, *k.shape), dtype=k.dtype, device=k.device)])
        held = held.float() if k.dtype != torch.float32 else held
        for step in range(plan.size):
            owner = (plan.rank - step) % plan.size
            allowed = plan.allowed(q.shape[0], owner)
            if allowed.any():
                kb, vb = held[0].to(k.dtype), held[1].to(v.dtype)
                dqb, dkb, dvb = _block_backward(grad_out, q, kb, vb, out, lse, allowed, plan.scale)
                dq += dqb.float()
                held[2] += dkb.float()
                held[3] += dvb.float()
            held = _wait(_shift(held, plan))
        return dq.to(q.dtype), held[2].to(k.dtype), held[3].to(v.dtype), None


def _shift(t: torch.Tensor, plan: RingPlan) -> list[dist.Work]:
    """Send t to the next ring rank and receive the previous rank's into a new buffer (asynchronous)."""
    size, rank = plan.size, plan.rank
    received = torch.empty_like(t)
    send_to = dist.get_global_rank(plan.group, (rank + 1) % size)
    receive_from = dist.get_global_rank(plan.group, (rank - 1) % size)
    ops = [dist.P2POp(dist.isend, t.contiguous(), send_to, plan.group),
           dist.P2POp(dist.irecv, received, receive_from, plan.group)]  # fmt: skip
    return [*dist.batch_isend_irecv(ops), received]  # type: ignore[list-item]


def _wait(pending: list) -> torch.Tensor:  # noqa: ANN001 (works, then the received buffer)
    for work in pending[:-1]:
        work.wait()
    return pending[-1]


def _merge(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running (out, lse) and one block's -> their union's (rows no key has reached yet keep lse -inf)."""
    new = torch.logaddexp(lse, block_lse)
    finite = torch.isfinite(new)
    keep = torch.where(finite, torch.exp(lse - new), 0.0).unsqueeze(-1)
    take = torch.where(finite, torch.exp(block_lse - new), 0.0).unsqueeze(-1)
    return out * keep + block_out.float() * take, new


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))


def _block_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, s, D], lse [B, H, s] fp32) of q over one block; rows the block hides have lse -inf."""
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    visible = allowed.any(-1)  # [B, 1, s]
    if q.device.type == "cpu":
        out, lse = _FLASH_CPU(q, k, v, 0.0, False, attn_mask=_additive(allowed, q.dtype), scale=scale)
    else:
        scores = (torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale).masked_fill(
            ~allowed, float("-inf")
        )
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.where(visible.unsqueeze(-1), torch.exp(scores - lse.unsqueeze(-1)), 0.0)
        out = torch.einsum("bhqk,bhkd->bhqd", probs, v.float())
    return out, torch.where(visible, lse.float(), float("-inf"))


def _block_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    allowed: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block's dq, dk, dv given the final out and lse (flash attention's backward, exact per block)."""
    kv_heads, groups = k.shape[1], q.shape[1] // k.shape[1]
    kr, vr = repeat_kv(k, groups), repeat_kv(v, groups)
    if q.device.type == "cpu":
        dq, dk, dv = _FLASH_CPU_BACKWARD(
            grad_out, q, kr, vr, out, lse, 0.0, False, attn_mask=_additive(allowed, q.dtype), scale=scale
        )
    else:
        scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), kr.float()) * scale
        probs = torch.where(allowed, torch.exp(scores - lse.unsqueeze(-1)), 0.0)
        go = grad_out.float()
        dv = torch.einsum("bhqk,bhqd->bhkd", probs, go)
        dp = torch.einsum("bhqd,bhkd->bhqk", go, vr.float())
        ds = probs * (dp - (go * out.float()).sum(-1, keepdim=True))
        dq = torch.einsum("bhqk,bhkd->bhqd", ds, kr.float()) * scale
        dk = torch.einsum("bhqk,bhqd->bhkd", ds, q.float()) * scale
    if groups > 1:  # a kv head's gradient sums over the query heads it serves
        dk = dk.unflatten(1, (kv_heads, groups)).sum(2)
        dv = dv.unflatten(1, (kv_heads, groups)).sum(2)
    return dq, dk, dv
