"""Annotation-driven JSON codec: encode with orjson, decode and validate against a type.

A decoder is built once per annotation (a "plan") and then called per value; it checks the JSON
value against the annotation and converts it into the annotated Python type (a dataclass comes back
as that dataclass). A mismatch raises `DecodeError` naming the offending field path.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import enum
import math
import types
import typing
import uuid
from collections.abc import Callable
from typing import Any

import orjson

__all__ = ("DecodeError", "Decoder", "decoder", "dumps", "dumps_floats", "loads", "may_hold_float")

Decoder = Callable[[Any, str], Any]
"""Checks and converts one JSON value; the second argument is the field path for error messages."""


class DecodeError(ValueError):
    """A JSON value does not match its annotation."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.reason = message


def _default(value: object) -> object:
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, set | frozenset):
        return list(value)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def dumps(value: object) -> bytes:
    """Encode a value of any supported annotated type as JSON bytes (bytes become base64)."""
    return orjson.dumps(value, default=_default)


def loads(data: bytes | str) -> Any:
    """Parse JSON bytes; orjson.JSONDecodeError (a ValueError) on malformed input."""
    return orjson.loads(data)


def _describe(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )


def _fail(path: str, expected: str, value: object) -> typing.NoReturn:
    raise DecodeError(path, f"expected {expected}, got {_describe(value)}")


def _any(value: Any, path: str) -> Any:
    return value


def _int(value: Any, path: str) -> int:
    if type(value) is int:
        return value
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
    data = orjson.dumps(value, default=_default)
    if b"null" in data:
        data = orjson.dumps(_spell_non_finite(value), default=_default)
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


def may_hold_float(tp: object, _seen: set[object] | None = None) -> bool:
    """Can a value of this annotation contain a float (so NaN or an infinity)?"""
    if tp is float or tp is typing.Any or tp is object:
        return True
    seen = _seen if _seen is not None else set()
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if tp in seen:
            return False
        seen.add(tp)
        hints = typing.get_type_hints(tp)
        return any(may_hold_float(hints[f.name], seen) for f in dataclasses.fields(tp))
    if isinstance(tp, typing.NewType):
        return may_hold_float(tp.__supertype__, seen)
    if tp in (list, tuple, dict, set, frozenset):
        return True  # unparametrised: items of any type
    return any(may_hold_float(arg, seen) for arg in typing.get_args(tp) if arg is not Ellipsis)


def _str(value: Any, path: str) -> str:
    if type(value) is str:
        return value
    _fail(path, "string", value)


def _bool(value: Any, path: str) -> bool:
    if type(value) is bool:
        return value
    _fail(path, "boolean", value)


def _none(value: Any, path: str) -> None:
    if value is not None:
        _fail(path, "null", value)


def _bytes(value: Any, path: str) -> bytes:
    if type(value) is not str:
        _fail(path, "base64 string", value)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise DecodeError(path, "expected base64 string, got invalid base64") from None


def _parsed(parse: Callable[[str], Any], expected: str) -> Decoder:
    """A decoder of values that travel as strings in a format `parse` reads (ValueError if not)."""

    def decode(value: Any, path: str) -> Any:
        if type(value) is str:
            try:
                return parse(value)
            except ValueError:
                pass
        _fail(path, expected, value)

    return decode


_datetime = _parsed(datetime.datetime.fromisoformat, "ISO 8601 date-time string")
_date = _parsed(datetime.date.fromisoformat, "ISO 8601 date string")
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

_cache: dict[object, Decoder] = {}


def decoder(annotation: object) -> Decoder:
    """The decoder plan for an annotation; TypeError if the annotation is not supported."""
    try:
        return _cache[annotation]
    except KeyError:
        pass
    except TypeError:  # unhashable annotation (rare): build without caching
        return _build(annotation)
    return _build(annotation)


def _build(tp: object) -> Decoder:
    if tp in _SIMPLE:
        return _SIMPLE[tp]
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return _remember(tp, decoder(args[0]))
    if isinstance(tp, typing.NewType):
        return _remember(tp, decoder(tp.__supertype__))
    if origin is typing.Union or origin is types.UnionType:
        return _remember(tp, _union(args))
    if origin is typing.Literal:
        return _remember(tp, _literal(args))
    if tp is list or origin is list:
        return _remember(tp, _list(decoder(args[0]) if args else _any, list))
    if tp in (set, frozenset) or origin in (set, frozenset):
        container = typing.cast(type, origin or tp)
        return _remember(tp, _list(decoder(args[0]) if args else _any, container))
    if tp is tuple or origin is tuple:
        return _remember(tp, _tuple(args))
    if tp is dict or origin is dict:
        if args and args[0] is not str:
            raise TypeError(f"unsupported annotation {tp!r}: JSON object keys are strings, use dict[str, ...]")
        return _remember(tp, _dict(decoder(args[1]) if args else _any))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _remember(tp, _enum(tp))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _dataclass(tp)
    raise TypeError(f"unsupported annotation {tp!r}")


def _remember(tp: object, dec: Decoder) -> Decoder:
    _cache[tp] = dec
    return dec


def _union(members: tuple[object, ...]) -> Decoder:
    decoders = [decoder(m) for m in members if m is not type(None)]
    nullable = len(decoders) < len(members)
    expected = " or ".join(_name(m) for m in members)
    if len(decoders) == 1:
        (inner,) = decoders

        def optional(value: Any, path: str) -> Any:
            return None if value is None else inner(value, path)

        return optional

    def union(value: Any, path: str) -> Any:
        if value is None and nullable:
            return None
        for dec in decoders:
            try:
                return dec(value, path)
            except DecodeError:
                continue
        _fail(path, expected, value)

    return union


def _literal(values: tuple[object, ...]) -> Decoder:
    allowed = {(type(v), v) for v in values}
    expected = "one of " + ", ".join(repr(v) for v in values)

    def literal(value: Any, path: str) -> Any:
        try:
            if (type(value), value) in allowed:
                return value
        except TypeError:  # unhashable JSON value: a list or an object
            pass
        raise DecodeError(path, f"expected {expected}, got {_short(value)}")

    return literal


def _list(item: Decoder, container: type) -> Decoder:
    if item is _any:

        def plain(value: Any, path: str) -> Any:
            if type(value) is not list:
                _fail(path, "array", value)
            return value if container is list else container(value)

        return plain

    def items(value: Any, path: str) -> Any:
        if type(value) is not list:
            _fail(path, "array", value)
        out = [item(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return out if container is list else container(out)

    return items


def _tuple(args: tuple[object, ...]) -> Decoder:
    if not args or (len(args) == 2 and args[1] is Ellipsis):
        inner = _list(decoder(args[0]) if args else _any, list)

        def variadic(value: Any, path: str) -> tuple[Any, ...]:
            return tuple(inner(value, path))

        return variadic
    if args == ((),):  # tuple[()]
        args = ()
    decoders = [decoder(a) for a in args]

    def fixed(value: Any, path: str) -> tuple[Any, ...]:
        if type(value) is not list:
            _fail(path, f"array of {len(decoders)} items", value)
        if len(value) != len(decoders):
            raise DecodeError(path, f"expected array of {len(decoders)} items, got {len(value)}")
        return tuple(dec(v, f"{path}[{i}]") for i, (dec, v) in enumerate(zip(decoders, value, strict=True)))

    return fixed


def _dict(item: Decoder) -> Decoder:
    def mapping(value: Any, path: str) -> dict[str, Any]:
        if type(value) is not dict:
            _fail(path, "object", value)
        if item is _any:
            return value
        return {k: item(v, f"{path}.{k}" if path else k) for k, v in value.items()}

    return mapping


def _enum(cls: type[enum.Enum]) -> Decoder:
    by_value = {(type(m.value), m.value): m for m in cls}
    expected = "one of " + ", ".join(repr(m.value) for m in cls)

    def member(value: Any, path: str) -> enum.Enum:
        try:
            return by_value[(type(value), value)]
        except (KeyError, TypeError):
            if type(value) is int and (float, float(value)) in by_value:
                return by_value[(float, float(value))]
            raise DecodeError(path, f"expected {expected}, got {_short(value)}") from None

    return member


def _dataclass(cls: type) -> Decoder:
    plan: list[tuple[str, Decoder, bool]] = []

    def instance(value: Any, path: str) -> Any:
        if type(value) is not dict:
            _fail(path, f"object ({cls.__name__})", value)
        kwargs = {}
        for name, dec, required in plan:
            sub = f"{path}.{name}" if path else name
            if name in value:
                kwargs[name] = dec(value[name], sub)
            elif required:
                raise DecodeError(sub, "missing field")
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise DecodeError(path, f"invalid {cls.__name__}: {exc}") from None

    _cache[cls] = instance  # before the fields: a dataclass may refer to itself
    try:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init:
                required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                plan.append((f.name, decoder(hints[f.name]), required))
    except BaseException:
        del _cache[cls]
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


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
