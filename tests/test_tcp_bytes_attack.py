"""Hostile peers against the raw-bytes path of the TCP transport (docs/protocol.md, "Attachments"): flags on
frames that never carry them, lying and unasked SETTINGS, frames split across reads, exactness of every shape,
streams against flow control, reconnection and mixed fleets; over real sockets and through the public API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
import orjson
import pytest
from rawtcp import RawClient
from test_tcp_attack import fake_server
from test_tcp_bytes import (
    ASK,
    Blob,
    Files,
    FilesImpl,
    answer,
    attached_request,
    message,
    negotiated,
    raw,
    serving,
)

import kubrpc
from kubrpc import RpcError, Status
from kubrpc.transports._frames import (
    FLAG_ACK,
    FLAG_ATTACHED,
    HEADER,
    PREFACE,
    SETTING_ATTACHMENTS,
    Frame,
    FrameDecoder,
    FrameType,
    encode_frame,
    encode_request,
    encode_settings,
    encode_window_update,
)

pytestmark = pytest.mark.anyio


async def test_flag_attached_on_frames_that_never_carry_it_is_ignored_by_the_client() -> None:
    """Bit 3 means ATTACHED on REQUEST, RESPONSE and DATA only; elsewhere it is a flag the client does not know,
    which it ignores: an ERROR with it keeps its code and message (it was read as 'malformed error body')."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(len(PREFACE) + 18)
        writer.write(encode_frame(FrameType.SETTINGS, 0, b"", FLAG_ATTACHED))
        decoder = FrameDecoder(1 << 20)
        while data := await reader.read(1 << 16):
            for frame in decoder.feed(data):
                if frame.type == FrameType.REQUEST:
                    writer.write(encode_frame(FrameType.PING, 0, b"12345678", FLAG_ATTACHED))
                    error = orjson.dumps({"code": "not_found", "message": "no such file"})
                    writer.write(encode_frame(FrameType.ERROR, frame.stream, error, FLAG_ATTACHED))
                elif frame.type == FrameType.PING and frame.flags & FLAG_ACK:
                    pongs.append(frame.payload)

    pongs: list[bytes] = []
    async with fake_server(script) as endpoint, kubrpc.connect([endpoint]) as channel:
        files = channel.stub(Files, timeout=5)
        for _ in range(2):
            with pytest.raises(RpcError) as caught:
                await files.get("a")
            assert (caught.value.code, caught.value.message) == (Status.NOT_FOUND, "no such file")
        with anyio.fail_after(5):
            while len(pongs) < 2:
                await anyio.sleep(0.01)
        assert pongs == [b"12345678", b"12345678"]
