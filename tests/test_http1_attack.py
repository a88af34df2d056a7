"""Attacks on the http transport's lean HTTP/1.1 client (transports/_http1.py) from hostile servers on 127.0.0.1:
answers nobody asked for, endless heads, upgrades, and a channel closed with callers queued for a connection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import pytest

import kubrpc
from kubrpc import Endpoint, RpcError, Status
from kubrpc.transports.http import HttpTransport

pytestmark = pytest.mark.anyio

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, dict[str, int]], Awaitable[None]]


@asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[dict[str, int]]:
    """A raw TCP server that runs `handler` per connection; stats counts connections and requests."""
    stats = {"connections": 0, "requests": 0}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stats["connections"] += 1
        try:
            await handler(reader, writer, stats)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    stats["port"] = srv.sockets[0].getsockname()[1]
    try:
        yield stats
    finally:
        srv.close()
        await srv.wait_closed()


async def read_request(reader: asyncio.StreamReader, stats: dict[str, int]) -> bytes:
    """One request, head and body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    body = await reader.readexactly(length)
    stats["requests"] += 1
    return head + body


def answer(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def channel(port: int, **options: object) -> kubrpc.Channel:
    return kubrpc.connect([Endpoint("127.0.0.1", port)], transport=HttpTransport(**options))  # type: ignore[arg-type]


async def test_a_second_answer_in_the_same_segment_is_not_the_next_calls() -> None:
    # Each request gets its answer and, in the same write, the start of an answer nobody asked for, whose body
    # the server completes after the next request. Taken as the next call's answer, it would be "junked".
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: dict[str, int]) -> None:
        n = 0
        while True:
            await read_request(reader, stats)
            n += 1
            prefix = b'ed"' if n > 1 else b""
            writer.write(prefix + answer(b"[%d]" % n) + b'HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n"junk')
            await writer.drain()

    async with server(handler) as stats, channel(stats["port"]) as ch:
        with anyio.fail_after(20):
            assert await ch.call("S/m", b"{}", timeout=10) == b"[1]"
            # the connection that carried junk is not reused: the next call gets its own answer
            assert await ch.call("S/m", b"{}", timeout=10) == b"[1]"
        assert stats["connections"] == 2


async def test_two_whole_answers_for_one_request_do_not_pool_the_connection_twice() -> None:
    # Two complete answers per request, in one write: the second must not put the connection in the pool a second
    # time (two callers would then share it: one gets the other's answer, the other waits forever).
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: dict[str, int]) -> None:
        while True:
            await read_request(reader, stats)
            n = stats["requests"]
            writer.write(answer(b"[%d]" % n) + answer(b'"junk"'))
            await writer.drain()

    async with server(handler) as stats, channel(stats["port"]) as ch:
        with anyio.fail_after(20):
            assert await ch.call("S/m", b"{}", timeout=10) == b"[1]"
            results = await asyncio.gather(
                ch.call("S/m", b"{}", timeout=5), ch.call("S/m", b"{}", timeout=5), return_exceptions=True
            )
        assert all(type(r) is bytes and r != b'"junk"' for r in results), results
        assert sorted(results) == [b"[2]", b"[3]"]  # type: ignore[type-var]
