"""A second attack on the client side, the codec and the inproc transport, each finding kept as a regression test.

Exactly-once is checked by resetting (or half-closing) a connection at every few byte offsets of the request and
of the answer, through tests/faultproxy.py, and counting the executions of a non-idempotent handler.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import enum
import logging
import math
import random
import time
import tracemalloc
import uuid
import zlib
from typing import Annotated, Any, Literal, NewType, Optional, Protocol

import anyio
import pytest
from faultproxy import FaultProxy, Mode
from hypothesis import HealthCheck, given, settings, strategies as st
from services import Arith, foreign_http, make_server
from test_client_faults import (
    Counter,
    CounterImpl,
    CountingHttp,
    CountingTcp,
    FakeClock,
    closed_port,
    counter_server,
    failing_peeks,
)
from test_codec_exactness import echo_protocol, echo_server, echo_spec, same

import kubrpc
from kubrpc import Endpoint, RpcError, Status
from kubrpc.balancers.p2c import PowerOfTwoChoices

pytestmark = pytest.mark.anyio


# ---- exactly-once: a fault at any byte offset never runs a non-idempotent call twice ----------------------------


async def _settled(proxy: FaultProxy) -> None:
    """Wait (bounded) until the proxy has passed on everything of the connections it has open."""
    with anyio.move_on_after(5):
        while proxy._tasks:
            await anyio.sleep(0.01)


@pytest.mark.parametrize(
    ("mode", "side", "chunk"),
    [("reset_after", "request", 0), ("reset_after", "answer", 0), ("half_close", "answer", 1)],
)
async def test_a_fault_at_any_offset_never_runs_a_call_twice(scheme: str, mode: Mode, side: str, chunk: int) -> None:
    outcomes: dict[str, int] = {}
    async with counter_server(scheme) as (port, counter, _), FaultProxy(port, chunk=chunk) as proxy:
        proxy.mode = mode
        for offset in range(0, 260, 3):
            if side == "request":
                proxy.reset_after, proxy.reset_after_response = offset, None
            else:
                proxy.reset_after, proxy.reset_after_response = None, offset
            before = counter.bumps
            async with kubrpc.connect([Endpoint("127.0.0.1", proxy.port)], transport=scheme) as channel:
                stub = channel.stub(Counter, timeout=5)
                try:
                    with anyio.fail_after(20):
                        await stub.bump()
                    outcome = "ok"
                except RpcError as exc:
                    assert exc.code is Status.UNAVAILABLE
                    outcome = type(exc).__name__
            await _settled(proxy)
            ran = counter.bumps - before
            assert ran == 1 if outcome == "ok" else ran <= 1, (offset, outcome, ran)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes.get("ok", 0) > 0 and len(outcomes) > 1  # the sweep crossed from failures into successes


# ---- codec: an Enum registers only if every member can travel, and comes back as sent ----------------------------


class Pair(enum.Enum):
    A = (1, 2)  # a JSON array comes back as a list: this Enum registered, then every call failed


class Clash(enum.Enum):
    RAW = b"x"
    TEXT = "eA=="  # base64 of b"x": both travel as the same string


class Blob(enum.Enum):
    X = b"x"  # registered, then every call failed (the decoder looked for bytes in a JSON string)
    Y = b"\x00\xff"


class Perm(enum.IntFlag):
    R = 1
    W = 2


class Mode2(enum.Flag):
    A = 1
    B = 2


@pytest.mark.parametrize("cls", [Pair, Clash])
def test_enums_whose_members_cannot_travel_exactly_are_refused_at_register(cls: type[enum.Enum]) -> None:
    server = kubrpc.Server()
    with pytest.raises(TypeError, match=f"Enum {cls.__name__}"):
        server.register(echo_protocol(cls), object())


async def test_enums_of_bytes_and_flag_combinations_round_trip(scheme: str) -> None:
    cases: list[tuple[object, list[object]]] = [
        (Blob, [Blob.X, Blob.Y]),
        (Perm, [Perm.R, Perm.R | Perm.W, Perm(0)]),  # combinations failed: only single members were known
        (Mode2, [Mode2.A | Mode2.B]),
    ]
    async with echo_server(scheme, [tp for tp, _ in cases]) as channel:
        for i, (tp, values) in enumerate(cases):
            stub = channel.stub(echo_protocol(tp, f"Echo{i}"), timeout=10)
            for value in values:
                back = await stub.echo(value)
                assert same(back, value)
        with pytest.raises(RpcError) as info:  # a bit no member of the (strict) Flag has
            await channel.call("Echo2/echo", b'{"value": 4}', timeout=10)
        assert info.value.code is Status.INVALID_ARGUMENT


# ---- inproc: a hostile handler gets the same answer as on the wire -------------------------------------------------


class Boom(BaseException):
    """Not an Exception: a handler that raises it must still answer its caller."""


class Hostile(Protocol):
    async def boom(self) -> int: ...


class HostileImpl:
    async def boom(self) -> int:
        raise Boom("handler blew up")


async def test_an_inproc_handler_raising_a_base_exception_is_internal(caplog: pytest.LogCaptureFixture) -> None:
    server = kubrpc.Server()
    server.register(Hostile, HostileImpl())
    caplog.set_level(logging.ERROR)
    async with server.serve("inproc://hostile-boom") as listener, kubrpc.connect(listener.url) as channel:
        stub = channel.stub(Hostile, timeout=10)
        for _ in range(3):
            with anyio.fail_after(10), pytest.raises(RpcError) as info:
                await stub.boom()
            # Old code: UNAVAILABLE "inproc://hostile-boom stopped before the call finished", the server running on.
            assert info.value.code is Status.INTERNAL and info.value.message == "internal error"
        await asyncio.sleep(0)
    assert "handler blew up" not in info.value.message
    logged = [r for r in caplog.records if r.name == "kubrpc.server"]
    assert len(logged) == 3 and all(r.exc_info and isinstance(r.exc_info[1], Boom) for r in logged)
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


# ---- backoff: when an endpoint's backoff runs out, one call tries it again, not every caller at once ---------------


@pytest.mark.parametrize("transport_name", ["tcp", "http"])
async def test_after_its_backoff_a_down_endpoint_gets_one_attempt_not_a_herd(transport_name: str) -> None:
    dead = closed_port()
    transport: Any = CountingTcp() if transport_name == "tcp" else CountingHttp()
    async with kubrpc.connect([Endpoint("127.0.0.1", dead)], transport=transport) as channel:
        call, outcomes = failing_peeks(channel.stub(Counter, timeout=10))
        for _ in range(5):
            with anyio.fail_after(20):
                while channel._down and next(iter(channel._down.values()))[0] > time.monotonic():
                    await anyio.sleep(0.01)  # until the backoff has run out
                async with anyio.create_task_group() as tg:
                    for _ in range(64):
                        tg.start_soon(call)
    assert outcomes == [Status.UNAVAILABLE] * 320
    # Old code (http): every caller that came after the backoff connected, 64 at a time (over 300 attempts).
    assert transport.attempts[dead] <= 10


# ---- codec: null is one value; random type trees round-trip exactly over both transports ---------------------------


class Maybe(enum.Enum):
    YES = 1
    UNKNOWN = None  # travels as null, as None does


def test_a_union_of_none_and_an_enum_member_that_travels_as_null_is_refused() -> None:
    # Old code: Optional[Maybe] registered, and Maybe.UNKNOWN came back as None.
    for tp in (Optional[Maybe], Maybe | Literal[None]):  # noqa: UP045
        with pytest.raises(TypeError, match="both travel as the JSON value null"):
            kubrpc.Server().register(echo_protocol(tp), object())
    spec = echo_spec(Maybe | str)  # null is not ambiguous here: it is Maybe.UNKNOWN
    assert spec.decode_args(spec.encode_call((Maybe.UNKNOWN,), {}))["value"] is Maybe.UNKNOWN
    assert spec.decode_result(b"null") is Maybe.UNKNOWN


class Blobs(enum.Enum):
    X = b"x"
    Y = b"yy"


UserId = NewType("UserId", int)
_OFFSETS = st.timedeltas(datetime.timedelta(hours=-23, minutes=-59), datetime.timedelta(hours=23, minutes=59))
_LEAVES: list[tuple[object, st.SearchStrategy[Any]]] = [
    (int, st.integers(-(2**63), 2**64 - 1)),
    (float, st.floats()),
    (str, st.text()),
    (bool, st.booleans()),
    (bytes, st.binary(max_size=20)),
    (
        datetime.datetime,
        st.datetimes(
            timezones=st.none()
            | _OFFSETS.map(lambda o: o - datetime.timedelta(microseconds=o.microseconds)).map(datetime.timezone)
        ),
    ),
    (datetime.date, st.dates()),
    (uuid.UUID, st.uuids()),
    (Blobs, st.sampled_from(Blobs)),
    (Mode2, st.sampled_from([Mode2.A, Mode2.B, Mode2.A | Mode2.B])),
    (Maybe, st.sampled_from(Maybe)),
    (UserId, st.integers(0, 10).map(UserId)),
    (Annotated[int, "meta"], st.integers(-5, 5)),
    (Literal[1, "a", b"z", True], st.sampled_from([1, "a", b"z", True])),
    (
        Any,
        st.recursive(
            st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(),
            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
            max_leaves=6,
        ),
    ),
]
_made: list[type] = []


def _dataclass_of(fields: list[tuple[object, st.SearchStrategy[Any]]]) -> tuple[object, st.SearchStrategy[Any]]:
    cls = dataclasses.make_dataclass(f"Fuzz{len(_made)}", [(f"f{i}", tp) for i, (tp, _) in enumerate(fields)])
    _made.append(cls)
    return cls, st.tuples(*(s for _, s in fields)).map(lambda values: cls(*values))


def _containers(
    children: st.SearchStrategy[tuple[object, st.SearchStrategy[Any]]],
) -> st.SearchStrategy[tuple[object, st.SearchStrategy[Any]]]:
    generic: Any = (list, Optional, tuple, dict)  # subscripted at run time with the annotations drawn
    list_, optional, tuple_, dict_ = generic
    return st.one_of(
        children.map(lambda c: (list_[c[0]], st.lists(c[1], max_size=3))),
        children.map(lambda c: (optional[c[0]], st.none() | c[1])),
        children.map(lambda c: (tuple_[c[0], ...], st.lists(c[1], max_size=3).map(tuple))),
        children.map(lambda c: (dict_[str, c[0]], st.dictionaries(st.text(max_size=4), c[1], max_size=3))),
        st.lists(children, min_size=1, max_size=3).map(_dataclass_of),
    )


_TREES = st.recursive(st.sampled_from(_LEAVES), _containers, max_leaves=5)


@st.composite
def _trees_and_values(draw: st.DrawFn) -> tuple[object, list[object]]:
    tp, values = draw(_TREES)
    return tp, [draw(values) for _ in range(2)]


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=_trees_and_values())
async def test_random_type_trees_round_trip_exactly_over_both_transports(case: tuple[object, list[object]]) -> None:
    tp, values = case
    try:
        echo_spec(tp)
    except TypeError as exc:  # only an ambiguous union may be refused
        assert "ambiguous union" in str(exc)
        return
    for scheme in ("tcp", "http"):
        async with echo_server(scheme, [tp]) as channel:
            stub = channel.stub(echo_protocol(tp, "Echo0"), timeout=10)
            for value in values:
                with anyio.fail_after(10):
                    back = await stub.echo(value)
                assert same(back, value), (scheme, tp, value, back)


# ---- HTTP: a JSON body that is not a kubrpc error is a foreign answer, and says so --------------------------------


@pytest.mark.parametrize("body", [b'{"error": "upstream timeout"}', b"{}", b"[1]", b'"slow"'])
async def test_a_foreign_json_error_body_names_the_status_and_the_endpoint(body: bytes) -> None:
    answer = b"HTTP/1.1 504 Gateway Timeout\r\ncontent-type: application/json\r\n"
    answer += b"content-length: %d\r\n\r\n%s" % (len(body), body)
    async with foreign_http(answer) as (port, requests):
        async with kubrpc.connect([Endpoint("127.0.0.1", port)], transport="http") as channel:
            with anyio.fail_after(10), pytest.raises(RpcError) as info:
                await channel.stub(Counter, timeout=5).bump()
    # Old code: UNAVAILABLE "malformed error body", which named neither the status nor who answered.
    assert info.value.code is Status.UNAVAILABLE
    assert info.value.message.startswith(f"HTTP 504 from 127.0.0.1:{port} (not kubrpc)")
    assert len(requests) == 1  # not idempotent: never sent again


# ---- p2c: an endpoint that fails fast with a server error does not draw the calls --------------------------------


@pytest.mark.parametrize("failure", [Status.INTERNAL, Status.UNKNOWN, Status.DATA_LOSS, Status.RESOURCE_EXHAUSTED])
def test_p2c_avoids_an_endpoint_that_answers_every_call_with_a_fast_server_error(failure: Status) -> None:
    clock = FakeClock()
    good, bad = Endpoint("10.0.0.1", 1), Endpoint("10.0.0.2", 1)
    balancer = PowerOfTwoChoices(rng=random.Random(5), clock=clock)
    balancer.update([good, bad])
    picks = {good: 0, bad: 0}
    for _ in range(3000):  # 30 s of traffic: good answers in 5 ms, bad fails in 0.1 ms (a crashed handler)
        ep = balancer.pick()
        picks[ep] += 1
        balancer.on_start(ep)
        clock.now += 0.005 if ep == good else 0.0001
        if ep == good:
            balancer.on_finish(ep, status=Status.OK, latency=0.005)
        else:
            balancer.on_finish(ep, status=failure, latency=0.0001)
        clock.now += 0.005
    # Old code: only UNAVAILABLE counted as a failure, and bad drew 98% of the calls (394 of 400 end to end).
    assert picks[bad] < 0.05 * picks[good]


def test_p2c_does_not_penalise_answers_about_the_call() -> None:
    clock = FakeClock()
    a, b = Endpoint("10.0.0.1", 1), Endpoint("10.0.0.2", 1)
    balancer = PowerOfTwoChoices(rng=random.Random(6), clock=clock)
    balancer.update([a, b])
    picks = {a: 0, b: 0}
    for _ in range(2000):  # b answers NOT_FOUND / INVALID_ARGUMENT as fast as a answers OK: an even split
        ep = balancer.pick()
        picks[ep] += 1
        balancer.on_start(ep)
        clock.now += 0.001
        status = Status.OK if ep == a else random.Random(picks[ep]).choice([Status.NOT_FOUND, Status.INVALID_ARGUMENT])
        balancer.on_finish(ep, status=status, latency=0.001)
        clock.now += 0.009
    assert 0.3 < picks[b] / 2000 < 0.7


# ---- call options: a NaN timeout is refused up front, a very long one is no deadline ------------------------------


@pytest.mark.parametrize("target", ["tcp", "http", "inproc"])
async def test_nan_timeouts_are_refused_and_huge_ones_mean_no_deadline(target: str) -> None:
    server, _ = make_server()
    url = "inproc://attack-timeouts" if target == "inproc" else f"{target}://127.0.0.1:0"
    async with server.serve(url) as listener, kubrpc.connect(listener.url) as channel:
        # Old code: 1e308 s crashed the tcp and http transports with OverflowError (converting it to milliseconds).
        assert await channel.stub(Arith, timeout=1e308).add(1, 2) == 3
        assert await channel.call("Arith/add", b'{"a": 1, "b": 2}', timeout=1e300) == b"3"
        with pytest.raises(ValueError, match="not NaN"):
            channel.stub(Arith, timeout=math.nan)
        with pytest.raises(ValueError, match="not NaN"):  # old code: a ValueError from int(), or none (inproc)
            await channel.call("Arith/add", b'{"a": 1, "b": 2}', timeout=math.nan)
    with pytest.raises(ValueError, match="not NaN"):
        kubrpc.connect(listener.url, timeout=math.nan)


# ---- metadata: names that frame, route or time the request are refused before sending, on every transport --------


@pytest.mark.parametrize("target", ["tcp", "http", "inproc"])
@pytest.mark.parametrize(
    "metadata",
    [
        {"content-length": "2"},  # http: the server read 2 bytes of body; the rest was left as the next request
        {"Transfer-Encoding": "chunked"},  # http: 400 from the server, INTERNAL on the client
        {"host": "admin.internal"},  # http: re-routed by any proxy on the way
        {"connect-timeout-ms": "1"},  # http: a 1 ms deadline on the server; tcp: plain metadata
        {"content-type": "text/plain"},
        {"connection": "close"},
    ],
)
async def test_metadata_that_frames_or_routes_the_request_is_refused(target: str, metadata: dict[str, str]) -> None:
    server = kubrpc.Server()
    counter = CounterImpl()
    server.register(Counter, counter)
    url = "inproc://attack-metadata" if target == "inproc" else f"{target}://127.0.0.1:0"
    async with server.serve(url) as listener, kubrpc.connect(listener.url) as channel:
        with pytest.raises(RpcError) as info:
            await channel.stub(Counter, timeout=5, metadata=metadata).bump()
        assert info.value.code is Status.INVALID_ARGUMENT
        assert f"metadata key {next(iter(metadata))!r} is reserved" in info.value.message
        assert counter.bumps == 0
        assert await channel.stub(Counter, timeout=5, metadata={"x-content-length": "2"}).bump() == 1


# ---- codec: sets of unhashable items, and required fields the encoder leaves out -----------------------------------


@dataclasses.dataclass
class Plain:  # not frozen: unhashable
    name: str


@dataclasses.dataclass(frozen=True)
class Tagged:
    name: str
    tags: list[str] = dataclasses.field(default_factory=list)  # hashable class, unhashable values


@dataclasses.dataclass
class Secretive:
    _token: str  # orjson leaves out fields whose name starts with "_": this one could never arrive


@pytest.mark.parametrize("tp", [set[Plain], set[list[int]], frozenset[dict[str, int]], Secretive, list[Secretive]])
def test_annotations_whose_values_could_never_arrive_are_refused_at_register(tp: object) -> None:
    # Old code: registered; then a set of them was a TypeError (INTERNAL) and Secretive "missing field" on every call.
    with pytest.raises(TypeError, match="hashable|starts with '_'"):
        kubrpc.Server().register(echo_protocol(tp), object())


async def test_unhashable_items_in_a_set_are_invalid_argument_not_internal(scheme: str) -> None:
    async with echo_server(scheme, [set[Any], frozenset[Tagged]]) as channel:
        for path, body in (
            ("Echo0/echo", b'{"value": [[1], {"a": 2}]}'),
            ("Echo1/echo", b'{"value": [{"name": "x", "tags": ["a"]}]}'),
        ):
            with pytest.raises(RpcError) as info:
                await channel.call(path, body, timeout=10)
            # Old code: TypeError "unhashable type" in the decoder, answered INTERNAL (500) and logged as a crash.
            assert info.value.code is Status.INVALID_ARGUMENT
            assert "hashable" in info.value.message
        assert await channel.call("Echo0/echo", b'{"value": [1, "a"]}', timeout=10) in (b'[1,"a"]', b'["a",1]')


# ---- HTTP: a compressed answer cannot inflate past the size limit ---------------------------------------------------


async def test_a_gzip_bomb_answer_is_not_inflated_past_the_limit() -> None:
    squeeze = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip
    megabyte = b"1" * (1 << 20)
    bomb = b"".join(squeeze.compress(megabyte) for _ in range(64)) + squeeze.flush()  # 64 MiB in ~65 KB
    answer = b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n\r\n%s" % (len(bomb), bomb)
    async with foreign_http(answer) as (port, heads):
        tracemalloc.start()
        try:
            async with kubrpc.connect([Endpoint("127.0.0.1", port)], transport="http") as channel:
                with anyio.fail_after(20), pytest.raises(RpcError) as info:
                    await channel.stub(Counter, timeout=10).peek()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    # Old code: aiohttp asked for gzip and inflated all 64 MiB (a 4 MiB limit counts the 65 KB on the wire).
    assert peak < 16 * 1024 * 1024
    assert info.value.code is Status.INTERNAL  # not JSON: kubrpc servers never compress
    assert b"accept-encoding" not in heads[0].lower()


# ---- a slow link: deadlines hold, a call runs at most once, and the connection stays usable ------------------------


class Sink(Protocol):
    async def put(self, blob: str) -> int: ...


class SinkImpl:
    def __init__(self) -> None:
        self.runs = 0

    async def put(self, blob: str) -> int:
        self.runs += 1
        return len(blob)


async def test_a_bandwidth_limited_link_keeps_deadlines_and_runs_each_call_at_most_once(scheme: str) -> None:
    server = kubrpc.Server()
    sink = SinkImpl()
    server.register(Sink, sink)
    async with server.serve(f"{scheme}://127.0.0.1:0") as listener:
        port = int(listener.url.rsplit(":", 1)[1])
        async with FaultProxy(port, chunk=4096, rate=2_000_000) as proxy:  # 2 MB/s each way
            async with kubrpc.connect([Endpoint("127.0.0.1", proxy.port)], transport=scheme) as channel:
                blob = "x" * 400_000  # 0.2 s on the wire
                failed = 0
                for _ in range(5):
                    try:
                        with anyio.fail_after(20):
                            await channel.stub(Sink, timeout=0.05).put(blob)
                    except RpcError as exc:
                        assert exc.code is Status.DEADLINE_EXCEEDED
                        failed += 1
                assert failed >= 1
                with anyio.fail_after(30):
                    assert await channel.stub(Sink, timeout=20).put(blob) == len(blob)
            await _settled(proxy)
    assert sink.runs <= 6  # at most once per call, whatever arrived after its deadline
