"""Bytes of parameters, gradients and optimizer state each rank holds: DeepSpeed ZeRO-1/2/3/3+offload vs FSDP2.

The model is recipes/llama-125m.yaml's (134M parameters, fp32, AdamW). Each configuration runs in its own
`--world` freshly spawned gloo processes: build the engine, take one optimizer step on a synthetic batch (so
AdamW's moments exist), run the next step's forward and backward (so the gradients exist), then count every
tensor storage alive in the process once (by data pointer), classified as

- parameters: the model's parameters as this rank holds them (FSDP2 / ZeRO-3: its shard; ZeRO-3's `ds_tensor`);
- optimizer state: AdamW's moments plus the fp32 master copy DeepSpeed keeps of its partition (ZeRO 1-3);
- gradients and buffers: everything else still alive after the step (gradient buffers, DeepSpeed's flat
  reduction buffers, RoPE tables).

On a GPU, `torch.cuda.max_memory_allocated` is the measure (printed too when CUDA is used). On CPU, offload
cannot lower anything (the "device" is host memory): the offload rows report which bytes DeepSpeed keeps in host
memory, i.e. what a GPU would not hold. Ratios are against FSDP2 in the same run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/zero_memory.py [--world 2] [--configs fsdp2,zero1,...]
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from framework.config.loader import load_recipe
from framework.config.schema import Recipe
from framework.engines.build import train_module_for
from framework.parallel.dims import ParallelDims, build_mesh
from framework.run import build_parallel_model, materialize_model

CONFIGS: dict[str, dict[str, Any]] = {
    "fsdp2": {},
    "zero1": {"zero_stage": 1},
    "zero2": {"zero_stage": 2},
    "zero3": {"zero_stage": 3},
    "zero3_offload": {"zero_stage": 3, "offload_optimizer": "cpu", "offload_params": "cpu"},
    # DeepSpeed's default reduce bucket is 5e8 elements (2 GB in fp32): the size for billion-parameter models
    "zero3_buckets_5e7": {
        "zero_stage": 3,
        "config": {"zero_optimization": {"reduce_bucket_size": 50_000_000}},
    },
}
SEQ = 128
CPU = torch.device("cpu")


def recipe_for(name: str, world: int) -> Recipe:
    sets = ["train.global_batch_size=" + str(world), "train.micro_batch_size=1", f"data.seq_len={SEQ}"]
    sets += ["precision.dtype=fp32", "checkpoint.every=0", "checkpoint.save_final=false"]
    recipe = load_recipe("recipes/llama-125m.yaml", sets)
    if name != "fsdp2":
        recipe.parallel.engine = "deepspeed"
        for key, value in CONFIGS[name].items():
            setattr(recipe.deepspeed, key, value)
    else:
        recipe.parallel.data_parallel, recipe.parallel.dp_shard = "fsdp", world
    return recipe


def build(name: str, recipe: Recipe) -> Any:
    if name == "fsdp2":
        dims = ParallelDims.from_recipe(recipe, dist.get_world_size())
        mesh = build_mesh(dims, "cpu")
        return train_module_for(build_parallel_model(recipe, dims, mesh, CPU), recipe, CPU, dims, mesh)
    from framework.deepspeed.engine import DeepSpeedTrainModule

    return DeepSpeedTrainModule(materialize_model(recipe.model, CPU, 0), recipe, CPU)


def forward_backward(module: Any, vocab: int) -> None:
    ids = torch.randint(0, vocab, (1, SEQ + 1), generator=torch.Generator().manual_seed(dist.get_rank()))
    module.train_batch([{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}])


def storages(tensors: list[torch.Tensor]) -> dict[int, int]:
    """data_ptr -> bytes of each distinct storage among `tensors` (DTensors counted by their local shard)."""
    out: dict[int, int] = {}
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        if t.numel() and t.device.type == "cpu":
            out[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return out


def account(module: Any) -> dict[str, int]:
    gc.collect()
    with warnings.catch_warnings():  # gc sees deprecated tensor subclasses' attributes; harmless here
        warnings.simplefilter("ignore")
        alive = storages([o for o in gc.get_objects() if isinstance(o, torch.Tensor)])
    model = module.engine.module if hasattr(module, "engine") else module.model
    params = storages([getattr(p, "ds_tensor", p) for p in model.parameters()])
    inner = module.engine.optimizer if hasattr(module, "engine") else module.optimizer
    torch_opt = getattr(inner, "optimizer", inner)  # DeepSpeed wraps Loom's AdamW
    state = [t for s in torch_opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    masters = [p for g in torch_opt.param_groups for p in g["params"]] if hasattr(module, "engine") else []
    optim = storages(state + masters)
    optim = {k: v for k, v in optim.items() if k not in params}
    rest = sum(v for k, v in alive.items() if k not in params and k not in optim)
    return {"params": sum(params.values()), "optim": sum(optim.values()), "grads_buffers": rest}


def worker(rank: int, world: int, port: int, name: str, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["WORLD_SIZE"] = str(world)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    recipe = recipe_for(name, world)
    module = build(name, recipe)
    forward_backward(module, recipe.model.vocab_size)
    module.optim_step()  # AdamW's moments now exist
    forward_backward(module, recipe.model.vocab_size)  # and this step's gradients: the steady-state peak
    result = account(module)
    if rank == 0:
        queue.put(result)
    dist.barrier()
    dist.destroy_process_group()


def run_config(name: str, world: int) -> dict[str, int]:
    """`name` in `world` fresh processes (nothing of another configuration is alive); rank 0's accounting."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, world, port, name, queue)) for r in range(world)]
    for p in procs:
        p.start()
    result = queue.get()
    for p in procs:
        p.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args()
    results = {name: run_config(name, args.world) for name in args.configs.split(",")}
    report(results, args.world)


def report(results: dict[str, dict[str, int]], world: int) -> None:
    mib = 2**20
    base = sum(results["fsdp2"].values()) if "fsdp2" in results else None
    print(f"llama-125m, fp32 AdamW, {world} ranks, bytes held per rank at the backward of step 2 (MiB):")
    print(f"{'config':<18}{'params':>10}{'grads+buf':>11}{'optimizer':>11}{'total':>10}{'vs FSDP2':>10}")
    for name, r in results.items():
        total = sum(r.values())
        ratio = f"{total / base:.2f}" if base else "-"
        print(f"{name:<18}{r['params'] / mib:>10.0f}{r['grads_buffers'] / mib:>11.0f}{r['optim'] / mib:>11.0f}"
              f"{total / mib:>10.0f}{ratio:>10}")  # fmt: skip
    print(
        "zero3_offload: its optimizer and parameter partitions live in host memory (on a GPU, not on device)"
    )


if __name__ == "__main__":
    main()
