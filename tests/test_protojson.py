"""kubrpc._protojson: proto3 JSON <-> native JSON, checked against protobuf's own JSON mapping (json_format).

The schema is what `kubrpc proto` renders, compiled with protoc (grpcio-tools): what kubrpc emits must be what
protobuf's emitter writes for the same message, and what protobuf writes (with either field names) must reach the
handler as the value it stands for.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc_tools
import orjson
import pytest
from connect_shop import Line, Money, Order, OrderState, Shop
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings, strategies as st

from kubrpc import codec, proto
from kubrpc._protojson import MethodCodec, json_name, method_codec, type_codec
from kubrpc.errors import RpcError, bad_request
from kubrpc.interface import service_spec
from kubrpc.status import Status

WELL_KNOWN = str(Path(grpc_tools.__file__).parent / "_proto")
SPEC = service_spec(Shop)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pool.DescriptorPool:
    """The Shop schema as `kubrpc proto` renders it, compiled by protoc."""
    tmp = tmp_path_factory.mktemp("proto")
    (tmp / "shop.v1.proto").write_text(proto.render(Shop))
    out = tmp / "descriptors.pb"
    result = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp}", f"-I{WELL_KNOWN}", "--include_imports"]
        + [f"--descriptor_set_out={out}", "shop.v1.proto"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp,
    )
    assert result.returncode == 0, result.stderr
    made = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file:
        made.Add(file)
    return made


def message(pool: descriptor_pool.DescriptorPool, name: str) -> Message:
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"shop.v1.{name}"))()


def codec_of(method: str) -> MethodCodec:
    return method_codec(SPEC.methods[method])


ORDER = Order(
    order_id=uuid.UUID("6f1c2a9e-7d1b-4a3e-9d2e-0c5b8a1f2e3d"),
    customer_name="Ann",
    lines=[Line("apple", 3, Money(5)), Line("pear", 0, Money(-(2**63), "USD"))],
    state=OrderState.ShippedOut,
    placed_at=datetime.datetime(2024, 5, 1, 12, 0, 0, 250000, tzinfo=datetime.timezone(datetime.timedelta(hours=2))),
    note="",
    attachment=b"\x00\xfa\xfb\xff",
    labels={"a_b": "c", "": ""},
    big_number=2**63 - 1,
    discount=0.0,
    matrix=[[1, 2], [], [3]],
    due=datetime.date(2024, 6, 1),
    extra={"x": [1, None, "y"]},
)


def reference(pool: descriptor_pool.DescriptorPool, name: str, emitted: Any) -> Any:
    """What protobuf's emitter writes for the message kubrpc emitted (which protobuf must parse, strictly)."""
    msg = message(pool, name)
    json_format.ParseDict(emitted, msg)
    return json_format.MessageToDict(msg)


def test_the_emitter_writes_what_protobuf_writes(pool: descriptor_pool.DescriptorPool) -> None:
    emitted = orjson.loads(type_codec(Order, "unused").to_proto(codec.dumps(ORDER)))
    assert emitted == reference(pool, "Order", emitted)
    assert emitted["placedAt"] == "2024-05-01T10:00:00.250Z"  # UTC, with Z
    assert emitted["bigNumber"] == str(2**63 - 1)  # int64 as a string
    assert emitted["state"] == "ORDER_STATE_SHIPPED_OUT"
    assert emitted["attachment"] == "APr7/w=="
    assert emitted["note"] == "" and emitted["discount"] == 0.0  # optional fields: written when set, even zero
    assert "quantity" not in emitted["lines"][1]  # a plain field holding its zero value is left out
    assert emitted["matrix"] == [{"items": ["1", "2"]}, {}, {"items": ["3"]}]
    assert emitted["labels"] == {"a_b": "c", "": ""}  # map keys are data, not field names


def test_what_protobuf_writes_reaches_the_handler_as_it_was_sent(pool: descriptor_pool.DescriptorPool) -> None:
    request = message(pool, "PlaceOrderRequest")
    json_format.ParseDict({"order": orjson.loads(type_codec(Order, "unused").to_proto(codec.dumps(ORDER)))}, request)
    for original_names in (False, True):
        sent = json_format.MessageToJson(request, preserving_proto_field_name=original_names).encode()
        native = codec_of("place_order").request_to_native(sent)
        kwargs = SPEC.methods["place_order"].decode_args(native)
        assert kwargs["order"] == Order(**{**vars(ORDER), "placed_at": ORDER.placed_at.astimezone(datetime.UTC)})
        assert "dry_run" not in kwargs  # absent optional with a default: the default applies


texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)
int64s = st.integers(-(2**63), 2**63 - 1)
moneys = st.builds(Money, int64s, texts)
orders = st.builds(
    Order,
    order_id=st.uuids(),
    customer_name=texts,
    lines=st.lists(st.builds(Line, texts, int64s, moneys), max_size=3),
    state=st.sampled_from(OrderState),
    placed_at=st.datetimes(
        datetime.datetime(1970, 1, 1), datetime.datetime(2200, 1, 1), timezones=st.just(datetime.UTC)
    ),
    note=st.none() | texts,
    attachment=st.binary(max_size=10),
    labels=st.dictionaries(texts, texts, max_size=3),
    big_number=int64s,
    discount=st.none() | st.floats(allow_nan=False, allow_infinity=False),
    matrix=st.lists(st.lists(int64s, max_size=3), max_size=3),
    due=st.none() | st.dates(),
    extra=st.none()
    | st.recursive(
        st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False) | texts,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
        max_leaves=5,
    ),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=orders)
def test_any_order_round_trips_through_protobuf(pool: descriptor_pool.DescriptorPool, order: Order) -> None:
    emitted = orjson.loads(type_codec(Order, "unused").to_proto(codec.dumps(order)))
    assert emitted == reference(pool, "Order", emitted)
    request = message(pool, "PlaceOrderRequest")
    json_format.ParseDict({"order": emitted, "dryRun": True}, request)
    native = codec_of("place_order").request_to_native(json_format.MessageToJson(request).encode())
    assert SPEC.methods["place_order"].decode_args(native) == {"order": order, "dry_run": True}


def native_args(method: str, body: object) -> dict[str, Any]:
    """Decode a request as a Connect call is decoded (transports/_connect.py's ConnectCore.dispatch)."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    native = codec_of(method).request_to_native(data)
    try:
        return SPEC.methods[method].decode_args(native)
    except RpcError as exc:
        raise codec_of(method).native_error(exc) from None


LINE = {"sku": "s", "quantity": "1", "unitPrice": {"units": 2}}


@pytest.mark.parametrize(
    ("sent", "units"),
    [
        ("12", 12),
        (12, 12),
        (12.0, 12),
        ("-9223372036854775808", -(2**63)),
        ("1e3", 1000),
        (1e3, 1000),
        ("0.0", 0),
        ("-0", 0),
        ("1.50e1", 15),
        ("9223372036854775807", 2**63 - 1),
    ],
)
def test_int64_as_a_number_or_a_string(sent: object, units: int) -> None:
    args = native_args("total", {"lines": [{**LINE, "unitPrice": {"units": sent}}]})
    assert args["lines"][0].unit_price.units == units


@pytest.mark.parametrize(
    "sent",
    [
        "2024-05-01T12:00:00Z",
        "2024-05-01t12:00:00z",
        "2024-05-01T14:00:00+02:00",
        "2024-05-01T07:30:00-04:30",
        "2024-05-01T12:00:00.000Z",
        "2024-05-01T12:00:00.000000Z",
        "2024-05-01T12:00:00.000000000Z",
    ],
)
def test_timestamps_in_rfc_3339_with_z_or_offsets_and_0_3_6_9_digits(sent: str) -> None:
    args = native_args("shift", {"when": sent, "seconds": 0})
    assert args["when"] == datetime.datetime(2024, 5, 1, 12, tzinfo=datetime.UTC)


def test_nanoseconds_are_cut_to_microseconds() -> None:
    args = native_args("shift", {"when": "2024-05-01T12:00:00.123456789Z"})
    assert args["when"] == datetime.datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=datetime.UTC)


@pytest.mark.parametrize("sent", ["AAEC+vv/", "AAEC-vv_", "AAEC+vv/AA==", "AAEC+vv/AA", "AAEC-vv_AA"])
def test_bytes_in_standard_or_url_safe_base64_with_or_without_padding(sent: str) -> None:
    args = native_args("echo_any", {"value": 1, "blob": sent})
    assert args["blob"] == bytes([0, 1, 2, 250, 251, 255]) + (b"\x00" if len(sent) > 8 else b"")


def test_enums_by_name_or_number_and_original_or_json_names() -> None:
    assert native_args("echo_any", {"value": None, "states": ["ORDER_STATE_NEW", 2, 3]})["states"] == [
        OrderState.NEW,
        OrderState.PAID,
        OrderState.ShippedOut,
    ]
    line = {"sku": "s", "quantity": "1", "unit_price": {"units": 2}}  # the original name
    assert native_args("total", {"lines": [line]})["lines"][0].unit_price == Money(2)


def test_null_is_an_absent_field() -> None:
    args = native_args(
        "total", {"lines": [{"sku": None, "quantity": None, "unitPrice": {"units": 1}}], "currency": None}
    )
    assert args == {"lines": [Line("", 0, Money(1))]}  # plain fields: their zero values; optional: the default
    assert native_args("describe", {"value": None}) == {"value": None}
    assert native_args("echo_any", {"value": None}) == {"value": None, "blob": b"", "states": []}  # a Value null


def test_oneof_members() -> None:
    assert native_args("describe", {"value": {"int64Value": "5"}}) == {"value": 5}
    assert native_args("describe", {"value": {"string_value": "5"}}) == {"value": "5"}
    assert native_args("describe", {}) == {"value": None}
    out = codec_of("describe")
    assert orjson.loads(out.response_to_proto(b'"x"')) == {"result": "x"}
    assert orjson.loads(type_codec(int | str, "W").to_proto(b"7")) == {"result": {"int64Value": "7"}}
    assert orjson.loads(type_codec(int | str, "W").to_proto(b'"7"')) == {"result": {"stringValue": "7"}}


def test_results_wrapped_empty_and_default() -> None:
    assert codec_of("total").response_to_proto(b"0") == b"{}"  # a zero result is left out, as protobuf does
    assert codec_of("total").response_to_proto(b"12") == b'{"result":"12"}'
    assert codec_of("ping").response_to_proto(b"null") == b"{}"
    assert codec_of("echo_any").response_to_proto(b"null") == b'{"result":null}'
    assert codec_of("count").response_to_proto(b'{"a":1}') == b'{"result":{"a":"1"}}'
    nan = type_codec(float, "W").to_proto(codec.dumps_floats(float("nan")))
    assert nan == b'{"result":"NaN"}'


def invalid(method: str, body: object) -> RpcError:
    with pytest.raises(RpcError) as caught:
        native_args(method, body)
    assert caught.value.code is Status.INVALID_ARGUMENT
    return caught.value


@pytest.mark.parametrize(
    ("method", "body", "field", "reason"),
    [
        ("total", {"lines": [{**LINE, "quantity": "x"}]}, "lines[0].quantity", "expected an int64"),
        ("total", {"lines": [{**LINE, "quantity": str(2**63)}]}, "lines[0].quantity", "outside the int64 range"),
        ("total", {"lines": [{**LINE, "quantity": 1.5}]}, "lines[0].quantity", "expected an integer"),
        ("total", {"lines": [{**LINE, "quantity": True}]}, "lines[0].quantity", "expected an int64"),
        ("total", {"lines": [{**LINE, "unit_price": {"units": 1}}]}, "lines[0].unit_price", "field given twice"),
        ("total", {"lines": [{**LINE, "colour": 1}]}, "lines[0].colour", "unexpected field 'colour' in Line"),
        ("total", {"lines": [{"sku": "s"}]}, "lines[0].unitPrice", "missing field"),
        ("total", {"lines": [None]}, "lines[0]", "null is not a value of a repeated field"),
        ("total", {"lines": {}}, "lines", "expected an array"),
        ("shift", {"when": "2024-05-01 12:00:00Z"}, "when", "expected an RFC 3339 timestamp"),
        ("shift", {"when": "2024-05-01T12:00:00"}, "when", "expected an RFC 3339 timestamp"),
        ("shift", {"when": "2024-02-30T12:00:00Z"}, "when", "expected an RFC 3339 timestamp"),
        ("shift", {"when": "0001-01-01T00:00:00+01:00"}, "when", "expected an RFC 3339 timestamp"),
        ("shift", {"when": 1714564800}, "when", "expected an RFC 3339 timestamp string"),
        ("echo_any", {"value": 1, "blob": "AA=A"}, "blob", "expected base64"),
        ("echo_any", {"value": 1, "blob": "A"}, "blob", "expected base64"),
        ("echo_any", {"value": 1, "states": ["PAID"]}, "states[0]", "expected one of ORDER_STATE_NEW"),
        ("echo_any", {"value": 1, "states": [0]}, "states[0]", "OrderState is not set"),
        ("echo_any", {"value": 1, "states": [9]}, "states[0]", "expected one of"),
        ("describe", {"value": {"int64Value": "1", "stringValue": "x"}}, "value", "set only one of"),
        ("describe", {"value": {}}, "value", "has no value"),
        ("find", {}, "orderId", "missing field: give a UUID string"),
        ("find", {"orderId": "nope"}, "orderId", "expected UUID string"),
        ("count", {"words": [], "mode": "sideways"}, "mode", "expected one of 'upper', 'lower'"),
        (
            "place_order",
            {
                "order": {
                    **orjson.loads(type_codec(Order, "u").to_proto(codec.dumps(ORDER))),
                    "lines": [{"sku": "s", "unit_price": {"units": "x"}}],
                }
            },
            "order.lines[0].unit_price.units",
            "expected an int64",
        ),
    ],
)
def test_errors_name_the_field_as_the_client_wrote_it(method: str, body: object, field: str, reason: str) -> None:
    error = invalid(method, body)
    assert error.field_violations and error.field_violations[0][0] == field, error
    assert reason in error.field_violations[0][1]
    assert field in error.message


def test_errors_of_the_native_codec_are_renamed() -> None:
    order = {**orjson.loads(type_codec(Order, "u").to_proto(codec.dumps(ORDER))), "customerName": 1}
    error = invalid("place_order", {"order": order})
    assert error.field_violations[0][0] == "order.customerName"  # from _protojson
    # From the native codec (a Literal's values are only checked there): the path in JSON names.
    renamed = codec_of("place_order").native_error(
        RpcError(
            Status.INVALID_ARGUMENT,
            "invalid argument 'order.lines[0].unit_price': nope",
            [bad_request([("order.lines[0].unit_price", "nope")])],
        )
    )
    assert renamed.field_violations == [("order.lines[0].unitPrice", "nope")]
    assert renamed.message == "invalid argument 'order.lines[0].unitPrice': nope"


@pytest.mark.parametrize(
    ("body", "reason"),
    [(b"{nope", "not valid JSON"), (b"[]", "must be a JSON object"), (b'"x"', "must be a JSON object")],
)
def test_a_body_that_is_no_message(body: bytes, reason: str) -> None:
    error = invalid("total", body)
    assert reason in error.message


def test_json_names_as_protoc_makes_them() -> None:
    assert [json_name(n) for n in ("unit_price", "a", "big_number_2", "x__y", "already_camelCase")] == [
        "unitPrice",
        "a",
        "bigNumber2",
        "xY",
        "alreadyCamelCase",
    ]


def test_plans_are_built_once() -> None:
    assert codec_of("place_order") is codec_of("place_order")
    assert type_codec(Order, "x") is type_codec(Order, "x")


@dataclass
class Cat:
    name: str
    lives: int = 9


@dataclass
class Dog:
    name: str
    good: bool = True


def test_a_oneof_member_is_the_one_the_native_codec_picks() -> None:
    """Dog's fields are a subset of nothing here, but a lenient Dog would take a Cat's JSON (ignoring `lives`)."""
    pets = type_codec(Dog | Cat, "PetResponse")
    assert orjson.loads(pets.to_proto(codec.dumps(Cat("Tom")))) == {"result": {"cat": {"name": "Tom", "lives": "9"}}}
    assert orjson.loads(pets.to_proto(codec.dumps(Dog("Rex")))) == {"result": {"dog": {"name": "Rex", "good": True}}}
    when = type_codec(datetime.date | datetime.datetime | int | bool, "W")
    assert orjson.loads(when.to_proto(codec.dumps(datetime.date(2024, 5, 1)))) == {
        "result": {"stringValue": "2024-05-01"}
    }
    assert orjson.loads(when.to_proto(codec.dumps(True))) == {"result": {"boolValue": True}}
    assert orjson.loads(when.to_proto(codec.dumps(0))) == {"result": {"int64Value": "0"}}  # a oneof member: written


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["", "NaN", "1e3", "-0", "AAEC", "2024-05-01T12:00:00Z", "ORDER_STATE_PAID", "x_y", "--1"])
    | texts,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["lines", "sku", "quantity", "unitPrice", "unit_price", "units", "items", "value", "order"])
            | st.sampled_from(["int64Value", "stringValue", "when", "seconds", "states", "blob", "orderId", "mode"])
            | texts,
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(method=st.sampled_from(sorted(SPEC.methods)), body=json_values)
def test_any_json_is_a_call_or_invalid_argument(method: str, body: object) -> None:
    """Fuzz: whatever JSON a client sends, the request becomes arguments or an INVALID_ARGUMENT, never a crash."""
    try:
        native_args(method, json.dumps(body).encode())
    except RpcError as exc:
        assert exc.code is Status.INVALID_ARGUMENT, exc
