"""The TCP wire byte for byte, from raw sockets: framing, multiplexing, cancel, ping, bad peers."""

from __future__ import annotations

import re
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import orjson
import pytest
from rawtcp import RawClient, raw_opener
from services import Arith, ControlImpl, wait_until

import kubrpc
from kubrpc.transports._frames import (
    PREFACE,
    Frame,
    FrameType,
    encode_frame,
    encode_request,
    parse_goaway,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
async def tcp(start_server: Callable[..., object]) -> AsyncIterator[tuple[Callable[..., object], ControlImpl, str]]:
    url, _, control = await start_server("tcp", max_message_size=1024)  # type: ignore[operator]
    host, port = url.removeprefix("tcp://").rsplit(":", 1)
    async with AsyncExitStack() as stack:
        yield raw_opener(stack, host, int(port), skip_settings=True), control, url


async def test_request_response_and_error_frames(tcp: tuple[Callable[..., object], object, str]) -> None:
    open_raw, _, _ = tcp
    client: RawClient = await open_raw()  # type: ignore[operator]
    await client.send(encode_request(1, "Arith/add", b'{"a": 1, "b": 2}'))
    assert await client.frame() == Frame(FrameType.RESPONSE, 0, 1, b"3")
    await client.send(encode_request(2, "Arith/add", b'{"a": true, "b": 2}'))
    frame = await client.frame()
    assert (frame.type, frame.stream) == (FrameType.ERROR, 2)
    assert orjson.loads(frame.payload) | {"details": None} == {
        "details": None,  # (the field violations: tests/test_validation_details.py)
        "code": "invalid_argument",
        "message": "invalid argument 'a': expected integer, got boolean",
    }
    await client.send(encode_request(3, "No/such", b"{}"))
    assert orjson.loads((await client.frame()).payload)["code"] == "unimplemented"


async def test_calls_are_multiplexed_and_answered_out_of_order(tcp: tuple[Callable[..., object], object, str]) -> None:
    open_raw, _, _ = tcp
    client: RawClient = await open_raw()  # type: ignore[operator]
    await client.send(
        encode_request(5, "Control/sleep", b'{"seconds": 0.3}') + encode_request(7, "Arith/add", b'{"a": 2, "b": 2}')
    )
    first, second = await client.frame(), await client.frame()
    assert (first.stream, first.payload) == (7, b"4")
    assert (second.stream, second.payload) == (5, b'"slept"')


async def test_cancel_frame_cancels_the_handler(tcp: tuple[Callable[..., object], ControlImpl, str]) -> None:
    open_raw, control, _ = tcp
    client: RawClient = await open_raw()  # type: ignore[operator]
    await client.send(encode_request(1, "Control/sleep", b'{"seconds": 30}'))
    await wait_until(lambda: control.started == 1)
    await client.send(encode_frame(FrameType.CANCEL, 1))
    await wait_until(lambda: control.cancelled == 1)
    await client.send(encode_request(3, "Arith/add", b'{"a": 1, "b": 1}'))
    assert await client.frame() == Frame(FrameType.RESPONSE, 0, 3, b"2")  # nothing was sent for stream 1


async def test_deadline_in_request_frame(tcp: tuple[Callable[..., object], ControlImpl, str]) -> None:
    open_raw, control, _ = tcp
    client: RawClient = await open_raw()  # type: ignore[operator]
    await client.send(encode_request(1, "Control/sleep", b'{"seconds": 30}', timeout_ms=50))
    frame = await client.frame()
    assert orjson.loads(frame.payload) == {"code": "deadline_exceeded", "message": "deadline exceeded"}
    assert control.cancelled == 1


async def test_ping_is_echoed_with_ack(tcp: tuple[Callable[..., object], object, str]) -> None:
    open_raw, _, _ = tcp
    client: RawClient = await open_raw()  # type: ignore[operator]
    await client.send(encode_frame(FrameType.PING, 0, b"12345678"))
    assert await client.frame() == Frame(FrameType.PING, 1, 0, b"12345678")
    await client.send(encode_frame(99, 0, b"unknown frame types are ignored"))
    await client.send(encode_request(1, "Arith/add", b'{"a": 1, "b": 2}'))
    assert (await client.frame()).payload == b"3"


async def test_oversized_request_body_is_resource_exhausted(tcp: tuple[Callable[..., object], object, str]) -> None:
    open_raw, _, _ = tcp
    client: RawClient = await open_raw()  # type: ignore[operator]
    await client.send(encode_request(1, "Arith/add", b'{"a": 1, "b": 2, "x": "' + b"y" * 2000 + b'"}'))
    frame = await client.frame()
    assert orjson.loads(frame.payload)["code"] == "resource_exhausted"
    await client.send(encode_request(3, "Arith/add", b'{"a": 1, "b": 2}'))
    assert (await client.frame()).payload == b"3"


@pytest.mark.parametrize(
    ("preface", "data", "reason"),
    [
        (b"", b"SSH-2.0-OpenSSH_9.6\r\n", "bad preface"),  # an HTTP request gets an HTTP 400 (test_error_messages)
        (PREFACE, struct.pack(">IBBI", 2**31, 1, 0, 1), "exceeds the limit"),
        (PREFACE, encode_frame(FrameType.REQUEST, 1, b"\x00\x01"), "truncated REQUEST"),
        (PREFACE, encode_request(0, "Arith/add", b"{}"), "stream id 0"),
        (PREFACE, encode_request(1, "Control/sleep", b'{"seconds": 5}') * 2, "already used"),
        # A finished call's id, or any lower one, is not reused (the call below is answered within its read).
        (PREFACE, encode_request(5, "Arith/add", b'{"a": 1, "b": 2}') * 2, "ids must increase; the last was 5"),
        (PREFACE, encode_request(5, "Arith/add", b"{}") + encode_request(3, "Arith/add", b"{}"), "already used"),
    ],
)
async def test_protocol_errors_close_only_that_connection(
    tcp: tuple[Callable[..., object], object, str], preface: bytes, data: bytes, reason: str
) -> None:
    open_raw, _, url = tcp
    bad: RawClient = await open_raw(preface)  # type: ignore[operator]
    await bad.send(data)
    assert await bad.closed()
    goaway = [f for f in bad.frames if f.type == FrameType.GOAWAY]
    assert goaway and reason in parse_goaway(goaway[0].payload)[1]
    async with kubrpc.connect(url) as channel:  # everyone else is still served
        assert await channel.stub(Arith, timeout=5).add(1, 1) == 2


async def test_vanished_peer_cancels_its_calls(tcp: tuple[Callable[..., object], ControlImpl, str]) -> None:
    open_raw, control, url = tcp
    client: RawClient = await open_raw()  # type: ignore[operator]
    await client.send(encode_request(1, "Control/sleep", b'{"seconds": 30}'))
    await wait_until(lambda: control.started == 1)
    await client.stream.aclose()
    await wait_until(lambda: control.cancelled == 1)
    async with kubrpc.connect(url) as channel:
        assert await channel.stub(Arith, timeout=5).add(2, 3) == 5


async def test_slow_reader_does_not_block_others(tcp: tuple[Callable[..., object], object, str]) -> None:
    open_raw, _, url = tcp
    slow: RawClient = await open_raw()  # type: ignore[operator]
    # Many requests whose answers the client never reads.
    await slow.send(b"".join(encode_request(i, "test.Store/blob", b'{"size": 900}') for i in range(1, 3000)))
    async with kubrpc.connect(url) as channel:
        arith = channel.stub(Arith, timeout=5)
        assert [await arith.add(i, 0) for i in range(20)] == list(range(20))


async def test_protocol_doc_example_matches_the_encoder() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    example = doc[doc.index("## Example") :]
    hex_lines = re.findall(r"^    ([0-9A-F ]+?)\s{2,}", example, flags=re.M)
    wire = bytes.fromhex("".join(line.replace(" ", "") for line in hex_lines))
    ping = encode_frame(FrameType.PING, 0, b"kubrpcok")
    request = PREFACE + ping + encode_request(1, "Arith/add", b'{"a":1,"b":2}', timeout_ms=2000)
    answer = encode_frame(FrameType.SETTINGS, 0) + encode_frame(FrameType.PING, 0, b"kubrpcok", flags=1)
    assert wire == request + answer + encode_frame(FrameType.RESPONSE, 1, b"3")


def _fuzz_server(examples: int) -> None:
    """Throw random byte streams (after a valid preface) at a real server; it must keep serving."""
    from hypothesis import HealthCheck, given, settings, strategies as st
    from services import make_server

    server, _ = make_server(max_message_size=1024)
    chunks = st.lists(
        st.one_of(
            st.binary(max_size=64),
            st.builds(
                encode_request, st.integers(0, 5), st.sampled_from(["Arith/add", "x", ""]), st.binary(max_size=40)
            ),
            st.builds(encode_frame, st.integers(0, 8), st.integers(0, 5), st.binary(max_size=40)),
        ),
        max_size=8,
    )

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
    @given(chunks)
    def run(parts: list[bytes]) -> None:
        async def main() -> None:
            async with server.serve("tcp://127.0.0.1:0") as listener:
                host, port = listener.url.removeprefix("tcp://").rsplit(":", 1)
                async with await anyio.connect_tcp(host, int(port)) as stream:
                    try:
                        await stream.send(PREFACE + b"".join(parts))
                        with anyio.move_on_after(0.05):
                            while await stream.receive():
                                pass
                    except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
                        pass
                async with kubrpc.connect(listener.url) as channel:
                    assert await channel.stub(Arith, timeout=5).add(1, 2) == 3

        anyio.run(main)

    run()


def test_fuzz_server_with_random_frames_bounded() -> None:
    _fuzz_server(examples=20)


@pytest.mark.slow
def test_fuzz_server_with_random_frames_soak() -> None:
    _fuzz_server(examples=500)


async def test_connections_over_the_limit_are_turned_away(start_server: Callable[..., object]) -> None:
    url, _, _ = await start_server("tcp", max_connections=2)  # type: ignore[operator]
    host, port = url.removeprefix("tcp://").rsplit(":", 1)
    async with AsyncExitStack() as stack:
        open_raw = raw_opener(stack, host, int(port), skip_settings=True)
        clients = [await open_raw() for _ in range(3)]
        third = clients[2]
        goaway = await third.frame()
        assert goaway.type == FrameType.GOAWAY and parse_goaway(goaway.payload) == (0, "too many connections")
        await third.send(encode_request(1, "Arith/add", b'{"a": 1, "b": 2}'))
        late = await third.frame()  # answered, not reset: the client may retry it elsewhere
        assert orjson.loads(late.payload)["code"] == "unavailable"
        await clients[0].send(encode_request(1, "Arith/add", b'{"a": 1, "b": 2}'))
        assert (await clients[0].frame()).payload == b"3"


async def test_idle_connections_are_sent_away_and_clients_reconnect(start_server: Callable[..., object]) -> None:
    url, _, _ = await start_server("tcp", idle_timeout=0.2)  # type: ignore[operator]
    async with kubrpc.connect(url) as channel:
        arith = channel.stub(Arith, timeout=5)
        assert await arith.add(1, 2) == 3
        (first,) = channel.connections.values()
        await wait_until(lambda: not first.usable)
        assert await arith.add(2, 3) == 5  # a new connection, transparently
        (second,) = channel.connections.values()
        assert second is not first and second.usable


async def test_calls_cancelled_before_they_start_are_forgotten(start_server: Callable[..., object]) -> None:
    url, _, _ = await start_server("tcp", max_concurrent_calls=3)  # type: ignore[operator]
    host, port = url.removeprefix("tcp://").rsplit(":", 1)
    async with await anyio.connect_tcp(host, int(port)) as stream:
        client = RawClient(stream, skip_settings=True)
        # REQUEST and CANCEL in one read: the call's task is cancelled before its first step.
        burst = b"".join(
            encode_request(s, "Control/sleep", b'{"seconds": 5}') + encode_frame(FrameType.CANCEL, s) for s in (1, 3, 5)
        )
        await client.send(PREFACE + burst)
        await anyio.sleep(0.1)  # the cancelled calls end within a loop turn or two; before the fix, never
        await client.send(encode_request(7, "Arith/add", b'{"a": 1, "b": 2}'))  # not RESOURCE_EXHAUSTED
        assert await client.frame() == Frame(FrameType.RESPONSE, 0, 7, b"3")


async def test_bad_metadata_fails_only_that_call(tcp: tuple[Callable[..., object], object, str]) -> None:
    open_raw, _, _ = tcp
    client: RawClient = await open_raw()  # type: ignore[operator]
    await client.send(encode_request(1, "Control/sleep", b'{"seconds": 0.3}'))
    await client.send(encode_request(3, "Arith/add", b'{"a": 1, "b": 2}', metadata=b'{"x-retry": 1}'))
    bad = await client.frame()
    assert bad.stream == 3
    assert orjson.loads(bad.payload) == {
        "code": "invalid_argument",
        "message": "metadata must be a JSON object of strings",
    }
    assert await client.frame() == Frame(FrameType.RESPONSE, 0, 1, b'"slept"')  # the other call was not hurt
