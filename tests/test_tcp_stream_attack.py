"""The attack pass on TCP stream calls: hostile and slow peers, over real sockets on 127.0.0.1.

Each test is a finding of the attack pass (or a probe that came out clean and guards the behaviour): a peer
that keeps streams open without progress, a peer that holds many streams, a hostile server against the client.
The wire is docs/protocol.md's "Streams"; tests/test_tcp_streams.py has the protocol's own tests.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Protocol

import orjson
import pytest
from rawtcp import RawClient, raw_opener
from stream_services import Feed, FeedImpl

import kubrpc
from kubrpc import RpcError, Status
from kubrpc.transports._frames import (
    FLAG_CLIENT_STREAMS,
    FLAG_REFUSED,
    FLAG_SERVER_STREAMS,
    PREFACE,
    FrameType,
    encode_frame,
    encode_request,
    encode_window_update,
)
from kubrpc.transports import _tcp_server
from kubrpc.transports._tcp_server import TcpListener

BIDI = FLAG_CLIENT_STREAMS | FLAG_SERVER_STREAMS
#: What the server counts for an open stream's own state (the old code counted nothing: 8 KiB is its value now).
_STREAM_ENTRY: int = getattr(_tcp_server, "_STREAM_ENTRY", 8 * 1024)


@kubrpc.interface(name="test.Quiet")
class Quiet(Protocol):
    def wait(self) -> AsyncIterator[int]: ...


class QuietImpl:
    """A server stream whose handler waits on its own source (a watch with no events yet), not on the client."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def wait(self) -> AsyncIterator[int]:
        await self.release.wait()
        yield 1


@asynccontextmanager
async def serving(**options: Any) -> AsyncIterator[tuple[TcpListener, kubrpc.Server, QuietImpl, Any]]:
    """Feed and Quiet on tcp://127.0.0.1:0: (listener, server, quiet, open_raw)."""
    server = kubrpc.Server(**options)
    quiet = QuietImpl()
    server.register(Feed, FeedImpl())
    server.register(Quiet, quiet)
    async with AsyncExitStack() as stack:
        listener = await stack.enter_async_context(server.serve("tcp://127.0.0.1:0"))
        assert isinstance(listener, TcpListener)
        port = int(listener.url.rsplit(":", 1)[1])
        yield listener, server, quiet, raw_opener(stack, "127.0.0.1", port, skip_settings=True)


def stream_request(stream: int, path: str, args: dict[str, Any], flags: int, timeout_ms: int = 0) -> bytes:
    return encode_request(stream, path, orjson.dumps(args), timeout_ms, b"", flags)


def server_streams(listener: TcpListener) -> int:
    return sum(len(c.streams) for c in listener.connections)


async def settle(check: Any, rounds: int = 1000) -> bool:
    """Poll `check` (a hang guard, not a timing assertion)."""
    for _ in range(rounds):
        if check():
            return True
        await asyncio.sleep(0.01)
    return bool(check())


async def final_frame(raw: RawClient, stream: int) -> Any:
    """The RESPONSE or ERROR that ends `stream` (skipping its DATA and WINDOW_UPDATEs)."""
    while True:
        frame = await raw.frame()
        if frame.stream == stream and frame.type in (FrameType.RESPONSE, FrameType.ERROR):
            return frame


# -- finding 1: a stream with no progress held its slot and memory forever (slowloris on stream DATA) ---------


@pytest.mark.anyio
async def test_a_stream_whose_client_never_sends_ends_after_idle_timeout() -> None:
    async with serving(idle_timeout=0.3) as (listener, server, _, open_raw):
        raw: RawClient = await open_raw(PREFACE + stream_request(1, "test.Feed/total", {}, FLAG_CLIENT_STREAMS))
        assert (await raw.frame()).type == FrameType.WINDOW_UPDATE  # accepted; then the client sends nothing
        frame = await final_frame(raw, 1)
        assert frame.type == FrameType.ERROR
        error = orjson.loads(frame.payload)
        assert error["code"] == "deadline_exceeded" and "stalled" in error["message"], error
        assert "idle_timeout" in error["message"]
        assert await settle(lambda: server_streams(listener) == 0 and server._pending_bytes == 0)


@pytest.mark.anyio
async def test_a_stream_whose_client_never_grants_credit_ends_after_idle_timeout() -> None:
    async with serving(idle_timeout=0.3) as (listener, server, _, open_raw):
        raw: RawClient = await open_raw(PREFACE + stream_request(1, "test.Feed/forever", {"size": 1000}, FLAG_SERVER_STREAMS))
        frame = await final_frame(raw, 1)  # it sends a window of DATA, then waits for credit that never comes
        assert frame.type == FrameType.ERROR
        assert orjson.loads(frame.payload)["code"] == "deadline_exceeded"
        assert await settle(lambda: server_streams(listener) == 0 and server._pending_bytes == 0)


@pytest.mark.anyio
async def test_streams_that_move_or_wait_on_the_server_are_not_stalled() -> None:
    async with serving(idle_timeout=0.3) as (listener, _, quiet, open_raw):
        raw: RawClient = await open_raw(
            PREFACE
            + stream_request(1, "test.Quiet/wait", {}, FLAG_SERVER_STREAMS)
            + stream_request(3, "test.Feed/total", {}, FLAG_CLIENT_STREAMS)
        )
        for _ in range(40):  # a slow but steady client stream: one message every 50 ms, for 2 s
            await raw.send(encode_frame(FrameType.DATA, 3, b"1"))
            await asyncio.sleep(0.05)
        await raw.send(encode_frame(FrameType.END, 3))
        frame = await final_frame(raw, 3)
        assert (frame.type, frame.payload) == (FrameType.RESPONSE, b"40")
        assert server_streams(listener) == 1  # the watch with no event yet waits on the server's side: it stays
        quiet.release.set()
        assert (await final_frame(raw, 1)).type == FrameType.RESPONSE


# -- finding 2: an open stream cost ~6.4 KiB of server memory but counted ~30 bytes against max_pending_bytes --


@pytest.mark.anyio
async def test_open_streams_count_their_state_against_max_pending_bytes() -> None:
    budget = 64 * _STREAM_ENTRY
    async with serving(max_pending_bytes=budget, max_message_size=budget) as (listener, server, _, open_raw):
        n = 500
        requests = b"".join(stream_request(2 * i + 1, "test.Feed/total", {}, FLAG_CLIENT_STREAMS) for i in range(n))
        raw: RawClient = await open_raw(PREFACE + requests)
        accepted = refused = 0
        for _ in range(n):
            frame = await raw.frame()
            if frame.type == FrameType.WINDOW_UPDATE:
                accepted += 1
            else:
                assert frame.type == FrameType.ERROR and frame.flags & FLAG_REFUSED, frame
                error = orjson.loads(frame.payload)
                assert error == {"code": "resource_exhausted", "message": "server busy"}, error
                refused += 1
        assert accepted <= budget // _STREAM_ENTRY and refused == n - accepted, (accepted, refused)
        assert server._pending_bytes <= budget and server_streams(listener) == accepted
        async with kubrpc.connect(listener.url) as channel:  # everyone else is still served, once streams end
            await raw.send(b"".join(encode_frame(FrameType.END, 2 * i + 1) for i in range(n)))
            assert await settle(lambda: server_streams(listener) == 0 and server._pending_bytes == 0)
            assert await channel.stub(Feed, timeout=10).add(1, 2) == 3
