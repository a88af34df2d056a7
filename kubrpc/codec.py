"""Annotation-driven JSON codec: encode with orjson, decode and validate against a type.

A decoder is built once per annotation (a "plan") and then called per value; it checks the JSON
value against the annotation and converts it into the annotated Python type (a dataclass comes back
as that dataclass). A mismatch raises `DecodeError` naming the offending field path.

Exactness: a value comes back as the type it was sent. A union whose members JSON cannot tell apart
(`str | bytes`, two dataclasses with the same fields, ...) is refused when its plan is built, so a
decoded union never depends on the order of its members.

Unknown object keys depend on the direction, at every nesting level: arguments (decoded by the server)
refuse them, since the server would silently lose what a newer client sent; results (decoded by the
client) ignore them, so a newer server may add fields before every client has rolled, as in protobuf.
`decoder(tp, ignore_unknown=True)` builds the tolerant plan; both plans are cached side by side.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import enum
import json
import math
import re
import struct
import sys
import types
import typing
import uuid
from array import array
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Annotated, Any

import orjson

__all__ = (
    "MAX_ATTACHMENTS",
    "MAX_DEPTH",
    "MAX_ERRORS",
    "RESERVED_METADATA",
    "Attached",
    "AwareDatetime",
    "DecodeError",
    "Decoder",
    "Packed",
    "attachable",
    "check_depth",
    "check_metadata",
    "collect_errors",
    "decoder",
    "dumps",
    "dumps_floats",
    "loads",
    "may_hold_float",
    "needs_exact_ints",
    "pack",
    "unpacked",
    "unwrap",
)

MAX_DEPTH = 254
"""The deepest nesting of arrays, objects and dataclasses the encoder (orjson) can write."""

INT_MIN, INT_MAX = -(2**63), 2**64 - 1
"""Integers on the wire: JSON numbers from -2**63 (signed 64-bit) to 2**64 - 1 (unsigned 64-bit)."""

Decoder = Callable[[Any, str], Any]
"""Checks and converts one JSON value; the second argument is the field path for error messages."""


class DecodeError(ValueError):
    """A JSON value does not match its annotation."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.reason = message


MAX_ERRORS = 100
"""The most errors collect_errors() reports for one value (an error report stays small)."""


class _Reported(DecodeError):
    """A container's items or fields failed, and their errors are recorded already (collect_errors)."""


_collected: ContextVar[list[DecodeError] | None] = ContextVar("kubrpc_decode_errors", default=None)


def _record(exc: DecodeError) -> None:
    """An item or field failed: in collect_errors(), record `exc` and go on to the next; otherwise raise it.

    Only failures get here, so the success path pays nothing for collecting.
    """
    errors = _collected.get()
    if errors is None:
        raise exc
    if type(exc) is not _Reported:
        errors.append(exc)
    if len(errors) >= MAX_ERRORS:
        raise _Reported("", "too many errors")


def collect_errors(dec: Decoder, value: Any, path: str) -> list[DecodeError]:
    """Every error of decoding `value` (each with its field path, at most MAX_ERRORS), not just the first.

    A second, slower pass for error reports: decoders stop at the first error.
    """
    errors: list[DecodeError] = []
    token = _collected.set(errors)
    try:
        dec(value, path)
    except DecodeError as exc:
        if type(exc) is not _Reported:
            errors.append(exc)
    finally:
        _collected.reset(token)
    return errors


class _Aware:
    """Annotated metadata: a datetime that must carry a UTC offset."""

    def __repr__(self) -> str:
        return "aware"


AwareDatetime = Annotated[datetime.datetime, _Aware()]
"""A datetime with a UTC offset: a naive value (no offset) is refused with INVALID_ARGUMENT, not passed on."""


_DATETIME, _UTC, _Fragment, _dumps = datetime.datetime, datetime.UTC, orjson.Fragment, orjson.dumps


def _default(value: object) -> object:
    if type(value) is _DATETIME:
        tz = value.tzinfo
        if tz is None or tz is _UTC:  # the common case, in orjson's format
            return _Fragment(_dumps(value))
        return _datetime_json(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, set | frozenset):
        return list(value)
    if isinstance(value, datetime.datetime):
        return _datetime_json(value)
    if isinstance(value, datetime.date | datetime.time):
        return orjson.Fragment(orjson.dumps(value))
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def _datetime_json(value: datetime.datetime) -> object:
    """orjson's format, which rounds a UTC offset to minutes (+00:19:32 becomes +00:20): then Python's."""
    tz = value.tzinfo
    if tz is None or tz is datetime.UTC:
        return orjson.Fragment(orjson.dumps(value))
    offset = value.utcoffset()
    if offset is None or not (offset.seconds % 60 or offset.microseconds):
        return orjson.Fragment(orjson.dumps(value))
    if offset.microseconds:  # Python's own parser reads +00:00:00.000250 as UTC
        raise TypeError(
            f"cannot encode {value.isoformat()}: a UTC offset with a fraction of a second cannot travel "
            "exactly; convert it to another time zone first"
        )
    return value.isoformat()  # +HH:MM:SS, which datetime.fromisoformat() reads back exactly


# Datetimes pass through to _default, which keeps sub-minute UTC offsets exactly.
_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME


def dumps(value: object) -> bytes:
    """Encode a value of any supported annotated type as JSON bytes (bytes become base64)."""
    return orjson.dumps(value, default=_default, option=_OPTIONS)


# 19 digits in a row: the shortest integer literal outside INT_MIN..INT_MAX has them.
_DIGITS = bytes.maketrans(b"123456789", b"000000000")
_LONG_DIGITS = b"0" * 19


def loads(data: bytes) -> Any:
    """Parse JSON bytes; orjson.JSONDecodeError (a ValueError) on malformed input.

    DecodeError if an integer is outside INT_MIN..INT_MAX, which orjson would round to a float. Only
    the annotations for which needs_exact_ints() holds need this.
    """
    value = orjson.loads(data)
    if len(data) >= 19 and _LONG_DIGITS in data.translate(_DIGITS):
        try:  # exact, and only when a long run of digits is present
            json.loads(bytes(data), parse_int=_wire_int)
        except RecursionError:
            raise DecodeError("", f"nested deeper than {MAX_DEPTH} levels") from None
    return value


def _wire_int(text: str) -> int:
    value = int(text)
    if not INT_MIN <= value <= INT_MAX:
        raise DecodeError("", f"integer {text[:30]} is outside the 64-bit range (-2**63 to 2**64-1)")
    return value


def check_depth(value: object) -> None:
    """DecodeError if a parsed JSON value is nested deeper than MAX_DEPTH (the encoder could not write it)."""
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        raise DecodeError("", f"nested deeper than {MAX_DEPTH} levels, the most the encoder can write") from None


def _describe(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )


def _fail(path: str, expected: str, value: object) -> typing.NoReturn:
    raise DecodeError(path, f"expected {expected}, got {_describe(value)}")


def passes_as_is(decoder: Decoder) -> type | None:
    """The type whose values `decoder` returns as they are (and no other value), if it is one of the simple ones."""
    return _AS_IS.get(decoder)


def _any(value: Any, path: str) -> Any:
    return value


def _int(value: Any, path: str) -> int:
    if type(value) is int:
        return value
    if type(value) is float and abs(value) >= 2.0**63 and value.is_integer():  # a long literal, or 1e19
        raise DecodeError(path, "expected integer within the 64-bit range (-2**63 to 2**64-1), got number")
    _fail(path, "integer", value)


def _float(value: Any, path: str) -> float:
    if type(value) is float:
        return value
    if type(value) is int:
        return float(value)
    if type(value) is str and value in _NON_FINITE:
        return float(value)
    _fail(path, "number", value)


# JSON has no NaN or infinities: they travel as these strings, as in protobuf's JSON mapping.
_NON_FINITE = frozenset({"NaN", "Infinity", "-Infinity"})


def dumps_floats(value: object) -> bytes:
    """dumps() for values that may hold floats: NaN and infinities become "NaN", "Infinity", "-Infinity".

    orjson writes them as null; a null in the output is the only sign, so the slower path runs only then.
    """
    data = orjson.dumps(value, default=_default, option=_OPTIONS)
    if b"null" in data:
        data = orjson.dumps(_spell_non_finite(value), default=_default, option=_OPTIONS)
    return data


def _spell_non_finite(value: object) -> object:
    if type(value) is float:
        if value != value:
            return "NaN"
        if value in (math.inf, -math.inf):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, list | tuple | set | frozenset):
        return [_spell_non_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _spell_non_finite(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _spell_non_finite(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


def may_hold_float(tp: object) -> bool:
    """Can a value of this annotation contain a float (so NaN or an infinity)?"""
    return _anywhere(tp, _holds_float, set())


def needs_exact_ints(tp: object) -> bool:
    """Could a JSON integer beyond 64 bits pass this annotation as a float? Then loads() must check.

    Any, object and unparametrised containers keep whatever orjson parsed; a union of int and float
    would take the float. An int refuses a float anyway, and a float is any JSON number.
    """
    return _anywhere(tp, _takes_big_ints, set())


def _holds_float(tp: object) -> bool | None:
    if tp is float or tp is typing.Any or tp is object or tp in (list, tuple, dict, set, frozenset):
        return True  # (an unparametrised container: items of any type)
    return None


def _takes_big_ints(tp: object) -> bool | None:
    if tp is typing.Any or tp is object or tp in (list, tuple, dict, set, frozenset):
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = {unwrap(a) for a in typing.get_args(tp)}
        if int in members and float in members:
            return True
    if origin is typing.Literal:
        return False
    return None


def _anywhere(tp: object, test: Callable[[object], bool | None], seen: set[object]) -> bool:
    """Does `test` hold for `tp` or anything inside it (dataclass fields, NewType, type arguments)?

    `test` answers True or False for an annotation it decides, None to look inside it.
    """
    verdict = test(tp)
    if verdict is not None:
        return verdict
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if tp in seen:
            return False
        seen.add(tp)
        hints = typing.get_type_hints(tp)
        return any(_anywhere(hints[f.name], test, seen) for f in dataclasses.fields(tp))
    if isinstance(tp, typing.NewType):
        return _anywhere(tp.__supertype__, test, seen)
    return any(_anywhere(arg, test, seen) for arg in typing.get_args(tp) if arg is not Ellipsis)


def _str(value: Any, path: str) -> str:
    if type(value) is str:
        return value
    _fail(path, "string", value)


def _bool(value: Any, path: str) -> bool:
    if type(value) is bool:
        return value
    _fail(path, "boolean", value)


# Decoders that return every value of exactly this type as it is, and refuse any other value (passes_as_is).
_AS_IS: dict[Decoder, type] = {_int: int, _str: str, _bool: bool}


def _none(value: Any, path: str) -> None:
    if value is not None:
        _fail(path, "null", value)


def _bytes(value: Any, path: str) -> bytes:
    if type(value) is not str:
        if type(value) is int:  # an attachment's index, in a message in the attachments format (TCP)
            attached = _attached.get()
            if attached is not None:
                return attached.take(value, path)
        _fail(path, "base64 string", value)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise DecodeError(path, f"expected base64 string, got {_short(value)}") from None


def _parsed(parse: Callable[[str], Any], expected: str) -> Decoder:
    """A decoder of values that travel as strings in a format `parse` reads (ValueError if not)."""

    def decode(value: Any, path: str) -> Any:
        if type(value) is str:
            try:
                return parse(value)
            except ValueError:
                raise DecodeError(path, f"expected {expected}, got {_short(value)}") from None
        _fail(path, expected, value)

    return decode


_datetime = _parsed(datetime.datetime.fromisoformat, "ISO 8601 date-time string")
_date = _parsed(datetime.date.fromisoformat, "ISO 8601 date string")


def _aware_datetime(value: Any, path: str) -> datetime.datetime:
    out: datetime.datetime = _datetime(value, path)
    if out.tzinfo is None:
        raise DecodeError(path, f"naive datetime {_short(value)}: give a UTC offset (e.g. Z or +00:00)")
    return out


_uuid = _parsed(uuid.UUID, "UUID string")


_SIMPLE: dict[object, Decoder] = {
    int: _int,
    float: _float,
    str: _str,
    bool: _bool,
    type(None): _none,
    None: _none,
    bytes: _bytes,
    datetime.datetime: _datetime,
    datetime.date: _date,
    uuid.UUID: _uuid,
    typing.Any: _any,
    object: _any,
}

_cache: dict[tuple[bool, object], Decoder] = {}
"""Plans keyed by (ignore_unknown, _key(annotation))."""


def _key(tp: object) -> object:
    """The cache key of an annotation: `Union[A, B] == Union[B, A]`, so the member order goes in too."""
    args = getattr(tp, "__args__", None)
    if not args or not isinstance(args, tuple):
        return tp
    return (tp, tuple(_key(a) for a in args))


def decoder(annotation: object, *, ignore_unknown: bool = False) -> Decoder:
    """The decoder plan for an annotation; TypeError if it is not supported (or is an ambiguous union).

    Unknown keys in dataclass objects, at any depth, are a DecodeError; with ignore_unknown=True (for
    results) they are skipped. Both plans refuse the same annotations.
    """
    try:
        key = (ignore_unknown, _key(annotation))
        return _cache[key]
    except KeyError:
        pass
    except TypeError:  # unhashable annotation (rare): build without caching
        return _build(annotation, ignore_unknown)
    dec = _build(annotation, ignore_unknown)
    _cache[key] = dec
    return dec


def _build(tp: object, lenient: bool) -> Decoder:
    if tp in _SIMPLE:
        return _SIMPLE[tp]
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        if args[0] is datetime.datetime and any(isinstance(m, _Aware) for m in tp.__metadata__):  # type: ignore[attr-defined]
            return _aware_datetime
        return decoder(args[0], ignore_unknown=lenient)
    if isinstance(tp, typing.NewType):
        return decoder(tp.__supertype__, ignore_unknown=lenient)
    if origin is typing.Union or origin is types.UnionType:
        return _union(tp, lenient)
    if origin is typing.Literal:
        return _literal(args)
    if tp is list or origin is list:
        return _list(decoder(args[0], ignore_unknown=lenient) if args else _any, list)
    if tp in (set, frozenset) or origin in (set, frozenset):
        container = typing.cast(type, origin or tp)
        if args:
            _check_hashable(args[0], tp)
        return _list(decoder(args[0], ignore_unknown=lenient) if args else _any, container)
    if tp is tuple or origin is tuple:
        return _tuple(args, lenient)
    if tp is dict or origin is dict:
        if args and args[0] is not str:
            raise TypeError(f"unsupported annotation {tp!r}: JSON object keys are strings, use dict[str, ...]")
        return _dict(decoder(args[1], ignore_unknown=lenient) if args else _any)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _enum(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _dataclass(tp, lenient)
    raise TypeError(f"unsupported annotation {tp!r}")


def _wire_value(value: object) -> tuple[type, object]:
    """A Literal or Enum value as the (type, value) of the JSON it travels as; TypeError if it cannot travel."""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bytes):
        return str, base64.b64encode(value).decode("ascii")
    if value is None or type(value) in (str, int, float, bool):
        return type(value), value
    raise TypeError(f"{value!r} cannot travel as JSON: use str, int, float, bool, bytes, None or an Enum of those")


def _literal(values: tuple[object, ...]) -> Decoder:
    table: dict[tuple[type, object], object] = {}
    for v in values:
        wire = _wire_value(v)
        if wire in table and table[wire] is not v:
            raise TypeError(f"Literal values {table[wire]!r} and {v!r} both travel as {wire[1]!r}")
        table[wire] = v
    expected = "one of " + ", ".join(repr(w) for _, w in table)

    def literal(value: Any, path: str) -> Any:
        try:
            return table[(type(value), value)]
        except (KeyError, TypeError):  # TypeError: unhashable JSON value, a list or an object
            raise DecodeError(path, f"expected {expected}, got {_short(value)}") from None

    return literal


# An HTTP header name (a token, RFC 9110) and a value of visible ASCII with inner spaces and tabs: HTTP
# would strip outer whitespace, and CR, LF or other control bytes would split or break the header.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_VALUE = re.compile(r"(?:[\x21-\x7e](?:[\t\x20-\x7e]*[\x21-\x7e])?)?")


# Header names that frame or route an HTTP request, or that carry kubrpc's own call data: as metadata they would
# cut the body short (a second request smuggled in the rest), re-route the call (host), or set its deadline.
RESERVED_METADATA = frozenset(
    {
        "connection",
        "content-encoding",
        "content-length",
        "content-type",
        "expect",
        "host",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "connect-timeout-ms",
        "connect-protocol-version",
        "connect-content-encoding",
        "connect-accept-encoding",
        "kubrpc-not-started",
    }
)


def check_metadata(metadata: Mapping[str, str]) -> None:
    """ValueError unless every key and value can travel as an HTTP header, unchanged, on every transport
    (and the key is not one that frames the request or carries kubrpc's own data: RESERVED_METADATA)."""
    for key, value in metadata.items():
        if type(key) is not str or _HEADER_NAME.fullmatch(key) is None:
            raise ValueError(
                f"metadata key {_short(key)} is not a valid header name (letters, digits, -_.!#$%&'*+^`|~)"
            )
        if key.lower() in RESERVED_METADATA:
            raise ValueError(
                f"metadata key {key!r} is reserved: it frames or routes the request, or carries kubrpc's own "
                "data (the deadline is the call's timeout); use another name"
            )
        if type(value) is not str or _HEADER_VALUE.fullmatch(value) is None:
            raise ValueError(
                f"metadata {key!r}: value {_short(value)} must be printable ASCII without leading or trailing "
                "spaces (no CR, LF or other control characters)"
            )


# ---- unions ------------------------------------------------------------------------------------
#
# Each member is described by what it can look like on the wire, per JSON type: every value of that
# type (ALL), a finite set of values (Literal, Enum), or a string format. Two members that can produce
# the same JSON make the union ambiguous, and it is refused. Otherwise the decoder picks the member by
# the JSON type of the value, then by its value or format, never by the order of the members.

_ALL = object()  # every value of a JSON type
# String formats, in the order they are tried: each one rejects every value the later ones write
# (base64 has no "-"; a UUID is 32 hex digits besides its dashes; a date has no "T").
_FORMATS = {bytes: "base64 string", uuid.UUID: "UUID string", datetime.date: "date", datetime.datetime: "date-time"}
_FORMAT_RANK = list(_FORMATS.values())


@dataclasses.dataclass(eq=False)
class _Member:
    """One member of a union: its annotation, decoder, and the JSON it can produce per JSON type."""

    tp: object
    decode: Decoder
    name: str  # as written in Python, for TypeErrors
    expected: str  # as on the wire, for DecodeErrors
    shapes: dict[type, object]  # JSON type -> _ALL | frozenset of values | format name | the annotation


def unwrap(tp: object) -> object:
    """`tp` without Annotated and NewType wrappers (AwareDatetime is a datetime), as values travel."""
    while True:
        if typing.get_origin(tp) is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif isinstance(tp, typing.NewType):
            tp = tp.__supertype__
        else:
            return tp


def _shapes(tp: object) -> dict[type, object]:
    """What a value of this (unwrapped, non-union) annotation can look like on the wire."""
    origin = typing.get_origin(tp)
    if tp in (typing.Any, object):
        return dict.fromkeys((bool, int, float, str, list, dict), _ALL)
    if tp is bool or tp is int or tp is str:
        return {typing.cast(type, tp): _ALL}
    if tp is float:
        return {float: _ALL, str: _NON_FINITE}
    if tp in _FORMATS:
        return {str: _FORMATS[tp]}
    values: list[object] | None = None
    if origin is typing.Literal:
        values = list(typing.get_args(tp))
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        values = list(tp)
    if values is not None:
        sets: dict[type, set[object]] = {}
        for v in values:
            kind, wire = _wire_value(v)
            sets.setdefault(kind, set()).add(wire)
        return {kind: frozenset(s) for kind, s in sets.items()}
    if tp in (list, tuple, set, frozenset) or origin in (list, tuple, set, frozenset):
        return {list: tp}
    if tp is dict or origin is dict or dataclasses.is_dataclass(tp):
        return {dict: tp}
    return {}


def _union(tp: object, lenient: bool) -> Decoder:
    members: list[_Member] = []
    nullable = False
    nulls: list[_Member] = []  # what a JSON null can be: None, or an Enum member whose value is None
    for m in _flatten(tp):
        if m is None or m is type(None):
            nullable = True
            if not any(n.tp is None for n in nulls):
                nulls.append(_Member(None, _none, "None", "null", {}))
            continue
        dec = decoder(m, ignore_unknown=lenient)
        shapes = _shapes(unwrap(m))
        member = _Member(m, dec, _type_name(m), _name(m), shapes)
        if shapes.get(type(None)):
            nullable = True
            shapes.pop(type(None))
            if dec(None, "") is not None:  # an Enum member, not None itself (Literal[None] is None)
                nulls.append(member)
            elif not any(n.tp is None for n in nulls):
                nulls.append(_Member(None, _none, "None", "null", {}))
        members.append(member)
    if len(nulls) > 1:
        raise _ambiguous(tp, nulls[0], nulls[1], "both travel as the JSON value null")
    if nulls and nulls[0].tp is not None:  # null is that Enum member
        null_member = nulls[0].decode
        members.append(_Member(None, lambda value, path: null_member(None, path), "", "null", {type(None): _ALL}))
        nullable = False
    expected = " or ".join([m.expected for m in members] + (["null"] if nullable else []))
    if len(members) == 1:
        inner = members[0].decode

        def optional(value: Any, path: str) -> Any:
            return None if value is None else inner(value, path)

        return optional

    by_type: dict[type, Decoder] = {}
    for kind in (type(None), bool, int, float, str, list, dict):
        claims = [(m, m.shapes[kind]) for m in members if kind in m.shapes]
        if claims:
            by_type[kind] = _pick(tp, kind, claims, expected, lenient)
    if int not in by_type and float in by_type:
        floats = [m for m in members if m.shapes.get(float) is _ALL]
        if floats:  # a JSON integer is a fine float when no member takes integers
            by_type[int] = floats[0].decode

    def union(value: Any, path: str) -> Any:
        if value is None and nullable:
            return None
        try:
            pick = by_type[type(value)]
        except KeyError:
            _fail(path, expected, value)
        return pick(value, path)

    return union


def _flatten(tp: object) -> list[object]:
    out: list[object] = []
    for m in typing.get_args(tp):
        inner = unwrap(m)
        if typing.get_origin(inner) in (typing.Union, types.UnionType):
            out.extend(_flatten(inner))
        else:
            out.append(m)
    return out


def _ambiguous(tp: object, a: _Member, b: _Member, why: str) -> TypeError:
    return TypeError(
        f"ambiguous union {_type_name(tp)}: {a.name} and {b.name} {why}, so a value could come back as the "
        "wrong type. Make the members distinguishable on the wire: give each dataclass a tag field with "
        'a different Literal value (a discriminator, e.g. `kind: Literal["cat"] = "cat"`), or wrap one '
        "member in a dataclass"
    )


def _pick(tp: object, kind: type, claims: list[tuple[_Member, object]], expected: str, lenient: bool) -> Decoder:
    """The decoder for JSON values of one type that several union members may claim."""
    if len(claims) == 1:
        return claims[0][0].decode
    wire = _describe(kind(0) if kind in (int, float, str) else kind())
    table: dict[object, Decoder] = {}
    formats: list[tuple[int, _Member]] = []
    for i, (a, sa) in enumerate(claims):
        for b, sb in claims[:i]:
            if sa is _ALL or sb is _ALL:
                raise _ambiguous(tp, b, a, f"both travel as any JSON {wire}")
            if kind is list:
                raise _ambiguous(tp, b, a, "both travel as a JSON array")
            if kind is dict and not (dataclasses.is_dataclass(sa) and dataclasses.is_dataclass(sb)):
                raise _ambiguous(tp, b, a, "both travel as a JSON object")
        if isinstance(sa, frozenset):
            for v in sa:
                for b, sb in claims:
                    if b is not a and _claims(b, sb, v):
                        raise _ambiguous(tp, b, a, f"both travel as the JSON value {_short(v)}")
                table[v] = a.decode
        elif isinstance(sa, str):
            formats.append((_FORMAT_RANK.index(sa), a))
    if kind is dict:
        return _dataclasses(tp, [m for m, _ in claims], expected, lenient)
    tries = [m.decode for _, m in sorted(formats, key=lambda f: f[0])]

    def pick(value: Any, path: str) -> Any:
        dec = table.get(value)
        if dec is not None:
            return dec(value, path)
        for dec in tries:
            try:
                return dec(value, path)
            except DecodeError:
                pass
        _fail(path, expected, value)

    return pick


def _claims(m: _Member, shape: object, value: object) -> bool:
    """Can member `m` (with this shape for the value's JSON type) decode `value`?"""
    if isinstance(shape, frozenset):
        return value in shape
    try:
        m.decode(value, "")
    except DecodeError:
        return False
    return True


def _wire_fields(cls: type) -> frozenset[str] | None:
    """The keys a dataclass always travels with, or None if the encoder may add or drop some."""
    fields = dataclasses.fields(cls)
    if any(not f.init or f.name.startswith("_") for f in fields):
        return None
    return frozenset(f.name for f in fields)


def _tags(cls: type) -> dict[str, frozenset[object]]:
    """The fields of a dataclass typed as a Literal (or an Enum), with the JSON values they can hold."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        try:
            shapes = _shapes(unwrap(hints[f.name]))
        except TypeError:  # an Enum with values JSON cannot carry: no tag
            continue
        if shapes and all(isinstance(s, frozenset) for s in shapes.values()):
            out[f.name] = frozenset().union(*typing.cast(list[frozenset[object]], list(shapes.values())))
    return out


def _dataclasses(tp: object, members: list[_Member], expected: str, lenient: bool) -> Decoder:
    """Choose among dataclass members by a tag field, else by the exact set of keys, else by elimination.

    Lenient (results), the keys that no member declares are left out first: a newer sender's additions.
    Ambiguity is judged on the declared fields alone, so both modes refuse the same unions.
    """
    classes = [typing.cast(type, unwrap(m.tp)) for m in members]
    tags = [_tags(c) for c in classes]
    keys = [_wire_fields(c) for c in classes]
    for i, a in enumerate(members):
        for j in range(i):
            b = members[j]
            tagged = any(not (tags[i][f] & tags[j][f]) for f in tags[i].keys() & tags[j].keys())
            if not tagged and (keys[i] is None or keys[j] is None or keys[i] == keys[j]):
                raise _ambiguous(tp, b, a, "can travel as the same JSON object")
    # A discriminator: one field that every member tags with values of its own.
    common = sorted(set.intersection(*(set(t) for t in tags)))
    tag_field, by_tag = None, {}
    for name in common:
        values = [t[name] for t in tags]
        if sum(len(v) for v in values) == len(frozenset().union(*values)):
            tag_field = name
            by_tag = {v: m.decode for m, vs in zip(members, values, strict=True) for v in vs}
            break
    by_keys: dict[frozenset[str], list[Decoder]] = {}
    for m, k in zip(members, keys, strict=True):
        if k is not None:
            by_keys.setdefault(k, []).append(m.decode)
    candidates = [
        (m.decode, frozenset(f.name for f in dataclasses.fields(c))) for m, c in zip(members, classes, strict=True)
    ]
    tag_expected = "one of " + ", ".join(repr(v) for v in by_tag)
    keys_of: Callable[[dict[str, Any]], frozenset[str]] = frozenset
    if lenient:
        keys_of = frozenset().union(*(allowed for _, allowed in candidates)).intersection

    def pick(value: Any, path: str) -> Any:
        if tag_field is not None and tag_field in value:
            tag = value[tag_field]
            try:
                dec = by_tag[tag]
            except (KeyError, TypeError):
                sub = f"{path}.{tag_field}" if path else tag_field
                raise DecodeError(sub, f"expected {tag_expected}, got {_short(tag)}") from None
            return dec(value, path)
        present = keys_of(value)
        decs = by_keys.get(present) or [dec for dec, allowed in candidates if present <= allowed]
        if len(decs) == 1:
            return decs[0](value, path)
        found, error = [], None
        token = _collected.set(None)  # trials: a member's errors are not the value's
        try:
            for dec in decs:
                try:
                    found.append(dec(value, path))
                except DecodeError as exc:
                    error = exc
        finally:
            _collected.reset(token)
        if len(found) == 1:
            return found[0]
        if found:
            names = " and ".join(type(v).__name__ for v in found)
            raise DecodeError(path, f"ambiguous object: it is a valid {names}; send all of its fields")
        if error is not None and len(decs) == 1:
            raise error
        raise DecodeError(path, f"expected {expected}, got an object with keys {sorted(present)}")

    return pick


def _check_hashable(item: object, tp: object) -> None:
    """TypeError now if no value of `item` can be in a set: a set of them could never be decoded."""
    inner = unwrap(item)
    origin = typing.get_origin(inner) or inner
    unhashable = origin in (list, dict, set) or (
        isinstance(inner, type) and dataclasses.is_dataclass(inner) and inner.__hash__ is None
    )
    if unhashable:
        raise TypeError(
            f"unsupported annotation {_type_name(tp)}: set items must be hashable; use a tuple, a frozenset "
            "or a frozen dataclass as the item type"
        )


def _as_set(container: type, out: list[Any], path: str) -> Any:
    try:
        return container(out)
    except TypeError:  # an item that holds a list or a dict (in Any, or in a frozen dataclass's field)
        raise DecodeError(path, "expected array of hashable items (no arrays or objects inside a set)") from None


def _list(item: Decoder, container: type) -> Decoder:
    if item is _any:

        def plain(value: Any, path: str) -> Any:
            if type(value) is not list:
                _fail(path, "array", value)
            return value if container is list else _as_set(container, value, path)

        return plain

    def items(value: Any, path: str) -> Any:
        if type(value) is not list:
            _fail(path, "array", value)
        try:
            out = [item(v, f"{path}[{i}]") for i, v in enumerate(value)]
        except DecodeError:
            if _collected.get() is None:
                raise
            out = _each(item, enumerate(value), path, "[{}]")
        return out if container is list else _as_set(container, out, path)

    return items


def _each(dec: Decoder | list[Decoder], items: typing.Iterable[tuple[Any, Any]], path: str, sub: str) -> list[Any]:
    """In collect_errors(), decode the items again after one failed, recording every item's errors.

    The failed item's errors, recorded by the first try, are dropped first: everything recorded since that try
    began is under this container's path (the items before it succeeded).
    """
    errors = _collected.get() or []
    prefix = path + sub[0] if path or sub[0] == "[" else ""
    while errors and errors[-1].path.startswith(prefix):
        errors.pop()
    out, failed = [], False
    for n, (key, v) in enumerate(items):
        where = sub.format(key) if path or sub[0] == "[" else str(key)
        try:
            out.append((dec[n] if isinstance(dec, list) else dec)(v, path + where))
        except DecodeError as exc:
            _record(exc)
            failed = True
    if failed:
        raise _Reported(path, "invalid items")
    return out


def _tuple(args: tuple[object, ...], lenient: bool) -> Decoder:
    if not args or (len(args) == 2 and args[1] is Ellipsis):
        inner = _list(decoder(args[0], ignore_unknown=lenient) if args else _any, list)

        def variadic(value: Any, path: str) -> tuple[Any, ...]:
            return tuple(inner(value, path))

        return variadic
    if args == ((),):  # tuple[()]
        args = ()
    decoders = [decoder(a, ignore_unknown=lenient) for a in args]

    def fixed(value: Any, path: str) -> tuple[Any, ...]:
        if type(value) is not list:
            _fail(path, f"array of {len(decoders)} items", value)
        if len(value) != len(decoders):
            raise DecodeError(path, f"expected array of {len(decoders)} items, got array of {len(value)}")
        try:
            return tuple([dec(v, f"{path}[{i}]") for i, (dec, v) in enumerate(zip(decoders, value, strict=True))])
        except DecodeError:
            if _collected.get() is None:
                raise
            return tuple(_each(decoders, enumerate(value), path, "[{}]"))

    return fixed


def _dict(item: Decoder) -> Decoder:
    def mapping(value: Any, path: str) -> dict[str, Any]:
        if type(value) is not dict:
            _fail(path, "object", value)
        if item is _any:
            return value
        try:
            return {k: item(v, f"{path}.{k}" if path else k) for k, v in value.items()}
        except DecodeError:
            if _collected.get() is None:
                raise
            return dict(zip(value, _each(item, value.items(), path, ".{}"), strict=True))

    return mapping


def _enum(cls: type[enum.Enum]) -> Decoder:
    """Members by the JSON they travel as (bytes as base64); TypeError now for values JSON cannot carry.

    A Flag also takes any combination of its members (an integer the Flag accepts), as it is encoded.
    """
    by_value: dict[tuple[type, object], enum.Enum] = {}
    for m in cls:
        try:
            wire = _wire_value(m)
        except TypeError as exc:
            raise TypeError(f"Enum {cls.__qualname__}: member {m.name}: {exc}") from None
        other = by_value.setdefault(wire, m)
        if other is not m:
            raise TypeError(f"Enum {cls.__qualname__}: members {other.name} and {m.name} both travel as {wire[1]!r}")
    expected = "one of " + ", ".join(repr(w) for _, w in by_value)
    flag = issubclass(cls, enum.Flag)

    def member(value: Any, path: str) -> enum.Enum:
        try:
            return by_value[(type(value), value)]
        except (KeyError, TypeError):
            if type(value) is int:
                if (float, float(value)) in by_value:
                    return by_value[(float, float(value))]
                if flag:
                    try:
                        return cls(value)
                    except ValueError:
                        pass
            raise DecodeError(path, f"expected {expected}, got {_short(value)}") from None

    return member


def _dataclass(cls: type, lenient: bool) -> Decoder:
    plan: list[tuple[str, Decoder, bool]] = []
    # Strict (arguments): unknown keys are refused, as unknown arguments are, since the receiver would
    # lose them. Lenient (results): they are skipped, so a newer server may add fields.
    known = frozenset(f.name for f in dataclasses.fields(cls))

    def instance(value: Any, path: str) -> Any:
        if type(value) is not dict:
            _fail(path, f"object ({cls.__name__})", value)
        kwargs = {}
        failed = False
        for name, dec, required in plan:
            sub = f"{path}.{name}" if path else name
            if name in value:
                try:
                    kwargs[name] = dec(value[name], sub)
                except DecodeError as exc:
                    _record(exc)
                    failed = True
            elif required:
                _record(DecodeError(sub, "missing field"))
                failed = True
        # Strict: an unknown key is refused (the receiver would lose it); lenient: skipped.
        if not lenient and (failed or len(kwargs) != len(value)):
            for unknown in sorted(k for k in value if k not in known):
                _record(DecodeError(path, f"unexpected field {_short(unknown)} in {cls.__name__}"))
                failed = True
        if failed:
            raise _Reported(path, f"invalid {cls.__name__}")
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise DecodeError(path, f"invalid {cls.__name__}: {exc}") from None

    key = (lenient, cls)
    _cache[key] = instance  # before the fields: a dataclass may refer to itself
    try:
        hints = typing.get_type_hints(cls, include_extras=True)
        for f in dataclasses.fields(cls):
            if f.init:
                required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                if required and f.name.startswith("_"):
                    raise TypeError(
                        f"{cls.__qualname__}.{f.name}: the encoder leaves out fields whose name starts with '_', "
                        "so this required field could never arrive; rename it or give it a default"
                    )
                plan.append((f.name, decoder(hints[f.name], ignore_unknown=lenient), required))
    except BaseException:
        del _cache[key]
        raise
    return instance


_NAMES: dict[object, str] = {
    type(None): "null",
    None: "null",
    int: "integer",
    float: "number",
    str: "string",
    bool: "boolean",
    bytes: "base64 string",
}


def _name(tp: object) -> str:
    return _NAMES.get(tp) or str(getattr(tp, "__name__", tp))


def _type_name(tp: object) -> str:
    if tp is None or tp is type(None):
        return "None"
    if isinstance(tp, type):
        return tp.__qualname__
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    return repr(tp).replace("typing.", "").replace("datetime.", "").replace("uuid.", "")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ---- attachments: bytes values as raw bytes after the JSON (the TCP transport; docs/protocol.md) ----------------
#
# A message in the attachments format is `count (u32) | length (u32) * count | JSON | data[0] | data[1] | ...`
# (big-endian): the JSON as usual, except that a `bytes` value is the integer index of its data. The decoding is
# type-directed, as for base64: only where the annotation expects `bytes` is an integer an index.

MAX_ATTACHMENTS = 65536
"""The most attachments one message may carry; a message with more bytes values than this sends them as base64."""

_U32 = struct.Struct(">I")


class Attached(bytes):
    """An outgoing message in the attachments format, in parts: these bytes are its JSON, and `attachments` the
    data of its bytes values, by index. `plain()` encodes the same value as ordinary JSON (bytes as base64), for
    a peer that does not read attachments."""

    attachments: list[bytes | bytearray | memoryview]
    plain: Callable[[], bytes]

    def table(self) -> bytes:
        """The head of the message on the wire: the count and the length of each attachment."""
        sizes = [len(a) if type(a) is not memoryview else a.nbytes for a in self.attachments]
        return struct.pack(f">{len(sizes) + 1}I", len(sizes), *sizes)

    @property
    def size(self) -> int:
        """The message's size on the wire: table, JSON and data."""
        sizes = [len(a) if type(a) is not memoryview else a.nbytes for a in self.attachments]
        return 4 + 4 * len(sizes) + len(self) + sum(sizes)


class Packed(bytes):
    """A received message in the attachments format, whole (table, JSON, data): decode it with `unpacked()`."""


def pack(value: object, floats: bool = False) -> Attached:
    """Encode a value whose annotation is attachable(): its bytes values become attachments (`floats`: as
    dumps_floats does)."""
    attachments: list[bytes | bytearray | memoryview] = []
    # Each object is one attachment however often it appears (a peer's many references to one attachment would
    # otherwise be multiplied when a handler sends them back); `kept` keeps alive what its id names meanwhile.
    indexes: dict[int, int] = {}
    kept: list[object] = []

    def default(v: object) -> object:
        if isinstance(v, bytes | bytearray | memoryview):
            index = indexes.get(id(v))
            if index is None:
                index = indexes[id(v)] = len(attachments)
                kept.append(v)
                attachments.append(v if type(v) is not memoryview or v.format == "B" else v.cast("B"))
            return index
        return _default(v)

    data = orjson.dumps(value, default=default, option=_OPTIONS)
    if floats and b"null" in data:
        attachments.clear()
        indexes.clear()
        data = orjson.dumps(_spell_non_finite(value), default=default, option=_OPTIONS)
    if len(attachments) > MAX_ATTACHMENTS:  # too many to index: as base64, which the receiver reads there too
        attachments = []
        data = dumps_floats(value) if floats else dumps(value)
    out = Attached(data)
    out.attachments = attachments
    return out


class _Attachments:
    """The data of a received message's attachments, each made a bytes object once, when a bytes value takes it."""

    __slots__ = ("data", "ends", "taken")

    def __init__(self, data: bytes, start: int, sizes: array[int]) -> None:
        self.data = data
        ends = array("Q", [start])
        for size in sizes:
            start += size
            ends.append(start)
        self.ends = ends
        self.taken: list[bytes | None] = [None] * len(sizes)

    def take(self, index: int, path: str) -> bytes:
        taken = self.taken
        if not 0 <= index < len(taken):
            raise DecodeError(
                path, f"attachment index {index} is out of range: the message has {len(taken)} attachments"
            )
        data = taken[index]
        if data is None:  # the same index twice is the same bytes object: no copy per reference
            data = taken[index] = self.data[self.ends[index] : self.ends[index + 1]]
        return data

    def check_all_taken(self) -> None:
        """DecodeError if an attachment was sent that no bytes value refers to (a sender's mistake, or padding)."""
        for index, data in enumerate(self.taken):
            if data is None:
                raise DecodeError(
                    "",
                    f"attachment {index} of {len(self.taken)} is not referred to by any bytes value "
                    "(an attachment's index must stand where the method's annotation expects bytes)",
                )


_attached: ContextVar[_Attachments | None] = ContextVar("kubrpc_attachments", default=None)


def unpacked(data: bytes, decode: Callable[[bytes], Any]) -> Any:
    """Split a message in the attachments format and run `decode` on its JSON, with its attachments in reach of
    the bytes decoders; DecodeError if the table lies about the message, or an attachment is left unreferred."""
    size = len(data)
    if size < 4:
        raise DecodeError("", f"truncated attachments table: {size} bytes, less than its 4-byte count")
    (count,) = _U32.unpack_from(data)
    if count > MAX_ATTACHMENTS:
        raise DecodeError("", f"{count} attachments: a message carries at most {MAX_ATTACHMENTS}")
    table_end = 4 + 4 * count
    if table_end > size:
        raise DecodeError("", f"the table of {count} attachments does not fit in the message of {size} bytes")
    sizes = array("I", data[4:table_end])
    if sys.byteorder == "little":
        sizes.byteswap()
    total = sum(sizes)
    if total > size - table_end:
        raise DecodeError(
            "",
            f"the attachments' lengths add up to {total} bytes, more than the {size - table_end} bytes after the table",
        )
    json_end = size - total
    attachments = _Attachments(data, json_end, sizes)
    token = _attached.set(attachments)
    try:
        value = decode(data[table_end:json_end])
        attachments.check_all_taken()
    finally:
        _attached.reset(token)
    return value


def attachable(*annotations: object) -> bool:
    """Can the bytes values of a value of these annotations (a method's arguments, together) travel as
    attachments? They must hold `bytes`, each where a decoder expects bytes alone: none may hold Any or an
    unparametrised container, a union of bytes with other types than None, or a Literal or Enum with bytes
    values (their decoders read base64). Decided once, when a method's plans are built."""
    return any(_anywhere(tp, _is_bytes, set()) for tp in annotations) and not any(
        _anywhere(tp, _blocks_attachments, set()) for tp in annotations
    )


def _is_bytes(tp: object) -> bool | None:
    return True if tp is bytes else None


_CONTAINERS = (list, tuple, dict, set, frozenset)


def _blocks_attachments(tp: object) -> bool | None:
    if tp is typing.Any or tp is object or tp in _CONTAINERS:
        return True  # may hold bytes where the decoder does not look for them
    origin = typing.get_origin(tp)
    if origin in _CONTAINERS and not typing.get_args(tp):
        return True  # typing.List, typing.Dict, ... without arguments: as list and dict
    if origin is typing.Literal:
        return any(isinstance(_enum_value(v), bytes | bytearray) for v in typing.get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return any(isinstance(m.value, bytes | bytearray) for m in tp)
    if origin is typing.Union or origin is types.UnionType:
        members = [unwrap(m) for m in _flatten(tp) if m is not None and m is not type(None)]
        if bytes in members and len(members) > 1:  # an index would be read as the other member's integer, or refused
            return True
    return None


def _enum_value(value: object) -> object:
    return value.value if isinstance(value, enum.Enum) else value
