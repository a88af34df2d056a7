"""The sans-IO frame codec: exact round trips and hostile input, with hypothesis."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st

from kubrpc import Status
from kubrpc.errors import ProtocolError
from kubrpc.transports._frames import (
    HEADER,
    MAX_METADATA,
    BadRequest,
    Frame,
    FrameDecoder,
    encode_frame,
    encode_goaway,
    encode_metadata,
    encode_request,
    parse_goaway,
    parse_request,
)

frames = st.builds(
    Frame,
    type=st.integers(0, 255),
    flags=st.integers(0, 255),
    stream=st.integers(0, 2**32 - 1),
    payload=st.binary(max_size=300),
)


@given(st.lists(frames, max_size=20), st.data())
def test_any_split_of_a_frame_stream_decodes_to_the_same_frames(sent: list[Frame], data: st.DataObject) -> None:
    wire = b"".join(encode_frame(f.type, f.stream, f.payload, f.flags) for f in sent)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    decoder = FrameDecoder(max_payload=300)
    got: list[Frame] = []
    for start, stop in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        got += decoder.feed(wire[start:stop])
    assert got == sent
    assert decoder.buffered == 0


@given(st.binary(max_size=2000))
@settings(max_examples=300)
def test_random_bytes_never_crash_the_decoder(data: bytes) -> None:
    decoder = FrameDecoder(max_payload=256)
    try:
        for frame in decoder.feed(data):
            assert len(frame.payload) <= 256
    except ProtocolError:
        return
    assert decoder.buffered < HEADER.size + 256


@given(st.integers(257, 2**32 - 1), st.integers(0, 255), st.integers(0, 2**32 - 1))
def test_declared_length_over_the_limit_is_refused_before_buffering(length: int, kind: int, stream: int) -> None:
    decoder = FrameDecoder(max_payload=256)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decoder.feed(struct.pack(">IBBI", length, kind, 0, stream))
    assert decoder.buffered == 0


@given(
    st.integers(1, 2**32 - 1),
    st.text(min_size=1, max_size=50),
    st.binary(max_size=200),
    st.integers(0, 2**32 - 1),
    st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=4),
)
def test_request_round_trip(stream: int, path: str, body: bytes, timeout_ms: int, metadata: dict[str, str]) -> None:
    wire = encode_request(stream, path, body, timeout_ms, encode_metadata(metadata))
    (frame,) = FrameDecoder(1 << 20).feed(wire)
    assert frame.stream == stream
    request = parse_request(frame.payload)
    assert (request.timeout_ms, request.path, request.metadata, request.body) == (timeout_ms, path, metadata, body)


@given(st.binary(max_size=300))
@settings(max_examples=300)
def test_malformed_request_payloads_raise_protocol_error_only(payload: bytes) -> None:
    try:
        request = parse_request(payload)
    except (ProtocolError, BadRequest):
        return
    assert isinstance(request.path, str) and all(isinstance(v, str) for v in request.metadata.values())


def test_every_truncation_of_a_request_header_is_refused() -> None:
    meta = b'{"k": "v"}'
    payload = encode_request(1, "Arith/add", b"{}", 10, meta)[HEADER.size :]
    fixed = 4 + 2 + len("Arith/add") + 4 + len(meta)
    for cut in range(fixed):
        with pytest.raises(ProtocolError, match="truncated"):
            parse_request(payload[:cut])
    assert parse_request(payload[:fixed]).body == b""


@given(st.integers(0, 2**32 - 1), st.text(max_size=50))
def test_goaway_round_trip(last: int, reason: str) -> None:
    (frame,) = FrameDecoder(1 << 10).feed(encode_goaway(last, reason))
    assert parse_goaway(frame.payload) == (last, reason)


def test_bad_metadata_fails_the_call_not_the_connection() -> None:
    for meta in (b"[1]", b'{"a": 1}', b"nope"):
        payload = encode_request(1, "A/b", b"{}", 0, meta)[HEADER.size :]
        with pytest.raises(BadRequest, match="metadata") as info:
            parse_request(payload)
        assert info.value.error.code is Status.INVALID_ARGUMENT
    payload = encode_request(1, "A/b", b"{}", 0, b'{"k": "' + b"v" * MAX_METADATA + b'"}')[HEADER.size :]
    with pytest.raises(BadRequest) as info:
        parse_request(payload)
    assert info.value.error.code is Status.RESOURCE_EXHAUSTED
