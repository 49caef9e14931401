"""Contract test for the Transformer Engine seam, without importing TE (it needs CUDA and cuDNN).

framework/kernels/te.py is read with `ast`; every attribute of a TE module alias it touches (`te.X`,
`te_recipe.Format.HYBRID`), every keyword and positional count of its calls (`te.X(...)` checks X's __init__ or
the function's parameters; calling a variable annotated `te.X` checks X.forward), and every TE module name string
it imports must exist in the API manifest extracted from the pinned TE version's sources by
tools/te_api_manifest.py (vendored in data/, so no network at test time). When that version's wheel is on disk
(LOOM_TE_SOURCES, or ~/.cache/loom/te/), the manifest is regenerated and compared.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from framework.kernels.te import TE_VERSION

ROOT = Path(__file__).resolve().parents[3]
TE_FILE = ROOT / "framework" / "kernels" / "te.py"
MANIFEST = Path(__file__).parent / "data" / f"te_api_{TE_VERSION}.json"
WHEEL = f"transformer_engine-{TE_VERSION}-py3-none-any.whl"
TE_MODULE = re.compile(r"^transformer_engine(\.\w+)*$")


def te_aliases(tree: ast.AST) -> dict[str, str]:
    """Local names bound to TE modules by import statements: {'te': 'transformer_engine.pytorch', ...}."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("transformer_engine") and a.asname:
                    aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("transformer_engine"):
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    return aliases


def typed_variables(tree: ast.AST, aliases: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Parameters annotated with a TE class (`dpa: te.DotProductAttention`) -> (module, class)."""
    typed = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.arg) and isinstance(node.annotation, ast.Attribute):
            base = node.annotation.value
            if isinstance(base, ast.Name) and base.id in aliases:
                typed[node.arg] = (aliases[base.id], node.annotation.attr)
    return typed


def _is_te_module_name(node: ast.AST) -> bool:
    """A string constant naming a TE module (as passed to importlib.import_module)."""
    return (
        isinstance(node, ast.Constant) and isinstance(node.value, str) and bool(TE_MODULE.match(node.value))
    )


def check_call(call: ast.Call, sig: dict[str, Any] | None, label: str) -> list[str]:
    """Errors for a call against a manifest signature (names, positional count, no unverifiable splats)."""
    where = f"line {call.lineno}: {label}"
    if sig is None:
        return [f"{where}: no signature for it in the TE sources"]
    errors = []
    if any(k.arg is None for k in call.keywords) or any(isinstance(a, ast.Starred) for a in call.args):
        errors.append(f"{where}: *args / **kwargs cannot be checked; spell the arguments out")
    if sig["positional"] >= 0 and len(call.args) > sig["positional"]:
        errors.append(f"{where}: {len(call.args)} positional arguments, TE takes {sig['positional']}")
    for k in call.keywords:
        if k.arg is not None and k.arg not in sig["params"] and not sig["varkw"]:
            close = difflib.get_close_matches(k.arg, sig["params"], n=1)
            errors.append(
                f"{where}: no keyword {k.arg!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
            )
    return errors


def contract_errors(source: str, manifest: dict[str, Any]) -> tuple[list[str], set[str]]:
    """(errors, the TE names checked) for Python `source` against `manifest`."""
    tree, modules = ast.parse(source), manifest["modules"]
    aliases, errors, checked = te_aliases(tree), [], set()
    typed = typed_variables(tree, aliases)
    errors += [f"import of {m}: not a module in the manifest" for m in aliases.values() if m not in modules]
    for node in ast.walk(tree):
        if _is_te_module_name(node) and node.value not in modules:
            errors.append(f"line {node.lineno}: module {node.value!r} is not in the manifest")
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            module = aliases[node.value.id]
            checked.add(f"{module}.{node.attr}")
            if node.attr not in modules.get(module, {}):
                errors.append(f"line {node.lineno}: {module}.{node.attr} does not exist in TE {TE_VERSION}")
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
            errors += _member_errors(node, aliases, modules)
        if isinstance(node, ast.Call):
            errors += _call_errors(node, aliases, typed, modules, checked)
    return errors, checked


def _member_errors(node: ast.Attribute, aliases: dict[str, str], modules: dict[str, Any]) -> list[str]:
    """alias.Class.MEMBER (an enum member such as Format.HYBRID) must be a member of Class."""
    inner = node.value
    if not (isinstance(inner, ast.Attribute) and isinstance(inner.value, ast.Name)):
        return []
    if inner.value.id not in aliases:
        return []
    entry = modules.get(aliases[inner.value.id], {}).get(inner.attr)
    if entry is None or entry["kind"] != "class" or node.attr in entry.get("members", []):
        return []
    return [f"line {node.lineno}: {inner.attr}.{node.attr} is not a member in TE {TE_VERSION}"]


def _call_errors(
    call: ast.Call,
    aliases: dict[str, str],
    typed: dict[str, tuple[str, str]],
    modules: dict[str, Any],
    checked: set[str],
) -> list[str]:
    func = call.func
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in aliases:
        module = aliases[func.value.id]
        entry = modules.get(module, {}).get(func.attr)
        if entry is None:
            return []  # reported as a missing name
        sig = entry["init"] if entry["kind"] == "class" else entry.get("params")
        return check_call(call, sig, f"{module}.{func.attr}(...)")
    if isinstance(func, ast.Name) and func.id in typed:
        module, cls = typed[func.id]
        checked.add(f"{module}.{cls}.forward")
        entry = modules.get(module, {}).get(cls)
        if entry is None:
            return [f"line {call.lineno}: {module}.{cls} does not exist in TE {TE_VERSION}"]
        return check_call(call, entry.get("forward"), f"{cls}.forward(...)")
    return []


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    return json.loads(MANIFEST.read_text())


def test_te_py_uses_only_names_that_exist_in_the_pinned_version(manifest: dict[str, Any]) -> None:
    errors, checked = contract_errors(TE_FILE.read_text(), manifest)
    assert errors == []
    pt, recipe = "transformer_engine.pytorch", "transformer_engine.common.recipe"
    # The parser really saw the calls (the test cannot pass by finding nothing).
    assert {
        f"{pt}.DotProductAttention",
        f"{pt}.DotProductAttention.forward",
        f"{pt}.autocast",
        f"{pt}.Linear",
    } <= checked
    assert {
        f"{recipe}.DelayedScaling",
        f"{recipe}.Float8CurrentScaling",
        f"{recipe}.MXFP8BlockScaling",
    } <= checked


@pytest.mark.parametrize(
    ("original", "broken", "expected"),
    [
        ("num_gqa_groups=kv_heads", "num_gqa_group=kv_heads", "no keyword 'num_gqa_group'"),
        ("cu_seqlens_kv=cu", "cu_seqlen_kv=cu", "no keyword 'cu_seqlen_kv'"),  # forward through `dpa: te.X`
        ("te.autocast(", "te.fp8_autocastt(", "fp8_autocastt does not exist"),
        ("Format.HYBRID", "Format.HYBRYD", "Format.HYBRYD is not a member"),
        ("amax_reduction_group=amax_group", "amax_group=amax_group", "no keyword 'amax_group'"),
        ('"transformer_engine.pytorch"', '"transformer_engine.pytorc"', "'transformer_engine.pytorc' is not"),
    ],
)
def test_a_misspelled_te_name_in_te_py_fails(
    manifest: dict[str, Any], original: str, broken: str, expected: str
) -> None:
    source = TE_FILE.read_text()
    assert original in source
    errors, _ = contract_errors(source.replace(original, broken, 1), manifest)
    assert any(expected in e for e in errors), errors


def test_splats_and_extra_positionals_are_refused(manifest: dict[str, Any]) -> None:
    snippet = (
        "def f(kw, a, b, c):\n"
        "    import transformer_engine.pytorch as te\n"
        "    te.Linear(1, 2, **kw)\n"
        "    te.is_fp8_available(a, b)\n"
    )
    errors, _ = contract_errors(snippet, manifest)
    assert any("cannot be checked" in e for e in errors)
    assert any("2 positional arguments, TE takes 1" in e for e in errors)


def test_only_te_py_imports_transformer_engine() -> None:
    importers = []
    for path in [*(ROOT / "framework").rglob("*.py"), *(ROOT / "launcher").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        if te_aliases(tree) or any(_is_te_module_name(n) for n in ast.walk(tree)):
            importers.append(path.relative_to(ROOT).as_posix())
    assert importers == ["framework/kernels/te.py"]


def test_the_gpu_extra_pins_the_version_the_manifest_describes(manifest: dict[str, Any]) -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"transformer-engine[pytorch]=={TE_VERSION}" in extras["gpu"]
    assert manifest["transformer_engine"] == TE_VERSION
    assert f"TE_VERSION := {TE_VERSION}\n" in (ROOT / "Makefile").read_text()  # the wheel `make test` fetches


def _te_sources() -> Path | None:
    """The wheel named by LOOM_TE_SOURCES (`make test` sets it, after fetching it), else the default cache."""
    named = os.environ.get("LOOM_TE_SOURCES")
    if named:
        if not Path(named).exists():
            pytest.fail(
                f"LOOM_TE_SOURCES={named} does not exist: its fetch failed (make test runs "
                f"`pip download --no-deps transformer-engine=={TE_VERSION} -d {Path(named).parent}`; run it to see why)"
            )
        return Path(named)
    cached = Path.home() / ".cache" / "loom" / "te" / WHEEL
    return cached if cached.exists() else None


def test_manifest_is_what_the_pinned_sources_give() -> None:
    sources = _te_sources()
    if sources is None:
        pytest.skip(f"no TE {TE_VERSION} sources: set LOOM_TE_SOURCES to {WHEEL} (`make test` fetches it)")
    spec = importlib.util.spec_from_file_location("te_api_manifest", ROOT / "tools" / "te_api_manifest.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    regenerated = tool.dumps(tool.build_manifest(tool.read_sources(sources), TE_VERSION))
    assert regenerated.strip() == MANIFEST.read_text().strip()
