"""An attack on the hot paths of 5836569: the TCP client resolving plain RESPONSE frames straight from the bytes
read (TcpConnection._read_answers), its cached REQUEST tail (TcpConnection._request), the server running plain
REQUEST frames straight from the bytes read (_ServerConnection._run_requests), and the per-method argument
decoder made with exec (MethodSpec.args_decoder).

Each fast path must do what the general one it stands for does: the same answers, errors, bookkeeping
(in_flight, wait_idle, closing a connection told to go away) and bytes on the wire.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import pytest

from kubrpc.endpoint import Endpoint
from kubrpc.transports._frames import HEADER, PREFACE, FrameType, encode_frame, encode_goaway
from kubrpc.transports.tcp import TcpTransport

pytestmark = pytest.mark.anyio

# -- a fake server speaking the wire (docs/protocol.md) --------------------------------------------------------

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
_HELLO_SIZE = len(PREFACE) + 18  # the preface and the client's PING


@asynccontextmanager
async def fake_server(script: Script) -> AsyncIterator[Endpoint]:
    """A TCP server on 127.0.0.1 that runs `script` on each connection (and closes it afterwards)."""
    tasks: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await script(reader, writer)
        except (asyncio.CancelledError, ConnectionError, asyncio.IncompleteReadError):
            pass  # (ended by the test, or by the client: not a failure of the script, nor logged by asyncio)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield Endpoint("127.0.0.1", server.sockets[0].getsockname()[1])
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        server.close()
        await server.wait_closed()


async def acknowledge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readexactly(_HELLO_SIZE)
    writer.write(encode_frame(FrameType.SETTINGS, 0))
    await writer.drain()


async def read_request(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    """One REQUEST frame, whole: (stream, flags, payload)."""
    length, kind, flags, stream = HEADER.unpack(await reader.readexactly(HEADER.size))
    payload = await reader.readexactly(length)
    assert kind == FrameType.REQUEST
    return int(stream), int(flags), payload


async def closed_by_client(reader: asyncio.StreamReader) -> bool:
    """True once the client has closed the connection (whatever else it sends first is skipped)."""
    while await reader.read(65536):
        pass
    return True


_PING = encode_frame(FrameType.PING, 0, b"12345678")


# -- the client's answers read straight from the bytes: bookkeeping when other frames follow ----------------------


@pytest.mark.parametrize("after", ["ping", "partial ping", "unknown frame"])
async def test_the_last_answer_followed_by_another_frame_in_one_read_wakes_wait_idle(after: str) -> None:
    """_read_answers() popped the last call, then handed the rest of the read to the decoder: nobody called
    _quiet(), so a wait_idle() that was waiting (a pool retiring the connection) was never woken."""
    rest = {"ping": _PING, "partial ping": _PING[:4], "unknown frame": encode_frame(99, 0, b"x")}[after]
    answered = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await acknowledge(reader, writer)
        stream, _, _ = await read_request(reader)
        await answered.wait()  # the test's wait_idle() is waiting
        writer.write(encode_frame(FrameType.RESPONSE, stream, b"3") + rest)
        await closed_by_client(reader)

    async with fake_server(script) as endpoint:
        conn = await TcpTransport(keepalive_interval=None).connect(endpoint)
        try:
            call = asyncio.ensure_future(conn.call("Arith/add", b'{"a":1,"b":2}', timeout=None, metadata={}))
            while not conn.in_flight:
                await asyncio.sleep(0)
            idle = asyncio.ensure_future(conn.wait_idle())
            await asyncio.sleep(0)
            assert not idle.done()
            answered.set()
            assert await call == b"3"
            with anyio.fail_after(5):  # a hang guard, not a timing assertion
                await idle
            assert conn.in_flight == 0
        finally:
            await conn.aclose()


@pytest.mark.parametrize("after", ["ping", "partial ping"])
async def test_a_connection_told_to_go_away_closes_once_its_last_answer_is_read_with_another_frame(
    after: str,
) -> None:
    """docs/protocol.md: the client closes a GOAWAY'd connection once its calls are answered. When the last
    answer came in the same read as another frame (or the start of one), the connection stayed open."""
    rest = {"ping": _PING, "partial ping": _PING[:4]}[after]
    closed = asyncio.get_running_loop().create_future()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await acknowledge(reader, writer)
        stream, _, _ = await read_request(reader)
        writer.write(encode_goaway(stream, "draining"))
        await writer.drain()
        await asyncio.sleep(0.05)  # (two reads, whatever the timing: the answer below is never needed sooner)
        writer.write(encode_frame(FrameType.RESPONSE, stream, b"3") + rest)
        closed.set_result(await closed_by_client(reader))

    async with fake_server(script) as endpoint:
        conn = await TcpTransport(keepalive_interval=None).connect(endpoint)
        try:
            assert await conn.call("Arith/add", b'{"a":1,"b":2}', timeout=None, metadata={}) == b"3"
            assert not conn.usable
            with anyio.fail_after(5):  # a hang guard
                assert await closed
        finally:
            await conn.aclose()
