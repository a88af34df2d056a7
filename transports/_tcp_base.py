"""Shared by both ends of a TCP connection: frame types, write coalescing, address formatting."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ._frames import (
    FrameType,
)

if TYPE_CHECKING:
    pass


__all__ = ("FrameWriter", "format_host")

log = logging.getLogger("kubrpc.tcp")

_REQUEST = FrameType.REQUEST
_RESPONSE = FrameType.RESPONSE
_ERROR = FrameType.ERROR
_CANCEL = FrameType.CANCEL
_PING = FrameType.PING
_GOAWAY = FrameType.GOAWAY

# Frames queued in one event-loop iteration go out in one write, but at most this many at a time,
# so that the peer starts on the first frames while this side is still producing the rest.
_FLUSH_FRAMES = 16  # measured: 4 and 64 were slower at concurrency 64 (benchmarks/bench_unary.py)


class FrameWriter(asyncio.Protocol):
    """Both ends of a connection: writes made in one loop turn go out in one write (at most _FLUSH_FRAMES)."""

    transport: asyncio.Transport | None
    _loop: asyncio.AbstractEventLoop
    _out: list[bytes]

    def write(self, data: bytes) -> None:
        """Queue bytes; everything queued in one event-loop iteration goes out in one write."""
        out = self._out
        if not out:
            self._loop.call_soon(self._flush)
        out.append(data)
        if len(out) >= _FLUSH_FRAMES:
            self._flush()

    def write_now(self, data: bytes) -> None:
        """Send bytes at once: for a frame with nothing queued to batch with, it saves a loop turn."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _flush(self) -> None:
        out = self._out
        if out:
            self._out = []
            self.write_now(out[0] if len(out) == 1 else b"".join(out))


def format_host(host: str) -> str:
    """An address's host as it goes in a URL: IPv6 in brackets."""
    return f"[{host}]" if ":" in host else host
