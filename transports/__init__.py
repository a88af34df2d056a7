"""Transports: the wire between a Channel and a Server.

Built-ins: `tcp` (length-prefixed binary frames, calls multiplexed per connection) and `http`
(HTTP/JSON on Starlette and uvicorn, callable with curl). Third parties register through the
`kubrpc.transports` entry-point group. Every transport honours `kubrpc.interfaces.Transport`.
"""

from __future__ import annotations

from typing import Any

from kubrpc._plugins import Registry
from kubrpc.interfaces import Connection, Transport

__all__ = ("Connection", "Transport", "create", "names", "registry")

registry: Registry[Any] = Registry(
    "kubrpc.transports",
    {
        "tcp": "kubrpc.transports.tcp:TcpTransport",
        "http": "kubrpc.transports.http:HttpTransport",
    },
)


def create(name: str, /, **options: Any) -> Transport:
    """A new transport of the registered kind `name`, configured by keyword options."""
    transport: Transport = registry.get(name)(**options)
    return transport


def names() -> list[str]:
    """The names create() accepts."""
    return registry.names()
