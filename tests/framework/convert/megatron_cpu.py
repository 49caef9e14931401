"""Test-only: megatron-core 0.16.1's GPTModel (local layer spec) on CPU/gloo, as the independent reference of
tests/framework/convert/test_megatron.py. Never imported by framework/.

megatron-core hard-codes CUDA in a few places this needs (all measured with 0.16.1 on torch 2.13.0+cpu):
- `RotaryEmbedding.get_emb` moves `inv_freq` to `torch.cuda.current_device()` on the first forward
  ("AssertionError: Torch not compiled with CUDA enabled"): current_device is redirected to the CPU device.
- `dist_checkpointing.save` calls `torch.cuda.synchronize()` in `filesystem_async.preload_tensors` (same error):
  redirected to a no-op.
- the CUDA RNG tracker forks CUDA RNG state around attention dropout: replaced by megatron's own inference
  tracker (`initialize_rng_tracker(inference_rng_tracker=True)`), whose fork is a null context (dropout is 0).
- `get_default_causal_mask` builds the mask with device="cuda" when no mask is passed: the forward passes an
  explicit causal mask instead.
- a bug without Transformer Engine: `moe_utils.router_gating_linear` tests `te_general_gemm is not None`, but
  the module binds that name only when TE imports ("NameError: name 'te_general_gemm' is not defined" in the
  first MoE forward): the name is bound to None.
- `MoEAlltoAllTokenDispatcher` creates a `torch.cuda.Stream()` at construction: the models use the allgather
  dispatcher.
The redirection is a context manager (`cpu_redirect`) so nothing leaks into other tests of the process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


@contextmanager
def cpu_redirect() -> Iterator[None]:
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe import moe_utils

    with (
        mock.patch.object(torch.cuda, "current_device", lambda: torch.device("cpu")),
        mock.patch.object(torch.cuda, "synchronize", lambda *a, **k: None),
        mock.patch.object(moe_utils, "te_general_gemm", None, create=True),
    ):
        mrandom.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
        yield


def build_gpt(args: dict[str, Any], *, tp: int = 1, pp: int = 1, ep: int = 1) -> torch.nn.Module:
    """GPTModel from the YAML mapping `loom convert --to megatron` writes (transformer_config, gpt_model,
    layer_spec), fp32 on the CPU, for the current parallel_state."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = dict(args["transformer_config"])
    fields["activation_func"] = ACTIVATIONS[fields.get("activation_func", "gelu")]
    if fields.get("num_moe_experts"):
        fields["moe_token_dispatcher_type"] = "allgather"  # alltoall creates a torch.cuda.Stream
    config = TransformerConfig(
        **fields, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep, use_cpu_initialization=True, params_dtype=torch.float32,
        sequence_parallel=False, pipeline_dtype=torch.float32,
    )  # fmt: skip
    if isinstance(fields.get("moe_layer_freq"), list):  # dense and MoE layers mixed: one spec per layer
        spec = get_gpt_decoder_block_spec(
            config, use_transformer_engine=False, normalization=args["layer_spec"]["normalization"]
        )
    else:
        spec = get_gpt_layer_local_spec(**args["layer_spec"])
    return GPTModel(
        config, spec, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        parallel_output=False, **args["gpt_model"],
    )  # fmt: skip


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """[B, S, V] logits of a whole (non-pipelined) model for token ids [B, S], causal attention."""
    seq = ids.shape[1]
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]  # True = masked
    positions = torch.arange(seq).expand_as(ids)
    model.eval()
    with torch.no_grad():
        return model(ids, positions, attention_mask=mask).float()


def save(model: torch.nn.Module, directory: Path) -> None:
    from megatron.core import dist_checkpointing

    directory.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(directory))


def load(model: torch.nn.Module, directory: Path) -> None:
    """dist_checkpointing.load, accepting only one mismatch: `_extra_state` objects absent from the checkpoint.
    Loom's exports hold tensors only, and the local spec's layers keep None there (Transformer Engine keeps its
    FP8 metadata); megatron's default strictness would fail on the absent keys inside DCP's load planner."""
    from megatron.core import dist_checkpointing

    state, missing, unexpected = dist_checkpointing.load(
        model.sharded_state_dict(), str(directory), strict="return_all"
    )
    assert not missing, f"checkpoint tensors the model did not ask for: {sorted(missing)[:4]}"
    assert all("_extra_state" in key for key in unexpected), sorted(unexpected)[:4]
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and all(k.endswith("_extra_state") for k in result.missing_keys)


def _parallel(tp: int = 1, pp: int = 1, ep: int = 1) -> None:
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep
    )


def _perturb(model: torch.nn.Module) -> None:
    """Norm gains and biases (and the router's expert bias) start at 1 and 0, which would hide a swapped or dropped
    norm or bias."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            if "norm" in name or name.endswith("bias"):  # expert_bias is a buffer
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def _write_logits(model: torch.nn.Module, ids: torch.Tensor, path: Path) -> None:
    out = logits(model, ids)
    if dist.get_rank() == 0:
        save_file({"logits": out.contiguous()}, str(path))
    dist.barrier()


def worker(rank: int, port: int, plan: dict[str, Any]) -> None:
    """One of 2 gloo processes. plan: `root` folder, `ids` token ids, `models` {name: (args, layouts)} built at
    TP1 (seed 0), saved to root/name/tp1 with their logits in root/name/logits.safetensors, then re-saved at
    each layout in `layouts` (tp2, pp2, ep2) after loading the TP1 checkpoint; `exports` {name: (folder, args,
    layouts)}: megatron checkpoints to load at each layout and run (logits to root/<name>_<layout>.safetensors;
    pp2: loaded only, each rank touches root/<name>_pp2_rank<r>.loaded)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    root, ids = Path(plan["root"]), plan["ids"]
    try:
        with cpu_redirect():
            _run(root, ids, plan)
    finally:
        dist.destroy_process_group()


LAYOUTS = {"tp1": {}, "tp2": {"tp": 2}, "pp2": {"pp": 2}, "ep2": {"ep": 2}}


def _run(root: Path, ids: torch.Tensor, plan: dict[str, Any]) -> None:
    _parallel()
    for name, (args, _) in plan["models"].items():
        torch.manual_seed(0)
        model = build_gpt(args)
        _perturb(model)
        save(model, root / name / "tp1")
        _write_logits(model, ids, root / name / "logits.safetensors")
    for layout, sizes in LAYOUTS.items():
        _parallel(**sizes)
        for name, (args, layouts) in plan["models"].items():
            if layout in layouts:
                model = build_gpt(args, **sizes)
                load(model, root / name / "tp1")
                save(model, root / name / layout)
        for name, (folder, args, layouts) in plan["exports"].items():
            if layout in layouts:
                model = build_gpt(args, **sizes)
                load(model, Path(folder))
                if layout == "pp2":  # a stage cannot run alone (the pipeline schedules hard-code CUDA)
                    (root / f"{name}_{layout}_rank{dist.get_rank()}.loaded").touch()
                else:
                    _write_logits(model, ids, root / f"{name}_{layout}.safetensors")
    _parallel()
