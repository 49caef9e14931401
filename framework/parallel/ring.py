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
so the K/V shards go around the ring once more, in reverse order: backward starts with the block forward ended
with (kept: ring rank + 1's, so its first step needs no transfer) and ends with the rank's own, each next block
received from rank + 1 while the current one computes. Each block's dK/dV accumulator travels with it one step
behind (received while this rank computes, added to, sent on to rank - 1) and reaches its owner at the owner's
last step, so no transfer is left exposed at the end: with cp_ring = 2, backward sends only the accumulators.

Score terms (ScoreTerms): every term of framework/models/attention.py's logit formula is computed in the blocks
from global heads and global positions — soft-capping, the T5 table (over the whole sequence, natural order),
ALiBi slopes and learned soft-distance weights on |p_i - p_j|, fixed or learned temperatures — and a sink logit
is merged as one more block with no value. Their gradients are exact: the block's dS is pushed through the
recomputed logits by autograd (d sink from P_sink and rowsum(dO O)). Attention dropout is refused
(framework/parallel/dims.py): a block's dropout pattern cannot equal one process's.

Kernels per block: for plain masked softmax, CPU's fused flash op with an additive mask
(`_scaled_dot_product_flash_attention_for_cpu`, and its backward, which takes the final O and L); with score terms
or off the CPU, the same math written out (a block's scores are materialised: [B, H, S/cp_ring, S/cp_ring] fp32,
transient — nothing of that size is kept for backward).
"""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.distributed as dist

from framework.models.attention import repeat_kv, softcap
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
    the softmax scale, the whole-sequence mask (global indices), every ring rank's token indices, and the score
    terms of framework/models/attention.py's formula that are not parameters (soft-cap, position ids)."""

    group: dist.ProcessGroup | None
    rank: int
    """This rank's place in the ring."""
    mask: AttentionMask
    tokens: list[torch.Tensor]
    """tokens[j]: natural indices [S / cp_ring] of ring rank j's keys (and queries)."""
    scale: float
    cap: float | None = None
    """model.attention_softcap: logits are c tanh(s / c) before the bias."""
    positions: torch.Tensor | None = None
    """[B, S] position ids of the whole sequence in natural order (the distance bias); None without one."""
    chunk_elements: int = 2**28
    """The math form materialises at most this many scores at once (1 GiB fp32): a block's query rows are
    taken in chunks."""
    pieces: dict[int, list[Piece] | None] = dataclasses.field(default_factory=dict)
    """Per key rank, the block's mask-free pieces (`_pieces`), computed once per plan."""
    waits: list[float] | None = None
    """Seconds each wait for a transfer took, when a list (benchmarks/context_parallel.py); None: not timed."""

    @property
    def size(self) -> int:
        return len(self.tokens)

    def allowed(self, batch: int, key_rank: int, rows: slice = slice(None)) -> torch.Tensor:
        """[B, 1, Sq, Sk] bool: which of ring rank key_rank's keys each of this rank's queries (those of `rows`)
        sees."""
        q, k = self.tokens[self.rank][rows], self.tokens[key_rank]
        b = torch.arange(batch, device=q.device).view(batch, 1, 1, 1)
        return self.mask.allowed(b, q.view(1, 1, -1, 1), k.view(1, 1, 1, -1)).expand(batch, 1, len(q), len(k))


@dataclasses.dataclass
class ScoreTerms:
    """The per-head tensors of the logit formula (framework/models/attention.py), this rank's heads; each may
    carry a gradient (learned temperature, soft distance weights, the T5 table, sinks):
        logit_ij = (cap(scale q_i . k_j) + table[i, j] - coef_h |p_i - p_j|) x inv_temperature_h,
    and a sink logit sink_h joins every row's softmax denominator with no value."""

    coef: torch.Tensor | None = None
    """[H] ALiBi slope + soft distance weight, multiplying -|p_i - p_j|."""
    table: torch.Tensor | None = None
    """[B or 1, H, S, S] additive bias over the whole sequence in natural order (T5 relative bias)."""
    inv_temperature: torch.Tensor | None = None
    """[H] 1 / T_h."""
    sinks: torch.Tensor | None = None
    """[H] sink logits."""

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        return self.coef, self.table, self.inv_temperature, self.sinks

    def plain(self, plan: RingPlan) -> bool:
        """Plain masked softmax blocks (the fused kernel's case; sinks only touch the merge)."""
        return plan.cap is None and self.coef is None and self.table is None and self.inv_temperature is None


class RingAttention(torch.autograd.Function):
    """out [B, H, s, D] = softmax attention of this rank's queries q [B, H, s, D] over the whole ring's keys and
    values (k, v [B, Hkv, s, D] on every ring rank), as the module docstring describes; `terms` (ScoreTerms's
    tensors, None where unused) receive their gradients."""

    @staticmethod
    def forward(ctx, q, k, v, plan: RingPlan, *terms):  # noqa: ANN001, ANN205 (autograd.Function)
        score = ScoreTerms(*terms)
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        for step in range(plan.size):
            pending = _shift(kv, plan) if step < plan.size - 1 else None  # overlaps the block below
            owner = (plan.rank - step) % plan.size
            block = _block_forward(q, kv[0], kv[1], plan, owner, score)
            if block is not None:
                out, lse = _merge(out, lse, *block)
            if pending is not None:
                kv = _wait(pending, plan)
        if score.sinks is not None:  # one more "block": the sink logit, with no value
            sink_lse = score.sinks.float().view(1, -1, 1).expand_as(lse)
            out, lse = _merge(out, lse, torch.zeros_like(out), sink_lse)
        out = out.to(q.dtype)
        # the last block received (ring rank + 1's) is where backward starts: kept, it needs no transfer
        last = kv if plan.size > 1 else None
        ctx.save_for_backward(q, k, v, out, lse, last, *terms)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205 (autograd.Function)
        q, k, v, out, lse, last, *terms = ctx.saved_tensors
        plan: RingPlan = ctx.plan
        # the learned terms as leaves of the per-block recomputation (the fixed ones as they are)
        needs = ctx.needs_input_grad[4:]
        score = ScoreTerms(
            *(t.detach().requires_grad_() if t is not None and n else t for t, n in zip(terms, needs))
        )
        grad_out = grad_out.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dterms = [None if t is None else torch.zeros_like(t, dtype=torch.float32) for t in terms]
        # Blocks in reverse order: step s holds ring rank (rank + 1 + s)'s K/V (step 0 the one forward ended with,
        # the last step this rank's own), each received from rank + 1 while the step before computes. A block's
        # dK/dV accumulator travels with it, one step behind: received while this rank computes, added to, sent
        # on to rank - 1; the own block's arrives last, so nothing is left in flight when the loop ends.
        kv, pending_acc, acc = last, None, None
        for step in range(plan.size):
            owner = (plan.rank + 1 + step) % plan.size
            if owner == plan.rank:
                kv = torch.stack([k, v])
            pending_kv = _shift(kv, plan, _KV, back=True) if step < plan.size - 2 else None
            grads = _block_backward(grad_out, q, kv[0], kv[1], out, lse, plan, owner, score)
            acc = (
                torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
                if step == 0
                else _wait(pending_acc, plan)
            )
            if grads is not None:
                dqb, dkb, dvb, dtb = grads
                dq += dqb.float()
                acc += torch.stack([dkb, dvb]).float()
                for total, g in zip(dterms, dtb, strict=True):
                    if g is not None:
                        total += g.float()
            if step < plan.size - 1:
                pending_acc = _shift(acc, plan, _GRADIENTS, back=True)
            if pending_kv is not None:
                kv = _wait(pending_kv, plan)
        if score.sinks is not None:
            dterms[3] = _sink_grad(grad_out, out, lse, score.sinks)
        dterms = [None if g is None else g.to(t.dtype) for g, t in zip(dterms, terms, strict=True)]
        return dq.to(q.dtype), acc[0].to(k.dtype), acc[1].to(v.dtype), None, *dterms


def _sink_grad(
    grad_out: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor
) -> torch.Tensor:
    """d loss / d sink_h = -sum_(b, i) P_sink(b, h, i) rowsum(dO O)(b, h, i): the sink column's probability times
    its dS = P (dP - rowsum(dO O)) with dP = 0 (it has no value)."""
    p_sink = torch.exp(sinks.float().view(1, -1, 1) - lse)
    return -(p_sink * (grad_out.float() * out.float()).sum(-1)).sum((0, 2))


_KV, _GRADIENTS = 0, 1
"""Message tags: a backward step has a K/V shift and a gradient shift in flight between the same two ranks."""


def _shift(t: torch.Tensor, plan: RingPlan, tag: int = _KV, *, back: bool = False) -> list[dist.Work]:
    """Send t to the next ring rank and receive the previous rank's into a new buffer (asynchronous); `back`:
    the other way round."""
    size, rank, step = plan.size, plan.rank, -1 if back else 1
    received = torch.empty_like(t)
    send_to = dist.get_global_rank(plan.group, (rank + step) % size)
    receive_from = dist.get_global_rank(plan.group, (rank - step) % size)
    ops = [dist.P2POp(dist.isend, t.contiguous(), send_to, plan.group, tag),
           dist.P2POp(dist.irecv, received, receive_from, plan.group, tag)]  # fmt: skip
    return [*dist.batch_isend_irecv(ops), received]  # type: ignore[list-item]


def _wait(pending: list, plan: RingPlan) -> torch.Tensor:  # noqa: ANN001 (works, then the received buffer)
    """The received buffer, once the transfer is done; with plan.waits set, the time spent waiting (the part
    of the transfer compute did not hide) is appended to it."""
    start = time.perf_counter()
    for work in pending[:-1]:
        work.wait()
    if plan.waits is not None:
        plan.waits.append(time.perf_counter() - start)
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


def _row_chunks(q: torch.Tensor, k_len: int, plan: RingPlan) -> list[slice]:
    """Query rows of one block in chunks whose [B, H, rows, k_len] scores stay under plan.chunk_elements."""
    b, h, q_len = q.shape[:3]
    rows = max(1, plan.chunk_elements // (b * h * k_len))
    return [slice(i, min(i + rows, q_len)) for i in range(0, q_len, rows)]


def _logits(
    q: torch.Tensor, k: torch.Tensor, plan: RingPlan, owner: int, score: ScoreTerms, rows: slice
) -> torch.Tensor:
    """[B, H, rows, s] fp32 logits of query rows `rows` of one block (q: those rows), unmasked (ScoreTerms's
    formula; differentiable in every input)."""
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    logits = softcap(torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * plan.scale, plan.cap)
    tq, tk = plan.tokens[plan.rank][rows], plan.tokens[owner]
    if score.table is not None:
        logits = logits + score.table.index_select(2, tq).index_select(3, tk).float()
    if score.coef is not None and plan.positions is not None:
        distance = (plan.positions[:, tq, None] - plan.positions[:, None, tk]).abs().float().unsqueeze(1)
        logits = logits - score.coef.float().view(1, -1, 1, 1) * distance
    if score.inv_temperature is not None:
        logits = logits * score.inv_temperature.float().view(1, -1, 1, 1)
    return logits


Piece = tuple[slice, slice, bool, torch.Tensor | None]
"""(query rows, key columns, causal, allowed) of a block: a rectangle the fused kernel computes, without a mask
(allowed None) or with the dense one ([B, 1, rows, cols] bool) where no mask-free split says it."""


def _fused_pieces(plan: RingPlan, batch: int, owner: int) -> list[Piece]:
    """The block for the fused kernel: its mask-free pieces (`_pieces`), else the whole block with its dense mask;
    [] when the mask hides all of it."""
    pieces = _pieces(plan, owner)
    if pieces is not None:
        return pieces
    allowed = plan.allowed(batch, owner)
    return [(slice(None), slice(None), False, allowed)] if allowed.any() else []


def _pieces(plan: RingPlan, owner: int) -> list[Piece] | None:
    """With a plain causal (or full) mask, one block splits into pieces by the runs of consecutive token indices
    (zigzag: two chunks of queries, two of keys): a key chunk wholly before a query chunk is seen whole, the same
    chunk is causal (top-left), a later one is skipped. The fused kernel then skips the masked half of a causal
    piece (is_causal) and builds no dense mask. None for masks pieces cannot express (documents, windows,
    prefix-LM) or runs that do not line up."""
    m = plan.mask
    if not (m.is_plain_causal or m.is_full):
        return None
    if owner not in plan.pieces:
        plan.pieces[owner] = _split(_runs(plan.tokens[plan.rank]), _runs(plan.tokens[owner]), m.causal)
    return plan.pieces[owner]


def _runs(tokens: torch.Tensor) -> list[tuple[slice, int, int]]:
    """(positions, first natural index, last + 1) of each run of consecutive natural indices in `tokens`."""
    values = tokens.tolist()
    starts = [0] + [i for i in range(1, len(values)) if values[i] != values[i - 1] + 1]
    ends = [*starts[1:], len(values)]
    return [(slice(a, b), values[a], values[b - 1] + 1) for a, b in zip(starts, ends, strict=True)]


def _split(q_runs: list, k_runs: list, causal: bool) -> list[Piece] | None:  # noqa: ANN001 (_runs's lists)
    pieces: list[Piece] = []
    for rows, q_first, q_end in q_runs:
        for cols, k_first, k_end in k_runs:
            if not causal or k_end - 1 <= q_first:  # every key at or before every query
                pieces.append((rows, cols, False, None))
            elif (k_first, k_end) == (q_first, q_end):
                pieces.append((rows, cols, True, None))
            elif k_first < q_end:  # overlapping but not the same chunk: only a mask says it
                return None
    return pieces


def _pieces_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan, pieces: list[Piece]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A block as its pieces (k, v repeated to q's heads), each through the fused kernel, merged by rows; rows a
    piece's mask hides get lse -inf."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
    for rows, cols, causal, allowed in pieces:
        mask = None if allowed is None else _additive(allowed, q.dtype)
        piece_out, piece_lse = _FLASH_CPU(
            q[:, :, rows], k[:, :, cols], v[:, :, cols], 0.0, causal, attn_mask=mask, scale=plan.scale
        )
        if allowed is not None:
            piece_lse = torch.where(allowed.any(-1), piece_lse.float(), float("-inf"))
        out[:, :, rows], lse[:, :, rows] = _merge(
            out[:, :, rows], lse[:, :, rows], piece_out, piece_lse.float()
        )
    return out, lse


def _pieces_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    plan: RingPlan,
    pieces: list[Piece],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (k, v repeated) of a block from its pieces, each exact given the final out and lse."""
    dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (q, k, v))
    for rows, cols, causal, allowed in pieces:
        grads = _FLASH_CPU_BACKWARD(
            grad_out[:, :, rows].contiguous(), q[:, :, rows].contiguous(), k[:, :, cols].contiguous(),
            v[:, :, cols].contiguous(), out[:, :, rows].contiguous(), lse[:, :, rows].contiguous(), 0.0, causal,
            attn_mask=None if allowed is None else _additive(allowed, q.dtype), scale=plan.scale,
        )  # fmt: skip
        dq[:, :, rows] += grads[0]
        dk[:, :, cols] += grads[1]
        dv[:, :, cols] += grads[2]
    return dq, dk, dv


def _fused(q: torch.Tensor, plan: RingPlan, score: ScoreTerms) -> bool:
    """The block runs CPU's fused flash op (plain masked softmax on CPU); else the math form, in row chunks."""
    return q.device.type == "cpu" and score.plain(plan)


def _block_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan, owner: int, score: ScoreTerms
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(out [B, H, s, D], lse [B, H, s] fp32) of q over one block, None when the mask hides all of it; rows the
    block hides have lse -inf."""
    batch, groups = q.shape[0], q.shape[1] // k.shape[1]
    if _fused(q, plan, score):
        pieces = _fused_pieces(plan, batch, owner)
        return (
            _pieces_forward(q, repeat_kv(k, groups), repeat_kv(v, groups), plan, pieces) if pieces else None
        )
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
    vr, empty = repeat_kv(v, groups).float(), True
    for rows in _row_chunks(q, k.shape[2], plan):
        allowed = plan.allowed(batch, owner, rows)
        if not allowed.any():
            continue
        scores = _logits(q[:, :, rows], k, plan, owner, score, rows).masked_fill(~allowed, float("-inf"))
        chunk_lse = torch.logsumexp(scores, dim=-1)
        visible = allowed.any(-1)
        probs = torch.where(visible.unsqueeze(-1), torch.exp(scores - chunk_lse.unsqueeze(-1)), 0.0)
        out[:, :, rows] = torch.einsum("bhqk,bhkd->bhqd", probs, vr)
        lse[:, :, rows] = torch.where(visible, chunk_lse, float("-inf"))
        empty = False
    return None if empty else (out, lse)


def _block_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    plan: RingPlan,
    owner: int,
    score: ScoreTerms,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor | None]] | None:
    """One block's dq, dk, dv (and the score terms' gradients) given the final out and lse, None when the mask
    hides all of it: flash attention's backward, exact per block. Off the fused kernel, per chunk of query rows,
    dS = P (dP - rowsum(dO O)) is pushed through the recomputed logits by autograd, which gives q, k and every
    learned term its share."""
    batch, kv_heads, groups = q.shape[0], k.shape[1], q.shape[1] // k.shape[1]
    if _fused(q, plan, score):
        pieces = _fused_pieces(plan, batch, owner)
        if not pieces:
            return None
        kr, vr = repeat_kv(k, groups), repeat_kv(v, groups)
        dq, dk, dv = _pieces_backward(grad_out, q, kr, vr, out, lse, plan, pieces)
        if groups > 1:  # a kv head's gradient sums over the query heads it serves
            dk, dv = (g.unflatten(1, (kv_heads, groups)).sum(2) for g in (dk, dv))
        return dq, dk, dv, [None] * 4
    k_leaf = k.detach().requires_grad_()
    learned = [t for t in score.tensors()[:3] if t is not None and t.requires_grad]
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk, dv = (torch.zeros(k.shape, dtype=torch.float32, device=k.device) for _ in range(2))
    dlearned = [torch.zeros_like(t, dtype=torch.float32) for t in learned]
    vr, empty = repeat_kv(v, groups).float(), True
    for rows in _row_chunks(q, k.shape[2], plan):
        allowed = plan.allowed(batch, owner, rows)
        if not allowed.any():
            continue
        q_leaf = q[:, :, rows].detach().requires_grad_()
        with torch.enable_grad():
            logits = _logits(q_leaf, k_leaf, plan, owner, score, rows)
        probs = torch.where(allowed, torch.exp(logits.detach() - lse[:, :, rows].unsqueeze(-1)), 0.0)
        go = grad_out[:, :, rows].float()
        dvr = torch.einsum("bhqk,bhqd->bhkd", probs, go)
        dv += dvr.unflatten(1, (kv_heads, groups)).sum(2)
        dp = torch.einsum("bhqd,bhkd->bhqk", go, vr)
        ds = probs * (dp - (go * out[:, :, rows].float()).sum(-1, keepdim=True))
        dq_rows, dk_rows, *d_terms = torch.autograd.grad(logits, [q_leaf, k_leaf, *learned], ds)
        dq[:, :, rows], empty = dq_rows, False
        dk += dk_rows
        for acc, g in zip(dlearned, d_terms, strict=True):
            acc += g
    if empty:
        return None
    found = iter(dlearned)
    dterms = [next(found) if t is not None and t.requires_grad else None for t in score.tensors()[:3]]
    return dq, dk, dv, [*dterms, None]
