"""Extract the public API of Transformer Engine's PyTorch frontend from its pure-Python sources, without importing
them (TE needs CUDA and cuDNN to import), into a small JSON manifest for tests/framework/kernels/test_te_contract.py.

The sources are the `transformer_engine` wheel from PyPI (1.2 MB, pure Python: it holds
`transformer_engine/pytorch/**.py` and `transformer_engine/common/recipe`; the compiled parts live in the
transformer_engine_cu12 / _cu13 wheels and the transformer_engine_torch sdist):

    pip download transformer-engine==2.20.2 --no-deps -d /tmp/te
    python tools/te_api_manifest.py /tmp/te/transformer_engine-2.20.2-py3-none-any.whl \
        > tests/framework/kernels/data/te_api_2.20.2.json

For each public name of MODULES the manifest records: classes -> their __init__ and forward parameters (dataclass
fields for dataclasses, inherited through base classes found in the sources) and class-level member names;
functions -> their parameters; re-exported modules -> kind "module".
"""

from __future__ import annotations

import ast
import json
import sys
import zipfile
from pathlib import Path
from typing import Any

MODULES = ("transformer_engine.pytorch", "transformer_engine.common.recipe")
Sources = dict[str, str]
Entry = dict[str, Any]


def read_sources(path: Path) -> Sources:
    """{'transformer_engine/pytorch/__init__.py': text, ...} from a wheel / zip or an unpacked directory."""
    if path.is_dir():
        files = path.rglob("transformer_engine/**/*.py")
        return {str(f.relative_to(path)): f.read_text() for f in files}
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.startswith("transformer_engine/") and n.endswith(".py")]
        return {n: archive.read(n).decode() for n in names}


def version_of(path: Path) -> str:
    """The version in a wheel's file name (transformer_engine-2.20.2-py3-none-any.whl -> 2.20.2)."""
    return path.name.split("-")[1] if path.is_file() else "unknown"


def module_path(sources: Sources, module: str) -> str | None:
    base = module.replace(".", "/")
    for candidate in (f"{base}.py", f"{base}/__init__.py"):
        if candidate in sources:
            return candidate
    return None


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute module an ImportFrom in `module` names (resolves `from .x import y`)."""
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    keep = len(parts) - node.level + (1 if is_package else 0)
    return ".".join(parts[:keep] + ([node.module] if node.module else []))


class Extractor:
    """Resolves public names through re-exports to their class / function definitions."""

    def __init__(self, sources: Sources) -> None:
        self.sources = sources
        self._trees: dict[str, ast.Module] = {}

    def tree(self, module: str) -> ast.Module | None:
        path = module_path(self.sources, module)
        if path is None:
            return None
        if module not in self._trees:
            self._trees[module] = ast.parse(self.sources[path])
        return self._trees[module]

    def public_names(self, module: str) -> list[str]:
        tree = self.tree(module)
        names: set[str] = set()
        for node in tree.body if tree else []:
            if isinstance(node, ast.ImportFrom):
                names.update(a.asname or a.name for a in node.names)
            elif isinstance(node, ast.ClassDef | ast.FunctionDef):
                names.add(node.name)
        return sorted(n for n in names if not n.startswith("_") and n != "*")

    def find(self, module: str, name: str, depth: int = 0) -> tuple[str, ast.AST] | None:
        """(defining module, ClassDef/FunctionDef/'module' marker) for `name` as seen from `module`."""
        tree = self.tree(module)
        if tree is None or depth > 8:
            return None
        for node in tree.body:
            if isinstance(node, ast.ClassDef | ast.FunctionDef) and node.name == name:
                return module, node
        is_package = module_path(self.sources, module).endswith("__init__.py")
        for node in tree.body:
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        source = _absolute(module, node, is_package)
                        if self.tree(f"{source}.{alias.name}") is not None:
                            return f"{source}.{alias.name}", ast.Module(body=[], type_ignores=[])
                        return self.find(source, alias.name, depth + 1)
        return None

    def entry(self, module: str, name: str) -> Entry | None:
        found = self.find(module, name)
        if found is None:
            return None
        where, node = found
        if isinstance(node, ast.Module):
            return {"kind": "module"}
        if isinstance(node, ast.FunctionDef):
            return {"kind": "function", "params": signature(node, method=False)}
        entry: Entry = {"kind": "class", "init": self.method(where, node, "__init__")}
        forward = self.method(where, node, "forward")
        if forward is not None:
            entry["forward"] = forward
        if members(node):
            entry["members"] = members(node)
        return entry

    def method(self, module: str, cls: ast.ClassDef, name: str, depth: int = 0) -> Entry | None:
        """Parameters of cls.<name>, looked up through the base classes defined in TE's sources."""
        for node in cls.body:
            if isinstance(node, ast.FunctionDef) and node.name == name:
                return signature(node, method=True)
        if name == "__init__" and is_dataclass(cls):
            return {
                "params": self.dataclass_fields(module, cls),
                "positional": -1,
                "varargs": False,
                "varkw": False,
            }
        for base in cls.bases:
            found = self.find(module, base.id) if isinstance(base, ast.Name) and depth < 8 else None
            if found and isinstance(found[1], ast.ClassDef):
                return self.method(found[0], found[1], name, depth + 1)
        return None

    def dataclass_fields(self, module: str, cls: ast.ClassDef) -> list[str]:
        fields: list[str] = []
        for base in cls.bases:
            found = self.find(module, base.id) if isinstance(base, ast.Name) else None
            if found and isinstance(found[1], ast.ClassDef) and is_dataclass(found[1]):
                fields += self.dataclass_fields(found[0], found[1])
        own = [
            n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
        ]
        return fields + [f for f in own if f not in fields]


def is_dataclass(cls: ast.ClassDef) -> bool:
    def name(d: ast.expr) -> str:
        d = d.func if isinstance(d, ast.Call) else d
        return d.attr if isinstance(d, ast.Attribute) else getattr(d, "id", "")

    return any(name(d) == "dataclass" for d in cls.decorator_list)


def signature(fn: ast.FunctionDef, *, method: bool) -> Entry:
    """Parameter names (self dropped), how many may be given by position (-1: any), *args / **kwargs flags."""
    a = fn.args
    positional = [p.arg for p in a.posonlyargs + a.args][1 if method else 0 :]
    return {
        "params": positional + [p.arg for p in a.kwonlyargs],
        "positional": -1 if a.vararg else len(positional),
        "varargs": a.vararg is not None,
        "varkw": a.kwarg is not None,
    }


def members(cls: ast.ClassDef) -> list[str]:
    """Names assigned in the class body (enum members, class constants, annotated fields)."""
    names = []
    for node in cls.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        names += [t.id for t in targets if isinstance(t, ast.Name)]
    return sorted(set(names))


def build_manifest(sources: Sources, version: str) -> dict[str, Any]:
    extractor = Extractor(sources)
    modules: dict[str, dict[str, Entry]] = {}
    for module in MODULES:
        entries = {name: extractor.entry(module, name) for name in extractor.public_names(module)}
        modules[module] = {name: entry for name, entry in entries.items() if entry is not None}
    return {"transformer_engine": version, "modules": modules}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tools/te_api_manifest.py WHEEL_OR_DIR > manifest.json", file=sys.stderr)
        return 2
    path = Path(argv[0])
    print(dumps(build_manifest(read_sources(path), version_of(path))))
    return 0


def dumps(manifest: dict[str, Any]) -> str:
    """JSON with one line per TE name: small, and a version bump reads as a line diff."""
    lines = ["{", f' "transformer_engine": {json.dumps(manifest["transformer_engine"])},', ' "modules": {']
    for m, (module, entries) in enumerate(sorted(manifest["modules"].items())):
        lines.append(f"  {json.dumps(module)}: {{")
        items = sorted(entries.items())
        for i, (name, entry) in enumerate(items):
            comma = "," if i < len(items) - 1 else ""
            lines.append(f"   {json.dumps(name)}: {json.dumps(entry, sort_keys=True)}{comma}")
        lines.append("  }" + ("," if m < len(manifest["modules"]) - 1 else ""))
    return "\n".join([*lines, " }", "}"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
