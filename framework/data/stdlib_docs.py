"""Collect the docstrings of Python's standard library: the text of the bundled demo corpus.

Importing ~300 modules runs their import-time code, so `demo.py` runs this file in a child process
(`python -m framework.data.stdlib_docs OUT.json [MODULE ...]`): whatever a module does to the interpreter (threads,
signal handlers, monkey-patching, prints) dies with the child and never reaches the build or the trainer.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import pkgutil
import sys
import warnings
from collections.abc import Iterable, Iterator
from types import ModuleType

# Top-level modules never imported: they open windows or browsers, print on import, start programs from their
# __main__, write caches into the installation (lib2to3 grammar pickles), touch the terminal (readline), or are
# replaced by third-party code (distutils by setuptools' shim), which would make the corpus depend on what else is
# installed.
SKIP_TOP_LEVEL = frozenset(
    {
        "antigravity",
        "this",
        "idlelib",
        "tkinter",
        "turtle",
        "turtledemo",
        "lib2to3",
        "distutils",
        "ensurepip",
        "venv",
        "readline",
        "rlcompleter",
        "test",
    }
)
# Submodule name parts never imported: test suites (slow, side effects) and entry points (run on import).
SKIP_PARTS = frozenset({"test", "tests", "idle_test", "__main__"})


def wanted(name: str) -> bool:
    """Module names safe to import. Private modules are kept: the C accelerators (`_io`, `_decimal`, ...) hold
    most of the docstrings of the modules that re-export them."""
    parts = name.split(".")
    top = parts[0]
    # `__hello__`/`__phello__` print on import; `_test*`/`_ctypes_test` are CPython's test extensions.
    if top in SKIP_TOP_LEVEL or top.startswith("__") or "test" in top:
        return False
    return not any(part in SKIP_PARTS for part in parts)


def quiet_import(name: str) -> ModuleType | None:
    """Import a module, or None when it cannot be imported here (wrong OS, missing C library, exits)."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except (Exception, SystemExit):
            return None


def walk_modules(top_level: Iterable[str]) -> Iterator[ModuleType]:
    """Every wanted module and submodule, in sorted name order."""
    for name in sorted(top_level):
        if wanted(name):
            yield from _walk(name)


def _walk(name: str) -> Iterator[ModuleType]:
    module = quiet_import(name)
    if module is None:
        return
    yield module
    path = getattr(module, "__path__", None)
    if path is None:
        return
    children = sorted(info.name for info in pkgutil.iter_modules(path, prefix=name + "."))
    for child in children:
        if wanted(child):
            yield from _walk(child)


def documented_objects(module: ModuleType) -> Iterator[object]:
    """The module, then its classes (with their methods and properties) and functions.

    Re-exported objects are visited again from every module that imports them; `docstrings` dedupes the text.
    """
    yield module
    for _, obj in sorted(vars(module).items()):
        if inspect.isclass(obj):
            yield obj
            yield from _members(obj)
        elif callable(obj):
            yield obj


def _members(cls: type) -> Iterator[object]:
    for _, attr in sorted(vars(cls).items()):
        if isinstance(attr, (staticmethod, classmethod)):
            attr = attr.__func__
        if inspect.isroutine(attr) or isinstance(attr, property):
            yield attr


def docstrings(modules: Iterable[ModuleType]) -> set[str]:
    """Distinct cleaned docstrings (inspect.getdoc) of everything `documented_objects` finds."""
    found: set[str] = set()
    for module in modules:
        for obj in documented_objects(module):
            with contextlib.suppress(Exception):
                doc = inspect.getdoc(obj)
                if doc:
                    found.add(doc.strip())
    return found


def help_topics() -> set[str]:
    """The texts `help("if")`, `help("with")`, ... print: the language reference shipped in pydoc_data."""
    module = quiet_import("pydoc_data.topics")
    topics = getattr(module, "topics", {})
    return {text.strip() for text in topics.values() if isinstance(text, str) and text.strip()}


def main(argv: list[str]) -> None:
    """Write the docstrings of the modules named in argv[1:] (none: the whole stdlib, plus the help topics) to
    the file argv[0] as a sorted JSON list."""
    out, names = argv[0], argv[1:]
    texts = docstrings(walk_modules(names)) if names else docstrings(walk_modules(sys.stdlib_module_names))
    if not names:
        texts |= help_topics()
    with open(out, "w", encoding="utf-8") as f:
        json.dump(sorted(texts), f, ensure_ascii=False)


if __name__ == "__main__":
    main(sys.argv[1:])
