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


async def endless_head(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: dict[str, int], piece: bytes
) -> None:
    """Answer with a head that does not end: `piece` over and over, up to 1 MiB, then nothing."""
    await read_request(reader, stats)
    writer.write(b"HTTP/1.1 200 OK\r\n")
    sent = 0
    while sent < 1 << 20:
        writer.write(piece * (65536 // len(piece)))
        await writer.drain()
        sent += 65536
    await reader.read()


@pytest.mark.parametrize("piece", [b"a", b"X-Filler: 0123456789\r\n"], ids=["one-endless-header", "endless-headers"])
async def test_an_endless_answer_head_is_refused_not_buffered(piece: bytes) -> None:
    # One header value that never ends grew httptools' buffer without bound (no limit, unlike aiohttp's 8 KiB
    # lines); endless small headers kept a call without a deadline waiting as long as they came.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: dict[str, int]) -> None:
        await endless_head(reader, writer, stats, b"X-Long: " + piece if piece == b"a" else piece)

    async with server(handler) as stats, channel(stats["port"], read_timeout=5) as ch:
        with anyio.fail_after(30), pytest.raises(RpcError) as info:
            await ch.call("S/m", b"{}", timeout=None)
        assert info.value.code is Status.UNAVAILABLE
        assert "head" in info.value.message, info.value.message


async def test_closing_the_channel_fails_every_caller_queued_for_a_connection() -> None:
    # max_connections=1: one call holds the connection, three wait for it. Closing the channel woke one of them,
    # whose connect failed (the pool is closed) without waking the next: those hung.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: dict[str, int]) -> None:
        await read_request(reader, stats)
        await reader.read()  # never answers

    async with server(handler) as stats, channel(stats["port"], max_connections=1) as ch:
        results: list[BaseException | bytes] = []

        async def one() -> None:
            try:
                results.append(await ch.call("S/m", b"{}", timeout=None))
            except RpcError as exc:
                results.append(exc)

        tasks = [asyncio.create_task(one()) for _ in range(4)]
        with anyio.fail_after(20):
            while stats["requests"] < 1:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
        await ch.aclose()
        try:
            with anyio.fail_after(10):
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        assert len(results) == 4
        assert all(isinstance(r, RpcError) and r.code is Status.UNAVAILABLE for r in results), results


async def test_a_101_upgrade_answer_is_a_clear_error_not_a_protocol_crash() -> None:
    # httptools raises HttpParserUpgrade (not an HttpParserError) out of data_received: asyncio logged a fatal
    # error and the call failed as a reset, with nothing saying why.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: dict[str, int]) -> None:
        await read_request(reader, stats)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nxx")
        await writer.drain()
        await reader.read()

    async with server(handler) as stats, channel(stats["port"]) as ch:
        with anyio.fail_after(20), pytest.raises(RpcError) as info:
            await ch.call("S/m", b"{}", timeout=5)
        assert info.value.code is Status.UNAVAILABLE
        assert "101" in info.value.message or "upgrade" in info.value.message.lower(), info.value.message
