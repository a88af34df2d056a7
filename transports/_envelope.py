"""Connect's enveloped messages, sans I/O: 1 byte of flags, 4 bytes of big-endian length, then the message.

`envelope()` frames one message; a `Decoder` is fed bytes as they arrive and returns the complete envelopes,
refusing (EnvelopeError) a message larger than its limit before buffering it, so that a peer cannot make it hold
more than one message's worth of bytes. Flag 0x02 marks the end-of-stream message; 0x01 (compressed) is refused
where the caller says so, since kubrpc negotiates no compression.
"""

from __future__ import annotations

__all__ = ("COMPRESSED", "END_STREAM", "Decoder", "EnvelopeError", "envelope")

COMPRESSED = 0x01
END_STREAM = 0x02
_HEAD = 5


class EnvelopeError(ValueError):
    """The bytes are not a valid envelope stream (an oversized message, unknown flags)."""


def envelope(message: bytes, flags: int = 0) -> bytes:
    """One message in its envelope."""
    return bytes((flags,)) + len(message).to_bytes(4, "big") + message


class Decoder:
    """An incremental envelope decoder: `feed()` bytes, get back the (flags, message) pairs they complete."""

    __slots__ = ("_buffer", "_need", "max_size")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buffer = bytearray()
        self._need = _HEAD  # bytes the envelope being read needs in all (its head, then head and message)

    @property
    def pending(self) -> int:
        """Bytes of an incomplete envelope held so far (0 at an envelope boundary)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """The envelopes that `data` completes, in order; EnvelopeError if the stream is invalid."""
        out: list[tuple[int, bytes]] = []
        buffer = self._buffer
        view = memoryview(data)
        while view:
            take = min(len(view), self._need - len(buffer))
            buffer += view[:take]
            view = view[take:]
            if len(buffer) < self._need:
                break
            if self._need == _HEAD:
                flags = buffer[0]
                if flags & ~(COMPRESSED | END_STREAM):
                    raise EnvelopeError(f"unknown envelope flags 0x{flags:02x}")
                size = int.from_bytes(buffer[1:5], "big")
                if size > self.max_size:
                    raise EnvelopeError(
                        f"message of {size} bytes exceeds the maximum message size ({self.max_size} bytes)"
                    )
                self._need = _HEAD + size
                if size:
                    continue
            out.append((buffer[0], bytes(buffer[_HEAD:])))
            buffer.clear()
            self._need = _HEAD
        return out
