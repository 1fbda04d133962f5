"""Typed run configuration: dataclasses loaded from one YAML file plus dotted command-line overrides.

    python -m megatron_dil.train --config run.yaml train.lr=5e-7 parallel.tensor=2

Every section is a dataclass; unknown keys and values of the wrong type are rejected with the dotted key named
(``ConfigError: train.lr: expected float, got 'fast'``). Override values are parsed as YAML scalars, so
``train.lr=5e-7``, ``loss.beta=null`` and ``data.train=[a,b]`` all work. A dataclass may offer named presets through a
``preset`` key: the preset's values are the defaults and the other keys override them (see ``models.ModelConfig``).
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from megatron_dil.io import atomic_write_text

T = TypeVar("T")


def at_least(config, minimum: float, *names: str) -> None:
    """Domain check of numeric fields (None = unset is allowed): the message starts with the field's name, so the
    config loader can prefix the section (``train.train_iters must be >= 1, got 0``)."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not (math.isfinite(value) and value >= minimum):
            raise ValueError(f"{name} must be >= {minimum}, got {value}")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``5e-7`` (no dot) as a string; accept YAML 1.2 exponent floats so ``train.lr=5e-7`` works."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class ConfigError(ValueError):
    """A configuration key is unknown, missing or of the wrong type; the message names the dotted key."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (recursing into dataclasses, lists, dicts, Optional, Literal)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:  # Optional[X]: X's own error names the exact key (e.g. model.preset)
            raise errors[0]
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        value_tp = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {value!r}")
        return value
    if tp in (bool, str):
        if not isinstance(value, tp):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {_type_name(tp)}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, strictly: unknown keys and wrong types raise ``ConfigError``."""
    data = dict(data)
    presets = getattr(cls, "presets", None)
    if "preset" in data and callable(presets):
        name = data.pop("preset")
        table = presets()
        if name not in table:
            raise ConfigError(f"{prefix + '.' if prefix else ''}preset: unknown preset {name!r}; valid: {sorted(table)}")
        data = {**dataclasses.asdict(table[name]), **data}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown key (valid keys of {cls.__name__}: {sorted(fields)})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{prefix + '.' if prefix else ''}{missing[0]}: required key is missing")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:  # __post_init__ validation: name the key (or at least the section)
        message = str(err)
        if message.split(" ", 1)[0] in fields:  # "train_iters must be >= 1" -> "train.train_iters must be >= 1"
            raise ConfigError(f"{prefix}.{message}" if prefix else message) from err
        raise ConfigError(f"{prefix or cls.__name__}: {message}") from err


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested mapping, returning a new mapping."""
    data = _parse_yaml(yaml.safe_dump(data)) or {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=5e-7")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: {part} is not a section")
            node = child
        node[parts[-1]] = _parse_yaml(raw) if raw.strip() else ""
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load dataclass ``cls`` from a YAML file (optional) and dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = _parse_yaml(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping of sections")
    return from_dict(cls, apply_overrides(data, overrides or []))


def to_dict(obj: Any) -> dict[str, Any]:
    """The plain-data form of a config dataclass (what ``save_config`` writes and ``from_dict`` reads back)."""
    return dataclasses.asdict(obj)


def save_config(obj: Any, path: str | Path) -> None:
    """Write the fully resolved config as YAML (atomically), so a run can be reproduced from it alone."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(to_dict(obj), sort_keys=False))
