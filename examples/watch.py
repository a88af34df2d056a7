"""A live "watch": an in-memory key-value store that streams its changes to every watcher, as they happen.

    python examples/watch.py                      # a server and a client in one process, over TCP
    python examples/watch.py --transport http     # or over HTTP, or inproc (no sockets)

    kubrpc serve examples.watch:server --bind tcp://127.0.0.1:9000               # serve it alone, then:
    kubrpc call tcp://127.0.0.1:9000 kv.Store/watch '{"prefix": "config/"}'      # one JSON line per change
    kubrpc call tcp://127.0.0.1:9000 kv.Store/put '{"key": "config/a", "value": "1"}'
    printf '{"key": "a", "value": "1"}\\n{"key": "b", "value": "2"}\\n' \\
        | kubrpc call tcp://127.0.0.1:9000 kv.Store/load                           # a stream of requests

`watch` is a stream of results: the keys under a prefix, a `synced` marker, then each change. A watcher that
falls too far behind (its client stopped reading) is ended with RESOURCE_EXHAUSTED after the changes it was
sent, and watches again: a put never waits for a slow watcher. `load` is a stream of requests.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

import anyio

import kubrpc


@dataclass
class Change:
    """One change of the store: a put or a delete at `revision`; `synced` ends a watch's initial state."""

    revision: int
    kind: Literal["put", "delete", "synced"]
    key: str = ""
    value: str | None = None


@dataclass
class Entry:
    """A key and its value."""

    key: str
    value: str


@kubrpc.interface(name="kv.Store")
class Store(Protocol):
    """An in-memory key-value store whose changes can be watched."""

    async def put(self, key: str, value: str) -> int:
        """Set a key; the store's new revision."""
        ...

    async def delete(self, key: str) -> bool:
        """Remove a key; False if there was none."""
        ...

    async def get(self, key: str) -> str | None: ...

    def watch(self, prefix: str = "", *, initial: bool = True) -> AsyncIterator[Change]:
        """The keys under `prefix` (unless initial=False), a `synced` change, then every change as it happens."""
        ...

    async def load(self, entries: AsyncIterable[Entry]) -> int:
        """Put each entry of the stream, in order; the store's revision after the last."""
        ...


@dataclass(eq=False)
class _Watcher:
    prefix: str
    changes: asyncio.Queue[Change]
    lagged: bool = field(default=False)


class StoreImpl:
    """The store: a dict, a revision counter, and one bounded queue per watcher."""

    def __init__(self, *, backlog: int = 1000) -> None:
        self.backlog = backlog
        self.revision = 0
        self._data: dict[str, str] = {}
        self._watchers: set[_Watcher] = set()

    async def put(self, key: str, value: str) -> int:
        self._data[key] = value
        return self._publish("put", key, value)

    async def delete(self, key: str) -> bool:
        if self._data.pop(key, None) is None:
            return False
        self._publish("delete", key, None)
        return True

    async def get(self, key: str) -> str | None:
        return self._data.get(key)

    async def watch(self, prefix: str = "", *, initial: bool = True) -> AsyncIterator[Change]:
        watcher = _Watcher(prefix, asyncio.Queue(self.backlog))
        # The snapshot and the subscription in one step (no await between): no change is missed or sent twice.
        self._watchers.add(watcher)
        start = self.revision
        snapshot = sorted((k, v) for k, v in self._data.items() if k.startswith(prefix)) if initial else []
        try:
            for key, value in snapshot:
                yield Change(start, "put", key, value)
            yield Change(start, "synced")
            while True:
                if watcher.lagged:
                    raise kubrpc.RpcError(
                        kubrpc.Status.RESOURCE_EXHAUSTED,
                        f"this watcher fell more than {self.backlog} changes behind: watch again",
                    )
                yield await watcher.changes.get()
        finally:  # the client left its loop, the call was cancelled, or the server drains: unsubscribe
            self._watchers.discard(watcher)

    async def load(self, entries: AsyncIterable[Entry]) -> int:
        async for entry in entries:
            await self.put(entry.key, entry.value)
        return self.revision

    def _publish(self, kind: Literal["put", "delete"], key: str, value: str | None) -> int:
        self.revision += 1
        change = Change(self.revision, kind, key, value)
        for watcher in list(self._watchers):
            if key.startswith(watcher.prefix):
                try:
                    watcher.changes.put_nowait(change)
                except asyncio.QueueFull:  # its client does not read: end that watch, never block the put
                    watcher.lagged = True
                    self._watchers.discard(watcher)
        return self.revision


server = kubrpc.Server(drain_timeout=2)
server.register(Store, StoreImpl())


async def follow(name: str, store: Store, prefix: str, synced: anyio.Event, last: int) -> None:
    """Print the changes a watcher sees, until it has seen revision `last` (its loop then ends the stream)."""
    async for change in store.watch(prefix):
        if change.kind == "synced":
            print(f"[{name}] synced at revision {change.revision}")
            synced.set()
            continue
        shown = f" = {change.value!r}" if change.kind == "put" else ""
        print(f"[{name}] {change.kind} {change.key}{shown} (revision {change.revision})")
        if change.revision >= last:
            break  # leaving the loop cancels the watch on the server


async def demo(transport: str) -> None:
    """Serve the store, watch it from two watchers, and change it from a third stub."""
    url = "inproc://watch-example" if transport == "inproc" else f"{transport}://127.0.0.1:0"
    async with server.serve(url) as listener, kubrpc.connect(listener.url) as channel:
        print(f"serving kv.Store on {listener.url}")
        store = channel.stub(Store, timeout=5.0)  # each put, delete and load: 5 s
        watching = channel.stub(Store)  # a watch has no deadline: it runs until its loop ends
        await store.put("config/mode", "fast")  # before the watchers: they get it as their initial state
        last = 6  # the revision of the last change below, a config/ one, so that both watchers see it
        synced = [anyio.Event(), anyio.Event()]
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(follow, "config", watching, "config/", synced[0], last)
            tasks.start_soon(follow, "all", watching, "", synced[1], last)
            for event in synced:
                await event.wait()
            await store.put("config/mode", "safe")
            await store.put("users/ada", "admin")
            await store.delete("config/mode")

            async def entries() -> AsyncIterator[Entry]:
                for key, value in [("users/bob", "reader"), ("config/retries", "3")]:
                    yield Entry(key, value)

            print(f"loaded 2 entries: revision {await store.load(entries())}")
        print(f"config/retries = {await store.get('config/retries')!r}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A key-value store whose changes stream to its watchers.")
    parser.add_argument("--transport", choices=["tcp", "http", "inproc"], default="tcp")
    anyio.run(demo, parser.parse_args().transport)
