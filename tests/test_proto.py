"""`kubrpc proto` and kubrpc.proto.render(): the emitted proto3 schema compiles with protoc and maps every type."""

from __future__ import annotations

import datetime
import enum
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NewType, Protocol

import grpc_tools
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor
from services import Arith, ArithImpl, Control

import kubrpc
from kubrpc import proto
from kubrpc.cli import main
from kubrpc.codec import AwareDatetime

WELL_KNOWN = str(Path(grpc_tools.__file__).parent / "_proto")
KUBRPC = [str(Path(sys.executable).parent / "kubrpc")]

Sku = NewType("Sku", str)


class OrderState(enum.Enum):
    """Where an order is."""

    NEW = "new"
    paid = "paid"
    ShippedOut = 3


@dataclass
class Money:
    units: int
    currency: str = "EUR"


@dataclass
class Node:
    """A tree: recursive."""

    name: str
    children: list[Node] = field(default_factory=list)
    parent: Node | None = None


@dataclass
class Cat:
    name: str
    lives: int


@dataclass
class Dog:
    name: str
    good: bool


@dataclass
class Order:
    """Every row of docs/proto.md's table."""

    id: uuid.UUID
    state: OrderState
    created: datetime.datetime
    due: datetime.date
    total: Money
    lines: list[Money]
    tags: set[str]
    history: tuple[float, ...]
    labels: dict[str, str]
    grid: list[list[int]]
    groups: dict[str, list[Money]]
    deep: dict[str, dict[str, int]]
    note: str | None
    maybe_lines: list[int] | None
    pet: Cat | Dog
    maybe_pet: Cat | Dog | None
    extra: Any
    kind: Literal["a", "b"]
    level: Literal[1, 2, 3]
    raw: bytes
    tree: Node
    when: AwareDatetime
    sku: Sku
    code: int | str
    flag: bool = False
    count: int = 0
    frozen: frozenset[OrderState] = frozenset()
    computed: int = field(default=0, init=False)


@kubrpc.interface(name="shop.v1.Orders")
class Orders(Protocol):
    """Orders of the shop."""

    async def create(self, order: Order, *, dry_run: bool = False) -> Order:
        """Create an order."""
        ...

    async def count(self, state: OrderState | None = None, limit: int = 10) -> int: ...

    async def states(self) -> list[OrderState]: ...

    async def delete(self, id: uuid.UUID) -> None: ...

    async def pets(self, names: list[str]) -> dict[str, Cat | Dog]: ...

    async def anything(self, value: Any, values: list[Any], maybe: Any | None) -> Any: ...

    async def maybe(self, id: uuid.UUID) -> Order | None: ...

    @kubrpc.method(name="get_total")
    async def total(self, ids: list[uuid.UUID]) -> float | None: ...


def compile_proto(tmp_path: Path, files: dict[str, str]) -> descriptor_pool.DescriptorPool:
    """Run protoc (from grpcio-tools) on the files; a pool of what it compiled (the test fails if it cannot)."""
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    out = tmp_path / "descriptors.pb"
    result = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp_path}", f"-I{WELL_KNOWN}", "--include_imports"]
        + [f"--descriptor_set_out={out}", f"--python_out={tmp_path}", *files],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, f"protoc refused the schema:\n{result.stderr}\n{''.join(files.values())}"
    assert not result.stderr, result.stderr  # no warnings either (e.g. an unused import)
    descriptors = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in descriptors.file:
        pool.Add(file)
    return pool


def fields(message: Descriptor) -> dict[str, tuple[int, str, str]]:
    """name -> (number, type, label) where type is a scalar's name or a message's or enum's full name."""
    out = {}
    for f in message.fields:
        if f.message_type is not None:
            kind = f.message_type.full_name
            if f.message_type.GetOptions().map_entry:
                value = f.message_type.fields_by_name["value"]
                kind = f"map<{value.message_type.full_name if value.message_type else _scalar(value)}>"
        elif f.enum_type is not None:
            kind = f.enum_type.full_name
        else:
            kind = _scalar(f)
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            label = "map"
        elif f.is_repeated:
            label = "repeated"
        elif f.containing_oneof is not None:
            label = "optional" if f.containing_oneof.name.startswith("_") else f"oneof {f.containing_oneof.name}"
        else:
            label = ""
        out[f.name] = (f.number, kind, label)
    return out


def _scalar(f: FieldDescriptor) -> str:
    names = {v: k.removeprefix("TYPE_").lower() for k, v in vars(FieldDescriptor).items() if k.startswith("TYPE_")}
    return names[f.type]


def test_services_compile(tmp_path: Path) -> None:
    pool = compile_proto(tmp_path, {"services.proto": proto.render(Arith, Control)})
    assert fields(pool.FindMessageTypeByName("AddRequest")) == {"a": (1, "int64", ""), "b": (2, "int64", "")}
    assert fields(pool.FindMessageTypeByName("AddResponse")) == {"result": (1, "int64", "")}
    assert fields(pool.FindMessageTypeByName("DivResponse")) == {"result": (1, "double", "")}
    control = pool.FindServiceByName("Control")
    assert [m.name for m in control.methods] == ["sleep", "fail", "crash", "whoami", "cancelled_inside"]
    fail = control.methods_by_name["fail"]
    assert (fail.input_type.name, fail.output_type.full_name) == ("FailRequest", "google.protobuf.Empty")
    assert pool.FindServiceByName("Arith").methods_by_name["add"].output_type.name == "AddResponse"


def test_every_row_of_the_table(tmp_path: Path) -> None:
    text = proto.render(Orders)
    pool = compile_proto(tmp_path, {"shop.v1.proto": text})
    service = pool.FindServiceByName("shop.v1.Orders")
    assert service.file.package == "shop.v1"
    methods = {m.name: (m.input_type.name, m.output_type.full_name) for m in service.methods}
    assert methods == {
        "create": ("CreateRequest", "shop.v1.Order"),  # a dataclass result is its own message
        "count": ("CountRequest", "shop.v1.CountResponse"),
        "states": ("StatesRequest", "shop.v1.StatesResponse"),
        "delete": ("DeleteRequest", "google.protobuf.Empty"),
        "pets": ("PetsRequest", "shop.v1.PetsResponse"),
        "anything": ("AnythingRequest", "shop.v1.AnythingResponse"),
        "maybe": ("MaybeRequest", "shop.v1.MaybeResponse"),
        "get_total": ("GetTotalRequest", "shop.v1.GetTotalResponse"),  # the wire name
    }
    order = fields(pool.FindMessageTypeByName("shop.v1.Order"))
    assert order == {
        "id": (1, "string", ""),
        "state": (2, "shop.v1.OrderState", ""),
        "created": (3, "google.protobuf.Timestamp", ""),
        "due": (4, "string", ""),
        "total": (5, "shop.v1.Money", ""),
        "lines": (6, "shop.v1.Money", "repeated"),
        "tags": (7, "string", "repeated"),
        "history": (8, "double", "repeated"),
        "labels": (9, "map<string>", "map"),
        "grid": (10, "shop.v1.Int64List", "repeated"),
        "groups": (11, "map<shop.v1.MoneyList>", "map"),
        "deep": (12, "map<shop.v1.Int64Map>", "map"),
        "note": (13, "string", "optional"),
        "maybe_lines": (14, "shop.v1.Int64List", "optional"),
        "pet": (15, "shop.v1.CatOrDog", ""),
        "maybe_pet": (16, "shop.v1.CatOrDog", "optional"),
        "extra": (17, "google.protobuf.Value", ""),
        "kind": (18, "string", ""),
        "level": (19, "int64", ""),
        "raw": (20, "bytes", ""),
        "tree": (21, "shop.v1.Node", ""),
        "when": (22, "google.protobuf.Timestamp", ""),
        "sku": (23, "string", ""),
        "code": (24, "shop.v1.Int64OrString", ""),
        "flag": (25, "bool", "optional"),  # a default: absent is not false
        "count": (26, "int64", "optional"),
        "frozen": (27, "shop.v1.OrderState", "repeated"),
    }  # `computed` (init=False) is not on the wire
    assert fields(pool.FindMessageTypeByName("shop.v1.Node")) == {
        "name": (1, "string", ""),
        "children": (2, "shop.v1.Node", "repeated"),
        "parent": (3, "shop.v1.Node", "optional"),
    }
    assert fields(pool.FindMessageTypeByName("shop.v1.CatOrDog")) == {
        "cat": (1, "shop.v1.Cat", "oneof value"),
        "dog": (2, "shop.v1.Dog", "oneof value"),
    }
    assert fields(pool.FindMessageTypeByName("shop.v1.Int64OrString")) == {
        "int64_value": (1, "int64", "oneof value"),
        "string_value": (2, "string", "oneof value"),
    }
    assert fields(pool.FindMessageTypeByName("shop.v1.Int64List")) == {"items": (1, "int64", "repeated")}
    assert fields(pool.FindMessageTypeByName("shop.v1.Int64Map")) == {"items": (1, "map<int64>", "map")}
    state = pool.FindEnumTypeByName("shop.v1.OrderState")
    assert [(v.name, v.number) for v in state.values] == [
        ("ORDER_STATE_UNSPECIFIED", 0),
        ("ORDER_STATE_NEW", 1),
        ("ORDER_STATE_PAID", 2),
        ("ORDER_STATE_SHIPPED_OUT", 3),
    ]
    assert fields(pool.FindMessageTypeByName("shop.v1.CreateRequest")) == {
        "order": (1, "shop.v1.Order", ""),
        "dry_run": (2, "bool", "optional"),
    }
    assert fields(pool.FindMessageTypeByName("shop.v1.AnythingRequest")) == {
        "value": (1, "google.protobuf.Value", ""),
        "values": (2, "google.protobuf.Value", "repeated"),
        "maybe": (3, "google.protobuf.Value", ""),  # a Value holds null itself
    }
    assert fields(pool.FindMessageTypeByName("shop.v1.CountRequest")) == {
        "state": (1, "shop.v1.OrderState", "optional"),
        "limit": (2, "int64", "optional"),
    }
    response = {
        name: fields(pool.FindMessageTypeByName(f"shop.v1.{name}Response"))["result"]
        for name in ("Count", "States", "Pets", "Anything", "Maybe", "GetTotal")
    }
    assert response == {
        "Count": (1, "int64", ""),
        "States": (1, "shop.v1.OrderState", "repeated"),
        "Pets": (1, "map<shop.v1.CatOrDog>", "map"),
        "Anything": (1, "google.protobuf.Value", ""),
        "Maybe": (1, "shop.v1.Order", "optional"),
        "GetTotal": (1, "double", "optional"),
    }
    # Docstrings become comments.
    assert "// Orders of the shop.\nservice Orders {" in text
    assert "  // Create an order.\n  rpc create(" in text
    assert "// Where an order is.\nenum OrderState {" in text


@kubrpc.interface(name="shop.v1.Live")
class Live(Protocol):
    """Every kind of stream (and a unary call beside them)."""

    def ticks(self, n: int, *, every: float = 1.0) -> AsyncIterator[int]:
        """A stream of results: `returns (stream TicksResponse)`."""
        ...

    def orders(self, state: OrderState) -> AsyncIterator[Order]: ...

    async def total(self, currency: str, amounts: AsyncIterable[Money]) -> Money: ...

    async def count(self, names: AsyncIterable[list[str]]) -> int: ...

    async def consume(self, values: AsyncIterable[int | None]) -> None: ...

    def chat(self, room: str, words: AsyncIterable[str], *, loud: bool = False) -> AsyncIterator[str]: ...

    def echo(self, orders: AsyncIterable[Order]) -> AsyncIterator[Order]: ...

    async def add(self, a: int, b: int) -> int: ...


def kinds(service: ServiceDescriptor) -> dict[str, tuple[bool, bool]]:
    """method name -> (client_streaming, server_streaming), as the compiled descriptor says."""
    described = descriptor_pb2.ServiceDescriptorProto()
    service.CopyToProto(described)
    return {m.name: (m.client_streaming, m.server_streaming) for m in described.method}


def test_stream_methods_compile_with_their_kinds(tmp_path: Path) -> None:
    text = proto.render(Live)
    pool = compile_proto(tmp_path, {"shop.v1.proto": text})
    service = pool.FindServiceByName("shop.v1.Live")
    assert kinds(service) == {
        "ticks": (False, True),
        "orders": (False, True),
        "total": (True, False),
        "count": (True, False),
        "consume": (True, False),
        "chat": (True, True),
        "echo": (True, True),
        "add": (False, False),
    }
    assert "  rpc ticks(TicksRequest) returns (stream TicksResponse);\n" in text
    assert "  rpc total(stream TotalRequest) returns (Money);\n" in text
    assert "  rpc chat(stream ChatRequest) returns (stream ChatResponse);\n" in text
    methods = {m.name: (m.input_type.name, m.output_type.full_name) for m in service.methods}
    assert methods == {
        "ticks": ("TicksRequest", "shop.v1.TicksResponse"),
        "orders": ("OrdersRequest", "shop.v1.Order"),  # a dataclass message is its own message, as unary
        "total": ("TotalRequest", "shop.v1.Money"),
        "count": ("CountRequest", "shop.v1.CountResponse"),
        "consume": ("ConsumeRequest", "google.protobuf.Empty"),
        "chat": ("ChatRequest", "shop.v1.ChatResponse"),
        "echo": ("EchoRequest", "shop.v1.Order"),
        "add": ("AddRequest", "shop.v1.AddResponse"),
    }

    def message(name: str) -> dict[str, tuple[int, str, str]]:
        return fields(pool.FindMessageTypeByName(f"shop.v1.{name}"))

    # A stream of results: the request as for a unary call, each message as a unary result.
    assert message("TicksRequest") == {"n": (1, "int64", ""), "every": (2, "double", "optional")}
    assert message("TicksResponse") == {"result": (1, "int64", "")}
    # A stream of requests: the ordinary parameters first, then the stream parameter holding one item.
    assert message("TotalRequest") == {"currency": (1, "string", ""), "amounts": (2, "shop.v1.Money", "")}
    assert message("CountRequest") == {"names": (1, "string", "repeated")}  # one item: a list
    assert message("ConsumeRequest") == {"values": (1, "int64", "optional")}
    assert message("ChatRequest") == {
        "room": (1, "string", ""),
        "loud": (2, "bool", "optional"),
        "words": (3, "string", ""),  # after every ordinary parameter, keyword-only ones included
    }
    assert message("ChatResponse") == {"result": (1, "string", "")}
    assert message("EchoRequest") == {"orders": (1, "shop.v1.Order", "")}
    assert "  // A stream of results: `returns (stream TicksResponse)`.\n  rpc ticks(" in text


def test_stream_messages_that_have_no_protobuf_type_are_named() -> None:
    async def call(self: object, x: int, items: Any) -> None: ...

    call.__annotations__ = {"x": int, "items": AsyncIterable[tuple[int, str]], "return": None}
    bad = kubrpc.interface(name="Bad")(type("Bad", (Protocol,), {"call": call}))
    with pytest.raises(TypeError, match=r"^Bad/call: messages of 'items': tuple\[int, str\] has no protobuf type"):
        proto.render(bad)

    def results(self: object) -> Any: ...

    results.__annotations__ = {"return": AsyncIterator[list[int | None]]}
    with pytest.raises(TypeError, match=r"^Worse/results: result: list\[int \| None\]: a repeated field or map value"):
        proto.render(kubrpc.interface(name="Worse")(type("Worse", (Protocol,), {"results": results})))


def test_a_server_with_several_packages(tmp_path: Path) -> None:
    server = kubrpc.Server()
    server.register(Arith, ArithImpl())
    server.register(Echo, EchoImpl())
    with pytest.raises(ValueError, match=r"^the services are in 2 protobuf packages \(\(no package\), shop\.v1\)"):
        proto.render(server)
    files = proto.render_files(server)
    assert sorted(files) == ["services.proto", "shop.v1.proto"]
    pool = compile_proto(tmp_path, files)
    assert pool.FindServiceByName("Arith").file.package == ""
    assert pool.FindServiceByName("shop.v1.Echo").file.package == "shop.v1"


@kubrpc.interface(name="shop.v1.Echo")
class Echo(Protocol):
    async def echo(self, order: Order) -> Order: ...


class EchoImpl:
    async def echo(self, order: Order) -> Order:
        return order


def test_cli_prints_the_schema(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["proto", f"{__name__}:Orders"]) == 0
    assert capsys.readouterr().out == proto.render(Orders)
    assert main(["proto", f"{__name__}:Orders", "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'out' / 'shop.v1.proto'}\n"
    assert (tmp_path / "out" / "shop.v1.proto").read_text() == proto.render(Orders)
    (tmp_path / "file").write_text("")
    assert main(["proto", f"{__name__}:Orders", "--out", str(tmp_path / "file")]) == 1
    assert capsys.readouterr().err == f"kubrpc: cannot write {tmp_path / 'file' / 'shop.v1.proto'}: File exists\n"


def test_cli_errors_are_one_line() -> None:
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": str(here)}
    result = subprocess.run(
        [*KUBRPC, "proto", "services:Store"], capture_output=True, text=True, check=False, cwd=here, env=env
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        "kubrpc: cannot render services:Store as protobuf: test.Store/find: result: "
        "dict[str, services.Item | None]: a repeated field or map value cannot be null in protobuf; "
        "drop the None, or wrap the item in a dataclass with an optional field\n"
    )


def test_cli_refuses_what_is_not_a_service(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["proto", f"{__name__}:compile_proto"]) == 1
    assert capsys.readouterr().err == (
        f"kubrpc: {__name__}:compile_proto is not a kubrpc.Server or a service Protocol (its type is function)\n"
    )
    assert main(["proto", f"{__name__}:Money"]) == 1
    assert capsys.readouterr().err == f"kubrpc: cannot render {__name__}:Money as protobuf: Money declares no methods\n"


def _protocol(annotation: object, *, name: str = "Bad", method: str = "call") -> type:
    """A one-method Protocol `name` whose method takes one parameter `x` of the annotation."""

    async def call(self: object, x: Any) -> None: ...

    call.__annotations__ = {"x": annotation, "return": None}
    call.__name__ = method
    return kubrpc.interface(name=name)(type(name.rpartition(".")[2], (Protocol,), {method: call}))


@dataclass
class Pair:
    both: tuple[int, str]


class Weird(enum.Enum):
    unspecified = 0


@dataclass
class Listed:
    items: list[int | None]


@pytest.mark.parametrize(
    ("annotation", "message"),
    [
        (tuple[int, str], "tuple[int, str] has no protobuf type (a tuple of fixed length): use tuple[T, ...]"),
        (Pair, "Pair.both: tuple[int, str] has no protobuf type (a tuple of fixed length)"),
        (list, "bare list has no protobuf type: give its items' type, e.g. list[int]"),
        (dict, "bare dict has no protobuf type: give its items' type, e.g. dict[str, int]"),
        (tuple, "bare tuple has no protobuf type"),
        (set[int | None], "set[int | None]: a repeated field or map value cannot be null in protobuf"),
        (Listed, "Listed.items: list[int | None]: a repeated field or map value cannot be null in protobuf"),
        (dict[str, int | None], "dict[str, int | None]: a repeated field or map value cannot be null"),
        (Literal["a", 1], "Literal['a', 1] has no protobuf type: its values must all be str, all int or all bool"),
        (Weird, "Weird.unspecified: cannot be the protobuf enum value WEIRD_UNSPECIFIED"),
    ],
)
def test_unmappable_types_are_named(annotation: object, message: str) -> None:
    try:
        protocol = _protocol(annotation)
    except TypeError as exc:
        raise AssertionError(f"kubrpc serves {annotation!r}, but not here: {exc}") from None
    with pytest.raises(TypeError) as caught:
        proto.render(protocol)
    assert str(caught.value).startswith(f"Bad/call: parameter 'x': {message}"), str(caught.value)


def test_unservable_types_are_named_by_kubrpc() -> None:
    with pytest.raises(TypeError, match=r"parameter 'x': unsupported annotation dict\[int, str\]"):
        proto.render(_protocol(dict[int, str]))


def test_name_clashes_are_refused() -> None:
    other = dataclass(type("Money", (), {"__annotations__": {"cents": int}, "__module__": "elsewhere"}))
    with pytest.raises(
        TypeError,
        match=r"^B/other: parameter 'x': two definitions would be named 'Money' in protobuf package '\(none\)': "
        r"test_proto.Money and elsewhere.Money; rename one$",
    ):
        proto.render(_protocol(Money, name="A"), _protocol(other, name="B", method="other"))
    clash = dataclass(type("CallRequest", (), {"__annotations__": {"n": int}, "__module__": "elsewhere"}))
    with pytest.raises(TypeError, match=r"'CallRequest' .*: the request of A/call and elsewhere.CallRequest; rename"):
        proto.render(_protocol(clash, name="A"))
    with pytest.raises(TypeError, match=r"would be named 'CallRequest'.*: the request of A/call and the request of B/"):
        proto.render(_protocol(int, name="A"), _protocol(int, name="B"))  # one package: rename a method


def test_names_that_are_not_protobuf_names_are_refused() -> None:
    with pytest.raises(TypeError, match=r"^service name 'shop-v1.Orders' is not a protobuf name"):
        proto.render(_protocol(int, name="shop-v1.Orders"))

    async def call(self: object) -> None: ...

    bad = kubrpc.interface(name="x")(type("X", (Protocol,), {"call": kubrpc.method(name="get-item")(call)}))
    with pytest.raises(TypeError, match=r"^x/get-item: method name 'get-item' is not a protobuf name"):
        proto.render(bad)


def test_nothing_to_render() -> None:
    with pytest.raises(ValueError, match="nothing to render"):
        proto.render(kubrpc.Server())
