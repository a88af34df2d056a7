"""Validation reports every error of a request, each with its field path, as Connect error details (issue 12
item 7), over both transports; a naive datetime for an AwareDatetime is refused, not passed to the handler."""

from __future__ import annotations

import base64
import datetime
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import orjson
import pytest

import kubrpc
from kubrpc import RpcError, Status
from kubrpc.codec import AwareDatetime, collect_errors, decoder
from kubrpc.errors import bad_request

pytestmark = pytest.mark.anyio


@dataclass
class Line:
    sku: str
    qty: int


@dataclass
class Order:
    id: int
    lines: list[Line]
    notes: dict[str, int]


@kubrpc.interface(name="shop.Shop")
class Shop(Protocol):
    async def place(self, order: Order, count: int, label: str) -> int: ...

    async def at(self, when: AwareDatetime) -> str: ...

    async def plain(self, when: datetime.datetime) -> str: ...


@kubrpc.interface(name="shop.Shop")
class LooseShop(Protocol):
    """What a client with other types (an older version, another language) sends to Shop."""

    async def place(self, order: Any, count: Any, zzz: Any) -> int: ...


class ShopImpl:
    def __init__(self) -> None:
        self.runs = 0

    async def place(self, order: Order, count: int, label: str) -> int:
        self.runs += 1
        return count

    async def at(self, when: datetime.datetime) -> str:
        self.runs += 1
        return (when - datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)).__class__.__name__

    async def plain(self, when: datetime.datetime) -> str:
        return "naive" if when.tzinfo is None else "aware"


BAD_ORDER: dict[str, Any] = {
    "id": "7",
    "lines": [{"sku": "a", "qty": 1}, {"sku": 2, "qty": "x"}, {"qty": 3}],
    "notes": {"ok": 1, "bad": "no"},
    "extra": True,
}
EXPECTED = [
    ("order.id", "expected integer, got string"),
    ("order.lines[1].sku", "expected string, got integer"),
    ("order.lines[1].qty", "expected integer, got string"),
    ("order.lines[2].sku", "missing field"),
    ("order.notes.bad", "expected integer, got string"),
    ("order", "unexpected field 'extra' in Order"),
    ("count", "expected integer, got string"),
    ("label", "missing argument"),
    ("zzz", "unexpected argument"),
]


async def _serve(scheme: str) -> tuple[Any, kubrpc.Server, ShopImpl]:
    server = kubrpc.Server()
    impl = ShopImpl()
    server.register(Shop, impl)
    return server.serve(f"{scheme}://127.0.0.1:0"), server, impl


@pytest.mark.parametrize("scheme", ["tcp", "http"])
async def test_all_errors_travel_as_a_bad_request_detail(scheme: str) -> None:
    """A raw request with nine errors (wrong types, missing and unknown fields and arguments, at every depth)
    gets them all back: the message lists them, `exc.details` holds a google.rpc.BadRequest."""
    cm, server, impl = await _serve(scheme)
    async with cm as listener, kubrpc.connect(listener.url) as channel:
        body = orjson.dumps({"order": BAD_ORDER, "count": "3", "zzz": 1})
        if scheme == "http":
            async with httpx.AsyncClient(timeout=5) as client:
                response = await client.post(f"{listener.url}/shop.Shop/place", content=body)
            assert response.status_code == 400
            wire = response.json()
            assert wire["code"] == "invalid_argument"
            error = RpcError.from_json(wire)
        else:
            with pytest.raises(RpcError) as info:
                await channel.stub(LooseShop).place(BAD_ORDER, "3", 1)
            error = info.value
    assert impl.runs == 0
    assert error.code is Status.INVALID_ARGUMENT
    assert error.field_violations == EXPECTED
    assert error.message.startswith("9 invalid arguments: order.id: expected integer, got string; ")
    assert "label: missing argument" in error.message
    [detail] = error.details
    assert detail["type"] == "google.rpc.BadRequest"
    assert base64.b64decode(detail["value"] + "==")  # the protobuf form, unpadded base64 as Connect sends it
    _ = server


@pytest.mark.parametrize("scheme", ["tcp", "http"])
async def test_one_error_keeps_its_one_line_message_and_has_a_detail(scheme: str) -> None:
    cm, _, impl = await _serve(scheme)
    async with cm as listener, kubrpc.connect(listener.url) as channel:
        with pytest.raises(RpcError) as info:
            await channel.stub(Shop).place(Order(1, [Line("a", 1)], {}), "3", "x")  # type: ignore[arg-type]
    assert info.value.message == "invalid argument 'count': expected integer, got string"
    assert info.value.field_violations == [("count", "expected integer, got string")]
    assert impl.runs == 0


@pytest.mark.parametrize("scheme", ["tcp", "http"])
async def test_a_naive_datetime_for_an_aware_annotation_is_invalid_argument_not_internal(scheme: str) -> None:
    cm, _, impl = await _serve(scheme)
    async with cm as listener, kubrpc.connect(listener.url) as channel:
        shop = channel.stub(Shop)
        with pytest.raises(RpcError) as info:
            await shop.at(datetime.datetime(2026, 1, 2, 3, 4))
        assert await shop.at(datetime.datetime(2026, 1, 2, 3, 4, tzinfo=datetime.UTC)) == "timedelta"
        # A plain datetime annotation is exact: naive stays naive, aware stays aware.
        assert await shop.plain(datetime.datetime(2026, 1, 2)) == "naive"
        assert await shop.plain(datetime.datetime(2026, 1, 2, tzinfo=datetime.UTC)) == "aware"
    assert info.value.code is Status.INVALID_ARGUMENT
    assert "naive datetime" in info.value.message and "UTC offset" in info.value.message
    assert info.value.field_violations[0][0] == "when"
    assert impl.runs == 1


def test_collecting_is_bounded_and_the_first_error_path_is_unchanged() -> None:
    dec = decoder(list[int])
    errors = collect_errors(dec, ["x"] * 1000, "xs")
    assert len(errors) == 100
    assert errors[0].path == "xs[0]"
    with pytest.raises(Exception) as info:
        dec([1, "x", "y"], "xs")
    assert str(info.value) == "xs[1]: expected integer, got string"  # the fast path stops at the first


def test_error_details_round_trip_and_a_hostile_body_is_tolerated() -> None:
    error = RpcError(Status.INVALID_ARGUMENT, "m", [bad_request([("a.b", "why")])])
    back = RpcError.from_json(orjson.loads(orjson.dumps(error.to_json())))
    assert back.details == error.details and back.field_violations == [("a.b", "why")]
    assert RpcError(Status.INTERNAL, "x").to_json() == {"code": "internal", "message": "x"}
    odd = RpcError.from_json({"code": "internal", "message": "x", "details": [1, {"type": 2}, "s"]})
    assert odd.details == [{"type": 2}] and odd.field_violations == []
    assert RpcError.from_json({"code": "internal", "details": {"no": "list"}}).details == []
