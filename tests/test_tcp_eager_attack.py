"""An attack on the TCP server's eager calls (transports/_eager.py) and the answers batched per read.

Raw sockets against a real server: floods of calls that finish in their first step, peers that do not read,
REFUSED pseudo-frames and stream-id ordering, handlers that fail or cancel in their first step; after each,
the memory budget and the connection's bookkeeping must be back to zero.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

import anyio
import orjson
import pytest
from rawtcp import RawClient
from services import wait_until
from test_tcp_hardening import request, serving

from kubrpc.transports._frames import FrameType, encode_request

pytestmark = pytest.mark.anyio


async def test_a_refused_request_after_frames_held_by_a_pause_does_not_break_stream_id_order() -> None:
    """A REFUSED pseudo-frame is answered at once when the rest of its read is held (its bytes are gone); the
    held REQUESTs before it have lower ids and must still run when reading resumes, not close the connection."""
    async with serving(max_message_size=2 << 20, max_pending_bytes=2 << 20) as (listener, server, open_raw):
        # Another connection's running call holds most of the budget, so that a large partial frame is refused.
        holder: RawClient = await open_raw()  # type: ignore[operator]
        await holder.send(encode_request(1, "Control/sleep", b" " * 2_090_000 + b'{"seconds": 5}'))
        await wait_until(lambda: server._pending_bytes > 2_090_000)
        raw: RawClient = await open_raw(rcvbuf=64 * 1024)  # type: ignore[operator]
        assert (await raw.frame()).type == FrameType.SETTINGS
        raw.stop_reading()
        blobs = b"".join(request(s, "test.Store/blob", {"size": 1 << 20}) for s in range(1, 17, 2))  # 8 MiB of answers
        add = request(17, "Arith/add", {"a": 1, "b": 2})
        big = encode_request(19, "Arith/add", b" " * 1_500_000 + b'{"a": 1, "b": 2}')  # refused: over budget
        (conn,) = [
            c
            for c in listener.connections
            if c.peer.endswith(str(raw.stream.extra(anyio.abc.SocketAttribute.local_port)))
        ]
        await raw.send(blobs + add + big[:150_000])
        await wait_until(lambda: conn._write_paused)
        answers: dict[int, tuple[int, bytes]] = {}
        with anyio.fail_after(30):
            while len(answers) < 10:
                frame = await raw.frame()
                answers[frame.stream] = (frame.type, frame.payload[:100])
        assert answers[17] == (FrameType.RESPONSE, b"3")
        assert answers[19][0] == FrameType.ERROR and b"busy" in answers[19][1]
        assert all(answers[s][0] == FrameType.RESPONSE for s in range(1, 17, 2))
        assert conn in listener.connections and not conn._going_away
        # The connection goes on, and ids still have to increase past the refused one.
        await raw.send(big[150_000:] + request(21, "Arith/add", {"a": 2, "b": 2}))
        assert (await raw.frame()).payload == b"4"
