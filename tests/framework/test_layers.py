"""The package layers (docs/architecture.md), read from every import statement of framework/ with `ast`
(function-level imports included): each folder may import only the folders below it. The layer step of issue 19
moved the train-module engines out of parallel/ and consolidate out of checkpoint/ to make this table true."""

from __future__ import annotations

import ast
from pathlib import Path

FRAMEWORK = Path(__file__).resolve().parents[2] / "framework"
DIST = "torch.distributed"
# folder (or top-level module) -> what it may import besides itself and torch; DIST: torch.distributed
# gpus (the GPU table: memory and peak TFLOP/s by model, plain data) sits below config; any folder may read it.
ALLOWED = {
    "gpus": set(),
    "config": set(),
    "outputs": {"config"},
    "data": {"config", "outputs"},
    "models": {"config", "data"},  # models/ is single-device PyTorch: never torch.distributed
    "kernels": {"config", "models"},
    "parallel": {"config", "models", "kernels", DIST},  # layout code: never train/ or engines/
    "checkpoint": {"config", "outputs", DIST},
    "train": {"config", "outputs", "models", "kernels", "checkpoint", DIST},
    "engines": {"config", "models", "parallel", "train", DIST},
    "deepspeed": {"config", "models", "parallel", "train", DIST},
    "convert": {"config", "outputs", "data", "models", "kernels", "checkpoint", "train", "deepspeed", DIST},
    "run_dir": {"config", "outputs", "checkpoint", "train"},
    "run": {"config", "data", "models", "kernels", "parallel", "engines", "train", "run_dir", DIST},
}


def imported(path: Path) -> set[str]:
    """framework folders (second name component), DIST and 'launcher' that a module imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            if name.startswith("framework."):
                found.add(name.split(".")[1])
            elif name == DIST or name.startswith(DIST + "."):
                found.add(DIST)
            elif name.split(".")[0] == "launcher":
                found.add("launcher")
    return found


def test_every_folder_imports_only_the_layers_below_it() -> None:
    wrong = []
    for path in sorted(FRAMEWORK.rglob("*.py")):
        relative = path.relative_to(FRAMEWORK)
        layer = relative.parts[0] if len(relative.parts) > 1 else relative.stem
        if layer == "__init__":
            continue
        assert layer in ALLOWED, f"framework/{relative}: a new folder; give it a row in ALLOWED"
        extra = imported(path) - ALLOWED[layer] - {layer, "gpus"}
        wrong += [f"framework/{relative} imports {name}" for name in sorted(extra)]
    assert not wrong, "\n".join(wrong)


def test_the_reader_sees_function_level_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "def f():\n    from framework.train.loss import x\n    import torch.distributed as dist\n"
    )
    assert imported(module) == {"train", DIST}
