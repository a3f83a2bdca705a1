"""Typed dataclass configs loaded from YAML that reject unknown keys, wrong types and values out of bounds.

Every config of the project is a (frozen or plain) dataclass. :func:`from_dict` builds one from a
mapping and fails with a :class:`ConfigError` naming the source file and the dotted key path. A numeric
field declared with :func:`bounded` is checked by :func:`check_bounds` (called from the dataclass's
``__post_init__``, so a config built in code is checked too).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, cast, get_args, get_origin

import yaml

from c2seg.errors import C2SegError

T = TypeVar("T")


class ConfigError(C2SegError):
    """A config file holds an unknown key, a missing key or an impossible value."""


class _SafeLoader(yaml.SafeLoader):
    """The safe loader, reading floats as YAML 1.2 does: ``3e-4`` is a number (YAML 1.1 wants ``3.0e-4``), and
    refusing a key given twice in one mapping as YAML 1.2 does (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # unhashable: the base class reports it
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                            f"found duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep)


_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2 exponent floats; the only YAML reader of the project."""
    return yaml.load(text, Loader=_SafeLoader)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's own text spans several lines)."""
    problem = getattr(exc, "problem", None) or str(exc)
    mark = getattr(exc, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The interval a numeric config value must lie in; ``None``: unbounded on that side."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


def bounded(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field whose value (each item of a tuple; ``None`` passes) must lie within the bounds."""
    bounds = Bounds(gt if gt is not None else ge, lt if lt is not None else le, gt is not None, lt is not None)
    return dataclasses.field(default=default, metadata={"bounds": bounds})


class BoundsError(C2SegError):
    """A config value outside its field's bounds; ``key`` is the field (with ``[i]`` for a tuple item)."""

    def __init__(self, key: str, value: Any, bounds: Bounds) -> None:
        self.key, self.detail = key, f"must be {bounds}, got {value!r}"
        super().__init__(f"{key} {self.detail}")


def check_bounds(obj: Any) -> None:
    """Raise :class:`BoundsError` for the first field of dataclass ``obj`` outside its :func:`bounded` range."""
    for f in dataclasses.fields(obj):
        bounds, value = f.metadata.get("bounds"), getattr(obj, f.name)
        if bounds is None or value is None:
            continue
        items = enumerate(value) if isinstance(value, tuple) else [(None, value)]
        for i, item in items:
            if not bounds.holds(item):
                raise BoundsError(f.name if i is None else f"{f.name}[{i}]", item, bounds)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader; a clear error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = safe_load(path.read_text())
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid YAML: not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(exc)}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_json_record(path: str | Path, fmt: str, missing: str) -> dict[str, Any]:
    """Read a JSON record this project wrote (manifest, job file): errors name the file when it is
    missing (``missing`` says what to run), malformed, or of another ``format`` than ``fmt``."""
    import json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {missing}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise C2SegError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != fmt:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise C2SegError(f"{path}: format {got!r} is not {fmt}")
    return data


def load_config(cls: type[T], path: str | Path, overrides: dict[str, Any] | None = None) -> T:
    """Load a YAML file into dataclass ``cls``; ``overrides`` (dotted keys) are applied first."""
    return from_dict(cls, load_overridden(path, overrides), source=str(path))


def load_overridden(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The YAML mapping of ``path`` with ``overrides`` (dotted keys) applied."""
    data = load_yaml(path)
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
    return data


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data["a"]["b"] = value`` for ``dotted="a.b"``, creating mappings on the way."""
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: '{key}' is not a mapping")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse a command-line ``key.path=value`` override; the value is read as YAML (safe)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text}: the value is not valid (safe) YAML: {yaml_problem(exc)}") from exc


def from_dict(cls: type[T], data: Any, source: str = "<config>", path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, checking keys and types recursively."""
    where = f"{source}: {path}" if path else source
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cast(Any, cls)) if f.init}
    unknown = sorted(set(data) - set(fields), key=str)  # a YAML key may be a number, null, ...
    if unknown:
        key = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(
            f"{source}: unknown key '{key}' (allowed here: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, field in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], source, sub)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key '{sub}'")
    try:
        obj = cls(**kwargs)
    except BoundsError as exc:
        raise ConfigError(f"{source}: {path + '.' if path else ''}{exc.key} {exc.detail}") from exc
    except (ValueError, TypeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where or source}: {exc}") from exc
    return obj


def _coerce(tp: Any, value: Any, source: str, path: str) -> Any:
    origin = get_origin(tp)
    args = get_args(tp)
    where = f"{source}: {path}"
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, source, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(a, v, source, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_coerce(item, v, source, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        kt, vt = args if args else (Any, Any)
        if kt is int:  # JSON records (job.json, manifest) store integer keys as strings
            value = {int(k) if isinstance(k, str) and k.lstrip("-").isdigit() else k: v for k, v in value.items()}
        return {_coerce(kt, k, source, f"{path}.{k}"): _coerce(vt, v, source, f"{path}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__}")
    return value


def to_dict(obj: Any) -> Any:
    """Plain-data view of a config dataclass (lists instead of tuples), for YAML/JSON/MLflow."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
