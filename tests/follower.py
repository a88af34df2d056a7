"""A recorder of resolver snapshots, shared by the resolver tests."""

from __future__ import annotations

from collections.abc import Callable

import anyio

from kubrpc import Endpoint
from kubrpc.interfaces import Resolver


class Follower:
    """Collects every snapshot a resolver yields, in a task of its own."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.snapshots: list[list[Endpoint]] = []
        self._changed = anyio.Event()

    async def run(self) -> None:
        async for snapshot in self.resolver.watch():
            self.snapshots.append(snapshot)
            self._changed.set()
            self._changed = anyio.Event()

    async def wait_for(self, predicate: Callable[[list[Endpoint]], bool]) -> list[Endpoint]:
        """Wait (at most 5 s) until the latest snapshot satisfies `predicate`."""
        with anyio.fail_after(5):
            while not (self.snapshots and predicate(self.snapshots[-1])):
                await self._changed.wait()
        return self.snapshots[-1]

    async def wait_for_hosts(self, *hosts: str) -> list[Endpoint]:
        return await self.wait_for(lambda snapshot: sorted(e.host for e in snapshot) == sorted(hosts))
