"""A registry of plugins by name: lazy built-ins, then entry points, then register()."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

P = TypeVar("P")
F = Callable[..., Any]


class Registry(Generic[P]):
    """Factories by name for one plugin family (an entry-point group); each factory makes a P."""

    def __init__(self, group: str, builtins: dict[str, str]) -> None:
        self.group = group
        self._builtins = dict(builtins)
        self._registered: dict[str, F] = {}
        self._loaded: dict[str, F] = {}

    def register(self, name: str, factory: F) -> None:
        """Make `factory` available as `name`; a later registration wins."""
        self._registered[name] = factory
        self._loaded.pop(name, None)

    def unregister(self, name: str) -> None:
        """Forget a factory that register() added (built-ins and entry points stay)."""
        self._registered.pop(name, None)
        self._loaded.pop(name, None)

    def names(self) -> list[str]:
        """Every name that get() accepts."""
        found = set(self._builtins) | set(self._registered)
        found.update(ep.name for ep in entry_points(group=self.group))
        return sorted(found)

    def create(self, name: str, /, **options: Any) -> P:
        """A new plugin of the registered kind `name`, configured by keyword options."""
        plugin: P = self.get(name)(**options)
        return plugin

    def get(self, name: str) -> F:
        """The factory registered as `name`; ValueError listing the choices if there is none."""
        if name in self._registered:
            return self._registered[name]
        if name in self._loaded:
            return self._loaded[name]
        factory: F
        if name in self._builtins:
            module, _, attr = self._builtins[name].partition(":")
            found: Any = importlib.import_module(module)
            for part in attr.split("."):  # "module:Class.from_target", as entry points allow
                found = getattr(found, part)
            factory = found
        else:
            found = [ep for ep in entry_points(group=self.group) if ep.name == name]
            if not found:
                raise ValueError(f"unknown {self.group} plugin {name!r}; available: {', '.join(self.names())}")
            factory = found[0].load()
        self._loaded[name] = factory
        return factory
