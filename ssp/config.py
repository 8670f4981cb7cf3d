"""Typed TOML configuration: one frozen dataclass per component, loaded from a file plus `--set` overrides.

Why this shape: every component receives only its own section (never the root), so what a component reads is
visible in its signature; unknown keys and wrong types are errors that name the key path and the file, so a typo
never silently falls back to a default.

Precedence is CLI `--set` > TOML file > dataclass defaults. Section classes are declared like this:

    @dataclass(frozen=True, kw_only=True, slots=True)
    class RetrieverConfig:
        kind: str = "tantivy"
        \"\"\"Which retriever: "tantivy", "http", or a user class "package.module:ClassName".\"\"\"

The string under each field is its documentation (read with `field_docs`); `ssp config show` prints it, and a test
requires one on every field.

Supported field types: bool, int, float, str, Path, Literal[...], X | None, list[X] / tuple[X, ...] (stored as
tuples), dict[str, X], nested config dataclasses, and Any (passed through untouched, for user plug-in options).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key path, the value, the rule and the source."""


def load_config(cls: type[T], path: Path | str | None = None, overrides: Sequence[str] = ()) -> T:
    """Build `cls` from a TOML file (optional) and `section.key=value` overrides, checking every key and type."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            with path.open("rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist; pass an existing TOML file to --config") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    for override in overrides:
        apply_override(data, override)
    if overrides:
        source += " with --set " + " ".join(overrides)
    return build(cls, data, source=source)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is a TOML literal, or a bare string when it does not parse."""
    key_path, sep, raw = override.partition("=")
    key_path = key_path.strip()
    if not sep or not key_path:
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE such as --set scheduler.max_inflight=64")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    node = data
    parts = key_path.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {override!r}: '{'.'.join(parts[: i + 1])}' is a value, not a table")
        node = child
    node[parts[-1]] = value


def build(cls: type[T], data: Mapping[str, Any], *, source: str = "<dict>", prefix: str = "") -> T:
    """Construct config dataclass `cls` from a plain mapping (as parsed from TOML), validating recursively."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: '{prefix or '<root>'}' must be a table, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"[{prefix}]" if prefix else "the top level"
        raise ConfigError(
            f"{source}: unknown key '{_join(prefix, unknown[0])}' in {where}; known keys: {', '.join(names)}"
        )
    kwargs = {name: _convert(hints[name], data[name], source, _join(prefix, name)) for name in names if name in data}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{source}: [{prefix or 'root'}] {e}") from None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def wrong(expected: str) -> ConfigError:
        return ConfigError(f"{source}: '{key}' must be {expected}, got {type(value).__name__} {value!r}")

    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, source=source, prefix=key)  # type: ignore[arg-type]
    if tp is bool:
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise wrong("a string")
        return value
    if tp is Path:
        if not isinstance(value, str):
            raise wrong("a path string")
        return Path(value)
    if origin is Literal:
        if value not in args:
            raise wrong("one of " + ", ".join(repr(a) for a in args))
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, source, key)
            except ConfigError as e:
                errors.append(str(e))
        raise wrong(" or ".join(_type_name(a) for a in args if a is not type(None)))
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise wrong("a list")
        item_tp = args[0] if args else Any
        return tuple(_convert(item_tp, v, source, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise wrong("a table")
        value_tp = args[1] if len(args) == 2 else Any
        return {str(k): _convert(value_tp, v, source, f"{key}.{k}") for k, v in value.items()}
    raise ConfigError(f"{source}: '{key}' has unsupported config type {tp!r} (a bug in the config class)")


def field_docs(cls: type) -> dict[str, str]:
    """The string literal written under each field of a config dataclass, by field name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    class_def = next(node for node in tree.body if isinstance(node, ast.ClassDef))
    docs: dict[str, str] = {}
    body = class_def.body
    for stmt, nxt in zip(body, body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict of a config (tuples as lists, paths as strings), e.g. for JSON or TOML output."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)


def to_toml(cfg: Any, *, with_docs: bool = True) -> str:
    """Render a config as TOML that `load_config` reads back; fields set to None are written as comments."""
    lines: list[str] = []
    _emit_table(cfg, "", lines, with_docs)
    return "\n".join(lines).strip() + "\n"


def _emit_table(cfg: Any, prefix: str, lines: list[str], with_docs: bool) -> None:
    docs = field_docs(type(cfg)) if with_docs else {}
    sub_tables = []
    if prefix:
        lines.append(f"\n[{prefix}]")
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            sub_tables.append((f.name, value))
            continue
        if with_docs and f.name in docs:
            lines.extend("# " + line for line in docs[f.name].splitlines())
        if value is None:
            lines.append(f"# {f.name} = (unset)")
        else:
            lines.append(f"{f.name} = {_toml_value(to_dict(value) if isinstance(value, tuple | dict) else value)}")
    for name, value in sub_tables:
        _emit_table(value, _join(prefix, name), lines, with_docs)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        escaped = str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f'"{k}" = {_toml_value(x)}' for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} {v!r} as TOML")
