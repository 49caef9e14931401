"""YAML recipe -> typed `Recipe`.

Steps: read YAML (UTF-8, safe tags only, duplicate keys and empty files refused) -> follow `base:` (deep merge, cycles refused) -> apply `--set key=value`
overrides -> convert to the section dataclasses, checking every key and type -> `Recipe.validate()`.
Each leaf value remembers which file (or `--set`) gave it, so a mistake is reported where it was made.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from framework.config.errors import ConfigError, did_you_mean
from framework.config.schema import Recipe

SET_SOURCE = "--set"


class _Origins:
    """Which file gave each dotted key (the deepest key recorded wins)."""

    def __init__(self) -> None:
        self._by_key: dict[str, str] = {}

    def record(self, data: Any, source: str, prefix: str = "") -> None:
        if isinstance(data, dict):
            for key, value in data.items():
                self.record(value, source, f"{prefix}.{key}" if prefix else str(key))
        if prefix:
            self._by_key[prefix] = source

    def of(self, key: str, default: str) -> str:
        # "optim.betas[0]" -> "optim.betas"; walk up to the nearest key that was recorded.
        key = key.split("[")[0]
        below = [source for k, source in self._by_key.items() if k.startswith(key + ".")]
        while key:
            if key in self._by_key:
                return self._by_key[key]
            key = key.rpartition(".")[0]
        # A section that only an override created: blame that override.
        return below[-1] if below else default


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load, merge, override, convert and validate a recipe. Raises ConfigError on any user mistake."""
    path = Path(path)
    origins = _Origins()
    data = _load_with_bases(path, origins, chain=())
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(data, key, value, item)
        origins.record(value, SET_SOURCE, key)
    try:
        recipe = to_dataclass(Recipe, data, "")
        recipe.validate()
    except ConfigError as err:
        if err.file is None:
            raise ConfigError(origins.of(err.key, str(path)), err.key, err.value, err.rule, err.fix) from None
        raise
    return recipe


class _DuplicateKey(Exception):
    """A mapping that gives one key twice (YAML says keys are unique; PyYAML would keep the last silently)."""

    def __init__(self, key: str, first_line: int, second_line: int) -> None:
        super().__init__(key)
        self.key, self.first_line, self.second_line = key, first_line, second_line


MAX_VALUES = 1_000_000
"""Values a recipe may expand to once YAML aliases are followed (a real recipe has a few hundred): a few lines of
nested aliases (a "billion laughs" document) would otherwise expand to billions and hang every later step."""


class _TooLarge(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


# One alternative of PyYAML's int/float patterns (a line "|..." of its verbose regexp) that holds a ":" group.
_BASE_60 = re.compile(r"\n\s*\|[^\n]*:\[0-5\]\?\[0-9\][^\n]*?(?=\n|\)\$$)")


def _without_base_60(resolvers: dict[str, list]) -> dict[str, list]:
    """SafeLoader's implicit resolvers minus YAML 1.1's base-60 numbers: an unquoted `time: 3:00` stays the
    text "3:00" (what Slurm, and YAML 1.2, read) instead of the integer 180."""
    table = {}
    for first, entries in resolvers.items():
        kept = []
        for tag, regexp in entries:
            if tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
                regexp = re.compile(_BASE_60.sub("", regexp.pattern), regexp.flags)
            kept.append((tag, regexp))
        table[first] = kept
    return table


class _RecipeLoader(yaml.SafeLoader):
    """yaml.safe_load's loader (standard tags only: nothing that runs code), refusing duplicate keys.

    The composed node tree is checked before anything is constructed, so the error names the dotted key and the
    lines of both occurrences, in nested mappings too. Merge keys (`<<: *anchor`) may be overridden on purpose,
    so only keys written out in the mapping itself count. The walk also counts the values the document expands
    to (each aliased node once, its expanded size remembered) and refuses more than MAX_VALUES."""

    yaml_implicit_resolvers = _without_base_60(yaml.SafeLoader.yaml_implicit_resolvers)

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        size = self._check(node, "", {})
        if size > MAX_VALUES:
            raise _TooLarge(size)
        return self.construct_document(node)

    def _check(self, node: yaml.Node, prefix: str, sizes: dict[int, int]) -> int:
        """Expanded number of values under `node` (memoised per node: linear in the text, not in the expansion)."""
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = 1  # a node inside itself (a recursive alias) counts once
        size = 1
        if isinstance(node, yaml.SequenceNode):
            size += sum(self._check(item, f"{prefix}[{i}]", sizes) for i, item in enumerate(node.value))
        if isinstance(node, yaml.MappingNode):
            size += self._check_mapping(node, prefix, sizes)
        sizes[id(node)] = size
        return size

    def _check_mapping(self, node: yaml.MappingNode, prefix: str, sizes: dict[int, int]) -> int:
        lines: dict[Any, int] = {}
        size = 0
        for key_node, value_node in node.value:
            merge = key_node.tag == "tag:yaml.org,2002:merge"
            plain = isinstance(key_node, yaml.ScalarNode) and not merge
            key = self.construct_object(key_node, deep=True) if plain else None
            dotted = f"{prefix}.{key}" if prefix else str(key)
            line = key_node.start_mark.line + 1
            if key is not None:
                if key in lines:
                    raise _DuplicateKey(dotted, lines[key], line)
                lines[key] = line
            size += 1 + self._check(value_node, dotted, sizes)
        return size


def _decode(path: Path, raw: bytes) -> str:
    """The recipe's text; a file that is not UTF-8 is one error naming the first bad byte's offset."""
    try:
        return raw.decode("utf-8-sig")  # a leading byte-order mark is fine
    except UnicodeDecodeError as exc:
        raise ConfigError(
            str(path),
            "recipe",
            f"byte {exc.start}",
            f"is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}: {exc.reason})",
            "save the recipe as UTF-8",
        ) from None


def _parse_yaml(path: Path, text: str) -> Any:
    """YAML text -> data with `_RecipeLoader`; syntax errors and duplicate keys become one ConfigError."""
    loader = _RecipeLoader(text)
    try:
        return loader.get_single_data()
    except _DuplicateKey as dup:
        raise ConfigError(
            f"{path}:{dup.second_line}",
            dup.key,
            f"lines {dup.first_line} and {dup.second_line}",
            "is given twice; YAML keys must be unique (the last one would silently win)",
            "keep one of them",
        ) from None
    except _TooLarge as big:
        raise ConfigError(
            str(path),
            "recipe",
            f"{big.size:,} values",
            f"expands to more than {MAX_VALUES:,} values through YAML aliases (&anchor / *alias)",
            "write the recipe without nested aliases",
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown line"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(
            f"{path}:{mark.line + 1}" if mark else str(path),
            "yaml",
            line,
            f"YAML syntax error: {problem}",
            "fix the YAML at that line (indentation, a missing ':' or an unclosed quote)",
        ) from None
    finally:
        loader.dispose()


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(str(path), "recipe", str(path), "file not found", "check the path") from None
    except OSError as exc:
        raise ConfigError(
            str(path), "recipe", str(path), f"cannot be read ({exc.strerror})", "check the path"
        ) from None
    data = _parse_yaml(path, _decode(path, raw))
    if data is None:  # an empty file, only comments, or `null`: never silently "all defaults"
        raise ConfigError(
            str(path),
            "recipe",
            None,
            "is empty (no sections)",
            "write at least one section, e.g. `model:`; `{}` asks for all defaults on purpose",
        )
    if not isinstance(data, dict):
        raise ConfigError(
            str(path),
            "recipe",
            type(data).__name__,
            "a recipe must be a mapping of sections",
            "start with `model:`",
        )
    return data


def _load_with_bases(path: Path, origins: _Origins, chain: tuple[Path, ...]) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p.name) for p in (*chain, resolved))
        raise ConfigError(
            str(path), "base", str(path), f"recipes inherit in a cycle ({cycle})", "remove one `base:`"
        )
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        origins.record(data, str(path))
        return data
    if not isinstance(base, str):
        raise ConfigError(
            str(path), "base", base, "must be a path to another recipe", "write `base: other.yaml`"
        )
    base_path = path.parent / base
    if not base_path.exists():
        raise ConfigError(
            str(path),
            "base",
            base,
            f"base recipe not found at {base_path}",
            "the path is relative to this recipe's folder",
        )
    merged = _load_with_bases(base_path, origins, (*chain, resolved))
    origins.record(data, str(path))
    return deep_merge(merged, data)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; any other value (lists included) replaces the base's."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(item: str) -> tuple[str, Any]:
    """`model.n_layers=4` -> ("model.n_layers", 4); the value is parsed as YAML (so 4 is int, null is None)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part.isidentifier() for part in key.split(".")):
        raise ConfigError(
            SET_SOURCE,
            item,
            item,
            "an override must look like section.key=value",
            "e.g. --set model.n_layers=4",
        )
    try:
        value = yaml.load(raw, Loader=_RecipeLoader) if raw.strip() else ""  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as dup:
        raise ConfigError(
            SET_SOURCE, f"{key}.{dup.key}", raw, "gives a key twice", "keep one of them"
        ) from None
    except yaml.YAMLError:
        raise ConfigError(
            SET_SOURCE, key, raw, "the value is not valid YAML", "quote strings, e.g. key='a: b'"
        ) from None
    return key, value


def _set_dotted(data: dict[str, Any], key: str, value: Any, item: str) -> None:
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            prefix = ".".join(parts[: i + 1])
            raise ConfigError(
                SET_SOURCE, prefix, child, "is a value, not a section", f"check the key in --set {item}"
            )
        node = child
    node[parts[-1]] = value


# --- dict -> dataclass, checking keys and types -----------------------------------------------------------


def to_dataclass(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping, refusing unknown keys (with did-you-mean) and wrong types."""
    where = prefix or "recipe"
    if not isinstance(data, dict):
        raise ConfigError(
            None, where, data, "must be a mapping of keys", f"write it as `{where}:` with keys under it"
        )
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            kind = "section" if not prefix else f"key of {prefix}"
            raise ConfigError(None, dotted, value, f"unknown {kind}", did_you_mean(str(key), names))
        kwargs[key] = convert(hints[key], value, dotted)
    return cls(**kwargs)


def convert(hint: Any, value: Any, key: str) -> Any:
    """Check `value` against the type `hint` and return it in that type."""
    if dataclasses.is_dataclass(hint):
        return to_dataclass(hint, value, key)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return _convert_union(hint, value, key)
    if origin is Literal:
        return _convert_literal(hint, value, key)
    if origin in (tuple, list):
        return _convert_sequence(hint, origin, value, key)
    if origin is dict:  # free-form mappings (deepspeed.config): their keys are checked by whoever uses them
        if not isinstance(value, dict):
            raise ConfigError(None, key, value, "must be a mapping", f"write it as `{key}: {{name: value}}`")
        return dict(value)
    return _convert_scalar(hint, value, key)


def _convert_union(hint: Any, value: Any, key: str) -> Any:
    options = typing.get_args(hint)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(None, key, value, "must not be null", f"give a value of type {type_name(hint)}")
    errors = []
    for option in options:
        if option is type(None):
            continue
        try:
            return convert(option, value, key)
        except ConfigError as err:
            errors.append(err)
    if len(errors) == 1:
        raise errors[0]
    for err in errors:  # the value had an option's type but not its range (e.g. `.inf` for `'none' | float`)
        if isinstance(err, _RangeError):
            raise err
    raise ConfigError(None, key, value, f"must be {type_name(hint)}", "use one of those")


def _convert_literal(hint: Any, value: Any, key: str) -> Any:
    choices = typing.get_args(hint)
    if value in choices and type(value) is type(choices[choices.index(value)]):
        return value
    listed = ", ".join(repr(c) for c in choices)
    hint_text = (
        did_you_mean(str(value), [str(c) for c in choices]) if isinstance(value, str) else f"one of {listed}"
    )
    if hint_text.startswith("valid keys"):
        hint_text = f"use one of {listed}"
    raise ConfigError(None, key, value, f"must be one of {listed}", hint_text)


def _convert_sequence(hint: Any, origin: type, value: Any, key: str) -> Any:
    args = typing.get_args(hint)
    if not isinstance(value, list | tuple):
        raise ConfigError(None, key, value, f"must be a list ({type_name(hint)})", "write it as [a, b]")
    if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(value):
        raise ConfigError(
            None, key, value, f"must have exactly {len(args)} items", f"give {len(args)} values"
        )
    item_types = (
        args
        if origin is tuple and args and args[-1] is not Ellipsis
        else [args[0] if args else Any] * len(value)
    )
    items = [convert(t, v, f"{key}[{i}]") for i, (t, v) in enumerate(zip(item_types, value))]
    return origin(items)


class _RangeError(ConfigError):
    """A value of the right type that no field of that type accepts (not finite, beyond int64)."""


INT_MIN, INT_MAX = -(2**63), 2**63 - 1
"""Every int field fits int64 (what torch and the checkpoint files store); schema.py bounds sizes far tighter."""


def _convert_scalar(hint: Any, value: Any, key: str) -> Any:
    if hint is Any:
        return value
    if hint is float:
        return _convert_float(value, key)
    if hint is int and type(value) is int:
        if not INT_MIN <= value <= INT_MAX:
            raise _RangeError(
                None, key, value, "is out of range for a 64-bit integer", "use a realistic value for this key"
            )
        return value
    if hint is int and _is_number(value):
        # 1e30 or 4.0 where a count is wanted: YAML 1.1 reads `1e30` as text and `1.0e+30` as a float.
        raise ConfigError(
            None,
            key,
            value,
            f"must be a whole number (int), got {type(value).__name__}",
            "write digits, e.g. 4",
        )
    if hint in (str, bool) and type(value) is hint:
        return value
    example = {int: "e.g. 4", float: "e.g. 0.1", bool: "true or false", str: "a quoted string"}.get(hint, "")
    raise ConfigError(
        None, key, value, f"must be {type_name(hint)}, got {type(value).__name__}", f"write {example}"
    )


def _convert_float(value: Any, key: str) -> float:
    """Every float field must be a finite number: .inf / .nan (in a file or --set) silently ruin a run."""
    number = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int too large for a float
            number = math.inf
    elif isinstance(value, str):
        # PyYAML (YAML 1.1) reads `1e-3` as a string; accept what float() accepts.
        with contextlib.suppress(ValueError):
            number = float(value)
    if number is None:
        raise ConfigError(None, key, value, f"must be float, got {type(value).__name__}", "write e.g. 0.1")
    if not math.isfinite(number):
        raise _RangeError(None, key, value, "must be a finite number (not inf or nan)", "write e.g. 0.1")
    return number


def _is_number(value: Any) -> bool:
    if isinstance(value, float):
        return True
    if not isinstance(value, str):
        return False
    try:
        float(value)
    except ValueError:
        return False
    return True


def type_name(hint: Any) -> str:
    """A reader's name for a type hint: `int`, `int or null`, `'a' | 'b'`, `list of float`."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in typing.get_args(hint))
    if origin is Literal:
        return " | ".join(repr(c) for c in typing.get_args(hint))
    if origin in (tuple, list):
        return "list of " + type_name(typing.get_args(hint)[0])
    return getattr(hint, "__name__", str(hint))


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as plain data (tuples become lists so it round-trips through YAML/JSON)."""
    return _plain(dataclasses.asdict(recipe))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def dump_recipe(recipe: Recipe) -> str:
    """YAML text of the resolved recipe; loading it back gives the same Recipe."""
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)
