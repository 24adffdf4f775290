"""Dataclass configs filled from a YAML/JSON file and CLI flags (flags win); unknown keys are errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml

from sealdiff.errors import SealdiffError

T = TypeVar("T")


def read_config_file(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SealdiffError(f"config file {path} does not exist") from None
    except UnicodeDecodeError:
        raise SealdiffError(f"config file {path} is not UTF-8 text") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise SealdiffError(f"config file {path} does not parse: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SealdiffError(f"config file {path} must hold a mapping of field names to values")
    return data


def build_config(cls: type[T], file: str | Path | None = None, **overrides: Any) -> T:
    """`cls(**file_values | overrides)`; `None` overrides are ignored (flag not given)."""
    values = read_config_file(file)
    values.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise SealdiffError(f"unknown config keys {unknown} for {cls.__name__}; valid: {', '.join(sorted(names))}")
    try:
        return cls(**values)
    except TypeError as exc:
        raise SealdiffError(f"bad config for {cls.__name__}: {exc}") from None
