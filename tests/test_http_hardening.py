"""The HTTP server against hostile and broken peers: silent and slow connections, huge heads, stalled bodies.

Each test attacks a real server on 127.0.0.1 through raw sockets. Timeouts on the server under test are
short (fractions of a second); the tests' own time bounds are generous hang guards only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import tracemalloc
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import pytest
from services import make_server, wait_until
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

import kubrpc

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@contextlib.asynccontextmanager
async def _connect(url: str) -> AsyncIterator[Streams]:
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(url))
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _post(path: str, body: bytes, *headers: str, length: int | None = None) -> bytes:
    """A POST request head (and `body`), with Content-Length len(body) unless `length` says otherwise."""
    lines = [f"POST {path} HTTP/1.1", "Host: x", "Content-Type: application/json"]
    lines.append(f"Content-Length: {len(body) if length is None else length}")
    lines += headers
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """Read one response: its status, headers (lower-case names) and body (by Content-Length)."""
    with anyio.fail_after(10):
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


async def _closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server still sends until it closes the connection."""
    data = b""
    with anyio.fail_after(10):
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                data += chunk
    return data


class _Collect:
    """Reads a connection until the server closes it, while the test goes on writing."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.data = b""

    async def run(self) -> None:
        with anyio.fail_after(10), contextlib.suppress(ConnectionError):
            while chunk := await self.reader.read(65536):
                self.data += chunk


async def _http(start_server: Callable[..., Any], **options: Any) -> tuple[str, kubrpc.Server, Any]:
    url, server, control = await start_server("http", **options)
    return url, server, control


# 1. Silent and slowloris connections


async def test_silent_connections_hold_no_slot_and_are_closed_after_the_header_timeout(
    start_server: Callable[..., Any],
) -> None:
    url, _, _ = await _http(start_server, max_connections=8, header_timeout=0.3)
    async with contextlib.AsyncExitStack() as stack:
        silent = [await stack.enter_async_context(_connect(url)) for _ in range(16)]
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            for _ in range(3):  # today: 503 while the silent sockets stay open
                response = await client.post("/Arith/add", json={"a": 1, "b": 2})
                assert (response.status_code, response.json()) == (200, 3)
        for reader, _ in silent:
            assert await _closed(reader) == b""  # closed without a word: they never sent a request


@pytest.mark.parametrize("kept_alive", [False, True])
async def test_a_head_that_trickles_in_gets_408_after_the_header_timeout(
    start_server: Callable[..., Any], kept_alive: bool
) -> None:
    url, _, control = await _http(start_server, header_timeout=0.3)
    async with _connect(url) as (reader, writer):
        if kept_alive:  # a first request is answered; the second one trickles
            writer.write(_post("/Arith/add", b'{"a": 1, "b": 2}'))
            assert (await _response(reader))[0] == 200
        writer.write(b"POST /Control/sleep HTTP/1.1\r\n")
        async with anyio.create_task_group() as tg:
            answer = _Collect(reader)
            tg.start_soon(answer.run)
            for i in range(400):  # a header line every 25 ms: activity, but never a complete head
                if answer.data:
                    break
                writer.write(b"X-%d: y\r\n" % i)
                await writer.drain()
                await asyncio.sleep(0.025)
    assert answer.data.startswith(b"HTTP/1.1 408 ")
    body = json.loads(answer.data.split(b"\r\n\r\n", 1)[1])
    assert body == {"code": "deadline_exceeded", "message": "request headers not received within 0.3 s"}
    assert control.started == 0


# 2. The body is read under a deadline


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_body_that_stops_arriving_gets_408_and_the_connection_closes(
    start_server: Callable[..., Any], chunked: bool
) -> None:
    url, server, control = await _http(start_server, body_timeout=0.3)
    async with _connect(url) as (reader, writer):
        if chunked:
            writer.write(_post("/Control/sleep", b"").replace(b"Content-Length: 0", b"Transfer-Encoding: chunked"))
            writer.write(b'5\r\n{"sec\r\n')
        else:
            writer.write(_post("/Control/sleep", b'{"seconds": 0', length=100))
        answer = await _closed(reader)
    assert answer.startswith(b"HTTP/1.1 408 ")
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body == {"code": "deadline_exceeded", "message": "request body not received within 0.3 s"}
    assert control.started == 0
    await wait_until(lambda: server._pending_bytes == 0)


async def test_a_body_that_trickles_in_gets_408_too(start_server: Callable[..., Any]) -> None:
    url, _, control = await _http(start_server, body_timeout=0.3)
    async with _connect(url) as (reader, writer), anyio.create_task_group() as tg:
        answer = _Collect(reader)
        tg.start_soon(answer.run)
        writer.write(_post("/Control/sleep", b"{", length=1000))
        for _ in range(400):  # a byte every 25 ms: activity, but the body would take 25 s
            if answer.data:
                break
            writer.write(b" ")
            await writer.drain()
            await asyncio.sleep(0.025)
    assert answer.data.startswith(b"HTTP/1.1 408 ")
    assert control.started == 0


async def test_the_call_deadline_covers_reading_the_body(start_server: Callable[..., Any]) -> None:
    url, server, control = await _http(start_server)  # the body timeout is 30 s: the 200 ms deadline ends it
    async with _connect(url) as (reader, writer):
        writer.write(_post("/Control/sleep", b'{"seconds": 0', "Connect-Timeout-Ms: 200", length=100))
        status, headers, body = await _response(reader)
        assert (status, json.loads(body)) == (504, {"code": "deadline_exceeded", "message": "deadline exceeded"})
        assert headers["connection"] == "close"
        assert await _closed(reader) == b""
    assert control.started == 0
    await wait_until(lambda: server._pending_bytes == 0)


# 3. Header limits


async def test_heads_over_16_kib_get_431(start_server: Callable[..., Any]) -> None:
    url, _, control = await _http(start_server)  # the default max_header_size
    small = [f"X-Pad-{i}: {'p' * 100}" for i in range(140)]  # about 15 KiB of head: fine
    big = [f"X-Pad-{i}: {'p' * 100}" for i in range(200)]  # about 21 KiB: today answered 200
    async with _connect(url) as (reader, writer):
        writer.write(_post("/Arith/add", b'{"a": 1, "b": 2}', *small))
        assert (await _response(reader))[0] == 200
        writer.write(_post("/Arith/add", b'{"a": 1, "b": 2}', *big))
        status, headers, body = await _response(reader)
        assert (status, json.loads(body)["code"]) == (431, "resource_exhausted")
        assert json.loads(body)["message"] == "request headers exceed the limit of 16384 bytes"
        assert headers["connection"] == "close"
        assert await _closed(reader) == b""
    async with _connect(url) as (reader, writer):  # a big head pipelined behind a request, in one write
        writer.write(_post("/Arith/add", b'{"a": 1, "b": 2}') + _post("/Arith/add", b'{"a": 1, "b": 2}', *big))
        assert (await _response(reader))[0] == 200
        assert (await _response(reader))[0] == 431
    assert control.started == 0


async def test_a_client_with_too_much_metadata_is_told_why(start_server: Callable[..., Any]) -> None:
    from services import Arith

    url, _, _ = await _http(start_server, max_header_size=4096)
    async with kubrpc.connect(url) as channel:
        arith = channel.stub(Arith, timeout=10)
        assert await arith.add(1, 2) == 3
        with pytest.raises(kubrpc.RpcError) as caught:
            await channel.stub(Arith, timeout=10, metadata={"x-big": "b" * 5000}).add(1, 2)
    assert caught.value.code is kubrpc.Status.RESOURCE_EXHAUSTED
    assert "request headers exceed the limit of 4096 bytes" in caught.value.message


@pytest.mark.parametrize("where", ["header", "trailer"])
async def test_endless_header_lines_are_cut_off_not_buffered(start_server: Callable[..., Any], where: str) -> None:
    url, _, _ = await _http(start_server)
    if where == "header":
        start = b"POST /Arith/add HTTP/1.1\r\nHost: x\r\nX-Endless: "
    else:  # a chunked body's trailers are headers too
        start = b"POST /Arith/add HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        start += b'10\r\n{"a": 1, "b": 2}\r\n0\r\nX-Endless: '
    chunk = b"a" * 65536

    async def attack() -> bytes:
        async with _connect(url) as (reader, writer), anyio.create_task_group() as tg:
            answer = _Collect(reader)
            tg.start_soon(answer.run)
            writer.write(start)
            for _ in range(96):  # 6 MiB each, unless the server answers first
                if answer.data:
                    break
                writer.write(chunk)
                await writer.drain()
        return answer.data

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        async with anyio.create_task_group() as tg:
            answers: list[bytes] = []
            for _ in range(12):  # today: 72 MiB held

                async def one() -> None:
                    answers.append(await attack())

                tg.start_soon(one)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert peak < 12 * MiB, f"{peak / MiB:.1f} MiB"
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]


# 4. max_pending_bytes covers bodies still arriving


async def test_bodies_still_arriving_count_against_max_pending_bytes(start_server: Callable[..., Any]) -> None:
    url, server, control = await _http(start_server, max_message_size=MiB, max_pending_bytes=MiB)
    request = b'{"seconds": 0' + b" " * (MiB - 14) + b"}"
    body = request[:-16]  # all but the last 16 bytes of a 1 MiB request
    async with contextlib.AsyncExitStack() as stack:
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            peers = [await stack.enter_async_context(_connect(url)) for _ in range(48)]
            peers[0][1].write(_post("/Control/sleep", body, length=MiB))
            await wait_until(lambda: server._pending_bytes == MiB)  # admitted by its Content-Length
            for _, writer in peers[1:]:
                writer.write(_post("/Control/sleep", body, length=MiB))
            for _, writer in peers:
                with anyio.fail_after(10):
                    await writer.drain()
            refused = 0
            for reader, _ in peers[1:]:
                status, _, answer = await _response(reader)
                assert (status, json.loads(answer)) == (429, {"code": "resource_exhausted", "message": "server busy"})
                refused += 1
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert refused == 47
        assert server._pending_bytes == MiB
        assert held < 8 * MiB, f"{held / MiB:.1f} MiB"  # today: 46 MiB
        reader, writer = peers[0]
        writer.write(request[-16:])  # the first one completes, and runs
        status, _, answer = await _response(reader)
        assert (status, json.loads(answer)) == (200, "slept")
    await wait_until(lambda: server._pending_bytes == 0)
    assert control.finished == 1


async def test_chunked_bodies_are_admitted_as_they_arrive(start_server: Callable[..., Any]) -> None:
    url, server, _ = await _http(start_server, max_message_size=64 * 1024, max_pending_bytes=64 * 1024)
    head = b"POST /Control/sleep HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    async with _connect(url) as (first, first_writer), _connect(url) as (second, second_writer):
        first_writer.write(head + b"%x\r\n%s\r\n" % (60_000, b'{"seconds": 0' + b" " * (60_000 - 13)))
        await wait_until(lambda: server._pending_bytes == 60_000)
        second_writer.write(head + b"%x\r\n%s\r\n" % (10_000, b" " * 10_000))
        status, _, answer = await _response(second)
        assert (status, json.loads(answer)["message"]) == (429, "server busy")
        first_writer.write(b"1\r\n}\r\n0\r\n\r\n")
        assert (await _response(first))[0] == 200
    await wait_until(lambda: server._pending_bytes == 0)


# 5. max_connections admits exactly N


async def test_max_connections_admits_exactly_n_calls_at_once(start_server: Callable[..., Any]) -> None:
    url, server, control = await _http(start_server, max_connections=3)
    async with contextlib.AsyncExitStack() as stack:
        sleepers = [await stack.enter_async_context(_connect(url)) for _ in range(3)]
        idle = [await stack.enter_async_context(_connect(url)) for _ in range(5)]  # open, no request: no slot
        for _, writer in sleepers:
            writer.write(_post("/Control/sleep", b'{"seconds": 30}'))
        await wait_until(lambda: control.started == 3)  # today the third one is refused
        async with _connect(url) as (reader, writer):
            writer.write(_post("/Arith/add", b'{"a": 1, "b": 2}'))
            status, headers, body = await _response(reader)
        assert (status, headers["connection"], headers["kubrpc-not-started"]) == (503, "close", "1")
        assert json.loads(body) == {
            "code": "unavailable",
            "message": "server busy: 3 requests in progress (max_connections); the call did not start",
        }
        for _, writer in sleepers:  # the sleepers hang up: their handlers are cancelled, their slots free
            writer.close()
        await wait_until(lambda: control.cancelled == 3)
        for reader, writer in idle:  # a connection opened earlier may now call
            writer.write(_post("/Arith/add", b'{"a": 1, "b": 2}'))
            assert (await _response(reader))[:3:2] == (200, b"3")
    assert server._pending_bytes == 0


# 6. Routing by the raw path


async def test_rpc_paths_are_routed_by_the_raw_path(start_server: Callable[..., Any]) -> None:
    url, _, _ = await _http(start_server)

    async def post(path: str, body: bytes = b'{"a": 1, "b": 2}') -> tuple[int, Any]:
        async with _connect(url) as (reader, writer):
            writer.write(_post(path, body))
            status, _, answer = await _response(reader)
        return status, answer

    assert await post("/Arith/add") == (200, b"3")
    assert (await post("/Arith%2Fadd"))[0] == 404  # today: 200, as a proxy's rule for /Arith/add would not expect
    assert (await post("/test.Store%2Fecho", b'{"value": [1, "x"], "mode": "a"}'))[0] == 404
    assert (await post("/test.Store/echo", b'{"value": [1, "x"], "mode": "a"}')) == (200, b'[1,"x"]')
    status, answer = await post("/Arith/%61dd")
    assert (status, json.loads(answer)["message"]) == (
        501,
        "unknown method '%61dd' of service 'Arith' (known: add, div)",
    )


# uvicorn internals the server relies on


async def test_the_uvicorn_internals_the_server_relies_on_are_still_there() -> None:
    """kubrpc/_asgi_server.py subclasses uvicorn's HttpToolsProtocol: if uvicorn changes these, this fails."""
    callbacks = ("on_message_begin", "on_headers_complete", "on_body", "on_message_complete", "on_response_complete")
    for name in (*callbacks, "data_received", "handle_websocket_upgrade"):
        assert callable(getattr(HttpToolsProtocol, name))
    server, control = make_server(max_connections=5)
    async with server.serve("http://127.0.0.1:0") as listener:
        async with _connect(listener.url) as (_, writer):
            writer.write(_post("/Control/sleep", b'{"seconds": 30}'))
            await wait_until(lambda: control.started == 1)
            (connection,) = listener.uvicorn.server_state.connections  # type: ignore[attr-defined]
            assert isinstance(connection, HttpToolsProtocol)
            assert connection.limit_concurrency is None and connection._max_requests == 5  # type: ignore[attr-defined]
            assert len(connection.tasks) == 1 and connection.pipeline == collections.deque()
            assert connection.url == b"/Control/sleep" and (b"host", b"x") in connection.headers
            cycle = connection.cycle
            assert isinstance(cycle, RequestResponseCycle)
            assert (cycle.response_started, cycle.response_complete, cycle.disconnected) == (False, False, False)
            assert isinstance(cycle.message_event, asyncio.Event)
            assert (cycle.body, cycle.more_body) == (bytearray(), False)
            assert connection.flow.read_paused is False
        await wait_until(lambda: control.cancelled == 1)


def test_the_limits_are_checked() -> None:
    for options in ({"header_timeout": 0}, {"body_timeout": -1}, {"header_timeout": float("nan")}):
        with pytest.raises(ValueError, match="header_timeout and body_timeout must be > 0"):
            kubrpc.Server(**options)
    with pytest.raises(ValueError, match="max_header_size must be positive"):
        kubrpc.Server(max_header_size=0)
