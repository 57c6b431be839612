"""YAML + `key.sub=value` overrides -> nested frozen dataclasses, with errors naming the key.

Used by every CLI that takes `--config file.yaml key=value ...` (training, recipes). Types come from
the dataclass annotations; unknown keys and wrong types are errors, never silently ignored.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import types
import typing
from typing import Any, Mapping, Sequence, TypeVar

import yaml

T = TypeVar("T")


def load_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ValueError(f"config file {path!r} does not exist") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict, returning a copy."""
    out = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return out


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a mapping, recursing into nested dataclass fields."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        full = [f"{where}.{k}" if where else k for k in unknown]
        raise ValueError(f"{where or cls.__name__}: unknown key(s) {full}; known: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _convert(hints[name], value, key)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"{where or cls.__name__}: {e}") from None


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain nested dict (tuples as lists), for YAML/JSON dumps."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, key) if len(args) == 1 else value
    if dataclasses.is_dataclass(tp):
        scalar_field = getattr(tp, "SCALAR_FIELD", None)  # ClassVar: `x` is short for {field: x}
        if scalar_field and value is not None and not isinstance(value, Mapping):
            value = {scalar_field: value}
        return from_dict(tp, value or {}, key)
    if origin in (dict, Mapping, collections.abc.Mapping):
        if not isinstance(value, Mapping):
            raise ValueError(f"{key}={value!r}: expected a mapping")
        _, inner = typing.get_args(tp) or (Any, Any)
        return {str(k): _convert(inner, v, f"{key}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        # `in` alone would let True match a Literal[1] and 1 match Literal[True]: compare types too.
        if not any(value == a and type(value) is type(a) for a in allowed):
            raise ValueError(f"{key}={value!r}: expected one of {list(allowed)}{_yaml_bool_hint(value, allowed)}")
        return value
    if origin in (tuple, list, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}={value!r}: expected a list")
        (inner, *_) = typing.get_args(tp) or (Any,)
        return tuple(_convert(inner, v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float and not isinstance(value, bool):
        # YAML 1.1 reads "3e-5" (no dot) as a string: accept any float spelling.
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}={value!r}: expected a number") from None
    if tp in (int, str, bool) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        hint = _yaml_bool_hint(value, ("",)) if tp is str else ""
        raise ValueError(f"{key}={value!r}: expected {tp.__name__}{hint}")
    return value


def _yaml_bool_hint(value: Any, allowed: Sequence[Any]) -> str:
    """YAML 1.1 reads yes/no/on/off/true/false as booleans: say so when a string was expected."""
    if isinstance(value, bool) and all(isinstance(a, str) for a in allowed):
        return (" (YAML read an unquoted yes/no/on/off/true/false as the boolean "
                f"{value}; quote the string, e.g. \"off\")")
    return ""


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d
