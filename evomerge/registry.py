"""Name -> factory registries for strategies, spaces and evaluators.

Each entry pairs a factory with an options dataclass, so a spec is validated before anything is
built. A name of the form `package.module:attr` imports user code instead of a built-in.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from evomerge.errors import SpecError
from evomerge.schema import did_you_mean, parse

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class NoOptions:
    """Options class for components that take none."""


@dataclass
class Entry:
    name: str
    factory: Callable[..., Any]
    options: type
    summary: str = ""
    tags: frozenset[str] = frozenset()


@dataclass
class Component:
    """A resolved `{name: ..., **options}` block of a spec."""

    name: str
    options: Any = field(default_factory=NoOptions)

    def to_plain(self) -> dict[str, Any]:
        from evomerge.schema import to_plain

        return {"name": self.name, **to_plain(self.options)}


class Registry(Generic[F]):
    def __init__(self, kind: str, allow_import: bool = False):
        self.kind = kind
        self.allow_import = allow_import
        self._entries: dict[str, Entry] = {}

    def register(
        self, name: str, options: type = NoOptions, summary: str = "", tags: frozenset[str] = frozenset()
    ) -> Callable[[F], F]:
        """`tags` say what a space offers or what a strategy needs of its space."""

        def decorator(factory: F) -> F:
            self._entries[name] = Entry(name, factory, options, summary, frozenset(tags))
            return factory

        return decorator

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entry(self, name: str, path: str) -> Entry:
        if name in self._entries:
            return self._entries[name]
        if self.allow_import and ":" in name:
            return Entry(name, import_attr(name, path), _options_of_import(name, path))
        hint = did_you_mean(name, self._entries)
        extra = " or a 'package.module:attr' of your own" if self.allow_import else ""
        raise SpecError(path, f"unknown {self.kind} {name!r}{hint}; valid: {', '.join(self.names())}{extra}")

    def resolve(self, data: Any, path: str) -> Component:
        """Validate a `{name: ..., **options}` block against the named entry's options class."""
        if data is None:
            raise SpecError(path, f"missing required field; valid {self.kind} names: {', '.join(self.names())}")
        if isinstance(data, str):
            data = {"name": data}
        if not isinstance(data, dict) or "name" not in data:
            raise SpecError(
                f"{path}.name", f"missing required field; valid {self.kind} names: {', '.join(self.names())}"
            )
        if not isinstance(data["name"], str):
            raise SpecError(f"{path}.name", f"got {data['name']!r}, expected a string")
        entry = self.entry(data["name"], f"{path}.name")
        rest = {k: v for k, v in data.items() if k != "name"}
        if entry.options is dict:
            return Component(entry.name, rest)
        return Component(entry.name, parse(entry.options, rest, path))

    def build(self, component: Component, **context: Any) -> Any:
        """Built-ins are called as `factory(options, **context)`; user code as `factory(**options)`."""
        entry = self.entry(component.name, self.kind)
        if isinstance(component.options, dict):
            return entry.factory(**component.options)
        return entry.factory(component.options, **context)


def import_attr(spec: str, path: str = "") -> Any:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise SpecError(path, f"cannot import module {module_name!r} for {spec!r}: {err}") from err
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as err:
        raise SpecError(path, f"module {module_name!r} has no attribute {attr!r}") from err
    return obj


def _options_of_import(spec: str, path: str) -> type:
    """User factories may declare `options = SomeDataclass`; otherwise options pass through as a dict."""
    options = getattr(import_attr(spec, path), "options", None)
    return options if isinstance(options, type) and dataclasses.is_dataclass(options) else dict
