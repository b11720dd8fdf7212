"""Typed recipe configs loaded strictly from YAML plus `key=value` overrides (the schema: align/core/config.py).

Loading rejects unknown keys (naming the closest valid one, also across sections) and values of the
wrong type or out of their range, with the file and line of the offending key (or the command line).
`describe` lists a config's keys (`--keys`); `to_dict`/`to_yaml` write a resolved config back.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from align.core.config import _MISSING, field_check
from align.core.errors import ConfigError


class _Source:
    """Where values came from, so errors can name a file and line (or the command line)."""

    def __init__(
        self, name: str, lines: dict[str, int] | None = None, overridden: set[str] | None = None,
        override_where: dict[str, str] | None = None,
    ):
        self.name = name
        self.lines = lines or {}
        self.overridden = overridden or set()
        self.override_where = override_where or {}  # overridden key -> where it was set (default: the command line)

    def where(self, path: str) -> str:
        for k in self.overridden:  # a key set on the command line, a value inside it (rewards[0].weight), or its section
            if path == k or path.startswith((k + ".", k + "[")) or k.startswith((path + ".", path + "[")):
                return self.override_where.get(k, "command line")
        probe = path
        while probe:
            if probe in self.lines:
                return f"{self.name}:{self.lines[probe]}"
            probe = probe.rpartition(".")[0]
        return self.name


_MAX_YAML_NODES = 100_000  # a config has hundreds; aliases nested to explode into billions are refused


def _yaml_with_lines(text: str, name: str) -> tuple[Any, dict[str, int]]:
    """Parse YAML and record the line of every mapping key by dotted path.

    Refused with one line each: invalid YAML, a key given twice in one mapping (YAML keeps the
    last silently), an alias that contains itself, and aliases that expand beyond any config's size.
    """
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark else name
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    lines: dict[str, int] = {}
    on_path: set[int] = set()  # nodes being walked: meeting one again means an alias contains itself
    visits = 0

    def walk(n: Any, prefix: str) -> None:
        nonlocal visits
        visits += 1
        if visits > _MAX_YAML_NODES:
            raise ConfigError(f"{name}: YAML aliases expand to more than {_MAX_YAML_NODES:,} values; not a config")
        if id(n) in on_path:
            raise ConfigError(f"{name}:{n.start_mark.line + 1}: {prefix or 'the document'}: an alias refers to itself (recursive YAML)")
        on_path.add(id(n))
        if isinstance(n, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, value_node in n.value:
                key = key_node.value
                line = key_node.start_mark.line + 1
                path = f"{prefix}.{key}" if prefix else str(key)
                if isinstance(key_node, yaml.ScalarNode) and key != "<<":
                    if key in seen:
                        raise ConfigError(f"{name}:{line}: duplicate key '{path}' (first at line {seen[key]}); YAML would keep only the last")
                    seen[key] = line
                lines[path] = line
                walk(value_node, path)
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                path = f"{prefix}[{i}]"
                lines[path] = item.start_mark.line + 1
                walk(item, path)
        on_path.discard(id(n))

    if node is not None:
        walk(node, "")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:  # composing succeeded, so this is a constructor problem (a bad tag or value)
        mark = getattr(exc, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark else name
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', None) or str(exc).splitlines()[0]}") from None
    return data, lines


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _all_paths(cls: type, prefix: str = "") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        out.append(path)
        if dataclasses.is_dataclass(hints[f.name]):
            out.extend(_all_paths(hints[f.name], path + "."))
    return out


def _printable(text: str) -> str:
    """A user's key as one line: control characters (a newline in a key) shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _suggest(key: str, prefix: str, level_keys: list[str], root: type) -> str:
    close = difflib.get_close_matches(key, level_keys, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    # The key may be valid in another section: `learning_rate` at top level -> train.learning_rate.
    candidates = _all_paths(root)
    by_leaf = {p: p.rpartition(".")[2] for p in candidates}
    leaves = difflib.get_close_matches(key, list(by_leaf.values()), n=1, cutoff=0.75)
    if leaves:
        match = next(p for p, leaf in by_leaf.items() if leaf == leaves[0])
        return f" (did you mean '{match}'?)"
    return f" (valid keys here: {', '.join(level_keys)})"


def _convert(value: Any, tp: Any, path: str, src: _Source, root: type) -> Any:
    def bad(expected: str | None = None) -> ConfigError:
        shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
        return ConfigError(f"{src.where(path)}: {path}: expected {expected or _type_name(tp)}, got {shown}")

    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad()
        return _build(tp, value, src, root, path + ".")
    if origin in (Union, types.UnionType):
        return _convert_union(value, tp, path, src, root, bad)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and not isinstance(value, bool):
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{src.where(path)}: {path}: expected {_type_name(tp)}, got {value!r}{hint}")
    if origin is list:
        if not isinstance(value, list):
            raise bad()
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{path}[{i}]", src, root) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        number = value
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                raise bad() from None
        if not isinstance(number, (int, float)):
            raise bad()
        if not math.isfinite(number):
            raise bad("a finite number")
        return float(number)
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")  # a schema bug, not user input


def _convert_union(value: Any, tp: Any, path: str, src: _Source, root: type, bad) -> Any:
    """A value of `A | B | None`: the first member it converts to (one member's error, when only one applies)."""
    args = typing.get_args(tp)
    if value is None:
        if type(None) in args:
            return None
        raise bad()
    # `choice | list[choice]`: a list can only be the list (its error names the item), a scalar only
    # the choice (its error suggests the closest one).
    lists = [a for a in args if typing.get_origin(a) is list]
    others = [a for a in args if a is not type(None) and typing.get_origin(a) is not list]
    if len(lists) == 1 and len(others) == 1:
        if isinstance(value, list):
            return _convert(value, lists[0], path, src, root)
        if typing.get_origin(others[0]) is Literal:
            return _convert(value, others[0], path, src, root)
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _convert(value, arg, path, src, root)
        except ConfigError as exc:
            errors.append(exc)
    if len(errors) == 1:
        raise errors[0]
    raise bad()


def _build(cls: type, data: dict, src: _Source, root: type, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in hints or key not in names:
            raise ConfigError(
                f"{src.where(path)}: unknown key '{_printable(path)}'" + _suggest(str(key), prefix, names, root)
            )
        kwargs[key] = _convert(value, hints[key], path, src, root)
    for f in dataclasses.fields(cls):
        if f.name not in kwargs and f.default is _MISSING and f.default_factory is _MISSING:
            raise ConfigError(f"{src.name}: {prefix}{f.name}: required")
    return cls(**kwargs)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`a.b=1 c=[x, y]` -> {"a.b": 1, "c": ["x", "y"]}; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"command line: '{item}': an override is key=value (nested keys with dots)")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


_INDEXED = re.compile(r"^(.+)\[(\d+)\]$")


def apply_overrides(data: dict, overrides: dict[str, Any], source: str = "command line") -> None:
    """Set dotted keys in a nested dict in place; `name[i]` steps into entry i of a list (rewards[0].weight=2)."""
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(parts[: i + 1])
            indexed = _INDEXED.match(part)
            key = indexed.group(1) if indexed else part
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: {dotted}: '{'.'.join(parts[:i])}' is not a section")
            if indexed:
                entries, index = _list_entry(node.get(key), int(indexed.group(2)), dotted, where.rpartition("[")[0], source)
                if last:
                    entries[index] = value
                node = entries[index]
                continue
            if last:
                node[key] = value
                continue
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: {dotted}: '{where}' is not a section")
            node = child


def _list_entry(entries: Any, index: int, dotted: str, name: str, source: str) -> tuple[list, int]:
    """(the list, index) an indexed override sets, or a ConfigError saying how many entries there are."""
    if not isinstance(entries, list):
        what = "is not set" if entries is None else "is not a list"
        raise ConfigError(f"{source}: {dotted}: {name} {what}; give the whole list ({name}=[...])")
    if index >= len(entries):
        count = f"{len(entries)} entry" if len(entries) == 1 else f"{len(entries)} entries"
        raise ConfigError(f"{source}: {dotted}: {name} has {count} (index {index} is past its end); give the whole list ({name}=[...])")
    return entries, index


def check_values(cfg: Any, where: typing.Callable[[str], str] | None = None, prefix: str = "") -> None:
    """Every range declared in the schema of a config and its sections; the first value out of range
    raises a ConfigError naming its key (and, given `where`, its file:line or the command line)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        path = prefix + f.name
        check = field_check(f)
        problem = check.problem(value) if check is not None else None
        if problem:
            raise ConfigError(f"{where(path)}: {path}: {problem}" if where else f"{path}: {problem}")
        if dataclasses.is_dataclass(value):
            check_values(value, where, path + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    check_values(item, where, f"{path}[{i}].")


_LEADING_KEY = re.compile(r"[A-Za-z_][\w]*(?:\[\d+\])?(?:\.[A-Za-z_][\w]*(?:\[\d+\])?)*")


def _locate(message: str, src: _Source) -> str:
    """Where the key a validation message starts with was set: its file:line, the command line, or the file."""
    match = _LEADING_KEY.match(message)
    return src.where(match.group(0)) if match else src.name


T = typing.TypeVar("T")


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    prepare: typing.Callable[[Any], Any] | None = None,
    override_where: dict[str, str] | None = None,
) -> T:
    """Load a config dataclass from YAML (optional) plus dotted overrides, then check and validate it.

    Order: types (while building), the schema's ranges, the config's own validate(), then
    `prepare` (a stage's pre-flight checks and resolve step). Every error names the key and where
    it was set: `file:line`, or `command line` for an override (`override_where` labels overrides
    that came from elsewhere, e.g. a pipeline file).
    """
    data: dict = {}
    lines: dict[str, int] = {}
    name = "command line"
    if path is not None:
        path = Path(path)
        name = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read config: {exc}") from None
        loaded, lines = _yaml_with_lines(text, name)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config is a mapping of keys, got {type(loaded).__name__}")
        data = loaded
    if overrides:
        apply_overrides(data, overrides)
    src = _Source(name, lines, set(overrides or ()), override_where)
    cfg = _build(cls, data, src, cls)
    check_values(cfg, src.where)
    try:
        validate = getattr(cfg, "validate", None)
        if validate:
            validate()
        if prepare is not None:
            cfg = prepare(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{_locate(str(exc), src)}: {exc}") from None
    return cfg


def config_file_kind(path: str | Path) -> str | None:
    """"sweep" (a `values:` key at the top level), "pipeline" (`stages:`), or None (a stage config, or unreadable:
    its loader names the problem)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(data, dict):
        return None
    return "sweep" if "values" in data else "pipeline" if "stages" in data else None


def check_stage_file(path: Path, including: Path, where: str, kind: str) -> None:
    """`path`, named as a stage config by the `kind` file `including` (a sweep or pipeline), is a stage config:
    not that file itself, nor another sweep or pipeline (their keys would read as unknown stage keys)."""
    if Path(including).is_file() and Path(path).resolve() == Path(including).resolve():
        raise ConfigError(f"{where}: {path} is this {kind} file: a {kind} that includes itself; name the stage YAML it runs")
    other = config_file_kind(path)
    if other is not None:
        raise ConfigError(f"{where}: {path} is a {other} file, not a stage config; name the stage YAML it runs")


def config_from_dict(cls: type[T], data: dict, name: str) -> T:
    """A config section built from a mapping read elsewhere (a run dir's config.yaml): types and ranges
    checked like a loaded config's, errors naming `name`."""
    src = _Source(name)
    cfg = _build(cls, data, src, cls)
    check_values(cfg, src.where)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def describe(cls: type, prefix: str = "") -> list[str]:
    """Every key with its type, default and help: the `--help` of a recipe."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        path = f"{prefix}{f.name}"
        help_text = f.metadata.get("help", "")
        if dataclasses.is_dataclass(tp):
            out.append(f"{path}:  {help_text}")
            out.extend(describe(tp, path + "."))
            continue
        default = f.default if f.default is not _MISSING else (f.default_factory() if f.default_factory is not _MISSING else None)
        check = field_check(f)
        valid = f"; {check.text()}" if check is not None and not check.any_value else ""
        out.append(f"  {path} ({_type_name(tp)}, default {default!r}{valid}): {help_text}")
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if item is not None and dataclasses.is_dataclass(item):  # the keys of each entry, e.g. rewards[].weight
            out.extend(describe(item, path + "[]."))
    return out
