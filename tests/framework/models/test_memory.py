"""The per-rank memory estimate (framework/models/memory.py) against what one CPU training step really holds."""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass

import pytest
import torch

from framework.config.schema import (
    DataConfig,
    GDNConfig,
    LayersConfig,
    Mamba2Config,
    MLAConfig,
    ModelConfig,
    MTPConfig,
    ParallelConfig,
    PrecisionConfig,
    Recipe,
    TrainConfig,
)
from framework.models import build_model, init_weights
from framework.models.memory import (
    activation_breakdown,
    keeps_score_tensor,
    memory_per_rank,
    sequence_lengths,
)
from framework.train.loss import compute_loss
from framework.train.mtp_loss import mtp_loss, take_mtp_logits

TOLERANCE = 0.20
SMALL = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, ffn_hidden=48, max_seq_len=64)
OBJECTIVE = {"decoder": "causal", "encoder": "mlm", "encoder_decoder": "span_corruption"}
CASES = {
    "llama": ({}, {}),
    "gqa_qk_norm": (dict(kv_heads=2, qk_norm=True), {}),
    "gpt2_layernorm_gelu_bias_dropout": (
        dict(norm="layernorm", mlp="gelu", bias=True, position="learned", dropout=0.1, tie_embeddings=True),
        {},
    ),
    "attention_dropout_math_kernel": (dict(attention_dropout=0.1, kv_heads=2), {}),
    "sliding_window_documents": (dict(sliding_window=5), dict(document_masking=True)),
    "alternating_windows": (dict(sliding_window=5, full_attention_layers=[1]), {}),
    "prefix_lm_alibi": (dict(position="alibi"), dict(objective="prefix")),
    "soft_masking": (dict(soft_distance_bias=True, learned_temperature=True), {}),
    "naive_backend": (dict(attention_backend="naive", kv_heads=2, attention_dropout=0.1), {}),
    # Gemma 2: sandwich norms, (1 + w) norms, soft-capped scores (the naive kernel on CPU) and logits
    "gemma2": (
        dict(
            mlp="geglu",
            gelu_approximate="tanh",
            norm_weight_offset=True,
            sandwich_norm=True,
            kv_heads=2,
            embedding_scale="sqrt_d_model",
            final_logit_softcap=30.0,
            attention_softcap=50.0,
            tie_embeddings=True,
        ),
        {},
    ),  # fmt: skip
    "bert": (
        dict(
            family="encoder",
            norm="layernorm",
            norm_position="post",
            mlp="gelu",
            bias=True,
            position="learned",
            type_vocab_size=2,
            embedding_norm=True,
            mlm_head_transform=True,
            output_bias=True,
            tie_embeddings=True,
            dropout=0.1,
        ),
        {},
    ),
    "t5": (
        dict(family="encoder_decoder", position="relative_bias", mlp="geglu", n_decoder_layers=3),
        {},
    ),
    "t5_rope_gqa": (dict(family="encoder_decoder", position="rope", kv_heads=2, tie_embeddings=True), {}),
    "mtp": (dict(mtp=MTPConfig(depth=2), kv_heads=2), {}),
    # Multi-head Latent Attention (odd widths; SDPA pads q/k/v to one head width)
    "mla": (
        dict(
            layers=LayersConfig(pattern=["mla"]),
            mla=MLAConfig(
                kv_lora_rank=12, q_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5
            ),
        ),
        {},
    ),
}


# Recurrent mixers (framework/models/mixers.py): chunk 5 pads 24 tokens to 25, chunk 8 divides them
GDN = GDNConfig(heads=4, key_heads=2, key_head_dim=8, value_head_dim=6, chunk_size=5)
MAMBA = Mamba2Config(heads=4, head_dim=6, state_dim=8, groups=2, chunk_size=5)
MIXER_CASES = {
    # Qwen3-Next's shape: a Gated DeltaNet block, a gated-output attention block
    "gdn_hybrid": (dict(layers=LayersConfig(pattern=["gdn", "attention"]), gdn=GDN, kv_heads=2,
                        attention_gate=True), {}),
    "gdn_documents": (dict(layers=LayersConfig(pattern=["gdn", "attention"]), gdn=GDN), dict(document_masking=True)),
    "mamba2_hybrid": (dict(layers=LayersConfig(pattern=["mamba2", "attention"]), mamba2=MAMBA, kv_heads=2), {}),
    "mamba2_only": (
        dict(layers=LayersConfig(pattern=["mamba2"], feed_forward=False),
             mamba2=Mamba2Config(heads=4, head_dim=8, state_dim=8, conv_bias=False, chunk_size=8)),
        {},
    ),
    # Gemma 3's interleave: a local block (own window and RoPE tables), a global one
    "local_global": (
        dict(layers=LayersConfig(pattern=["attention_local", "attention"], local_window=5, local_rope_theta=100.0),
             kv_heads=2),
        {},
    ),
    # gpt-oss's attention: learned sinks (on CPU SDPA with one extra key and the dense mask) in alternating
    # sliding / full blocks, q/k/v/o biases
    "sinks_local_global": (
        dict(layers=LayersConfig(pattern=["attention_local", "attention"], local_window=5), kv_heads=2,
             attention_sinks=True, bias=True),
        {},
    ),
    "sinks_documents": (dict(attention_sinks=True), dict(document_masking=True)),
    "mamba2_documents": (
        dict(layers=LayersConfig(pattern=["mamba2"], feed_forward=False), mamba2=MAMBA), dict(document_masking=True),
    ),
}  # fmt: skip


def _recipe(name: str, dtype: str, *, batch: int = 2, seq_len: int = 24, z_loss: float = 0.0) -> Recipe:
    model_kw, data_kw = {**CASES, **MIXER_CASES}[name]
    model = ModelConfig(**{**SMALL, **model_kw})
    data = DataConfig(seq_len=seq_len, objective=OBJECTIVE[model.family], noise_density=0.25)
    for key, value in data_kw.items():
        setattr(data, key, value)
    recipe = Recipe(
        model=model,
        data=data,
        train=TrainConfig(micro_batch_size=batch, global_batch_size=batch, device="cpu", z_loss=z_loss),
        precision=PrecisionConfig(dtype=dtype),
        parallel=ParallelConfig(dp_shard=1),
    )
    recipe.validate()
    return recipe


# ------------------------------------------------------------------------------------------ measurement
def _batch(recipe: Recipe) -> dict[str, torch.Tensor]:
    """A batch shaped as the data pipeline shapes it, with the masks the recipe asks for."""
    cfg, data, b = recipe.model, recipe.data, recipe.train.micro_batch_size
    enc_len, dec_len = sequence_lengths(recipe)
    gen = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, cfg.vocab_size, (b, enc_len), generator=gen)}
    out_len = enc_len
    if dec_len is not None:
        batch["decoder_input_ids"] = torch.randint(0, cfg.vocab_size, (b, dec_len), generator=gen)
        out_len = dec_len
    if data.document_masking:
        batch["document_ids"] = (torch.arange(enc_len) // 7).expand(b, enc_len)
    if data.objective == "prefix":
        batch["prefix_lengths"] = torch.tensor([enc_len // 3, enc_len // 2])[:b]
    if cfg.type_vocab_size > 0:
        batch["token_type_ids"] = (torch.arange(enc_len) >= enc_len // 2).long().expand(b, enc_len)
    batch["labels"] = torch.randint(0, cfg.vocab_size, (b, out_len), generator=gen)
    return batch


@dataclass
class Measured:
    parameters: int
    gradients: int
    optimizer_state: int
    activations: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state + self.activations


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _saved_bytes_of_step(model: torch.nn.Module, recipe: Recipe, *, live: bool = False) -> int:
    """Bytes autograd saves for backward in one forward + loss, deduplicated by untyped storage (a tensor saved
    twice, or views of one tensor, count once) and excluding the parameters themselves. live: only what is still
    held when the loss is computed (a recurrent scan's final-state graph is freed as soon as the scan drops it;
    counting at pack time would include it, or not, as the allocator reuses its addresses)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    packed: list[weakref.ref] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
            packed.append(weakref.ref(t))
        return t

    batch = _batch(recipe)
    labels = batch.pop("labels")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.precision.dtype)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = model(batch.pop("input_ids"), **batch)
        out = compute_loss(logits, labels, (labels != -100).sum(), recipe.train.z_loss)
        mtp_logits = take_mtp_logits(model)
        if mtp_logits is not None:  # model.mtp: the depths' losses, as the train module adds them
            out.loss = out.loss + mtp_loss(mtp_logits, labels, (labels != -100).sum(), 0.3).loss
    if live:
        gc.collect()
        alive = (ref() for ref in packed)
        seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in alive if t is not None}
    out.loss.backward()
    return sum(seen.values())


def measure(recipe: Recipe, *, live: bool = False) -> Measured:
    """Parameters, gradients after backward, AdamW state after one step, and activations of one micro-batch."""
    torch.manual_seed(0)
    model = build_model(recipe.model)
    init_weights(model, recipe.model, seed=0)
    model.train()
    activations = _saved_bytes_of_step(model, recipe, live=live)
    params = list(model.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    optimizer = torch.optim.AdamW(params, lr=1e-3, foreach=False)
    optimizer.step()
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return Measured(_nbytes(params), _nbytes(grads), _nbytes(state), activations)


def _assert_close(estimate: dict[str, int], measured: Measured) -> None:
    for key in ("parameters", "gradients", "optimizer_state", "activations", "total"):
        got = getattr(measured, key)
        assert estimate[key] == pytest.approx(got, rel=TOLERANCE), (key, estimate[key], got)


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_estimate_within_20_percent_of_measured(name: str, dtype: str) -> None:
    recipe = _recipe(name, dtype)
    _assert_close(memory_per_rank(recipe), measure(recipe))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize(
    "name", ["llama", "bert", "t5", "soft_masking", "naive_backend", "gemma2", "alternating_windows"]
)
def test_activation_term_is_exact_up_to_scalars(name: str, dtype: str) -> None:
    """The per-op derivation matches what autograd keeps to within 1.5% (the rest: a few index tensors and
    scalars not worth a term)."""
    recipe = _recipe(name, dtype)
    estimate = memory_per_rank(recipe)["activations"]
    assert estimate == pytest.approx(measure(recipe).activations, rel=0.015)


def test_z_loss_keeps_fp32_logits() -> None:
    recipe = _recipe("llama", "bf16", z_loss=1e-4)
    _assert_close(memory_per_rank(recipe), measure(recipe))
    without = memory_per_rank(_recipe("llama", "bf16"))["activations"]
    tokens = recipe.train.micro_batch_size * recipe.data.seq_len
    assert memory_per_rank(recipe)["activations"] - without == tokens * recipe.model.vocab_size * 4


def test_longer_sequence_and_batch_scale() -> None:
    """Still within tolerance at a larger micro-batch and a longer sequence (attention's S^2 terms grow)."""
    recipe = _recipe("naive_backend", "bf16", batch=3, seq_len=60)
    _assert_close(memory_per_rank(recipe), measure(recipe))


# ------------------------------------------------------------------------------------------- parallel
def test_fsdp_divides_weights_grads_and_state() -> None:
    recipe = _recipe("llama", "fp32")
    single, single_acts = memory_per_rank(recipe), activation_breakdown(recipe)
    recipe.parallel.data_parallel = "fsdp"
    recipe.parallel.dp_shard = -1
    recipe.launch.nproc_per_node = 8
    sharded, sharded_acts = memory_per_rank(recipe), activation_breakdown(recipe)
    for key in ("parameters", "gradients", "optimizer_state"):
        assert sharded[key] == single[key] // 8
    assert {k: v for k, v in sharded_acts.items() if k != "weight_copies"} == {
        k: v for k, v in single_acts.items() if k != "weight_copies"
    }
    recipe.parallel.data_parallel = "ddp"
    assert memory_per_rank(recipe)["parameters"] == single["parameters"]


@pytest.mark.parametrize(("dtype", "nbytes"), [("fp32", 4), ("bf16", 2)])
@pytest.mark.parametrize("name", ["llama", "t5"])
def test_fsdp_gathers_the_root_and_two_blocks(name: str, dtype: str, nbytes: int) -> None:
    """FSDP2 over several ranks keeps no autocast copies but the gathered root (embeddings, final norms, head)
    and two blocks in flight, in the compute dtype; counted here from the module itself."""
    recipe = _recipe(name, dtype)
    recipe.model.n_layers = 4  # more blocks than are in flight
    recipe.parallel.data_parallel, recipe.parallel.dp_shard, recipe.launch.nproc_per_node = "fsdp", -1, 4
    with torch.device("meta"):
        model = build_model(recipe.model)
    layers = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == "layers"]
    sizes = sorted((sum(p.numel() for p in b.parameters()) for m in layers for b in m.values()), reverse=True)
    root = sum(p.numel() for p in model.parameters()) - sum(sizes)
    assert activation_breakdown(recipe)["weight_copies"] == (root + sizes[0] + sizes[1]) * nbytes


def test_tensor_parallel_and_checkpointing_reduce_activations() -> None:
    recipe = _recipe("llama", "bf16")
    base = activation_breakdown(recipe)["layers"]
    recipe.parallel.tp, recipe.parallel.sequence_parallel = 2, True
    assert activation_breakdown(recipe)["layers"] == pytest.approx(
        base / 2, rel=0.03
    )  # RoPE tables replicated
    recipe.parallel.sequence_parallel = False
    assert base / 2 < activation_breakdown(recipe)["layers"] < base
    recipe.parallel.tp = 1
    recipe.parallel.activation_checkpointing = "full"
    assert activation_breakdown(recipe)["layers"] < base


def test_bf16_keeps_fp32_parameters() -> None:
    fp32, bf16 = memory_per_rank(_recipe("llama", "fp32")), memory_per_rank(_recipe("llama", "bf16"))
    for key in ("parameters", "gradients", "optimizer_state"):
        assert fp32[key] == bf16[key]
    assert bf16["optimizer_state"] == 2 * bf16["parameters"]


@pytest.mark.parametrize(
    "change",
    [
        {"sliding_window": 4},
        {"position": "alibi"},
        {"sliding_window": 4, "position": "alibi"},
        {"attention_sinks": True},
        {"attention_sinks": True, "sliding_window": 4},
    ],  # fmt: skip
    ids=str,
)
def test_cuda_attention_keeps_no_score_sized_tensor_for_any_mask(change: dict) -> None:
    """On CUDA every mask and bias runs a fused kernel (FlexAttention with a block mask): kept memory is linear
    in the sequence length; on CPU SDPA keeps the dense [B, H, S, S] mask or bias."""

    def layers(device: str, seq: int) -> int:
        r = Recipe()
        r.model = ModelConfig(
            vocab_size=64, d_model=32, n_layers=2, n_heads=4, kv_heads=2, ffn_hidden=48, max_seq_len=64,
            **change,
        )  # fmt: skip
        r.data.seq_len, r.train.micro_batch_size = seq, 2
        return activation_breakdown(r, device=device)["layers"]

    assert layers("cuda", 32) == 2 * layers("cuda", 16)
    assert layers("cpu", 32) > 2 * layers("cpu", 16)
    assert keeps_score_tensor(
        ModelConfig(attention_dropout=0.1), cpu=False
    )  # Flex has no dropout: SDPA + mask


# --------------------------------------------------------------------------------------- recurrent mixers
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(MIXER_CASES))
def test_mixer_activations_exact(name: str, dtype: str) -> None:
    """Hybrids and mixer-only stacks: the per-mixer formulas (memory.gdn_activation_bytes,
    mamba2_activation_bytes) match what the PyTorch chunked paths keep, to the byte but for scalars; the whole
    estimate within the usual tolerance."""
    recipe = _recipe(name, dtype)
    measured, estimate = measure(recipe, live=True), memory_per_rank(recipe)
    assert estimate["activations"] == pytest.approx(measured.activations, rel=1e-3)
    _assert_close(estimate, measured)


@pytest.mark.parametrize("seq_len", [16, 40])
def test_mixer_activations_exact_at_other_lengths(seq_len: int) -> None:
    """Unpadded (16 = 2 chunks of 8) and padded (40 = 5 chunks of 8 and 8 chunks of 5) sequences."""
    for name in ("mamba2_only", "gdn_hybrid"):
        recipe = _recipe(name, "bf16", seq_len=seq_len)
        estimate = memory_per_rank(recipe)["activations"]
        assert estimate == pytest.approx(measure(recipe, live=True).activations, rel=1e-3), name


def _layer_bytes(model: ModelConfig, seq_len: int, device: str = "cuda") -> int:
    r = Recipe(model=model)
    r.data.seq_len, r.train.micro_batch_size, r.precision.dtype = seq_len, 1, "bf16"
    return activation_breakdown(r, device=device)["layers"]


@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_recurrent_mixers_grow_linearly_in_sequence(mixer: str) -> None:
    """Twice the tokens, twice the bytes for the recurrent mixers (up to Mamba-2's chunk-pass decay, quadratic in
    the number of chunks but tiny); attention on CPU keeps an S x S mask and grows faster."""
    model = ModelConfig(
        vocab_size=256, d_model=256, n_layers=2, n_heads=4, ffn_hidden=512, max_seq_len=8192,
        layers=LayersConfig(pattern=[mixer], feed_forward=False),
        gdn=GDNConfig(heads=4, key_head_dim=64, value_head_dim=64), mamba2=Mamba2Config(heads=8, head_dim=64),
    )  # fmt: skip
    assert _layer_bytes(model, 4096) / _layer_bytes(model, 2048) == pytest.approx(2.0, rel=0.01)
    attention = ModelConfig(vocab_size=256, d_model=256, n_layers=2, n_heads=4, ffn_hidden=512, max_seq_len=8192,
                            sliding_window=128)  # fmt: skip
    assert _layer_bytes(attention, 4096, "cpu") / _layer_bytes(attention, 2048, "cpu") > 2.4


@pytest.mark.parametrize("name", ["llama", "bert", "gpt2_layernorm_gelu_bias_dropout"])
def test_muon_state_is_one_momentum_per_matrix(name: str) -> None:
    """optim.name muon: the optimizer's real state after one step (momentum for the matrices, AdamW's moments
    for the rest; not AdamW's `step` scalars) is optimizer_state exactly, and well under AdamW's alone."""
    from framework.train.optim import build_optimizer

    recipe = _recipe(name, "fp32")
    recipe.optim.name = "muon"
    model = build_model(recipe.model)
    init_weights(model, recipe.model, seed=0)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer = build_optimizer(model, recipe.optim, torch.device("cpu"))
    optimizer.step()
    state = [t for s in optimizer.state.values() for k, t in s.items() if k != "step"]
    estimate = memory_per_rank(recipe)["optimizer_state"]
    assert estimate == _nbytes(state)
    assert estimate < 0.75 * memory_per_rank(_recipe(name, "fp32"))["optimizer_state"]
