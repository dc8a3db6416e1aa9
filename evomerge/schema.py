"""A small typed-dataclass validator.

Specs are plain dataclasses; `parse` walks their type hints so that every error names the dotted
field, the offending value and what is allowed. We avoid pydantic to keep control over those
messages (registry names are only known at run time, so they cannot be `Literal`s).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Protocol, TypeVar, Union, get_args, get_origin, get_type_hints, runtime_checkable

from evomerge.errors import SpecError

T = TypeVar("T")


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        (inner,) = get_args(tp) or (Any,)
        return f"list of {_type_name(inner)}"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def did_you_mean(value: str, allowed: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(value, list(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def convert(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the type `tp`, converting where YAML is loose (int for float)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(value, arg, path)
            except SpecError as err:
                errors.append(err)
        raise SpecError(path, f"got {value!r}, expected {_type_name(tp)}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            hint = did_you_mean(str(value), [str(a) for a in allowed])
            raise SpecError(path, f"got {value!r}, allowed: {', '.join(map(repr, allowed))}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        return parse(tp, value, path)
    if origin is list:
        (inner,) = get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise SpecError(path, f"got {value!r}, expected {_type_name(tp)}")
        return [convert(v, inner, _join(path, i)) for i, v in enumerate(value)]
    if origin is dict:
        key_t, val_t = get_args(tp) or (str, Any)
        if not isinstance(value, dict):
            raise SpecError(path, f"got {value!r}, expected a mapping")
        return {convert(k, key_t, path): convert(v, val_t, _join(path, str(k))) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise SpecError(path, f"got {value!r}, expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(path, f"got {value!r}, expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(path, f"got {value!r}, expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SpecError(path, f"got {value!r}, expected a string")
        return value
    raise TypeError(f"schema type {tp!r} at {path} is not supported")


def parse(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass `cls` from a mapping, validating every field against its type hint.

    After construction a dataclass may define `check(self, path)` to enforce ranges; it raises
    `SpecError` with the field's dotted path.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(path or "spec", f"got {data!r}, expected a mapping")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            allowed = ", ".join(sorted(fields))
            raise SpecError(
                _join(path, str(key)),
                f"unknown field{did_you_mean(str(key), fields)}; allowed fields: {allowed}",
            )
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = convert(data[name], hints[name], _join(path, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise SpecError(_join(path, name), f"missing required field ({_type_name(hints[name])})")
    obj = cls(**kwargs)
    if isinstance(obj, ChecksItself):
        obj.check(path)
    return obj


@runtime_checkable
class ChecksItself(Protocol):
    """Options with rules across fields or on values (ranges, files that must exist): `check` raises SpecError
    naming `path`'s field, once the fields are converted."""

    def check(self, path: str) -> None: ...


def option_names(options: Any) -> set[str]:
    """The fields of an options dataclass (none for a component that takes no options)."""
    return {f.name for f in dataclasses.fields(options)} if dataclasses.is_dataclass(options) else set()


def to_plain(obj: Any) -> Any:
    """Dataclasses back to YAML-able builtins (the resolved spec written into a run)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def require(condition: bool, path: str, message: str) -> None:
    if not condition:
        raise SpecError(path, message)
