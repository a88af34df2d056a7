"""The reflection service every Server serves (unless `Server(reflection=False)`): what does this server serve?

`kubrpc list` and `kubrpc describe` read it over TCP (over HTTP they read /openapi.json). Its wire name is
`kubrpc.Reflection`; it goes through the server's interceptors like any call (a `BearerAuth` token needs
`kubrpc.Reflection/*` to use it), and it is not listed in /openapi.json or `server.services`.

    services() -> ["arith.Arith", ...]                        the wire names of the registered services
    describe("arith.Arith") or describe("arith.Arith/add")     an OpenAPI 3.1 fragment: the `paths` of the
                                                              service's (or that method's) operations and the
                                                              `components` they refer to, as /openapi.json has them
                                                              (stream methods in `x-kubrpc-streams`, as there)
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from .errors import RpcError
from .interface import interface, method
from .status import Status

if TYPE_CHECKING:
    from .server import Server

__all__ = ("REFLECTION_SERVICE", "Reflection", "ReflectionService")

REFLECTION_SERVICE = "kubrpc.Reflection"


@interface(name=REFLECTION_SERVICE)
class Reflection(Protocol):
    """The wire contract of the reflection service."""

    @method(idempotent=True)
    async def services(self) -> list[str]:
        """The wire names of the services the server serves (reflection itself left out)."""
        ...

    @method(idempotent=True)
    async def describe(self, name: str) -> dict[str, Any]:
        """`Service` or `Service/method`: its OpenAPI paths and components; NOT_FOUND (with a suggestion) if unknown."""
        ...


class ReflectionService:
    """The implementation of `Reflection` for one Server; the schemas come from kubrpc.openapi."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._document: tuple[tuple[str, ...], dict[str, Any]] | None = None  # for the services it was made for

    async def services(self) -> list[str]:
        """The wire names of the registered services."""
        return list(self._server.services)

    async def describe(self, name: str) -> dict[str, Any]:
        """The OpenAPI paths of `name` (a service or a `Service/method`) with the components they use."""
        from .openapi import STREAMS, openapi_document

        service, slash, method_name = name.partition("/")
        spec = self._server.services.get(service)
        if spec is None:
            hint = suggest(service, self._server.services)
            raise RpcError(Status.NOT_FOUND, f"unknown service {quoted(service)}{hint}")
        names = [m.name for m in spec.methods.values()]
        if slash and method_name not in names:
            raise RpcError(
                Status.NOT_FOUND,
                f"unknown method {quoted(method_name)} of service {service!r}{suggest(method_name, names)}",
            )
        # Made once per set of services, not per call: 200 services cost 3 ms of the event loop per document.
        registered = tuple(self._server.services)
        if self._document is None or self._document[0] != registered:
            self._document = (registered, openapi_document(self._server))
        document = self._document[1]
        wanted = {f"/{service}/{m}" for m in ([method_name] if slash else names)}
        paths = {path: item for path, item in document.get("paths", {}).items() if path in wanted}
        streams = {path: item for path, item in document.get(STREAMS, {}).items() if path in wanted}
        # Only the schemas these paths use: not every other service's (an answer per service stays its own size).
        schemas = document.get("components", {}).get("schemas", {})
        used = _used([paths, streams], schemas)
        answer: dict[str, Any] = {"paths": paths}
        if streams:
            answer[STREAMS] = streams
        answer["components"] = {"schemas": {name: schemas[name] for name in used}}
        return answer


def _used(value: Any, schemas: dict[str, Any]) -> list[str]:
    """The component schemas `value` refers to, directly or through each other (recursive types included)."""
    seen: dict[str, None] = {}
    todo = [value]
    while todo:  # no recursion: a deep schema cannot exhaust the stack
        item = todo.pop()
        if isinstance(item, dict):
            ref = item.get("$ref")
            if isinstance(ref, str) and ref.startswith(_SCHEMAS) and ref[len(_SCHEMAS) :] in schemas:
                name = ref[len(_SCHEMAS) :]
                if name not in seen:
                    seen[name] = None
                    todo.append(schemas[name])
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
    return sorted(seen)


_SCHEMAS = "#/components/schemas/"
#: Names longer than this are cut short where an error repeats them (a caller's name can be megabytes long).
_SHOWN = 120
#: Beyond this many known names, or for a name longer than _SHOWN, no fuzzy match is tried: difflib's cost
#: grows with both (5,000 services: 90 ms of the event loop per unknown call), and a caller picks them.
_FUZZY_NAMES = 1000


def quoted(name: str) -> str:
    """`name` as repr() writes it (control characters escaped), cut to _SHOWN characters: safe to echo back."""
    if len(name) <= _SHOWN:
        return repr(name)
    return f"{name[:_SHOWN]!r}... ({len(name)} characters)"


def suggest(name: str, known: Iterable[str]) -> str:
    """'; did you mean 'x'?' for the nearest of `known` names, else '; known: a, b' (a few), else ''."""
    names = sorted(known)
    close: list[str] = []
    if len(name) <= _SHOWN and len(names) <= _FUZZY_NAMES:
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    if not close:  # `Loans` for `lib.Loans`: the last dotted part alone
        last = name.rpartition(".")[2].lower()
        close = [n for n in names if n.rpartition(".")[2].lower() == last][:1]
    if close:
        return f"; did you mean {close[0]!r}?"
    if names:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        return f" (known: {shown})"
    return ""
