"""proto3 JSON <-> kubrpc's native JSON, for the messages `kubrpc proto` renders (the Connect protocol's JSON codec).

kubrpc's handlers see native JSON (kubrpc.codec); a Connect client sends and expects the proto3 JSON mapping of
the schema kubrpc.proto renders. This module converts between the two as bytes -> bytes transforms, so the native
codec and its validation stay the only way into a handler. A plan is built once per type (and cached, as codec's
are); converting is then a walk over the parsed JSON with no introspection.

Requests (proto3 JSON in) accept everything a proto3 JSON parser must: lowerCamelCase and original field names,
int64 as a number or a string, enums by name or number, RFC 3339 timestamps with Z or an offset and up to 9
fractional digits, bytes in standard or URL-safe base64 with or without padding, `null` for an absent field.
Unknown fields are refused, as native arguments are. Responses (proto3 JSON out) are what a proto3 JSON
emitter writes: lowerCamelCase names, int64 as strings, enums by name, Timestamps in UTC with Z, standard padded
base64, and fields that hold their default value left out (proto3 `optional` fields are written whenever set).
The rules are documented in docs/proto.md.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import decimal
import enum
import math
import re
import types
import typing
import uuid
from collections.abc import Callable
from typing import Any

import orjson

from .codec import MAX_DEPTH, DecodeError, _wire_value as wire_value, decoder, unwrap
from .errors import RpcError, bad_request
from .interface import MethodSpec
from .proto import _SCALARS, _camel, _pascal, _upper_snake
from .status import Status

__all__ = (
    "ClientStreamCodec",
    "MethodCodec",
    "ProtoJsonError",
    "TypeCodec",
    "client_stream_codec",
    "json_name",
    "method_codec",
    "type_codec",
)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class ProtoJsonError(ValueError):
    """A proto3 JSON value does not match its field; `path` names the field as the client wrote it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


def json_name(name: str) -> str:
    """The proto3 JSON name of a field, as protoc computes it: `unit_price` -> `unitPrice`."""
    out, upper = [], False
    for c in name:
        if c == "_":
            upper = True
        elif upper:
            out.append(c.upper())
            upper = False
        else:
            out.append(c)
    return "".join(out)


def _sub(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _fail(path: str, expected: str, value: object) -> typing.NoReturn:
    raise ProtoJsonError(path, f"expected {expected}, got {_describe(value)}")


_MISSING: Any = object()
"""An absent plain field whose zero value is not a valid value of its Python type: a missing field."""


class _Conv:
    """One proto type: native JSON value -> proto3 JSON value (emit) and back (parse)."""

    proto = ""  # the proto type, as kubrpc.proto names it
    zero: Any = _MISSING  # the native value of an absent plain field
    message = False  # a message type: it has presence, and an absent field is unset, not zero
    null = False  # `null` is a value of the type (google.protobuf.Value), not "absent"
    hint = ""  # what a required field of this type must hold, for "missing field" errors

    def emit(self, value: Any) -> Any:
        """A native JSON value as proto3 JSON."""
        return value

    def parse(self, value: Any, path: str) -> Any:
        """A proto3 JSON value as native JSON; ProtoJsonError if it does not fit."""
        return value

    def is_default(self, value: Any) -> bool:
        """Would a proto3 emitter leave this (native) value of a plain field out?"""
        return value == self.zero and type(value) is type(self.zero)


class _Int64(_Conv):
    proto, zero = "int64", 0
    _decimal = re.compile(r"-?[0-9]{1,19}\Z")
    _number = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?\Z")

    def emit(self, value: Any) -> Any:
        return str(value) if type(value) is int else value

    def parse(self, value: Any, path: str) -> Any:
        kind = type(value)
        if kind is int:
            number = value
        elif kind is float:
            if not value.is_integer():
                raise ProtoJsonError(path, f"expected an integer, got {value!r}")
            number = int(value)
        elif kind is str:
            if self._decimal.match(value):
                number = int(value)
            elif self._number.match(value):
                exact = decimal.Decimal(value)
                if exact.copy_abs() > INT64_MAX + 1:  # (copy_abs: exact, whatever the exponent)
                    number = INT64_MAX + 1  # out of range: said below
                elif exact.is_zero():
                    number = 0
                elif exact.adjusted() < 0 or exact != exact.to_integral_value():
                    raise ProtoJsonError(path, f"expected an integer, got {_short(value)}")
                else:
                    number = int(exact)
            else:
                raise ProtoJsonError(path, f"expected an int64 (a number or a decimal string), got {_short(value)}")
        else:
            _fail(path, "an int64 (a number or a decimal string)", value)
        if not INT64_MIN <= number <= INT64_MAX:
            raise ProtoJsonError(path, f"integer {_short(value)} is outside the int64 range (-2**63 to 2**63-1)")
        return number


_NON_FINITE = frozenset({"NaN", "Infinity", "-Infinity"})


class _Double(_Conv):
    proto, zero = "double", 0.0

    def is_default(self, value: Any) -> bool:
        return type(value) in (int, float) and value == 0 and math.copysign(1.0, value) > 0

    def parse(self, value: Any, path: str) -> Any:
        kind = type(value)
        if kind is float or kind is int:
            return value
        if kind is str:
            if value in _NON_FINITE:
                return value
            if _Int64._number.match(value):
                number = float(value)
                if math.isfinite(number):
                    return number
                raise ProtoJsonError(path, f"number {_short(value)} is out of the range of a double")
            raise ProtoJsonError(path, f'expected a number (or "NaN", "Infinity", "-Infinity"), got {_short(value)}')
        _fail(path, "a number", value)


class _String(_Conv):
    proto, zero = "string", ""

    def __init__(self, zero: Any = "", hint: str = "") -> None:
        self.zero = zero
        self.hint = hint

    def parse(self, value: Any, path: str) -> Any:
        if type(value) is str:
            return value
        _fail(path, "a string", value)


class _Bool(_Conv):
    proto, zero = "bool", False

    def parse(self, value: Any, path: str) -> Any:
        if type(value) is bool:
            return value
        _fail(path, "true or false", value)


_URLSAFE = str.maketrans("-_", "+/")


class _Bytes(_Conv):
    proto, zero = "bytes", ""

    def parse(self, value: Any, path: str) -> Any:
        if type(value) is not str:
            _fail(path, "a base64 string", value)
        text = value.translate(_URLSAFE).rstrip("=")
        text += "=" * (-len(text) % 4)
        try:
            base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ProtoJsonError(path, f"expected base64 (standard or URL-safe), got {_short(value)}") from None
        return text


_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?"
    r"(?:[Zz]|([+-])([0-9]{2}):([0-9]{2}))\Z"
)
_UTC = datetime.UTC


class _Timestamp(_Conv):
    proto, message = "google.protobuf.Timestamp", True

    def emit(self, value: Any) -> Any:
        when = datetime.datetime.fromisoformat(value)
        when = when.replace(tzinfo=_UTC) if when.tzinfo is None else when.astimezone(_UTC)
        micro = when.microsecond
        fraction = "" if not micro else f".{micro // 1000:03d}" if not micro % 1000 else f".{micro:06d}"
        return (
            f"{when.year:04d}-{when.month:02d}-{when.day:02d}T{when.hour:02d}:{when.minute:02d}:{when.second:02d}"
            f"{fraction}Z"
        )

    def parse(self, value: Any, path: str) -> Any:
        if type(value) is not str:
            _fail(path, 'an RFC 3339 timestamp string ("2024-05-01T12:00:00Z")', value)
        match = _RFC3339.match(value)
        try:
            if match is None:
                raise ValueError
            year, month, day, hour, minute, second, fraction, sign, oh, om = match.groups()
            offset = datetime.timedelta(hours=int(oh), minutes=int(om)) if sign else datetime.timedelta()
            if offset >= datetime.timedelta(days=1):
                raise ValueError
            when = datetime.datetime(
                int(year),
                int(month),
                int(day),
                int(hour),
                int(minute),
                int(second),
                int((fraction or "0").ljust(6, "0")[:6]),  # Python keeps microseconds: nanoseconds are cut
                tzinfo=datetime.timezone(-offset if sign == "-" else offset),
            ).astimezone(_UTC)
        except (ValueError, OverflowError):
            raise ProtoJsonError(
                path, f'expected an RFC 3339 timestamp ("2024-05-01T12:00:00Z", or with an offset), got {_short(value)}'
            ) from None
        return when.isoformat()


class _Value(_Conv):
    """google.protobuf.Value: any JSON value, null included, as it is."""

    proto, zero, null = "google.protobuf.Value", None, True

    def is_default(self, value: Any) -> bool:
        return False


class _Enum(_Conv):
    def __init__(self, cls: type[enum.Enum]) -> None:
        self.proto = cls.__name__
        prefix = _upper_snake(cls.__name__)
        self.unspecified = f"{prefix}_UNSPECIFIED"
        self.names: dict[tuple[type, object], str] = {}  # native JSON value -> proto name
        self.values: dict[object, Any] = {}  # proto name and number -> native JSON value
        for number, member in enumerate(cls, 1):
            kind, native = wire_value(member)
            name = f"{prefix}_{_upper_snake(member.name)}"
            self.names[(kind, native)] = name
            if kind is float:
                self.names.setdefault((int, native), name)  # (orjson writes 1.0 as 1.0, but just in case)
            self.values[name] = native
            self.values[number] = native
        self.expected = "one of " + ", ".join(n for n in self.values if type(n) is str)
        self.hint = self.expected

    def emit(self, value: Any) -> Any:
        try:
            return self.names[(type(value), value)]
        except (KeyError, TypeError):
            raise TypeError(f"{_short(value)} is no member of enum {self.proto}") from None

    def parse(self, value: Any, path: str) -> Any:
        if type(value) is str or type(value) is int:
            try:
                return self.values[value]
            except KeyError:
                pass
            if value in (0, self.unspecified):
                raise ProtoJsonError(path, f"{self.proto} is not set ({_short(value)}): give {self.expected}")
            raise ProtoJsonError(path, f"expected {self.expected} (or its number), got {_short(value)}")
        _fail(path, f"an enum name ({self.expected}) or number", value)

    def is_default(self, value: Any) -> bool:
        return False


class _List(_Conv):
    def __init__(self, item: _Conv) -> None:
        self.item = item
        self.proto = item.proto
        self.zero = []

    def emit(self, value: Any) -> Any:
        emit = self.item.emit
        return [emit(v) for v in value]

    def parse(self, value: Any, path: str) -> Any:
        if type(value) is not list:
            _fail(path, "an array", value)
        parse = self.item.parse
        out = []
        for i, v in enumerate(value):
            if v is None:
                raise ProtoJsonError(f"{path}[{i}]", "null is not a value of a repeated field")
            out.append(parse(v, f"{path}[{i}]"))
        return out

    def is_default(self, value: Any) -> bool:
        return not value


class _Map(_Conv):
    def __init__(self, item: _Conv) -> None:
        self.item = item
        self.proto = f"map<string, {item.proto}>"
        self.zero = {}

    def emit(self, value: Any) -> Any:
        emit = self.item.emit
        return {k: emit(v) for k, v in value.items()}

    def parse(self, value: Any, path: str) -> Any:
        if type(value) is not dict:
            _fail(path, "an object (a map)", value)
        parse = self.item.parse
        out = {}
        for k, v in value.items():
            if v is None and not self.item.null:
                raise ProtoJsonError(_sub(path, k), "null is not a value of a map")
            out[k] = parse(v, _sub(path, k))
        return out

    def is_default(self, value: Any) -> bool:
        return not value


class _Wrapper(_Conv):
    """A list or a map inside a list, map or optional field: the message `Int64List { repeated int64 items = 1; }`."""

    message = True

    def __init__(self, inner: _List | _Map) -> None:
        self.inner = inner
        kind = "List" if isinstance(inner, _List) else "Map"
        self.proto = f"{_camel(inner.item.proto)}{kind}"

    def emit(self, value: Any) -> Any:
        return {"items": self.inner.emit(value)} if value else {}

    def parse(self, value: Any, path: str) -> Any:
        if type(value) is not dict:
            _fail(path, f"an object ({self.proto}, with its field items)", value)
        if len(value) > 1 or (value and "items" not in value):
            unknown = sorted(k for k in value if k != "items")
            raise ProtoJsonError(path, f"unexpected field {_short(unknown[0])} in {self.proto} (it has only items)")
        items = value.get("items")
        return self.inner.zero.copy() if items is None else self.inner.parse(items, _sub(path, "items"))


@dataclasses.dataclass(eq=False)
class _Field:
    name: str  # the native (Python) name, and the proto field name
    json: str  # its lowerCamelCase JSON name
    conv: _Conv
    optional: bool  # proto3 `optional`: written whenever set (not None), even when zero
    absent: Any  # the native value of an absent field: _MISSING, _OMIT (the default applies), or a value


_OMIT: Any = object()


def _absent(conv: _Conv, label: str, has_default: bool, nullable: bool) -> Any:
    if label in ("repeated", "map"):
        return conv.zero  # no presence: absent is empty
    if has_default:
        return _OMIT
    if nullable or conv.null:
        return None
    return conv.zero


class _Message(_Conv):
    message = True

    def __init__(self, proto: str, what: str) -> None:
        self.proto = proto
        self.what = what  # for messages: "Item", "the arguments of shop.Orders/get"
        self.fields: list[_Field] = []
        self.by_key: dict[str, _Field] = {}

    def add(self, f: _Field) -> None:
        self.fields.append(f)
        self.by_key[f.json] = f
        self.by_key[f.name] = f

    def emit(self, value: Any) -> Any:
        out = {}
        for f in self.fields:
            if f.name not in value:
                continue
            v = value[f.name]
            if v is None and not f.conv.null:
                continue
            if not f.optional and f.conv.is_default(v):
                continue
            out[f.json] = f.conv.emit(v)
        return out

    def parse(self, value: Any, path: str) -> Any:
        if type(value) is not dict:
            _fail(path, f"an object ({self.proto})", value)
        out: dict[str, Any] = {}
        given: dict[str, str] = {}
        by_key = self.by_key
        for key, v in value.items():
            f = by_key.get(key)
            if f is None:
                names = ", ".join(f.json for f in self.fields) or "none"
                raise ProtoJsonError(
                    _sub(path, key), f"unexpected field {_short(key)} in {self.proto} (its fields: {names})"
                )
            if f.name in given:
                raise ProtoJsonError(
                    _sub(path, key), f"field given twice, as {given[f.name]!r} and {key!r}: send one of them"
                )
            given[f.name] = key
            if v is None and not f.conv.null:
                continue  # null: the field is absent
            out[f.name] = f.conv.parse(v, _sub(path, key))
        if len(out) < len(self.fields):
            for f in self.fields:
                if f.name in out:
                    continue
                absent = f.absent
                if absent is _OMIT:
                    continue
                if absent is _MISSING:
                    hint = f.conv.hint or f"a {f.conv.proto}"
                    raise ProtoJsonError(_sub(path, given.get(f.name, f.json)), f"missing field: give {hint}")
                out[f.name] = absent.copy() if isinstance(absent, list | dict) else absent
        return out


class _Oneof(_Conv):
    """A union of several types: the message `CatOrDog { oneof value { Cat cat = 1; Dog dog = 2; } }`."""

    message = True

    def __init__(self, union: object, members: list[tuple[object, _Field]]) -> None:
        self.members = members
        self.proto = "Or".join(_camel(f.conv.proto) for _, f in members)
        self.by_key = {k: f for _, f in members for k in (f.name, f.json)}
        # Which member a native value is: what the native codec decodes it to (it picks one member exactly, by
        # JSON type, tag or key set), then the member that value is an instance of. Responses only.
        self.union = union
        self.expected = "one of the fields " + ", ".join(f.json for _, f in members)

    def emit(self, value: Any) -> Any:
        try:
            decoded = decoder(self.union)(value, "")
        except DecodeError:
            raise TypeError(f"{_short(value)} is no value of {self.proto}") from None
        for tp, f in self.members:
            if _is_member(decoded, tp):
                return {f.json: f.conv.emit(value)}
        raise TypeError(f"{_short(value)} is no member of {self.proto}")

    def parse(self, value: Any, path: str) -> Any:
        if type(value) is not dict:
            _fail(path, f"an object ({self.proto}, with {self.expected})", value)
        chosen: tuple[str, _Field] | None = None
        for key, v in value.items():
            f = self.by_key.get(key)
            if f is None:
                raise ProtoJsonError(
                    _sub(path, key), f"unexpected field {_short(key)} in {self.proto}: give {self.expected}"
                )
            if v is None and not f.conv.null:
                continue
            if chosen is not None:
                raise ProtoJsonError(path, f"{self.proto} is a oneof: set only one of {chosen[0]!r} and {key!r}")
            chosen = (key, f)
        if chosen is None:
            raise ProtoJsonError(path, f"{self.proto} has no value: set {self.expected}")
        key, f = chosen
        return f.conv.parse(value[key], _sub(path, key))


def _is_member(value: object, tp: object) -> bool:
    """Is a decoded value (as the native codec returns it) a value of the union member `tp`?"""
    tp = unwrap(tp)
    if tp is typing.Any or tp is object:
        return True
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return any(type(value) is type(v) and value == v for v in typing.get_args(tp))
    if origin is not None:
        return isinstance(value, origin)
    if tp in (int, float, str, bool, bytes, datetime.date, datetime.datetime, uuid.UUID):
        return type(value) is tp  # exactly: a bool is no int, a datetime no date
    return isinstance(tp, type) and isinstance(value, tp)  # an Enum, a dataclass


_SIMPLE: dict[object, Callable[[], _Conv]] = {
    int: _Int64,
    float: _Double,
    str: _String,
    bytes: _Bytes,
    bool: _Bool,
    datetime.datetime: _Timestamp,
    datetime.date: lambda: _String(_MISSING, "a date string (2024-05-01)"),  # "" is no date
    uuid.UUID: lambda: _String(_MISSING, "a UUID string"),
    typing.Any: _Value,
    object: _Value,
}

_cache: dict[object, tuple[str, _Conv]] = {}
_messages: dict[type, _Message] = {}


def _field(tp: object) -> tuple[str, _Conv]:
    """(label, conv) of a field of Python type `tp`, as kubrpc.proto's _File.field() renders it.

    label is "", "optional", "repeated" or "map".
    """
    try:
        return _cache[tp]
    except KeyError:
        pass
    except TypeError:
        return _build(tp)
    out = _cache[tp] = _build(tp)
    return out


def _build(tp: object) -> tuple[str, _Conv]:
    tp = unwrap(tp)
    if tp in _SIMPLE:
        return "", _SIMPLE[tp]()
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        members = [a for a in args if a is not None and a is not type(None)]
        nullable = len(members) < len(args)
        if len(members) == 1:
            label, conv = _field(members[0])
            if isinstance(conv, _Value):
                return "", conv
            if label in ("repeated", "map"):
                return "optional", _Wrapper(typing.cast(_List | _Map, conv))
            return "optional", conv
        fields = []
        for member in members:
            label, conv = _field(member)
            if label in ("repeated", "map"):
                conv = _Wrapper(typing.cast(_List | _Map, conv))
            base = _upper_snake(_camel(conv.proto)).lower()
            name = f"{base}_value" if conv.proto in _SCALARS else base
            fields.append((member, _Field(name, json_name(name), conv, True, _OMIT)))
        return ("optional" if nullable else ""), _Oneof(typing.Union[tuple(members)], fields)  # noqa: UP007
    if origin is typing.Literal:
        values = [a for a in args if a is not None]
        label = "optional" if len(values) < len(args) else ""
        kind = type(values[0])
        if issubclass(kind, enum.Enum):
            return label, _Enum(kind)
        conv = _SIMPLE[kind]()
        wire = [wire_value(v)[1] for v in values]
        if not any(conv.is_default(w) for w in wire):
            conv.zero = _MISSING
            conv.hint = "one of " + ", ".join(repr(w) for w in wire)
        return label, conv
    if origin in (list, set, frozenset) or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
        return "repeated", _List(_item(args[0]))
    if origin is dict:
        return "map", _Map(_item(args[1]))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "", _Enum(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return "", _message(tp)
    raise TypeError(f"{tp!r} has no protobuf type (see `kubrpc proto`)")


def _item(tp: object) -> _Conv:
    label, conv = _field(tp)
    if label == "optional":
        raise TypeError(f"{tp!r}: a repeated field or map value cannot be null in protobuf")
    return _Wrapper(typing.cast(_List | _Map, conv)) if label else conv


def _message(cls: type) -> _Message:
    try:
        return _messages[cls]
    except KeyError:
        pass
    message = _messages[cls] = _Message(cls.__name__, cls.__name__)  # before the fields: it may refer to itself
    try:
        hints = typing.get_type_hints(cls, include_extras=True)
        for f in dataclasses.fields(cls):
            if f.init:
                has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
                message.add(_make_field(f.name, hints[f.name], has_default))
    except BaseException:
        del _messages[cls]
        raise
    return message


def _make_field(name: str, tp: object, has_default: bool) -> _Field:
    label, conv = _field(tp)
    optional = label == "optional" or (has_default and label == "")
    return _Field(name, json_name(name), conv, optional, _absent(conv, label, has_default, label == "optional"))


class _Empty(_Conv):
    proto, message = "google.protobuf.Empty", True

    def emit(self, value: Any) -> Any:
        return {}

    def parse(self, value: Any, path: str) -> Any:
        if type(value) is not dict or value:
            raise ProtoJsonError(path, "expected {} (google.protobuf.Empty)")
        return None


def _result(tp: object, wrapper: str) -> _Conv:
    """The message a result (or a stream item) of type `tp` travels as: a dataclass's own, Empty, or a wrapper."""
    bare = unwrap(tp)
    if bare is None or bare is type(None):
        return _Empty()
    if isinstance(bare, type) and dataclasses.is_dataclass(bare):
        return _message(bare)
    message = _Message(wrapper, wrapper)
    message.add(_make_field("result", tp, False))
    return _Unwrap(message)


class _Unwrap(_Conv):
    """`<Method>Response { T result = 1; }` around a native value that is just the T."""

    message = True

    def __init__(self, message: _Message) -> None:
        self.inner = message
        self.proto = message.proto

    def emit(self, value: Any) -> Any:
        return self.inner.emit({"result": value})

    def parse(self, value: Any, path: str) -> Any:
        out = self.inner.parse(value, path)
        return out.get("result")


def _loads(data: bytes, what: str) -> Any:
    try:
        value = orjson.loads(data) if data else {}
    except orjson.JSONDecodeError as exc:
        raise ProtoJsonError(
            "", f"the body is not valid JSON ({exc}); send the {what} message in proto3 JSON"
        ) from None
    if type(value) is not dict:
        raise ProtoJsonError("", f"the body must be a JSON object: the {what} message in proto3 JSON")
    return value


def _invalid(exc: ProtoJsonError) -> RpcError:
    if not exc.path:
        return RpcError(Status.INVALID_ARGUMENT, exc.reason)
    return RpcError(
        Status.INVALID_ARGUMENT, f"invalid argument {exc.path!r}: {exc.reason}", [bad_request([(exc.path, exc.reason)])]
    )


class TypeCodec:
    """The proto3 JSON of one message type (a stream item): native JSON bytes <-> proto3 JSON bytes."""

    __slots__ = ("conv", "name")

    def __init__(self, conv: _Conv) -> None:
        self.conv = conv
        self.name = conv.proto

    def to_proto(self, native: bytes) -> bytes:
        """Native JSON bytes of a value as its message in proto3 JSON (TypeError if the value does not fit)."""
        return orjson.dumps(self.conv.emit(orjson.loads(native)))

    def to_native(self, data: bytes) -> bytes:
        """A message in proto3 JSON as native JSON bytes; RpcError INVALID_ARGUMENT naming the field if it is bad."""
        try:
            value = self.conv.parse(_loads(data, self.name), "")
        except ProtoJsonError as exc:
            raise _invalid(exc) from None
        except RecursionError:
            raise RpcError(Status.INVALID_ARGUMENT, f"the {self.name} message is nested too deeply") from None
        try:
            return orjson.dumps(value)
        except orjson.JSONEncodeError:  # nested deeper than the encoder writes (in a google.protobuf.Value)
            raise RpcError(
                Status.INVALID_ARGUMENT,
                f"the {self.name} message is nested deeper than {MAX_DEPTH} levels, the most kubrpc can carry",
            ) from None


_types: dict[tuple[object, str], TypeCodec] = {}


def type_codec(tp: object, wrapper: str) -> TypeCodec:
    """The codec of a value of type `tp` travelling as a message: a dataclass's own message, Empty for None,
    else the message `wrapper` (`<Method>Response`) with the value as its field `result`."""
    key = (tp, wrapper)
    try:
        return _types[key]
    except KeyError:
        codec = _types[key] = TypeCodec(_result(tp, wrapper))
        return codec


class MethodCodec:
    """The proto3 JSON of one method's `<Method>Request` and its response message, over native JSON bytes."""

    __slots__ = ("request", "response", "spec")

    def __init__(self, spec: MethodSpec) -> None:
        self.spec = spec
        name = _pascal(spec.name)
        request = _Message(f"{name}Request", f"the arguments of {spec.path}")
        for p in spec.params:
            request.add(_make_field(p.name, p.annotation, not p.required))
        self.request = TypeCodec(request)
        self.response = type_codec(spec.returns, f"{name}Response")

    def request_to_native(self, data: bytes) -> bytes:
        """A `<Method>Request` in proto3 JSON as the native JSON object of named arguments (RpcError if bad)."""
        return self.request.to_native(data)

    def response_to_proto(self, native: bytes) -> bytes:
        """A native JSON result as the response message in proto3 JSON."""
        return self.response.to_proto(native)

    def native_error(self, exc: RpcError) -> RpcError:
        """An INVALID_ARGUMENT from the native codec, with its field paths in proto3 JSON names (`unitPrice`)."""
        if not exc.details:
            return exc
        renamed = {}
        for detail in exc.details:
            debug = detail.get("debug")
            if detail.get("type") != "google.rpc.BadRequest" or not isinstance(debug, dict):
                continue
            for v in debug.get("fieldViolations") or ():
                path = v.get("field") if isinstance(v, dict) else None
                if isinstance(path, str):
                    renamed[path] = _json_path(path)
        if all(k == v for k, v in renamed.items()):
            return exc
        message = exc.message
        for old, new in sorted(renamed.items(), key=lambda kv: -len(kv[0])):
            message = message.replace(repr(old), repr(new)).replace(f"{old}:", f"{new}:")
        pairs = [(renamed.get(f, f), why) for f, why in exc.field_violations]
        return RpcError(exc.code, message, [bad_request(pairs)])


_SEGMENT = re.compile(r"\[[0-9]+\]|[^.\[]+")


def _json_path(path: str) -> str:
    """A native field path (`items[0].unit_price`) with its field names as JSON names (`items[0].unitPrice`).

    Best effort: a map key with an underscore is renamed too.
    """
    parts: list[str] = []
    for segment in _SEGMENT.findall(path):
        parts.append(segment if segment[0] == "[" else ("." if parts else "") + json_name(segment))
    return "".join(parts)


_methods: dict[int, MethodCodec] = {}


def method_codec(spec: MethodSpec) -> MethodCodec:
    """The MethodCodec of a method, built once (TypeError if a type has no protobuf form)."""
    try:
        codec = _methods[id(spec)]
        if codec.spec is spec:
            return codec
    except KeyError:
        pass
    codec = _methods[id(spec)] = MethodCodec(spec)
    return codec


class ClientStreamCodec:
    """The proto3 JSON of a client stream's messages: `rpc M(stream MRequest) returns (MResponse)`.

    `MRequest` holds the ordinary parameters as fields 1..k (as a unary request) and field k+1, named after the
    stream parameter, with ONE item. Every message carries one item (absent: its zero value); the ordinary
    fields are read from the first message, and a later message that sets one to a non-default value is
    INVALID_ARGUMENT. (`request` is `MRequest` without the item field.)
    """

    __slots__ = ("_item", "_name", "_zero", "request", "response", "spec")

    def __init__(self, spec: MethodSpec) -> None:
        assert spec.stream is not None
        self.spec = spec
        name = _pascal(spec.name)
        self._name = f"{name}Request"
        self.request = _Message(self._name, f"the arguments of {spec.path}")
        for p in spec.params:
            self.request.add(_make_field(p.name, p.annotation, not p.required))
        self._item = _make_field(spec.stream.name, spec.stream.annotation, False)
        self.response = type_codec(spec.returns, f"{name}Response")
        # An absent item is its zero value: [] for a list, None if optional, a message's defaults (parsed from {}).
        self._zero: Any = self._item.absent

    def _parse(self, data: bytes) -> tuple[dict[str, Any], Any, set[str]]:
        """(the ordinary fields, the item, the names of the ordinary fields given) of one message."""
        try:
            raw = _loads(data, self._name)
            item_field = self._item
            item: Any = _MISSING
            rest = {}
            for key, value in raw.items():
                if key in (item_field.name, item_field.json) and (value is not None or item_field.conv.null):
                    if item is not _MISSING:
                        raise ProtoJsonError(key, "field given twice: send one of its names")
                    item = item_field.conv.parse(value, key)
                elif key not in (item_field.name, item_field.json):
                    rest[key] = value
            if item is _MISSING:
                item = item_field.conv.parse({}, item_field.json) if self._zero is _MISSING else self._zero
            out = self.request.parse(rest, "")
        except ProtoJsonError as exc:
            raise _invalid(exc) from None
        except RecursionError:
            raise RpcError(Status.INVALID_ARGUMENT, f"the {self._name} message is nested too deeply") from None
        given = {f.name for key in rest if (f := self.request.by_key.get(key)) is not None}
        return out, item, given

    def first(self, data: bytes | None) -> tuple[bytes, bytes | None]:
        """The first message (None: the stream had none) as (native arguments, the native item or None)."""
        if data is None:
            out, _, _ = self._parse(b"{}")
            return _native(out, self._name), None
        out, item, _ = self._parse(data)
        return _native(out, self._name), _native(item, self._name)

    def later(self, data: bytes) -> bytes:
        """A later message as its native item; INVALID_ARGUMENT if it sets an ordinary field."""
        out, item, given = self._parse(data)
        for f in self.request.fields:
            if f.name in given and f.name in out and not f.conv.is_default(out[f.name]):
                raise RpcError(
                    Status.INVALID_ARGUMENT,
                    f"field {f.json!r} of {self._name} is set in a later message of the stream: the ordinary "
                    "fields are read from the first message only; leave them unset after it",
                )
        return _native(item, self._name)


def _native(value: Any, name: str) -> bytes:
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        raise RpcError(
            Status.INVALID_ARGUMENT, f"the {name} message is nested deeper than {MAX_DEPTH} levels"
        ) from None


_client_streams: dict[int, ClientStreamCodec] = {}


def client_stream_codec(spec: MethodSpec) -> ClientStreamCodec:
    """The ClientStreamCodec of a client-stream method, built once (TypeError if a type has no protobuf form)."""
    codec = _client_streams.get(id(spec))
    if codec is not None and codec.spec is spec:
        return codec
    codec = _client_streams[id(spec)] = ClientStreamCodec(spec)
    return codec
