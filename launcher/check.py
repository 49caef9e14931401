"""`loom check`: validate a recipe and report its resolved form, size, FLOPs and memory per rank, and for a recipe
laid out for a cluster its layout and whether it fits the GPU it names (launch.gpu)."""

from __future__ import annotations

import dataclasses
import re

from framework.config.loader import dump_recipe, load_recipe
from framework.config.schema import Recipe


def _human(n: float, unit: str = "") -> str:
    for suffix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def _gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB"


def summary(recipe: Recipe) -> str:
    """Parameter counts, FLOPs per token and memory per rank of a validated recipe."""
    from framework.models.flops import flops_per_token, param_counts
    from framework.models.memory import memory_per_rank

    # the headline counts the model a checkpoint converts to (the MTP depths have their own line), as published
    # sizes do: DeepSeek-V3's 671B excludes its MTP module
    counts = param_counts(dataclasses.replace(recipe.model, mtp=None))
    flops = flops_per_token(recipe.model, recipe.data.seq_len, training=True)
    memory = memory_per_rank(recipe)
    lines = [
        "# summary",
        f"parameters: total {counts['total']:,} ({_human(counts['total'])}), active {counts['active']:,}, "
        f"embedding {counts['embedding']:,}, non-embedding {counts['non_embedding']:,}"
        + (" (without model.mtp's depths)" if recipe.model.mtp is not None else ""),
        *_moe_lines(recipe, counts),
        *_mixer_lines(recipe),
        *_mtp_lines(recipe, flops),
        *_optimizer_lines(recipe),
        f"training FLOPs per token (seq_len {recipe.data.seq_len}): {_human(flops)}"
        + (" with active experts only" if recipe.model.moe else "")
        + " (see docs/flops.md)",
        "memory per rank (micro-batch "
        f"{recipe.train.micro_batch_size} x {recipe.data.seq_len}, {recipe.precision.dtype}): "
        + ", ".join(f"{k} {_gib(v)}" for k, v in memory.items()),
        _fit_line(recipe),
        *_cluster_lines(recipe),
    ]
    return "\n".join(lines)


def _cluster_lines(recipe: Recipe) -> list[str]:
    """For a recipe written for a cluster (launch.gpu named, or more than one rank): its layout on
    launch.nnodes x nproc_per_node ranks, checked as `loom train` and `loom submit` check it (a ConfigError when
    it does not fit the world), and the memory per rank against the named GPU's."""
    from framework.models.memory import named_gpu_fit
    from framework.parallel.dims import ParallelDims

    launch = recipe.launch
    world = launch.nnodes * launch.nproc_per_node
    if launch.gpu is None and world == 1:
        return []
    dims = ParallelDims.from_recipe(recipe, world)
    nodes = f"{launch.nnodes} node{'s' * (launch.nnodes > 1)}"
    lines = [f"layout on {nodes} x {launch.nproc_per_node} ranks: {dims.describe()}"]
    fit = named_gpu_fit(recipe)
    if fit is not None:
        verdict = "fits" if fit.fits else "DOES NOT FIT"
        lines.append(
            f"memory fit on launch.gpu: {verdict} {fit.where}: {_gib(fit.need)} of {_gib(fit.limit)} "
            f"({fit.need / fit.limit:.0%}; {fit.what})"
        )
    return lines


def _fit_line(recipe: Recipe) -> str:
    """Whether the recipe's model fits this machine's device with the recipe's ranks (launch.*): a report, not a
    refusal, since a cluster's recipe is often checked elsewhere; `loom train` refuses (framework/run.py). A
    recipe that names its GPU (launch.gpu) is not compared with a CPU's RAM: `_cluster_lines` reports its fit."""
    import torch

    from framework.models.memory import fit_of

    device = recipe.train.device
    if device != "cpu" and torch.cuda.is_available():
        device = "cuda:0"
    elif device == "cuda":
        return "memory fit: not checked (train.device cuda, and this machine has no CUDA device)"
    elif recipe.launch.gpu is not None:
        return (
            f"memory fit here: not checked (laid out for launch.gpu {recipe.launch.gpu}; no CUDA device here)"
        )
    else:
        device = "cpu"
    fit = fit_of(recipe, recipe.launch.nproc_per_node * recipe.launch.nnodes, device)
    verdict = "fits" if fit.fits else "DOES NOT FIT; `loom train` would refuse it here"
    return (
        f"memory fit on {fit.where}: {verdict} (needs {_gib(fit.need)} for {fit.what}, has {_gib(fit.limit)})"
    )


def _mixer_lines(recipe: Recipe) -> list[str]:
    """The blocks of each sequence mixer of a model.layers pattern, with their token-mixing training FLOPs per
    token (attention grows with seq_len, the recurrent mixers do not); nothing without a pattern."""
    from framework.models.flops import mixing_flops_by_mixer

    if recipe.model.layers is None or recipe.model.family != "decoder":
        return []
    by_mixer = mixing_flops_by_mixer(recipe.model, recipe.data.seq_len)
    parts = [f"{blocks} {name} ({_human(3 * flops)})" for name, (blocks, flops) in by_mixer.items()]
    return ["mixers: " + ", ".join(parts) + " blocks (token-mixing training FLOPs per token)"]


def _mtp_lines(recipe: Recipe, flops: float) -> list[str]:
    """Multi-token prediction's share of the parameters and of the training FLOPs per token (nothing without)."""
    from framework.models.flops import flops_per_token, mtp_params

    mtp = recipe.model.mtp
    if mtp is None:
        return []
    without = flops_per_token(dataclasses.replace(recipe.model, mtp=None), recipe.data.seq_len, training=True)
    return [
        f"mtp: depth {mtp.depth}, loss weight {mtp.loss_weight}; parameters {_human(mtp_params(recipe.model))} "
        f"(dropped by `loom convert --to hf`), training FLOPs per token +{(flops / without - 1):.1%}"
    ]


MAX_LISTED_LAYERS = 512
"""The optimizer's groups come from the model built on the meta device: seconds per thousand layers, so deeper
(hypothetical) models are not listed."""


def _optimizer_lines(recipe: Recipe) -> list[str]:
    """The optimizer's parameter groups (optim.name and its rules), from the model built on the meta device: per
    group its algorithm, weight decay, tensor and parameter counts, and its names with layer indices folded."""
    import torch

    from framework.models.transformer import build_model
    from framework.train.optim import group_names

    lines = [f"optimizer: {recipe.optim.name} (groups from framework/train/optim.py's rules; optim.muon.include/"
             "exclude move parameters between Muon and AdamW)"]  # fmt: skip
    if recipe.model.n_layers > MAX_LISTED_LAYERS:
        return [lines[0] + f"; groups not listed for more than {MAX_LISTED_LAYERS} layers"]
    with torch.device("meta"):
        model = build_model(recipe.model)
    params = dict(model.named_parameters())
    for algorithm, decay, names in group_names(model, recipe.optim):
        count = sum(params[n].numel() for n in names)
        folded = list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n) for n in names))
        lines.append(
            f"  {algorithm} (weight decay {decay:g}): {len(names)} tensors, {_human(count)} parameters: "
            + ", ".join(folded)
        )
    return lines


def _moe_lines(recipe: Recipe, counts: dict[str, int]) -> list[str]:
    """Total vs active parameters of an MoE model, and its layer pattern (nothing for dense models)."""
    moe = recipe.model.moe
    if moe is None:
        return []
    layers = recipe.model.moe_layers
    return [
        f"moe: {len(layers)} of {recipe.model.n_layers} layers, {moe.n_experts} experts (top-{moe.top_k}"
        f", {moe.n_shared_experts} shared); parameters total {_human(counts['total'])}, "
        f"active per token {_human(counts['active'])} ({counts['active'] / counts['total']:.1%})"
    ]


def check(path: str, overrides: list[str]) -> str:
    """Load and validate the recipe (ConfigError on mistakes) and return the report to print."""
    recipe = load_recipe(path, overrides)
    return "# resolved recipe\n" + dump_recipe(recipe) + "\n" + summary(recipe)
