"""Resolvers whose endpoints are given, not discovered: a fixed list, or one a test sets."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import anyio

from ..endpoint import Endpoint

__all__ = ("ManualResolver", "StaticResolver", "parse_static")


def parse_static(spec: str) -> list[Endpoint]:
    """Parse `HOST:PORT[;weight=W][;zone=Z],...` (IPv6 hosts in brackets) into endpoints."""
    endpoints = []
    for item in spec.split(","):
        address, *options = item.strip().split(";")
        host, sep, port = address.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"bad endpoint {item.strip()!r}: expected HOST:PORT")
        kwargs: dict[str, object] = {}
        for option in options:
            key, sep, value = option.partition("=")
            if key == "weight" and sep:
                try:
                    kwargs["weight"] = float(value)
                except ValueError:
                    raise ValueError(f"bad weight {value!r} in {item.strip()!r}") from None
            elif key == "zone" and sep:
                kwargs["zone"] = value
            else:
                raise ValueError(f"unknown endpoint option {option!r} in {item.strip()!r}")
        endpoints.append(Endpoint(host, int(port), **kwargs))  # type: ignore[arg-type]
    return endpoints


class ManualResolver:
    """A resolver whose snapshot is set by hand with `set()`: for tests and custom discovery."""

    def __init__(self, endpoints: Iterable[Endpoint] = ()) -> None:
        self._snapshot = list(endpoints)
        self._version = 0
        self._closed = False
        self._changed: anyio.Event | None = None

    def set(self, endpoints: Iterable[Endpoint]) -> None:
        """Replace the endpoint set; every watch() yields it next."""
        self._snapshot = list(endpoints)
        self._version += 1
        self._wake()

    @property
    def endpoints(self) -> list[Endpoint]:
        """The current snapshot."""
        return list(self._snapshot)

    async def watch(self) -> AsyncIterator[list[Endpoint]]:
        """Yield the current snapshot, then each new one, until aclose()."""
        seen = -1
        while not self._closed:
            if seen != self._version:
                seen = self._version
                yield list(self._snapshot)
                continue
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()

    async def aclose(self) -> None:
        """End every watch()."""
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {len(self._snapshot)} endpoints>"


class StaticResolver(ManualResolver):
    """A fixed endpoint list: yields it once, then nothing until closed."""

    @classmethod
    def from_target(cls, target: str) -> StaticResolver:
        """A resolver for `static://HOST:PORT[;weight=W],...`, or `tcp://` / `http://` / `https://HOST:PORT`."""
        scheme, sep, rest = target.partition("://")
        return cls(parse_static(rest if sep else target))
