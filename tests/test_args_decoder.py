"""MethodSpec.args_decoder() (code made per method) against decode_args(): the same arguments, or the same error.

A server decodes the arguments of a call whose handler never waits with args_decoder(); every other body than
the common one (each parameter named once, each value of its type) goes through decode_args(), so the two must
never disagree, whatever a client sends.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import orjson
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import kubrpc
from kubrpc.errors import RpcError
from kubrpc.interface import MethodSpec, service_spec
from kubrpc.status import Status


@dataclasses.dataclass
class Point:
    x: int
    y: int

    def __post_init__(self) -> None:
        if self.x < 0:
            raise kubrpc.RpcError(kubrpc.Status.INVALID_ARGUMENT, "x must not be negative")


class Shapes(Protocol):
    async def add(self, a: int, b: int) -> int: ...

    async def mixed(self, name: str, ok: bool, ratio: float, count: int | None = None) -> str: ...

    async def move(self, p: Point, by: int) -> Point: ...

    async def anything(self, value: Any, tags: list[str]) -> int: ...

    async def quoted(self, class_: int, _: str) -> int: ...

    async def none(self) -> int: ...


SPEC = service_spec(Shapes)
METHODS = list(SPEC.methods.values())


def outcome(decode: Any, body: bytes) -> tuple[str, Any]:
    """What decoding `body` gives: ("ok", the arguments, as repr() shows them, types and NaN too) or ("error",
    everything the client would see of it)."""
    try:
        return "ok", repr(decode(body))
    except RpcError as exc:
        return "error", (exc.code, exc.message, exc.to_json())


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),  # (orjson writes no more; raw bodies go past it)
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.sampled_from("xyz"), inner, max_size=3)),
    max_leaves=6,
)


@st.composite
def bodies(draw: st.DrawFn, method: MethodSpec) -> bytes:
    """JSON bodies near the method's own: its names (some left out, some extra), values of any JSON type."""
    names = [p.name for p in method.params]
    keys = draw(st.lists(st.sampled_from([*names, "extra", "A"]), unique=True, max_size=len(names) + 2))
    if draw(st.booleans()):
        keys = list(names)  # every name: the common case's shape
    obj = {k: draw(json_values) for k in keys}
    shape = draw(st.sampled_from(["object", "object", "object", "array", "scalar", "raw"]))
    if shape == "array":
        return orjson.dumps(list(obj.values()))
    if shape == "scalar":
        return orjson.dumps(draw(json_scalars))
    if shape == "raw":
        return draw(st.sampled_from([b"", b"{", b"nul", b'{"a":1,"a":2,"b":3}', b'{"a":1,"b":99999999999999999999}']))
    return orjson.dumps(obj)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_args_decoder_agrees_with_decode_args(data: st.DataObject) -> None:
    method = data.draw(st.sampled_from(METHODS))
    body = data.draw(bodies(method))
    assert outcome(method.args_decoder(), body) == outcome(method.decode_args, body)


@pytest.mark.parametrize(
    ("method", "body"),
    [
        ("add", b'{"a":1,"b":2}'),
        ("add", b'{"b":2,"a":1}'),
        ("add", b'{"a":true,"b":2}'),  # a bool is no int
        ("add", b'{"a":1.0,"b":2}'),
        ("add", b'{"a":1,"b":18446744073709551616}'),  # past 64 bits
        ("add", b'{"a":1,"b":-9223372036854775809}'),
        ("add", b'{"a":1,"c":2}'),
        ("add", b'{"a":1,"b":2,"c":3}'),
        ("add", b'{"a":1,"a":2,"b":3}'),  # a duplicate key: JSON parsers keep the last
        ("mixed", b'{"name":"n","ok":true,"ratio":1,"count":null}'),  # an int ratio becomes a float
        ("mixed", b'{"name":"n","ok":1,"ratio":1.5,"count":3}'),
        ("mixed", b'{"name":"n","ok":true,"ratio":"NaN","count":3}'),
        ("move", b'{"p":{"x":1,"y":2},"by":3}'),
        ("move", b'{"p":{"x":-1,"y":2},"by":3}'),  # __post_init__ refuses it
        ("move", b'{"p":{"x":1},"by":3}'),
        ("quoted", b'{"class_":1,"_":"u"}'),
        ("none", b"{}"),
        ("none", b'{"a":1}'),
    ],
)
def test_args_decoder_cases(method: str, body: bytes) -> None:
    spec = SPEC.methods[method]
    assert outcome(spec.args_decoder(), body) == outcome(spec.decode_args, body)


def test_args_decoder_keeps_types() -> None:
    decode = SPEC.methods["mixed"].args_decoder()
    args = decode(b'{"name":"n","ok":false,"ratio":2,"count":7}')
    assert args == {"name": "n", "ok": False, "ratio": 2.0, "count": 7}
    assert type(args["ratio"]) is float
    assert list(args) == ["name", "ok", "ratio", "count"]  # in the order of the parameters


class ShapesImpl:
    async def add(self, a: int, b: int) -> int:
        return a + b

    async def mixed(self, name: str, ok: bool, ratio: float, count: int | None = None) -> str:
        return f"{name}:{ok}:{ratio}:{count}"

    async def move(self, p: Point, by: int) -> Point:
        return Point(p.x + by, p.y + by)

    async def anything(self, value: Any, tags: list[str]) -> int:
        return len(tags)

    async def quoted(self, class_: int, _: str) -> int:
        return class_

    async def none(self) -> int:
        return 0


@pytest.mark.parametrize("scheme", ["tcp", "http"])
async def test_inline_calls_decode_as_any_other(scheme: str) -> None:
    """Handlers that never wait run inline over TCP (args_decoder()); their callers see what decode_args() says."""
    server = kubrpc.Server()
    server.register(Shapes, ShapesImpl())
    async with server.serve(f"{scheme}://127.0.0.1:0") as listener, kubrpc.connect(listener.url) as channel:
        shapes = channel.stub(Shapes)
        assert await shapes.add(2, 3) == 5
        assert await shapes.move(Point(1, 2), 3) == Point(4, 5)
        assert await shapes.mixed("n", True, 2) == "n:True:2.0:None"
        assert await shapes.quoted(4, "x") == 4
        for body in (b'{"a":true,"b":2}', b'{"a":1}', b'{"a":1,"b":2,"c":3}', b"[1,2]", b"{"):
            with pytest.raises(RpcError) as caught:
                await channel.call("Shapes/add", body)
            expected = outcome(SPEC.methods["add"].decode_args, body)[1]
            assert (caught.value.code, caught.value.message) == expected[:2]
            assert caught.value.code is Status.INVALID_ARGUMENT
        with pytest.raises(RpcError, match="x must not be negative"):
            await channel.call("Shapes/move", b'{"p":{"x":-1,"y":0},"by":1}')
        assert await channel.call("Shapes/add", b'{"b":2,"a":40}') == b"42"


class Results(Protocol):
    async def count(self) -> int: ...

    async def name(self) -> str: ...

    async def flag(self) -> bool: ...

    async def maybe(self) -> int | None: ...


RESULTS = service_spec(Results)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(list(RESULTS.methods)),
    st.one_of(
        json_values.map(orjson.dumps),
        st.sampled_from([b"", b"1.0", b"true", b"18446744073709551616", b"-9223372036854775809", b'"x', b"[1]"]),
    ),
)
def test_result_decoder_agrees_with_decode_result(method: str, body: bytes) -> None:
    """A stub's result_decoder() (int, str and bool checked inline) gives what decode_result() gives, or its error."""
    spec = RESULTS.methods[method]
    assert outcome(spec.result_decoder(), body) == outcome(spec.decode_result, body)
