"""Dataclass configs filled from a YAML/JSON file and CLI flags (flags win); unknown keys are errors.

Values are checked against the dataclass's annotations before the dataclass sees them, so a wrong
type is one clear line naming the field, not a TypeError deep inside: `int` fields take integers
(an integral float or a numeric string is accepted), `float` fields finite numbers (YAML reads
`1e-4` as a string, so numeric strings are accepted), `str` fields strings (integers are turned into
strings: `trigger_position: 3`), `Literal[...]` fields one of their values. A field may also declare
`metadata={"range": (low, high)}` (inclusive, `None` for open) or `metadata={"choices": (...)}`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from sealdiff.errors import SealdiffError

T = TypeVar("T")
LrSchedule = Literal["constant", "cosine"]  # learning-rate schedules of the training recipes (cosine decays to 0)


def read_config_file(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SealdiffError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise SealdiffError(f"config file {path} is a directory; expected a YAML or JSON file") from None
    except UnicodeDecodeError:
        raise SealdiffError(f"config file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise SealdiffError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:  # JSONDecodeError is a ValueError
        first = next((line for line in str(exc).splitlines() if line.strip()), "syntax error")
        raise SealdiffError(f"config file {path} does not parse: {first}") from None
    except RecursionError:
        raise SealdiffError(f"config file {path} is nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SealdiffError(f"config file {path} must hold a mapping of field names to values")
    return data


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(name: str, value: Any, integer: bool) -> int | float:
    kind = "an integer" if integer else "a number"
    if isinstance(value, str):
        try:
            value = float(value.strip()) if not integer or not value.strip().lstrip("+-").isdigit() \
                else int(value.strip())
        except ValueError:
            raise SealdiffError(f"{name}={_show(value)} must be {kind}") from None
    if not _is_number(value):
        raise SealdiffError(f"{name}={_show(value)} must be {kind}")
    if isinstance(value, float) and not math.isfinite(value):
        raise SealdiffError(f"{name}={value} must be a finite number")
    if integer:
        if isinstance(value, float):
            if not value.is_integer():
                raise SealdiffError(f"{name}={value} must be an integer")
            value = int(value)
        return value
    return float(value)


def coerce(name: str, value: Any, hint: Any) -> Any:
    """`value` checked (and gently converted) against the type annotation `hint`; SealdiffError if wrong."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return value
    if origin is Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise SealdiffError(f"{name}={_show(value)} is invalid; valid: {', '.join(map(str, args))}")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in args:  # a value that already has one of the types is kept as it is
            if option in (int, float, str, bool, Path) and type(value) is option or \
                    option is Path and isinstance(value, Path):
                return coerce(name, value, option)
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(name, value, option)
            except SealdiffError as exc:
                errors.append(str(exc))
        raise SealdiffError(errors[0] if len(errors) == 1 else
                            f"{name}={_show(value)} has the wrong type; expected {_type_name(hint)}")
    if hint is type(None):
        if value is None:
            return None
        raise SealdiffError(f"{name}={_show(value)} must be empty (null)")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise SealdiffError(f"{name}={_show(value)} must be true or false")
    if hint is int:
        return _number(name, value, integer=True)
    if hint is float:
        return _number(name, value, integer=False)
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        raise SealdiffError(f"{name}={_show(value)} must be a string (quote it in a config file)")
    if hint is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise SealdiffError(f"{name}={_show(value)} must be a path")
    if origin in (list, tuple) and args:
        if not isinstance(value, (list, tuple)):
            raise SealdiffError(f"{name}={_show(value)} must be a list")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise SealdiffError(f"{name}={_show(value)} must have {len(args)} items")
            return tuple(coerce(f"{name}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
        items = [coerce(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    return value  # an annotation we do not interpret: the dataclass validates it


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(str, args))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _check_metadata(name: str, value: Any, metadata: typing.Mapping) -> None:
    if "choices" in metadata and value not in metadata["choices"]:
        raise SealdiffError(f"{name}={_show(value)} is invalid; valid: {', '.join(map(str, metadata['choices']))}")
    if "range" in metadata and _is_number(value):
        low, high = metadata["range"]
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"{'' if low is None else low}..{'' if high is None else high}"
            raise SealdiffError(f"{name}={value} is out of range; valid: {bounds}")


def config_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def build_config(cls: type[T], file: str | Path | None = None, **overrides: Any) -> T:
    """`cls(**file_values | overrides)`; `None` overrides are ignored (flag not given)."""
    values = read_config_file(file)
    values.update({k: v for k, v in overrides.items() if v is not None})
    fields = config_fields(cls)
    unknown = sorted({k for k in values if k not in fields}, key=str)
    if unknown:
        raise SealdiffError(f"unknown config keys {unknown} for {cls.__name__}; valid: {', '.join(sorted(fields))}")
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that does not evaluate: leave the checking to the dataclass
        hints = {}
    checked = {}
    for name, value in values.items():
        value = coerce(name, value, hints[name]) if name in hints else value
        _check_metadata(name, value, fields[name].metadata)
        checked[name] = value
    try:
        return cls(**checked)
    except SealdiffError:
        raise
    except (TypeError, ValueError, AttributeError) as exc:
        first = str(exc).splitlines()[0] if str(exc).strip() else repr(exc)
        raise SealdiffError(f"bad config for {cls.__name__}: {first}") from None


def help_field(text: str, **kwargs) -> Any:
    """A dataclass field with its help text (shown by the CLI and in config errors)."""
    return dataclasses.field(metadata={"help": text}, **kwargs)


def check_choice(name: str, value: Any, choices: Any) -> None:
    """Raise `SealdiffError` naming the valid values when `value` is not one of `choices` (a `Literal` type or
    a collection)."""
    valid = typing.get_args(choices) or tuple(choices)
    if value not in valid:
        raise SealdiffError(f"{name}={value!r} is invalid; valid: {', '.join(map(str, valid))}")
