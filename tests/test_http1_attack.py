"""Attacks on the http transport's lean HTTP/1.1 client (transports/_http1.py) from hostile servers on 127.0.0.1:
answers nobody asked for, endless heads, upgrades, and a channel closed with callers queued for a connection."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

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


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0)."""
    import socket
    import struct

    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@pytest.mark.parametrize("after", [0, 1], ids=["fresh-connection", "kept-alive-connection"])
async def test_a_reset_after_the_request_was_read_never_runs_a_non_idempotent_call_twice(after: int) -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: dict[str, int]) -> None:
        for _ in range(after):
            request = await read_request(reader, stats)
            writer.write(answer(b"[0]"))
        request = await read_request(reader, stats)
        seen.append(request.rsplit(b"\r\n\r\n", 1)[1])
        reset(writer)

    async with server(handler) as stats, channel(stats["port"]) as ch:
        with anyio.fail_after(20):
            for _ in range(after):
                assert await ch.call("S/m", b"{}", timeout=10) == b"[0]"
            with pytest.raises(RpcError) as info:
                await ch.call("S/m", b'{"once":1}', timeout=10)
        assert info.value.code is Status.UNAVAILABLE
        assert seen == [b'{"once":1}']  # delivered once, not retried


async def test_a_server_closing_each_kept_alive_connection_runs_no_call_twice() -> None:
    # The keep-alive race: the server says keep-alive, then closes. A call that wrote onto the closing connection
    # fails UNAVAILABLE (it may have been read: it is not retried unless idempotent, and then within the retry
    # budget), as with aiohttp before (it retried no POST either).
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: dict[str, int]) -> None:
        request = await read_request(reader, stats)
        seen.append(request.rsplit(b"\r\n\r\n", 1)[1])
        writer.write(answer(b"[1]"))
        await writer.drain()

    async with server(handler) as stats, channel(stats["port"]) as ch:
        ok = failed = 0
        with anyio.fail_after(30):
            for i in range(30):
                try:
                    assert await ch.call("S/m", b"[%d]" % i, timeout=10) == b"[1]"
                    ok += 1
                except RpcError as exc:
                    assert exc.code is Status.UNAVAILABLE
                    failed += 1
        assert len(seen) == len(set(seen))
        assert ok + failed == 30, (ok, failed)


async def test_a_cancelled_call_leaves_no_connection_in_an_unknown_state() -> None:
    # A call cancelled after the head of its answer arrived: the rest of that answer must not become the next's.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: dict[str, int]) -> None:
        while True:
            await read_request(reader, stats)
            n = stats["requests"]
            if n == 1:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n[1")
                await writer.drain()
                await asyncio.sleep(0.5)
                writer.write(b",1,1]")
            else:
                writer.write(answer(b"[%d]" % n))
            await writer.drain()

    async with server(handler) as stats, channel(stats["port"]) as ch:
        with anyio.fail_after(20):
            with pytest.raises(RpcError) as info:
                await ch.call("S/m", b"{}", timeout=0.2)
            assert info.value.code is Status.DEADLINE_EXCEEDED
            assert await ch.call("S/m", b"{}", timeout=10) == b"[2]"


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.0 200 OK\r\n\r\n[7]",
        b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\n[7]",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n[7]\r\n0\r\n\r\n",
    ],
    ids=["http1.0-until-close", "http1.0-length", "chunked"],
)
async def test_answers_framed_every_way_then_closed(reply: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: dict[str, int]) -> None:
        while True:
            await read_request(reader, stats)
            writer.write(reply)
            await writer.drain()
            if reply.startswith(b"HTTP/1.0"):
                break  # (the client closes an HTTP/1.0 answer's connection; the first ends with it)

    async with server(handler) as stats, channel(stats["port"]) as ch:
        with anyio.fail_after(20):
            for _ in range(3):
                assert await ch.call("S/m", b"{}", timeout=10) == b"[7]"


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n[7]",  # shorter than it says, then closed
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n[7]\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n[7]",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n[7]",
        b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n[7]",
    ],
    ids=["short-length", "bad-chunk-size", "huge-chunk-size", "two-lengths", "huge-length"],
)
async def test_broken_framing_is_an_error_and_the_next_call_works(reply: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: dict[str, int]) -> None:
        while True:
            await read_request(reader, stats)
            if stats["requests"] == 2:
                writer.write(reply)
                await writer.drain()
                break
            writer.write(answer(b"[8]"))
            await writer.drain()

    async with server(handler) as stats, channel(stats["port"]) as ch:
        with anyio.fail_after(20):
            assert await ch.call("S/m", b"{}", timeout=10) == b"[8]"
            with pytest.raises(RpcError) as info:
                await ch.call("S/m", b"{}", timeout=10)
            assert info.value.code in (Status.UNAVAILABLE, Status.RESOURCE_EXHAUSTED), info.value
            assert await ch.call("S/m", b"{}", timeout=10, idempotent=True) == b"[8]"


async def test_a_server_that_never_reads_a_large_request_is_bounded_by_read_timeout() -> None:
    # The request sits in the client's write buffer (one request: bounded by max_message_size); no hang.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: dict[str, int]) -> None:
        await asyncio.sleep(30)

    payload = b'"' + b"x" * (3 << 20) + b'"'
    async with server(handler) as stats, channel(stats["port"], read_timeout=0.5) as ch:
        with anyio.fail_after(20), pytest.raises(RpcError) as info:
            await ch.call("S/m", payload, timeout=None)
        assert info.value.code is Status.UNAVAILABLE


async def test_an_early_answer_before_the_request_is_read_is_taken_once() -> None:
    # A 413-like answer written before the server read the body, then the connection closed.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: dict[str, int]) -> None:
        await reader.readuntil(b"\r\n\r\n")
        stats["requests"] += 1
        writer.write(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()

    payload = b'"' + b"x" * (3 << 20) + b'"'
    async with server(handler) as stats, channel(stats["port"]) as ch:
        with anyio.fail_after(20):
            for _ in range(2):
                with pytest.raises(RpcError) as info:
                    await ch.call("S/m", payload, timeout=10)
                assert "HTTP 400" in info.value.message or info.value.code is Status.UNAVAILABLE, info.value


async def test_many_callers_through_few_connections() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: dict[str, int]) -> None:
        while True:
            request = await read_request(reader, stats)
            await asyncio.sleep(0.001)
            writer.write(answer(request.rsplit(b"\r\n\r\n", 1)[1]))
            await writer.drain()

    async with server(handler) as stats, channel(stats["port"], max_connections=3) as ch:
        with anyio.fail_after(60):
            results = await asyncio.gather(*(ch.call("S/m", b"[%d]" % i, timeout=30) for i in range(300)))
        assert results == [b"[%d]" % i for i in range(300)]
        assert stats["connections"] <= 3


async def test_callers_whose_deadline_ends_while_queued_for_a_connection_leak_no_slot() -> None:
    # max_connections=1: the first call holds the connection 1.5 s; three queued calls time out while waiting.
    # The connection, once free, still serves the next call (no lost wake-up, no slot counted twice).
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: dict[str, int]) -> None:
        while True:
            await read_request(reader, stats)
            if stats["requests"] == 1:
                await asyncio.sleep(1.5)
            writer.write(answer(b"[%d]" % stats["requests"]))
            await writer.drain()

    async with server(handler) as stats, channel(stats["port"], max_connections=1) as ch:
        with anyio.fail_after(20):
            first = asyncio.create_task(ch.call("S/m", b"{}", timeout=10))
            while stats["requests"] < 1:
                await asyncio.sleep(0.01)
            queued = await asyncio.gather(
                *(ch.call("S/m", b"{}", timeout=0.05) for _ in range(3)), return_exceptions=True
            )
            assert all(isinstance(r, RpcError) and r.code is Status.DEADLINE_EXCEEDED for r in queued), queued
            assert await first == b"[1]"
            assert await ch.call("S/m", b"{}", timeout=10) == b"[2]"
            assert await asyncio.gather(*(ch.call("S/m", b"{}", timeout=10) for _ in range(5))) == [
                b"[%d]" % i for i in range(3, 8)
            ]
        assert stats["connections"] == 1


async def test_closing_a_tls_channel_with_calls_in_flight_leaves_nothing_behind(tmp_path: Path) -> None:
    from kubrpc.testing.kube import self_signed_certificate

    cert, key = self_signed_certificate(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=cert)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            await reader.read()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context)
    port = srv.sockets[0].getsockname()[1]
    try:
        async with channel(port, ssl=client_context) as ch:
            tasks = [asyncio.create_task(ch.call("S/m", b"{}", timeout=None)) for _ in range(4)]
            await asyncio.sleep(0.3)
            await ch.aclose()
            with anyio.fail_after(10):
                results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, RpcError) and r.code is Status.UNAVAILABLE for r in results), results
    finally:
        srv.close()
        await srv.wait_closed()


@pytest.mark.parametrize("where", ["head", "body"])
async def test_a_trickled_answer_cannot_hold_a_call_without_a_deadline_past_read_timeout(where: str) -> None:
    # read_timeout was re-armed by every byte: a server trickling one byte every 0.05 s held a call without a
    # deadline for as long as it liked (README: "has waited this long for its answer fails with UNAVAILABLE").
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: dict[str, int]) -> None:
        await read_request(reader, stats)
        if where == "head":
            writer.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        for _ in range(2000):
            writer.write(b"a")
            await writer.drain()
            await asyncio.sleep(0.05)

    async with server(handler) as stats, channel(stats["port"], read_timeout=0.5) as ch:
        with anyio.fail_after(30), pytest.raises(RpcError) as info:
            await ch.call("S/m", b"{}", timeout=None)
        assert info.value.code is Status.UNAVAILABLE
        assert "read_timeout" in info.value.message


async def test_endless_chunked_trailers_are_refused_not_buffered() -> None:
    # After the last chunk, one trailer that never ends grew httptools' header buffer without bound (the body's
    # size limit does not see trailers): 8 MiB were buffered and the call waited for its deadline.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: dict[str, int]) -> None:
        await read_request(reader, stats)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n[7]\r\n0\r\nX-Trailer: ")
        for _ in range(128):
            writer.write(b"a" * 65536)
            await writer.drain()
        await reader.read()

    async with server(handler) as stats, channel(stats["port"], max_message_size=65536) as ch:
        with anyio.fail_after(30), pytest.raises(RpcError) as info:
            await ch.call("S/m", b"{}", timeout=5)
        assert info.value.code is Status.RESOURCE_EXHAUSTED, info.value


@pytest.mark.parametrize("deadline", [0.3, None], ids=["deadline", "no-deadline"])
async def test_a_tls_handshake_that_never_ends_is_bounded_and_not_delivered(deadline: float | None) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: dict[str, int]) -> None:
        await reader.read()  # accepts, reads the ClientHello, never answers it

    async with server(handler) as stats:
        transport = HttpTransport(ssl=ssl.create_default_context(), connect_timeout=0.3)
        async with kubrpc.connect([Endpoint("127.0.0.1", stats["port"])], transport=transport) as ch:
            with anyio.fail_after(20), pytest.raises(RpcError) as info:
                await ch.call("S/m", b"{}", timeout=deadline)
        if deadline is None:
            assert isinstance(info.value, kubrpc.NotDeliveredError), info.value
        else:
            assert info.value.code in (Status.DEADLINE_EXCEEDED, Status.UNAVAILABLE), info.value


async def test_closing_the_channel_while_a_connection_is_being_made_leaves_no_socket(tmp_path: Path) -> None:
    # The pool closed while a TLS handshake was under way: the new connection was still used for the call (which
    # waited for read_timeout on a socket nobody would close) instead of failing as the pool was closed.
    from kubrpc.testing.kube import self_signed_certificate

    cert, key = self_signed_certificate(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)

    async def tls_handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    tls = await asyncio.start_server(tls_handle, "127.0.0.1", 0, ssl=server_context)
    tls_port = tls.sockets[0].getsockname()[1]

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def slow_proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: dict[str, int]) -> None:
        await asyncio.sleep(0.5)  # the handshake waits
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", tls_port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    try:
        async with server(slow_proxy) as stats:
            transport = HttpTransport(ssl=ssl.create_default_context(cafile=cert), connect_timeout=10)
            async with kubrpc.connect([Endpoint("127.0.0.1", stats["port"])], transport=transport) as ch:
                task = asyncio.create_task(ch.call("S/m", b"{}", timeout=None))
                while stats["connections"] < 1:
                    await asyncio.sleep(0.01)
                await ch.aclose()
                try:
                    with anyio.fail_after(10):
                        with pytest.raises(RpcError) as info:
                            await task
                finally:
                    task.cancel()
                assert info.value.code is Status.UNAVAILABLE
    finally:
        tls.close()
        await tls.wait_closed()
