"""The TCP wire format, sans I/O: frame encoding and an incremental decoder (see docs/protocol.md).

connection := PREFACE frame*            (the client sends the preface once, first; the server's
                                         first frame, SETTINGS, acknowledges it)
frame      := length:u32 type:u8 flags:u8 stream:u32 payload[length]     (big-endian)
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Mapping
from typing import NamedTuple

import orjson

from kubrpc.codec import Attached, Packed
from kubrpc.errors import ProtocolError, RpcError
from kubrpc.status import Status

__all__ = (
    "ADMIT_ABOVE",
    "FLAG_ATTACHED",
    "SETTING_ATTACHMENTS",
    "FLAG_CLIENT_STREAMS",
    "FLAG_REFUSED",
    "FLAG_SERVER_STREAMS",
    "FRAME_OVERHEAD",
    "HEADER",
    "MAX_METADATA",
    "MAX_TIMEOUT_MS",
    "PREFACE",
    "OVERSIZED",
    "REFUSED",
    "STREAM_WINDOW",
    "BadRequest",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "Request",
    "encode_frame",
    "encode_goaway",
    "encode_message",
    "encode_request",
    "encode_settings",
    "encode_window_update",
    "parse_goaway",
    "parse_request",
    "parse_settings",
    "parse_window_update",
)

PREFACE = b"KUBRPC1\n"
HEADER = struct.Struct(">IBBI")
_REQUEST_HEAD = struct.Struct(">IH")
_U32 = struct.Struct(">I")
_HEADER_AND_REQUEST_HEAD = struct.Struct(">IBBIIH")
_EMPTY_METADATA = bytes(4)
_GOAWAY_HEAD = struct.Struct(">I")
FLAG_ACK = 0x01
#: REQUEST, RESPONSE and DATA flag: the message is in the attachments format (docs/protocol.md, "Attachments");
#: on a REQUEST it also says that the client reads answers in that format.
FLAG_ATTACHED = 0x08
#: SETTINGS entry (id u16, value u32): 1 = the sender reads and writes the attachments format.
SETTING_ATTACHMENTS = 1
_SETTING = struct.Struct(">HI")
#: REQUEST flags: a stream call (docs/protocol.md, "Streams"); the client sends DATA, the server sends DATA.
FLAG_CLIENT_STREAMS = 0x02
FLAG_SERVER_STREAMS = 0x04
#: ERROR flag: the server refused the call without running any of it (draining, over its limits): safe to retry.
FLAG_REFUSED = 0x02
#: Flow-control window of a stream, each way, in bytes (each DATA frame costing its payload plus
#: transports._streams.MESSAGE_OVERHEAD): what a receiver grants at the start and again as it reads.
STREAM_WINDOW = 256 * 1024
#: The most credit a receiver may have granted and not yet seen used, on one stream (more is a protocol error).
MAX_WINDOW = 2**31 - 1
MAX_STREAM_ID = 2**32 - 1
MAX_TIMEOUT_MS = 2**32 - 1
#: Encoded metadata of one request, at most.
MAX_METADATA = 16 * 1024
#: What a frame may carry beyond the largest message: its request header, path and metadata.
FRAME_OVERHEAD = 64 * 1024


class FrameType(enum.IntEnum):
    """What a frame carries."""

    REQUEST = 1
    RESPONSE = 2
    ERROR = 3
    CANCEL = 4
    PING = 5
    GOAWAY = 6
    SETTINGS = 7
    DATA = 8
    END = 9
    WINDOW_UPDATE = 10


#: A partly received frame longer than this is counted against the receiver's budget as its bytes arrive
#: (shorter ones, such as a CANCEL or PING split across two reads, are admitted as whole frames).
ADMIT_ABOVE = 1024

#: A frame payload at least this long is copied out of the receive buffer through a memoryview (one copy).
_VIEW_ABOVE = 4096

#: The frame types whose FLAG_ATTACHED says their payload is in the attachments format (FrameDecoder: a Packed).
_CARRY_ATTACHMENTS = frozenset({FrameType.REQUEST, FrameType.RESPONSE, FrameType.DATA})

#: Not a wire type (types are one byte): what FrameDecoder yields for a REQUEST frame that admit() refused.
REFUSED = 256
#: Pseudo-frame type: a DATA frame longer than the receiver's limit, whose payload was skipped (never buffered):
#: the receiver ends that stream alone with RESOURCE_EXHAUSTED, rather than the connection.
OVERSIZED = 257


class Frame(NamedTuple):
    """One decoded frame; `payload` is raw bytes whose meaning depends on `type`."""

    type: int
    flags: int
    stream: int
    payload: bytes


class Request(NamedTuple):
    """The payload of a REQUEST frame."""

    timeout_ms: int
    path: str
    metadata: dict[str, str]
    body: bytes


_REQUEST = int(FrameType.REQUEST)  # plain ints for the hot paths (packed and compared faster than members)
_DATA = int(FrameType.DATA)

# Request(...) and Frame(...) without the Python-level __new__ of a NamedTuple (the hot path).
_new_tuple = tuple.__new__


def encode_frame(type: int, stream: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """One frame, header and payload."""
    return HEADER.pack(len(payload), type, flags, stream) + payload


def encode_request(
    stream: int, path: str, body: bytes, timeout_ms: int = 0, metadata: bytes = b"", flags: int = 0
) -> bytes:
    """A REQUEST frame; `metadata` is a JSON object of strings (already encoded) or empty; `flags` mark a stream."""
    path_bytes = path.encode()
    size = _REQUEST_HEAD.size + len(path_bytes) + 4 + len(metadata) + len(body)
    head = _HEADER_AND_REQUEST_HEAD.pack(size, _REQUEST, flags, stream, timeout_ms, len(path_bytes))
    if metadata:
        return b"".join((head, path_bytes, _U32.pack(len(metadata)), metadata, body))
    return b"".join((head, path_bytes, _EMPTY_METADATA, body))


def encode_message(type: int, stream: int, message: Attached, flags: int = 0, head: bytes = b"") -> list[bytes]:
    """A frame (`head`, then `message` in the attachments format) as the parts to write, FLAG_ATTACHED set.

    The data of large attachments are parts of their own, written as they are (not copied into the frame) if they
    are immutable; a bytearray (or a view of one) is copied once, so that the caller may change it afterwards.
    """
    attachments = message.attachments
    size = len(head) + message.size
    first = HEADER.pack(size, type, flags | FLAG_ATTACHED, stream) + head + message.table() + message
    if size < _JOIN_BELOW:
        return [b"".join((first, *attachments))]
    # Runs of small attachments are joined: one write each would cost a send() each (65,536 for as many bytes).
    parts: list[bytes] = []
    run: list[bytes | bytearray | memoryview] = [first]
    for data in attachments:
        if (data.nbytes if isinstance(data, memoryview) else len(data)) < _JOIN_BELOW:  # (`type` is shadowed)
            run.append(data)
            continue
        if run:
            parts.append(_joined(run))
            run = []
        parts.append(data if _immutable(data) else bytes(data))  # type: ignore[arg-type]  # a view of bytes
    if run:
        parts.append(_joined(run))
    return parts


# A frame with attachments shorter than this is written as one joined bytes object.
_JOIN_BELOW = 64 * 1024


def _immutable(data: bytes | bytearray | memoryview) -> bool:
    """Can `data` go to the transport as it is? Transports may keep what they are given until it is sent (uvloop,
    and asyncio from Python 3.12): a bytearray, or a view of one, could change (or fail to resize) meanwhile."""
    return isinstance(data, bytes) or (isinstance(data, memoryview) and isinstance(data.obj, bytes))


def _joined(run: list[bytes | bytearray | memoryview]) -> bytes:
    """One immutable part of a run of small attachments (the frame's head first, if it is in the run)."""
    return run[0] if len(run) == 1 and isinstance(run[0], bytes) else b"".join(run)


def encode_settings(*settings: tuple[int, int]) -> bytes:
    """A SETTINGS frame carrying (id, value) entries."""
    return encode_frame(FrameType.SETTINGS, 0, b"".join(_SETTING.pack(i, v) for i, v in settings))


def parse_settings(payload: bytes) -> dict[int, int]:
    """The (id: value) entries of a SETTINGS payload; a trailing partial entry is ignored, as unknown ids are."""
    return dict(_SETTING.iter_unpack(payload[: len(payload) - len(payload) % _SETTING.size]))


def encode_window_update(stream: int, increment: int) -> bytes:
    """A WINDOW_UPDATE frame: the sender may send `increment` more bytes of DATA on `stream`."""
    return HEADER.pack(4, FrameType.WINDOW_UPDATE, 0, stream) + _GOAWAY_HEAD.pack(increment)


def parse_window_update(payload: bytes) -> int:
    """The increment of a WINDOW_UPDATE payload; ProtocolError unless it is exactly 4 bytes."""
    if len(payload) != 4:
        raise ProtocolError("WINDOW_UPDATE payload must be 4 bytes")
    return int.from_bytes(payload, "big")


def parse_request(payload: bytes, packed: int = 0) -> Request:
    """Split a REQUEST payload; ProtocolError if it is truncated or malformed.

    `packed` (the REQUEST's FLAG_ATTACHED bit): the body is in the attachments format, and comes back as a
    codec.Packed.
    """
    try:
        timeout_ms, path_len = _REQUEST_HEAD.unpack_from(payload)
        at = _REQUEST_HEAD.size + path_len
        (meta_len,) = _U32.unpack_from(payload, at)
    except struct.error:
        raise ProtocolError("truncated REQUEST frame") from None
    try:
        path = payload[_REQUEST_HEAD.size : at].decode()
    except UnicodeDecodeError:
        raise ProtocolError("REQUEST path is not UTF-8") from None
    at += 4
    if not meta_len and not packed:
        return _new_tuple(Request, (timeout_ms, path, {}, payload[at:]))
    if at + meta_len > len(payload):
        raise ProtocolError("truncated REQUEST frame")
    metadata: dict[str, str] = {}
    if meta_len:
        # The frame itself is sound: bad metadata is that call's error, not the connection's.
        if meta_len > MAX_METADATA:
            raise BadRequest(RpcError(Status.RESOURCE_EXHAUSTED, f"metadata exceeds {MAX_METADATA} bytes"))
        try:
            meta = orjson.loads(payload[at : at + meta_len])
        except orjson.JSONDecodeError:
            raise BadRequest(RpcError(Status.INVALID_ARGUMENT, "metadata is not JSON")) from None
        if type(meta) is not dict or not all(type(v) is str for v in meta.values()):
            raise BadRequest(RpcError(Status.INVALID_ARGUMENT, "metadata must be a JSON object of strings"))
        metadata = meta
    if packed:
        return Request(timeout_ms, path, metadata, Packed(memoryview(payload)[at + meta_len :]))
    return _new_tuple(Request, (timeout_ms, path, metadata, payload[at + meta_len :]))


class BadRequest(Exception):
    """A well-framed REQUEST that cannot be run: answer its stream with `error`, keep the connection."""

    def __init__(self, error: RpcError) -> None:
        super().__init__(error.message)
        self.error = error


def encode_metadata(metadata: Mapping[str, str]) -> bytes:
    """Metadata as the REQUEST frame carries it: empty, or a JSON object of strings (RpcError if it is not)."""
    if not metadata:
        return b""
    if not all(type(k) is str and type(v) is str for k, v in metadata.items()):
        raise RpcError(Status.INVALID_ARGUMENT, "metadata keys and values must be strings")
    encoded = orjson.dumps(dict(metadata))
    if len(encoded) > MAX_METADATA:
        raise RpcError(Status.RESOURCE_EXHAUSTED, f"metadata exceeds {MAX_METADATA} bytes")
    return encoded


def encode_goaway(last_stream: int, reason: str = "") -> bytes:
    """A GOAWAY frame: calls with stream id <= last_stream will still be answered."""
    return encode_frame(FrameType.GOAWAY, 0, _GOAWAY_HEAD.pack(last_stream) + reason.encode())


def parse_goaway(payload: bytes) -> tuple[int, str]:
    """(last_stream, reason) from a GOAWAY payload; ProtocolError if truncated."""
    if len(payload) < _GOAWAY_HEAD.size:
        raise ProtocolError("truncated GOAWAY frame")
    (last,) = _GOAWAY_HEAD.unpack_from(payload)
    return last, payload[_GOAWAY_HEAD.size :].decode(errors="replace")


class FrameDecoder:
    """Incremental decoder: feed() bytes as they arrive, get back every complete frame.

    A declared payload length over `max_payload` raises ProtocolError before any of it is buffered.
    With `admit` (a server's memory budget, `Server.admit`/`release`), a frame (longer than ADMIT_ABOVE)
    whose header has arrived but not all of its payload is counted against the budget by the bytes that
    have arrived, as they arrive (what a header announces costs its sender nothing, so it reserves nothing);
    once it is refused, its bytes are dropped, the rest of its payload is discarded as it arrives and, for a
    REQUEST, a `Frame(REFUSED, 0, stream, b"")` is returned in its place so that the call can be answered.
    A complete frame is released: its receiver admits it again. Call close() when the connection ends.
    """

    __slots__ = ("_buffer", "_release", "_skip", "admit", "begun", "max_payload", "reserved")

    def __init__(
        self,
        max_payload: int,
        admit: Callable[[int], bool] | None = None,
        release: Callable[[int], None] | None = None,
    ) -> None:
        self.max_payload = max_payload
        self.admit = admit
        self._release = release
        self._buffer = bytearray()
        #: Bytes admitted for the partly received frame at the head of the buffer (0: none is counted).
        self.reserved = 0
        self._skip = 0  # payload bytes still to discard of a refused frame
        #: How many partial frames have been counted against the budget so far (a receiver's frame timeout
        #: tells a new one from the one it is timing by it).
        self.begun = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame]:
        """Add received bytes; return the frames they complete, in order."""
        if self._skip:
            if len(data) <= self._skip:
                self._skip -= len(data)
                if not self._buffer:
                    return []
                data = b""  # frames put back by unread() are still to be returned
            else:
                data = data[self._skip :]
                self._skip = 0
        buf: bytes | bytearray = self._buffer
        if buf:
            buf += data  # (the bytearray, extended in place)
        else:  # nothing buffered (the usual case): read frames from `data` itself, slices of it are bytes already
            buf = data
        frames: list[Frame] = []
        append, unpack_from, max_payload = frames.append, HEADER.unpack_from, self.max_payload
        at = 0
        end = len(buf)
        header = HEADER.size
        while end - at >= header:
            length, type_, flags, stream = unpack_from(buf, at)
            if length > max_payload:
                if type_ != _DATA or not stream:
                    self._buffer.clear()
                    raise ProtocolError(f"frame of {length} bytes exceeds the limit of {self.max_payload}")
                # One stream's message is too large: skip its payload, end that stream alone.
                frames.append(Frame(OVERSIZED, 0, stream, b""))
                available = end - at - header
                if available >= length:
                    at += header + length
                    continue
                self._skip = length - available
                at = end
                break
            stop = at + header + length
            if stop > end:
                if self.admit is not None and (self.reserved or length > ADMIT_ABOVE):
                    # The partial frame (only the head of the buffer can be partial) is counted by the bytes
                    # that have arrived, not by what its header announces: re-admit all of them at once, so
                    # that a frame alone may exceed the budget as a whole request may.
                    fresh = not self.reserved
                    if not fresh:
                        self._release_reserved()
                    have = end - at
                    if self.admit(have):
                        self.reserved = have
                        if fresh:
                            self.begun += 1
                    else:
                        self._skip = stop - end
                        if type_ == _REQUEST:
                            frames.append(Frame(REFUSED, 0, stream, b""))
                        at = end
                break
            if length < 4096 and not flags & 8:  # _VIEW_ABOVE, FLAG_ATTACHED (literals: the hot path)
                payload = buf[at + header : stop]
                append(_new_tuple(Frame, (type_, flags, stream, payload if type(payload) is bytes else bytes(payload))))
            else:  # one copy, not two (a bytearray slice, then bytes of it); a message with attachments is Packed
                # The flag means ATTACHED on REQUEST, RESPONSE and DATA alone: elsewhere it is unknown, so ignored.
                packed = flags & FLAG_ATTACHED and type_ in _CARRY_ATTACHMENTS
                with memoryview(buf) as view:
                    payload = (Packed if packed else bytes)(view[at + header : stop])
                frames.append(Frame(type_, flags, stream, payload))
            if self.reserved:  # that was the frame admitted while partial: its receiver admits it again
                self._release_reserved()
            at = stop
        if buf is self._buffer:
            if at:
                del self._buffer[:at]
        elif at < end:  # a partial frame at the end of `data`: keep it
            self._buffer += memoryview(buf)[at:]
        return frames

    def unread(self, frames: list[Frame]) -> None:
        """Put complete frames back, as bytes, ahead of what is buffered: the next feed() returns them first.

        For a receiver that stops handling frames midway through a read (the rest cost their wire size, not
        ten times it as objects). REFUSED frames cannot be put back.
        """
        self._buffer[0:0] = b"".join(HEADER.pack(len(f.payload), f.type, f.flags, f.stream) + f.payload for f in frames)

    def _release_reserved(self) -> None:
        reserved, self.reserved = self.reserved, 0
        if self._release is not None:
            self._release(reserved)

    def close(self) -> None:
        """The connection ended: release what the partly received frame held, drop the buffer."""
        del self._buffer[:]
        self._skip = 0
        if self.reserved:
            self._release_reserved()
