"""The parallel layout of a run: sizes of each mesh dimension, validated, and the one DeviceMesh built from them.

Every rule is checked by `ParallelDims.from_recipe` before any process-group work, so a bad layout is a one-line
`ConfigError` (exit 2) instead of a hang or a collective error on N processes.

Mesh convention: `build_mesh` always builds all five dimensions, in the order `MESH_DIMS` (size-1 dimensions
included). Code can then always slice by name (`mesh["tp"]`, `mesh["dp_replicate", "dp_shard"]`) without asking
which dimensions exist; a size-1 dimension costs one trivial process group.

Expert parallelism (`ep`) is not a sixth dimension of the product: its ranks are carved from dp_shard x cp (as
torchtitan does; ep divides dp_shard x cp; ep ranks hold different tokens: other samples, or other sequence shards).
`expert_meshes` builds its views from the one mesh: dp_shard (with cp > 1: dp_shard and cp flattened into
dp_shard_cp, cp inner) unflattened into (dp_shard_mod_ep, ep), ep innermost, giving the ep mesh the experts are
sharded over and the experts' own data-parallel mesh (dp_shard_mod_ep, or dp_replicate x dp_shard_mod_ep with HSDP)
FSDP2 shards them over.

Support matrix (families x dimensions; anything else is a ConfigError):

    decoder:          dp_replicate, dp_shard, tp (+ sequence parallel), pp, ep (MoE), cp
    encoder:          dp_replicate, dp_shard, tp (+ sequence parallel), cp
    encoder_decoder:  dp_replicate, dp_shard, tp (+ sequence parallel)

With tp > 1 every model feature is split or replicated correctly (framework/parallel/tensor.py): GQA, QK-norm,
ALiBi, learned temperature / distance weights, T5 relative bias (sharded by heads), MoE (replicated on tp ranks),
post-norm, learned / type embeddings, tied heads. Rules: heads, kv_heads, ffn_hidden and vocab_size divisible by
tp; seq_len divisible by tp with sequence parallel.

With cp > 1 (Ulysses, framework/parallel/context.py) every mask and position scheme works (causal, sliding window,
documents, prefix-LM, ALiBi, learned temperature / soft distance, T5 relative bias). Rules: seq_len divisible by cp
(by cp x tp with sequence parallel); heads and kv_heads divisible by cp x tp (attention splits heads over both).
Not yet with cp > 1: MoE token dropping (capacity_factor; the capacity and the drop order span the whole
micro-batch). Router statistics of every aux_loss_scope are summed over the cp shards.

With ep > 1 (framework/parallel/expert.py): an MoE decoder, model.moe.n_experts divisible by ep, ep dividing
dp_shard x cp (so data_parallel fsdp or hsdp, or cp > 1). Composes with FSDP2/HSDP (experts sharded over the
remaining dp_shard x cp / ep and replicated over dp_replicate), with tp (experts replicated over tp: every tp rank
routes and exchanges the same tokens), with cp (each cp rank dispatches its sequence shard's tokens) and with pp
(each stage's MoE layers add their router losses in their own backward: framework/engines/moe_pipeline.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from framework.config import ConfigError, Recipe
from framework.config.schema import ModelConfig
from framework.models.mixers import MIXERS, mixers_used

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
"""Outer to inner: tp innermost keeps its (most frequent) collectives between neighbouring ranks (one node)."""

# Dimensions each model family may use with a size > 1 (ep, carved from dp_shard x cp, is checked by _check_ep).
# T5's cross-attention (decoder queries, encoder keys) has no sequence split of its own: no cp for encoder_decoder.
SUPPORTED = {
    "decoder": {"dp_replicate", "dp_shard", "tp", "pp", "cp"},
    "encoder": {"dp_replicate", "dp_shard", "tp", "cp"},
    "encoder_decoder": {"dp_replicate", "dp_shard", "tp"},
}
NOT_YET: dict[str, str] = {}
"""Dimensions refused for every family (name: what it is), while a release builds them."""
INTERLEAVED = ("interleaved_1f1b", "zero_bubble")
"""Schedules that hold two stages per pipeline rank (stages r and r + pp, or a V shape)."""


@dataclass(frozen=True)
class ParallelDims:
    """Validated sizes of every mesh dimension; their product is the world size."""

    pp: int
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    world_size: int
    data_parallel: str = "fsdp"
    sequence_parallel: bool = False
    pp_stages: int = 1
    """Pipeline stages in total (pp, or 2 x pp for the interleaved schedules)."""
    ep: int = 1
    """Expert-parallel ranks, carved from dp_shard x cp (not a factor of the world size)."""
    cp_ring: int = 1
    """Of cp, the ring-attention ranks (framework/parallel/ring.py); cp / cp_ring exchange heads (Ulysses)."""
    cp_balanced: bool = True
    """With cp_ring > 1: zigzag sequence sharding (ring.token_order)."""

    @classmethod
    def from_recipe(cls, recipe: Recipe, world_size: int) -> ParallelDims:
        """Resolve dp_shard=-1 and check every rule against the model, data and batch sections."""
        p = recipe.parallel
        dp_replicate, dp_shard = _dp_sizes(recipe, world_size)
        dims = cls(
            pp=p.pp,
            dp_replicate=dp_replicate,
            dp_shard=dp_shard,
            cp=p.cp,
            tp=p.tp,
            world_size=world_size,
            data_parallel=p.data_parallel,
            sequence_parallel=p.sequence_parallel and p.tp > 1,
            pp_stages=p.pp * (2 if p.pp_schedule in INTERLEAVED and p.pp > 1 else 1),
            ep=p.ep,
            cp_ring=p.cp_ring,
            cp_balanced=p.cp_load_balance,
        )
        _check_product(dims, recipe)
        _check_supported(dims, recipe)
        _check_tp(dims, recipe)
        _check_cp(dims, recipe)
        _check_pp(dims, recipe)
        _check_ep(dims, recipe)
        _check_batch(dims, recipe)
        _check_cpu_offload(dims, recipe)
        return dims

    @property
    def cp_ulysses(self) -> int:
        """Of cp, the ranks that exchange heads (Ulysses); cp_ring x cp_ulysses = cp."""
        return self.cp // self.cp_ring

    @property
    def dp(self) -> int:
        """Data-parallel ranks (replicas x shards): each reads a different slice of the global batch."""
        return self.dp_replicate * self.dp_shard

    def sizes(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in MESH_DIMS}

    def describe(self) -> str:
        """The layout for logs, e.g. 'world 4 = dp_shard 2 x tp 2 (fsdp, sequence parallel)'."""
        used = [f"{n} {s}" for n, s in self.sizes().items() if s > 1] or ["single process"]
        used += [f"(ep {self.ep} of dp_shard{' x cp' * (self.cp > 1)})"] if self.ep > 1 else []
        if self.cp_ring > 1:
            zigzag = ", zigzag" if self.cp_balanced else ", contiguous"
            used += [f"(cp = ulysses {self.cp_ulysses} x ring {self.cp_ring}{zigzag})"]
        extra = ([self.data_parallel] if self.dp > 1 else []) + (
            ["sequence parallel"] if self.sequence_parallel else []
        )
        return f"world {self.world_size} = {' x '.join(used)}" + (f" ({', '.join(extra)})" if extra else "")


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh:
    """One DeviceMesh over the default process group with every dimension of MESH_DIMS, named (size 1 too)."""
    shape = tuple(getattr(dims, name) for name in MESH_DIMS)
    return init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)


@dataclass(frozen=True)
class ExpertMeshes:
    """Views of the one mesh for expert parallelism (see the module docstring)."""

    ep: DeviceMesh
    """The ranks that split the experts (1-D, size ep)."""
    dp: DeviceMesh
    """The experts' data-parallel mesh: dp_shard_mod_ep (dp_shard x cp / ep ranks), or (dp_replicate,
    dp_shard_mod_ep) with HSDP."""


def expert_meshes(mesh: DeviceMesh, dims: ParallelDims) -> ExpertMeshes | None:
    """None without expert parallelism. Collective: every rank calls it (it creates the sub-groups)."""
    if dims.ep == 1:
        return None
    base, carved = mesh, "dp_shard"
    if dims.cp > 1:
        # the flattened (dp_shard, cp) dimension exists on the root only as a slice: unflatten it within the
        # (dp_replicate, dp_shard_cp) mesh, which keeps dp_replicate for HSDP (flattening is cached on the mesh)
        mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
        base, carved = mesh["dp_replicate", "dp_shard_cp"], "dp_shard_cp"
    shards = dims.dp_shard * dims.cp
    split = base._unflatten(carved, (shards // dims.ep, dims.ep), ("dp_shard_mod_ep", "ep"))
    dp = ("dp_replicate", "dp_shard_mod_ep") if dims.data_parallel == "hsdp" else ("dp_shard_mod_ep",)
    return ExpertMeshes(ep=split["ep"], dp=split[dp])


def _error(key: str, value: object, rule: str, fix: str) -> ConfigError:
    return ConfigError(None, key, value, rule, fix)


def _dp_sizes(recipe: Recipe, world_size: int) -> tuple[int, int]:
    """(dp_replicate, dp_shard) after the data_parallel flavour and dp_shard=-1 are resolved."""
    p = recipe.parallel
    if world_size < 1:
        raise _error("world_size", world_size, "must be >= 1", "launch at least one process")
    others = p.pp * p.cp * p.tp * p.dp_replicate
    dp_shard = p.dp_shard
    if dp_shard == -1:
        if world_size % others:
            raise _error(
                "parallel",
                p.dp_replicate,
                f"pp x cp x tp x dp_replicate = {others} does not divide the world size {world_size}",
                f"use a world size that is a multiple of {others}",
            )
        dp_shard = world_size // others
    if p.data_parallel == "ddp" and dp_shard > 1:
        # DDP replicates: the ranks data parallelism gets are replicas, not shards.
        if p.dp_replicate > 1:
            raise _error(
                "parallel.dp_shard",
                dp_shard,
                "must be 1 with data_parallel=ddp when dp_replicate is set",
                "use data_parallel: hsdp to combine replicas and shards",
            )
        return dp_shard, 1
    if p.data_parallel == "fsdp" and p.dp_replicate > 1:
        raise _error(
            "parallel.dp_replicate",
            p.dp_replicate,
            "must be 1 with data_parallel=fsdp (replicas of shards are HSDP)",
            "use data_parallel: hsdp, or dp_replicate: 1",
        )
    return p.dp_replicate, dp_shard


def _check_product(dims: ParallelDims, recipe: Recipe) -> None:
    product = dims.pp * dims.dp_replicate * dims.dp_shard * dims.cp * dims.tp
    if product != dims.world_size:
        sizes = " x ".join(f"{n} {s}" for n, s in dims.sizes().items())
        raise _error(
            "parallel",
            sizes,
            f"the sizes multiply to {product}, not the world size {dims.world_size}",
            "make them multiply to the number of processes, or set dp_shard: -1 to fill",
        )


def _check_supported(dims: ParallelDims, recipe: Recipe) -> None:
    family = recipe.model.family
    for name, what in NOT_YET.items():
        size = getattr(recipe.parallel, name)
        if size > 1:
            raise _error(
                f"parallel.{name}", size, f"{what} is not yet supported (a later release)", f"set {name}: 1"
            )
    allowed = SUPPORTED[family]
    for name, size in dims.sizes().items():
        if size > 1 and name not in allowed:
            raise _error(
                f"parallel.{name}",
                size,
                f"model family {family} does not support {name} > 1 (supported: {', '.join(sorted(allowed))})",
                f"set {name}: 1",
            )


def _check_tp(dims: ParallelDims, recipe: Recipe) -> None:
    if dims.tp == 1:
        return
    m = recipe.model
    for key, count in _split_counts(m, recurrent=True).items():
        if count % dims.tp:
            raise _error(key, count, f"must be divisible by parallel.tp={dims.tp}", "change tp or the heads")
    if m.ffn_hidden % dims.tp:
        raise _error(
            "model.ffn_hidden", m.ffn_hidden, f"must be divisible by parallel.tp={dims.tp}", "change tp"
        )
    if m.qk_norm and m.qk_norm_scope == "projection":
        # the norm's statistic spans every head, and tp splits the projection by heads
        raise _error("model.qk_norm_scope", "projection", f"normalises across heads that parallel.tp={dims.tp} splits",
                     "use parallel.tp: 1 (FSDP2, PP and CP take OLMo 2's layout)")  # fmt: skip
    if dims.sequence_parallel and recipe.data.seq_len % dims.tp:
        raise _error(
            "data.seq_len",
            recipe.data.seq_len,
            f"must be divisible by parallel.tp={dims.tp} with sequence parallel",
            "change seq_len, or set parallel.sequence_parallel: false",
        )
    _check_tp_vocab(dims, recipe)


def _split_counts(m: ModelConfig, *, recurrent: bool) -> dict[str, int]:
    """The head counts the blocks' mixers split (framework/models/mixers.py); recurrent=False: only those of
    the attention mixers, which Ulysses splits over cp as well (a recurrent mixer passes state instead)."""
    counts: dict[str, int] = {}
    for mixer in mixers_used(m) if m.family == "decoder" else [MIXERS["attention"]]:
        if recurrent or not mixer.recurrent:
            counts |= mixer.head_counts(m)
    return counts


def _check_cp(dims: ParallelDims, recipe: Recipe) -> None:
    """Ulysses: each cp rank holds seq_len / cp tokens (of those, 1 / tp with sequence parallel) and attends with
    heads / (tp x cp) heads over the whole sequence."""
    if dims.cp == 1:
        return
    m, split = recipe.model, dims.cp_ulysses * dims.tp
    heads_over = "parallel.cp x parallel.tp" if dims.cp_ring == 1 else "parallel.cp_ulysses x parallel.tp"
    for key, count in _split_counts(m, recurrent=False).items():
        if count % split:
            raise _error(
                key,
                count,
                f"must be divisible by {heads_over} = {split} (attention splits its heads over both)",
                "change cp, tp or the heads"
                + (", or use ring attention (parallel.cp_ring)" * (dims.cp_ring == 1)),
            )
    zigzag = 2 if dims.cp_ring > 1 and dims.cp_balanced else 1
    shards = dims.cp * (dims.tp if dims.sequence_parallel else 1) * zigzag
    if recipe.data.seq_len % shards:
        what = (
            f"parallel.cp={dims.cp}"
            + (f" x parallel.tp={dims.tp} (sequence parallel)" * dims.sequence_parallel)
            + " x 2 (zigzag chunks of the load-balanced ring)" * (zigzag == 2)
        )
        raise _error(
            "data.seq_len", recipe.data.seq_len, f"must be divisible by {what}", "change seq_len or cp"
        )
    _check_cp_features(dims, recipe)
    if dims.cp_ring > 1:
        _check_ring_features(dims, recipe)


def _check_cp_features(dims: ParallelDims, recipe: Recipe) -> None:
    """Not yet with context parallelism: MoE layers that drop tokens. Each cp rank routes a shard of every sequence,
    but the capacity counts the whole micro-batch's tokens and the drop order ranks every assignment of the
    micro-batch (first choices before second choices, then token order): a rank would need every shard's choices.
    Router statistics of every aux_loss_scope are summed over the shards (framework/train/moe_loss.py), so they
    equal one process's; routing itself is per token."""
    moe = recipe.model.moe
    if moe is not None and moe.capacity_factor is not None:
        raise _error(
            "model.moe.capacity_factor",
            moe.capacity_factor,
            "token dropping with parallel.cp > 1 is not yet supported (the capacity and the drop order span the "
            "whole micro-batch, whose sequences are split over the cp ranks)",
            "set moe.capacity_factor: null (dropless), or cp: 1",
        )


def _check_ring_features(dims: ParallelDims, recipe: Recipe) -> None:
    """Ring attention computes every score term in its blocks (framework/parallel/ring.py) but not attention
    dropout (a block's dropout pattern would differ from one process's); recurrent and MLA mixers are not in its
    sharding; the DeepSpeed engine has its own sequence parallelism. TE attention runs TE's own ring where it maps
    (framework/kernels/choice.py says where not)."""
    m = recipe.model
    if m.attention_dropout:
        raise _error(
            "model.attention_dropout", m.attention_dropout,
            "ring attention (parallel.cp_ring > 1) does not apply attention dropout",
            "use Ulysses only (parallel.cp_ring: 1), or model.attention_dropout: 0",
        )  # fmt: skip
    other = sorted(set(m.mixers) - {"attention", "attention_local"})
    if other:
        raise _error(
            "model.layers.pattern", other[0], "ring attention (parallel.cp_ring > 1) runs attention blocks only",
            "use parallel.cp_ring: 1 (Ulysses; recurrent mixers pass their state)",
        )  # fmt: skip
    if recipe.parallel.engine == "deepspeed":
        raise _error(
            "parallel.engine", "deepspeed", "has its own sequence parallelism; Loom's ring is not mapped onto it",
            "use parallel.cp_ring: 1, or parallel.engine: native",
        )  # fmt: skip


def _check_tp_vocab(dims: ParallelDims, recipe: Recipe) -> None:
    """The embedding and head (tied or not) are split over the vocabulary in equal blocks of rows."""
    m = recipe.model
    if m.vocab_size % dims.tp:
        raise _error(
            "model.vocab_size",
            m.vocab_size,
            f"must be divisible by parallel.tp={dims.tp} (the embedding and head are split over the vocabulary)",
            f"pad the vocabulary to a multiple of {dims.tp}",
        )


def _check_pp(dims: ParallelDims, recipe: Recipe) -> None:
    if dims.pp == 1:
        return
    _check_pp_features(dims, recipe)
    layers, explicit = recipe.model.n_layers, recipe.parallel.pp_layers
    stages = dims.pp_stages
    if explicit is None:
        if layers % stages:
            raise _error(
                "model.n_layers",
                layers,
                f"does not split evenly into {stages} pipeline stages",
                "change n_layers, or list the blocks per stage in parallel.pp_layers",
            )
        return
    if len(explicit) != stages or sum(explicit) != layers or min(explicit) < 1:
        raise _error(
            "parallel.pp_layers",
            explicit,
            f"needs {stages} entries >= 1 that sum to model.n_layers={layers}",
            f"list the blocks of each of the {stages} stages",
        )


def _check_pp_features(dims: ParallelDims, recipe: Recipe) -> None:
    """What a pipeline cannot split yet: a T5 bias table is read by the blocks of every stage (its gradients would
    need summing across all stages; tied heads do get that, between the first and last stage); DDP has no
    per-micro-batch gradient-sync switch the pipeline stages can drive (FSDP2 has)."""
    m, p = recipe.model, recipe.parallel
    refusals = [
        (
            m.position == "relative_bias",
            "model.position",
            m.position,
            "T5 relative bias",
            "use rope or alibi",
        ),
        (
            p.data_parallel == "ddp" and dims.dp > 1,
            "parallel.data_parallel",
            "ddp",
            "DDP",
            "use fsdp or hsdp",
        ),
    ]
    for refused, key, value, what, fix in refusals:
        if refused:
            raise _error(key, value, f"{what} with parallel.pp > 1 is not yet supported", fix)
    if p.pp_schedule == "zero_bubble" and dims.dp > 1:
        # Measured (tests/framework/parallel): with FSDP2 or HSDP the deferred weight-gradient passes of torch
        # 2.13's ScheduleInterleavedZeroBubble give gradients ~5% off one process's; with TP alone it is exact.
        raise _error(
            "parallel.pp_schedule",
            p.pp_schedule,
            "zero_bubble with data parallelism (FSDP2/HSDP) gives wrong gradients in torch 2.13",
            "use pp_schedule: interleaved_1f1b, or no data parallelism",
        )


def _check_ep(dims: ParallelDims, recipe: Recipe) -> None:
    """Expert parallelism needs experts to split and data-parallel shards to carve its ranks from."""
    if dims.ep == 1:
        return
    moe, family = recipe.model.moe, recipe.model.family
    if family != "decoder" or moe is None:
        raise _error(
            "parallel.ep",
            dims.ep,
            f"expert parallel needs an MoE decoder (model.family {family}, "
            f"model.moe {'set' if moe else 'null'})",
            "set ep: 1, or use a decoder with model.moe",
        )
    if moe.n_experts % dims.ep:
        raise _error(
            "model.moe.n_experts", moe.n_experts, f"must be divisible by parallel.ep={dims.ep}", "change ep"
        )
    if (dims.dp_shard * dims.cp) % dims.ep:
        raise _error(
            "parallel.ep",
            dims.ep,
            f"must divide dp_shard x cp = {dims.dp_shard} x {dims.cp} (the ep ranks are carved from the "
            f"data-parallel shards and the context-parallel ranks; data_parallel {dims.data_parallel})",
            "use data_parallel fsdp or hsdp with dp_shard x cp a multiple of ep",
        )


def _check_batch(dims: ParallelDims, recipe: Recipe) -> None:
    t = recipe.train
    if t.global_batch_size % (dims.dp * t.micro_batch_size):
        raise _error(
            "train.global_batch_size",
            t.global_batch_size,
            f"must be a multiple of data-parallel ranks x micro_batch_size = {dims.dp} x {t.micro_batch_size}",
            f"use a multiple of {dims.dp * t.micro_batch_size}",
        )
    chunks = recipe.parallel.pp_microbatches or dims.pp_stages
    if dims.pp > 1 and t.micro_batch_size % chunks:
        raise _error(
            "train.micro_batch_size",
            t.micro_batch_size,
            f"must split into parallel.pp_microbatches={chunks} pipeline micro-batches",
            f"use a multiple of {chunks}",
        )


def _check_cpu_offload(dims: ParallelDims, recipe: Recipe) -> None:
    if recipe.parallel.cpu_offload and (dims.data_parallel == "ddp" or dims.dp_shard == 1):
        raise _error(
            "parallel.cpu_offload",
            True,
            "CPU offload moves FSDP2 shards to the host: it needs data_parallel fsdp or hsdp with dp_shard > 1 "
            f"(this layout: {dims.data_parallel}, dp_shard {dims.dp_shard})",
            "set data_parallel: fsdp (or hsdp with dp_shard > 1), or cpu_offload: false",
        )
