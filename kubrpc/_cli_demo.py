"""`kubrpc demo`: three local servers, every built-in balancer, and a bar chart of where the calls went."""

from __future__ import annotations

import collections
import time
from contextlib import AsyncExitStack
from typing import Protocol

import anyio
import orjson

from .client import Channel, connect
from .endpoint import Endpoint
from .interfaces import Balancer
from .resolvers import create as create_resolver
from .server import Server

_WEIGHTS = {"a": 1.0, "b": 2.0, "c": 5.0}
_ZONES = {"a": "zone-1", "b": "zone-1", "c": "zone-2"}
_BAR = 30  # characters for a share of 100 %
_EIGHTHS = " ▏▎▍▌▋▊▉"


async def _endpoint_of(url: str) -> Endpoint:
    """The endpoint a client resolves `url` to (through the resolver registry, whatever the scheme)."""
    resolver = create_resolver(url)
    try:
        async for snapshot in resolver.watch():
            return snapshot[0]
    finally:
        await resolver.aclose()
    raise RuntimeError(f"{url} resolves to nothing")


class Demo(Protocol):
    """The demo's service: each server answers with its own name."""

    async def whoami(self) -> str: ...


class _DemoImpl:
    def __init__(self, name: str) -> None:
        self.name = name

    async def whoami(self) -> str:
        return self.name


def bar(share: float, width: int = _BAR) -> str:
    """A horizontal bar of `share` (0..1) of `width` characters, in eighths of a block."""
    eighths = round(max(0.0, min(1.0, share)) * width * 8)
    full, part = divmod(eighths, 8)
    return "█" * full + (_EIGHTHS[part] if part else "")


def _balancers() -> list[tuple[str, Balancer | str, str]]:
    """(name, balancer, what decides its shares) for every built-in balancer that can be made here."""
    from .balancers import create, names

    made: list[tuple[str, Balancer | str, str]] = []
    for name in ("round_robin", "weighted_random", "smooth_weighted", "p2c", "ring_hash", "zone_aware", "outlier"):
        if name not in names():
            continue
        try:
            balancer = create(name, zone="zone-1") if name == "zone_aware" else create(name)
        except (TypeError, ValueError) as exc:
            print(f"\n{name}: skipped ({exc})")
            continue
        made.append((name, balancer, _RULES.get(name, "")))
    return made


_RULES = {
    "round_robin": "each in turn",
    "weighted_random": "by weight, at random",
    "smooth_weighted": "by weight, interleaved",
    "p2c": "by load and weight: the better of two random picks",
    "ring_hash": "by key: 100 keys on a weighted hash ring",
    "zone_aware": "own zone first: zone-1 holds a and b",
    "outlier": "round_robin, minus endpoints that keep failing",
}


def _expected(name: str, endpoint: str) -> str:
    total = sum(_WEIGHTS.values())
    if name in ("round_robin", "outlier"):
        return f"{1 / len(_WEIGHTS):.1%}"
    if name in ("weighted_random", "smooth_weighted"):
        return f"{_WEIGHTS[endpoint] / total:.1%}"
    if name == "zone_aware":
        return "50.0%" if _ZONES[endpoint] == "zone-1" else "0.0%"
    return "-"


async def _worker(channel: Channel, counts: collections.Counter[str], n: int, offset: int, keys: int) -> None:
    """Make `n` calls, counting who answered; with `keys` (a stride), each call has a key out of 100 (ring_hash)."""
    for i in range(n):
        key = f"user-{(offset + i * keys) % 100}" if keys else None
        counts[orjson.loads(await channel.call("Demo/whoami", b"{}", timeout=10, key=key))] += 1


async def demo(calls: int, concurrency: int, transport: str) -> int:
    """Serve Demo three times (weights 1, 2, 5), call it through each balancer, and chart the shares."""
    async with AsyncExitStack() as stack:
        endpoints = []
        for name, weight in _WEIGHTS.items():
            server = Server()
            server.register(Demo, _DemoImpl(name))
            url = f"inproc://kubrpc-demo-{name}" if transport == "inproc" else f"{transport}://127.0.0.1:0"
            listener = await stack.enter_async_context(server.serve(url))
            found = await _endpoint_of(listener.url)
            host, port = found.host, found.port
            endpoints.append(Endpoint(host, port, weight=weight, zone=_ZONES[name], metadata={"name": name}))
        weights = ", ".join(f"{n}={w:g} ({_ZONES[n]})" for n, w in _WEIGHTS.items())
        print(f"3 {transport} servers, weights {weights}")
        for name, balancer, rule in _balancers():
            counts: collections.Counter[str] = collections.Counter()
            keyed = name == "ring_hash"
            async with connect(endpoints, transport=transport, balancer=balancer) as channel:
                await channel.call("Demo/whoami", b"{}", timeout=10)  # connect before timing

                started = time.perf_counter()
                per_worker = calls // concurrency
                async with anyio.create_task_group() as tg:
                    for i in range(concurrency):
                        n = per_worker + (1 if i < calls % concurrency else 0)
                        tg.start_soon(_worker, channel, counts, n, i, concurrency if keyed else 0)
                elapsed = time.perf_counter() - started
            print(f"\n{name}: {calls} calls in {elapsed:.2f} s = {calls / elapsed:,.0f} calls/s ({rule})")
            print("  endpoint  weight  calls   share   expected")
            for endpoint, weight in _WEIGHTS.items():
                share = counts[endpoint] / calls
                expected = _expected(name, endpoint)
                print(f"  {endpoint:8}  {weight:6g}  {counts[endpoint]:5d}  {share:6.1%}  {expected:>7}  {bar(share)}")
    return 0
