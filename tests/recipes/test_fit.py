"""Every shipped recipe fits the cluster it names: the GPU model (launch.gpu) and its layout over launch.nnodes x
nproc_per_node ranks need at most 90% of that GPU's memory per rank by the memory model, and the header comment and
README's table say the same cluster as the launch section."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from framework.config.loader import load_recipe
from framework.config.schema import Recipe
from framework.gpus import gpu_named
from framework.models.memory import memory_per_rank, named_gpu_fit
from framework.parallel.dims import ParallelDims

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
HEADROOM = 0.90
"""At most this share of the GPU's memory: the estimate leaves out the CUDA context, NCCL buffers, temporaries and
the allocator's fragmentation (framework/models/memory.py)."""

ONE_DEVICE = {
    "debug": "the CPU demo (`make demo`): one process, no cluster",
    "smoke": "`loom smoke`'s default: one device, whichever the machine has",
}
"""Recipes for one device of any kind: they name no cluster."""

CLUSTER = re.compile(r"^# Cluster: (\d+) nodes? x (\d+) (\S+?)\. (.*)", re.MULTILINE)
"""The header's cluster sentence, e.g. '# Cluster: 4 nodes x 8 H100-80GB. FSDP2 over ...'."""


def cluster_recipes() -> list:
    return [
        pytest.param(p, id=p.stem, marks=pytest.mark.skip(reason=ONE_DEVICE[p.stem]))
        if p.stem in ONE_DEVICE
        else pytest.param(p, id=p.stem)
        for p in RECIPES
    ]


def world(recipe: Recipe) -> int:
    return recipe.launch.nnodes * recipe.launch.nproc_per_node


def header(path: Path) -> str:
    """The comment lines the file opens with, joined (a sentence may wrap over lines)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return re.sub(r"\n# (?!Cluster:)", " ", "\n".join(lines))


@pytest.mark.parametrize("path", cluster_recipes())
def test_fits_the_named_gpu_with_headroom(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.launch.gpu is not None, "a cluster recipe names its GPU in launch.gpu"
    dims = ParallelDims.from_recipe(recipe, world(recipe))  # the layout is valid on that world
    assert dims.world_size > 1
    need = memory_per_rank(recipe, device="cuda")["total"]
    limit = gpu_named(recipe.launch.gpu).memory_bytes
    assert need <= HEADROOM * limit, f"{need / 2**30:.1f} GiB of {limit / 2**30:.1f} GiB"
    fit = named_gpu_fit(recipe)  # what `loom check` reports
    assert fit is not None and fit.fits and (fit.need, fit.limit) == (need, limit)


@pytest.mark.parametrize("path", cluster_recipes())
def test_the_layout_is_what_makes_it_fit(path: Path) -> None:
    """The layout is not decoration: the recipe on its named GPU alone (one process, the whole model) needs more
    than it does spread over its cluster."""
    recipe = load_recipe(path)
    one = [
        "launch.nnodes=1",
        "launch.nproc_per_node=1",
        "parallel.ep=1",
        "parallel.cp=1",
        "parallel.cp_ring=1",
    ]
    alone = load_recipe(path, [*one, "parallel.dp_shard=-1"])
    assert memory_per_rank(recipe, device="cuda")["total"] < memory_per_rank(alone, device="cuda")["total"]


@pytest.mark.parametrize("path", cluster_recipes())
def test_the_header_states_the_launch_and_layout(path: Path) -> None:
    recipe, text = load_recipe(path), header(path)
    found = CLUSTER.findall(text)
    assert len(found) == 1, f"one '# Cluster: N node(s) x G GPU. ...' sentence in the header of {path.name}"
    nodes, gpus, gpu, layout = found[0]
    launch = recipe.launch
    assert (int(nodes), int(gpus), gpu) == (launch.nnodes, launch.gpus_per_node, launch.gpu)
    assert launch.nproc_per_node == launch.gpus_per_node  # one worker per GPU (loom submit's rule)
    micro, seq = re.search(r"micro-batch (\d+) x (\d+)", layout).groups()
    assert (int(micro), int(seq)) == (recipe.train.micro_batch_size, recipe.data.seq_len)
    dp = ParallelDims.from_recipe(recipe, world(recipe)).dp
    accumulation = recipe.train.global_batch_size // (recipe.train.micro_batch_size * dp)
    steps = re.search(r"(\d+) accumulation steps|no accumulation", layout)
    assert int(steps.group(1) or 1) == accumulation, layout
    checkpointing = {"none": "no activation checkpointing", "full": "full activation checkpointing",
                     "selective": "selective activation checkpointing"}  # fmt: skip
    assert checkpointing[recipe.parallel.activation_checkpointing] in layout
    assert (f"ep {recipe.parallel.ep}" in layout) == (recipe.parallel.ep > 1)


@pytest.mark.parametrize("path", [p for p in RECIPES if p.stem in ONE_DEVICE], ids=lambda p: p.stem)
def test_one_device_recipes_name_no_cluster(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.launch.gpu is None and world(recipe) == 1 and not CLUSTER.search(header(path))


def test_the_readme_table_lists_each_recipe_with_its_cluster() -> None:
    rows = dict(
        re.findall(r"^\| `([\w.-]+)` \| [^|]+ \| ([^|]+?) \|", (ROOT / "README.md").read_text(), re.M)
    )
    assert set(rows) == {p.stem for p in RECIPES}
    for path in RECIPES:
        launch = load_recipe(path).launch
        expected = (
            "one device"
            if path.stem in ONE_DEVICE
            else f"{launch.nnodes} x {launch.gpus_per_node} {launch.gpu}"
        )
        assert rows[path.stem] == expected, path.stem
