"""The http transport's own HTTP/1.1 client for unary calls (transports/_http1.py), against servers that are not
uvicorn: answers framed every way HTTP allows, oversized answers, redirects, garbage, and the pool's bound."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import pytest

import kubrpc
from kubrpc import Endpoint, RpcError, Status
from kubrpc.transports.http import HttpTransport

pytestmark = pytest.mark.anyio

Answer = Callable[[bytes], bytes | None]


@asynccontextmanager
async def raw_http_server(answer: Answer, *, hold: float = 0.0) -> AsyncIterator[dict[str, int]]:
    """A server that reads one request head and body at a time and writes `answer(request)` (None: close)."""
    stats = {"connections": 0, "requests": 0, "open": 0, "most_open": 0}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stats["connections"] += 1
        stats["open"] += 1
        stats["most_open"] = max(stats["most_open"], stats["open"])
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                stats["requests"] += 1
                if hold:
                    await asyncio.sleep(hold)
                reply = answer(head + body)
                if reply is None:
                    break
                writer.write(reply)
                await writer.drain()
                if b"Connection: close" in reply:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            stats["open"] -= 1
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    stats["port"] = server.sockets[0].getsockname()[1]
    try:
        yield stats
    finally:
        server.close()
        await server.wait_closed()


async def call(port: int, transport: HttpTransport | None = None, **kwargs: object) -> bytes:
    async with kubrpc.connect([Endpoint("127.0.0.1", port)], transport=transport or HttpTransport()) as channel:
        return await channel.call("S/m", b"{}", timeout=10, **kwargs)  # type: ignore[arg-type]


async def test_a_body_that_ends_with_the_connection_is_complete() -> None:
    def answer(_: bytes) -> bytes | None:
        return b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n[1,2,3]"

    async with raw_http_server(answer) as stats:
        # the server closes after writing: the answer has no length, so the close ends it
        async with kubrpc.connect([Endpoint("127.0.0.1", stats["port"])], transport=HttpTransport()) as channel:
            assert await channel.call("S/m", b"{}", timeout=10) == b"[1,2,3]"


async def test_chunked_answers_are_read_and_the_connection_is_reused() -> None:
    def answer(_: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n[1,\r\n2\r\n2]\r\n0\r\n\r\n"

    async with raw_http_server(answer) as stats:
        async with kubrpc.connect([Endpoint("127.0.0.1", stats["port"])], transport=HttpTransport()) as channel:
            for _ in range(5):
                assert await channel.call("S/m", b"{}", timeout=10) == b"[1,2]"
        assert stats["connections"] == 1 and stats["requests"] == 5


async def test_an_oversized_answer_is_refused_and_the_channel_goes_on() -> None:
    big = b"[" + b"1," * 40_000 + b"1]"

    def answer(request: bytes) -> bytes:
        if b"big" in request:
            return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(big), big)
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async with raw_http_server(answer) as stats:
        transport = HttpTransport(max_message_size=10_000)
        async with kubrpc.connect([Endpoint("127.0.0.1", stats["port"])], transport=transport) as channel:
            with pytest.raises(RpcError) as info:
                await channel.call("S/m", b'{"big": 1}', timeout=10)
            assert info.value.code is Status.RESOURCE_EXHAUSTED
            assert "maximum message size" in info.value.message
            assert await channel.call("S/m", b"{}", timeout=10) == b"ok"


async def test_a_redirect_is_not_followed() -> None:
    def answer(_: bytes) -> bytes:
        return b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:1/x\r\nContent-Length: 0\r\n\r\n"

    async with raw_http_server(answer) as stats:
        with pytest.raises(RpcError) as info:
            await call(stats["port"])
        assert "HTTP 307" in info.value.message and "not kubrpc" in info.value.message
        assert stats["requests"] == 1


async def test_garbage_instead_of_http_is_an_error_not_a_hang() -> None:
    def answer(_: bytes) -> bytes:
        return b"SSH-2.0-OpenSSH_9.6\r\n\r\n"

    async with raw_http_server(answer) as stats:
        with anyio.fail_after(20), pytest.raises(RpcError) as info:
            await call(stats["port"])
        assert info.value.code is Status.UNAVAILABLE
        assert "malformed HTTP answer" in info.value.message


async def test_the_pool_opens_at_most_max_connections() -> None:
    def answer(_: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1"

    async with raw_http_server(answer, hold=0.05) as stats:
        transport = HttpTransport(max_connections=2)
        async with kubrpc.connect([Endpoint("127.0.0.1", stats["port"])], transport=transport) as channel:
            results = await asyncio.gather(*(channel.call("S/m", b"{}", timeout=30) for _ in range(12)))
        assert results == [b"1"] * 12
        assert stats["most_open"] <= 2 and stats["requests"] == 12


async def test_cancelled_waiters_for_a_connection_leave_the_pool_usable() -> None:
    def answer(_: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1"

    async with raw_http_server(answer, hold=0.2) as stats:
        transport = HttpTransport(max_connections=1)
        async with kubrpc.connect([Endpoint("127.0.0.1", stats["port"])], transport=transport) as channel:
            tasks = [asyncio.create_task(channel.call("S/m", b"{}", timeout=30)) for _ in range(5)]
            await asyncio.sleep(0.05)
            for task in tasks[1:]:
                task.cancel()
            assert await tasks[0] == b"1"
            await asyncio.gather(*tasks[1:], return_exceptions=True)
            assert await channel.call("S/m", b"{}", timeout=30) == b"1"


async def test_metadata_cannot_inject_header_lines_at_the_transport() -> None:
    transport = HttpTransport()
    async with raw_http_server(lambda _: b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1") as stats:
        conn = await transport.connect(Endpoint("127.0.0.1", stats["port"]))
        try:
            with pytest.raises(RpcError) as info:
                await conn.call("S/m", b"{}", timeout=5, metadata={"x-a": "1\r\nX-Evil: 1"})
            assert info.value.code is Status.INVALID_ARGUMENT
            assert stats["requests"] == 0
        finally:
            await conn.aclose()


async def test_an_interim_100_answer_is_skipped() -> None:
    def answer(_: bytes) -> bytes:
        return b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async with raw_http_server(answer) as stats:
        assert await call(stats["port"]) == b"ok"


async def test_a_path_cannot_break_the_request_line() -> None:
    seen: list[bytes] = []

    def answer(request: bytes) -> bytes:
        seen.append(request.split(b"\r\n", 1)[0])
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async with raw_http_server(answer) as stats:
        async with kubrpc.connect([Endpoint("127.0.0.1", stats["port"])], transport=HttpTransport()) as channel:
            assert await channel.call("S/m x HTTP/1.1\r\nX-Evil: 1", b"{}", timeout=10) == b"ok"
            assert await channel.call("S/m", b"{}", timeout=10) == b"ok"
    assert seen == [b"POST /S/m%20x%20HTTP/1.1%0D%0AX-Evil:%201 HTTP/1.1", b"POST /S/m HTTP/1.1"]
