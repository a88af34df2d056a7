"""An example service: `uvicorn examples.arith.service:app` (HTTP) or `kubrpc serve examples.arith.service:server`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import kubrpc


@dataclass
class Stats:
    count: int
    mean: float


@kubrpc.interface(name="arith.Arith")
class Arith(Protocol):
    """Arithmetic as a service."""

    @kubrpc.method(idempotent=True)
    async def add(self, a: int, b: int) -> int: ...

    @kubrpc.method(idempotent=True)
    async def stats(self, values: list[float]) -> Stats: ...

    async def whoami(self) -> str: ...


class ArithImpl:
    """The implementation: structural, no base class needed."""

    async def add(self, a: int, b: int) -> int:
        return a + b

    async def stats(self, values: list[float]) -> Stats:
        if not values:
            raise kubrpc.RpcError(kubrpc.Status.INVALID_ARGUMENT, "values must not be empty")
        return Stats(len(values), sum(values) / len(values))

    async def whoami(self) -> str:
        return os.environ.get("POD_NAME") or os.environ.get("HOSTNAME") or "local"


server = kubrpc.Server()
server.register(Arith, ArithImpl())
app = server.asgi()

if __name__ == "__main__":
    server.run(os.environ.get("KUBRPC_TCP", "tcp://0.0.0.0:9000"), os.environ.get("KUBRPC_HTTP", "http://0.0.0.0:8080"))
