"""Qwen3-MoE (Qwen3MoeForCausalLM): Qwen3's QK-norm attention with fine-grained SwiGLU experts, top-k softmax
routing and optional renormalisation (norm_topk_prob = Loom's moe.renormalize).

Which layers are sparse: transformers makes layer i sparse iff i is not in mlp_only_layers and
(i + 1) % decoder_sparse_step == 0; Loom's MoE layers are first_dense, first_dense + every, ... An export writes
decoder_sparse_step=1 and lists every dense layer in mlp_only_layers; an import accepts any pair whose sparse
layers form such a progression. Dense layers are a Qwen3 MLP of width intermediate_size (Loom's ffn_hidden).
"""

from __future__ import annotations

from typing import Any

from framework.config.errors import ConfigError
from framework.config.schema import ModelConfig, MoEConfig
from framework.convert.hf import experts, mixtral, qwen3

FILES = experts.FileLayout(block="mlp", gate="gate_proj", up="up_proj", down="down_proj")
renames = mixtral.renames  # MoE or dense per layer; q_norm / k_norm because cfg.qk_norm is set
optional = qwen3.optional


def to_files(cfg: ModelConfig, state: dict[str, Any]) -> dict[str, Any]:
    return experts.to_files(state, FILES)


def from_files(cfg: ModelConfig, state: dict[str, Any]) -> dict[str, Any]:
    return experts.from_files(state, FILES, cfg)


def sparse_layers(hf: Any) -> list[int]:
    """The layers transformers builds as Qwen3MoeSparseMoeBlock."""
    dense = set(hf.mlp_only_layers or [])
    step = hf.decoder_sparse_step
    return [
        i
        for i in range(hf.num_hidden_layers)
        if i not in dense and hf.num_experts > 0 and (i + 1) % step == 0
    ]


def _placement(hf: Any) -> dict[str, int]:
    """first_dense / every reproducing sparse_layers(hf) exactly, or a ConfigError."""
    sparse, n = sparse_layers(hf), hf.num_hidden_layers
    if not sparse:
        raise ConfigError(
            "config.json", "mlp_only_layers", hf.mlp_only_layers, "leaves no sparse layer (a dense model)",
            "import it as qwen3 (a dense Qwen3 checkpoint)",
        )  # fmt: skip
    first = sparse[0]
    every = sparse[1] - first if len(sparse) > 1 else n - first  # one sparse layer: no second one in reach
    if sparse != list(range(first, n, every)):
        raise ConfigError(
            "config.json", "mlp_only_layers", hf.mlp_only_layers,
            f"with decoder_sparse_step={hf.decoder_sparse_step} makes layers {sparse} sparse; Loom's MoE layers are "
            "first_dense, first_dense + every, ... up to the last layer",
            "import a checkpoint whose sparse layers are evenly spaced up to the last layer",
        )  # fmt: skip
    return {"first_dense": first, "every": every}


def model_config(hf: Any) -> dict[str, Any]:
    moe = MoEConfig(
        n_experts=hf.num_experts,
        top_k=hf.num_experts_per_tok,
        expert_hidden=hf.moe_intermediate_size,
        renormalize=bool(hf.norm_topk_prob),
        aux_loss=float(hf.router_aux_loss_coef),
        **_placement(hf),
    )
    return qwen3.model_config(hf) | {"moe": moe}
