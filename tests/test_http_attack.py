"""A second attack on the HTTP server, by a reviewer who did not write it: peers that do not read, deep pipelines,
hang-ups behind a pipeline, malformed requests.

Each test attacks a real server on 127.0.0.1 through raw sockets; the server under test has short timeouts and
the tests' own time bounds are generous hang guards only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import tracemalloc
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest
from services import make_server, wait_until
from test_http_hardening import MiB, Streams, _closed, _connect, _port, _post, _response

pytestmark = pytest.mark.anyio

_BLOB = b'{"size": 1048576}'  # answered with ~1.4 MB of base64


@contextlib.asynccontextmanager
async def _connect_not_reading(url: str) -> AsyncIterator[Streams]:
    """A connection with a tiny receive buffer, so that what the server sends soon waits in its own buffer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", _port(url)))
    except BaseException:
        sock.close()
        raise
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        yield reader, writer
    finally:
        writer.transport.abort()  # it never reads: a graceful close would wait on the unread bytes


# A peer that never reads its answers


async def test_a_peer_that_does_not_read_holds_no_slot_and_is_cut_off() -> None:
    server, control = make_server(max_connections=2, body_timeout=0.5)
    async with server.serve("http://127.0.0.1:0") as listener, contextlib.AsyncExitStack() as stack:
        state = listener.uvicorn.server_state  # type: ignore[attr-defined]
        for _ in range(2):  # as many as max_connections, each with 8 large answers pipelined: ~11 MB
            _, writer = await stack.enter_async_context(_connect_not_reading(listener.url))
            writer.write(_post("/test.Store/blob", _BLOB) * 8)
        # Each one's answers fill the kernel's buffers, then the server's: the server holds the next request.
        await wait_until(lambda: sum(c.flow.write_paused for c in state.connections) == 2, timeout=20)
        await wait_until(lambda: not state.tasks)  # today: 2, each waiting to write forever; other calls get 503
        unsent = [c.transport.get_write_buffer_size() for c in state.connections]
        assert all(size < 2 * MiB for size in unsent), unsent  # one answer each, no more
        async with _connect(listener.url) as (reader, writer):
            writer.write(_post("/Arith/add", b'{"a": 1, "b": 2}'))
            assert (await _response(reader))[::2] == (200, b"3")
        # Their unsent bytes have not shrunk for body_timeout: the server aborts them (today: never)
        await wait_until(lambda: not state.connections)


async def test_a_peer_that_reads_late_gets_every_answer() -> None:
    server, _ = make_server(max_connections=2)
    async with server.serve("http://127.0.0.1:0") as listener:
        state = listener.uvicorn.server_state  # type: ignore[attr-defined]
        async with _connect_not_reading(listener.url) as (reader, writer):
            writer.write(_post("/test.Store/blob", _BLOB) * 6 + _post("/Arith/add", b'{"a": 1, "b": 2}'))
            await wait_until(lambda: any(c.flow.write_paused for c in state.connections), timeout=20)
            for _ in range(6):  # it reads at last: the held requests run, one after another
                status, _, body = await _response(reader)
                assert (status, len(body)) == (200, 1398106)
            assert (await _response(reader))[::2] == (200, b"3")


async def test_a_hang_up_cancels_a_running_call_with_requests_pipelined_behind_it(
    start_server: Callable[..., Any],
) -> None:
    url, server, control = await start_server("http")
    async with _connect(url) as (_, writer):
        writer.write(_post("/Control/sleep", b'{"seconds": 30}') + _post("/Arith/add", b'{"a": 1, "b": 2}'))
        await wait_until(lambda: control.started == 1)
    await wait_until(lambda: control.cancelled == 1)  # today: it runs on for 30 s, for nobody, in its slot


async def test_pipelined_requests_are_capped_and_memory_stays_bounded(start_server: Callable[..., Any]) -> None:
    url, _, _ = await start_server("http")
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        async with _connect(url) as (reader, writer), anyio.create_task_group() as tg:
            answer: list[bytes] = []

            async def read() -> None:
                answer.append(await _closed(reader))

            tg.start_soon(read)
            writer.write(request * 30_000)  # ~1 MB: today ~30,000 queued requests, ~18 MB of objects
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert peak < 6 * MiB, f"{peak / MiB:.1f} MiB"
    data = answer[0]
    assert data.count(b"HTTP/1.1 200 OK") == 65  # the running one and the 64 queued behind it
    head, _, body = data.rpartition(b"HTTP/1.1 ")[2].partition(b"\r\n\r\n")
    assert head.startswith(b"503 ") and b"kubrpc-not-started: 1" in head and b"connection: close" in head
    assert json.loads(body) == {
        "code": "unavailable",
        "message": "more than 64 requests pipelined on one connection; the call did not start",
    }


# Slow heads


async def test_a_kept_alive_connection_that_sends_only_crlf_is_closed(start_server: Callable[..., Any]) -> None:
    url, _, _ = await start_server("http", header_timeout=0.3)
    async with _connect(url) as (reader, writer):
        writer.write(_post("/Arith/add", b'{"a": 1, "b": 2}'))
        assert (await _response(reader))[::2] == (200, b"3")
        writer.write(b"\r\n")  # the parser skips it; it cancelled the keep-alive timeout, and no head timer ran
        answer = await _closed(reader)  # today: open for good
    assert answer.startswith(b"HTTP/1.1 408 "), answer


# Malformed requests


@pytest.mark.parametrize(
    ("request_bytes", "reason"),
    [
        (_post("/Arith/add", b'{"a": 1, "b": 2}', length=-1), "Invalid character in Content-Length"),
        (_post("/Arith/add", b'{"a": 1, "b": 2}', "Content-Length: 3"), "Duplicate Content-Length"),
        (
            _post("/Arith/add", b'{"a": 1, "b": 2}', "Transfer-Encoding: chunked"),
            "Transfer-Encoding can't be present with Content-Length",
        ),
        (_post("/Arith/add", b'{"a": 1, "b": 2}', "X-Folded: a\r\n b"), "Unexpected whitespace after header value"),
        (_post("/Arith/add", b'{"a": 1, "b": 2}', "X-Nul: a\x00b"), "Invalid header value char"),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "HTTP/2 is not supported: send HTTP/1.1"),
    ],
)
async def test_a_malformed_request_gets_a_json_400_that_says_what_is_wrong(
    start_server: Callable[..., Any], request_bytes: bytes, reason: str
) -> None:
    url, server, control = await start_server("http")
    async with _connect(url) as (reader, writer):
        writer.write(request_bytes)
        status, headers, body = await _response(reader)  # today: text/plain "Invalid HTTP request received."
        assert (status, headers["content-type"], headers["connection"]) == (400, "application/json", "close")
        assert json.loads(body) == {"code": "invalid_argument", "message": f"malformed HTTP request: {reason}"}
        assert await _closed(reader) == b""
    async with _connect(url) as (reader, writer):  # bytes that are not HTTP after a request: it is answered first
        writer.write(_post("/Arith/add", b'{"a": 1, "b": 2}') + b"\x16\x03\x01garbage\r\n\r\n")
        assert (await _response(reader))[::2] == (200, b"3")
        assert await _closed(reader) == b""
    assert control.started == 0 and server._pending_bytes == 0


async def test_an_upgrade_request_is_answered_as_http_1_1_then_the_connection_closes(
    start_server: Callable[..., Any],
) -> None:
    url, _, _ = await start_server("http")
    upgrade = ("Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", "HTTP2-Settings: AAMAAABkAAQAAP__")
    async with _connect(url) as (reader, writer):  # what `curl --http2 http://...` sends
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n%s\r\n\r\n" % "\r\n".join(upgrade).encode())
        status, headers, body = await _response(reader)
        assert (status, json.loads(body), headers["connection"]) == (200, {"status": "ok"}, "close")
        writer.write(b"more bytes of another protocol")
        assert await _closed(reader) == b""
    async with _connect(url) as (reader, writer):  # its body would be skipped: today "missing argument 'a'"
        writer.write(_post("/Arith/add", b'{"a": 1, "b": 2}', *upgrade))
        status, _, body = await _response(reader)
        message = "HTTP upgrade (h2c) is not supported: send the request without an Upgrade header"
        assert (status, json.loads(body)) == (400, {"code": "invalid_argument", "message": message})


# What holds: every kind of failure gives its slot and its bytes back


async def test_every_kind_of_failure_gives_back_its_slot_and_its_pending_bytes() -> None:
    server, control = make_server(max_connections=2, header_timeout=0.3, body_timeout=0.3)
    async with server.serve("http://127.0.0.1:0") as listener:
        url, state = listener.url, listener.uvicorn.server_state  # type: ignore[attr-defined]
        chunked = b'POST /Control/sleep HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{"sec\r\n'
        attacks = [
            _post("/Control/sleep", b'{"seconds": 0', length=1000),  # hangs up mid-body
            chunked,  # hangs up mid-chunked-body
            _post("/Control/sleep", b'{"seconds": 30}'),  # hangs up mid-call
            _post("/Control/sleep", b'{"seconds": 30}') + _post("/Arith/add", b"{}"),  # ... with one pipelined
            _post("/Control/sleep", b'{"seconds": 0', "Connect-Timeout-Ms: 100", length=1000),  # deadline in body
            _post("/Control/sleep", b'{"seconds": 0', length=1000),  # 408 for the body
            b"POST /Control/sleep HTTP/1.1\r\nX: y",  # 408 for the head
            _post("/Control/sleep", b"", f"X-Big: {'b' * 20000}"),  # 431
            _post("/Control/sleep", b'{"seconds": 0}', "Content-Length: 1"),  # 400
        ]
        for attack in attacks:
            async with _connect(url) as (reader, writer):
                writer.write(attack)
                with contextlib.suppress(TimeoutError):
                    with anyio.move_on_after(0.1):
                        await reader.read(1)
        await wait_until(lambda: not state.tasks and not state.connections and server._pending_bytes == 0)
        assert control.cancelled == control.started == 2
        async with _connect(url) as (a, a_writer), _connect(url) as (b, b_writer):  # both slots are free
            a_writer.write(_post("/Control/sleep", b'{"seconds": 0.2}'))
            b_writer.write(_post("/Control/sleep", b'{"seconds": 0.2}'))
            assert (await _response(a))[0] == (await _response(b))[0] == 200


def test_the_uvicorn_internals_the_attack_fixes_rely_on_are_still_there() -> None:
    """kubrpc/_asgi_server.py also relies on these (beside those test_http_hardening.py checks)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

    for name in ("pause_writing", "resume_writing", "timeout_keep_alive_handler", "_unset_keepalive_if_required"):
        assert callable(getattr(HttpToolsProtocol, name))
    assert "keep_alive" in RequestResponseCycle.__init__.__code__.co_names


# The ASGI app under another server


async def test_the_asgi_app_never_reads_more_body_than_the_content_length_it_admitted() -> None:
    """Under a lenient ASGI server (one that passes Content-Length with a body that is longer, say chunked)."""
    server, control = make_server(max_message_size=MiB, max_pending_bytes=MiB)
    app = server.asgi()
    received = 0
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        nonlocal received
        received += 1
        return {"type": "http.request", "body": b" " * 65536, "more_body": received < 256}  # 16 MiB in all

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/Control/sleep",
        "raw_path": b"/Control/sleep",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"16")],
        "client": ("127.0.0.1", 1),
    }
    with anyio.fail_after(10):
        await app(scope, receive, send)
    assert sent[0]["status"] == 400  # today: 16 MiB read, past a 1 MiB max_message_size and pending bytes
    message = "request body longer than its Content-Length (16)"
    assert json.loads(sent[1]["body"]) == {"code": "invalid_argument", "message": message}
    assert received == 1 and server._pending_bytes == 0 and control.started == 0


# TLS


async def test_a_stalled_tls_handshake_is_closed_after_the_header_timeout(
    start_server: Callable[..., Any], tmp_path: Any
) -> None:
    from kubrpc.testing import certs

    context = certs.server_ssl_context(*certs.self_signed_certificate(tmp_path))
    url, _, _ = await start_server("https", header_timeout=0.3, listen={"ssl": context})
    async with _connect(url) as (silent, _), _connect(url) as (partial, writer):
        writer.write(bytes.fromhex("1603010200"))  # the start of a ClientHello record, never finished
        for reader in (silent, partial):
            assert await _closed(reader) == b""  # within the 10 s hang guard; today: asyncio's 60 s
