"""Transports: the wire between a Channel and a Server.

Built-ins: `tcp` (length-prefixed binary frames, calls multiplexed per connection), `http`
(HTTP/JSON on Starlette and uvicorn, callable with curl) and `inproc` (a server in the same process, no
sockets). Third parties register through the `kubrpc.transports` entry-point group. Every transport honours
`kubrpc.interfaces.Transport`.
"""

from __future__ import annotations

from kubrpc._plugins import Registry
from kubrpc.interfaces import Connection, Transport

__all__ = ("Connection", "Transport", "create", "names", "registry")

registry: Registry[Transport] = Registry(
    "kubrpc.transports",
    {
        "tcp": "kubrpc.transports.tcp:TcpTransport",
        "http": "kubrpc.transports.http:HttpTransport",
        "inproc": "kubrpc.transports.inproc:InprocTransport",
    },
)


create = registry.create
names = registry.names
