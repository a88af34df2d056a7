"""Services are typing.Protocols: turn one into a ServiceSpec, and check an implementation against it."""

from __future__ import annotations

import collections.abc
import enum
import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import orjson

from . import codec
from .codec import Packed
from .errors import RpcError, bad_request
from .status import Status

__all__ = ("CallKind", "MethodOptions", "MethodSpec", "Param", "ServiceSpec", "interface", "method", "service_spec")

C = TypeVar("C", bound=type)
F = TypeVar("F", bound=Callable[..., Any])

_NAME_ATTR = "__kubrpc_name__"
_DEEP_SIZE = 2 * codec.MAX_DEPTH  # the shortest body that can nest deeper than the encoder writes
_FAST_PARAMS = 16  # MethodSpec.args_decoder() makes code for methods with up to this many parameters
_OPTIONS_ATTR = "__kubrpc_method__"


_LISTED = 10  # errors spelled out in an INVALID_ARGUMENT message; all of them are in its details


class CallKind(enum.Enum):
    """What a method sends and receives, read from its annotations."""

    UNARY = "unary"
    """One request, one result."""
    SERVER_STREAM = "server_stream"
    """One request; the result is a stream: the method is `def m(...) -> AsyncIterator[T]`."""
    CLIENT_STREAM = "client_stream"
    """A stream of requests (one `AsyncIterable[T]` parameter) and one result."""
    BIDI_STREAM = "bidi_stream"
    """A stream each way: an `AsyncIterable[T]` parameter and an `AsyncIterator[R]` result."""

    @property
    def streams_requests(self) -> bool:
        """True when the client sends a stream of messages (client and bidirectional streaming)."""
        return self is CallKind.CLIENT_STREAM or self is CallKind.BIDI_STREAM

    @property
    def streams_results(self) -> bool:
        """True when the server sends a stream of messages (server and bidirectional streaming)."""
        return self is CallKind.SERVER_STREAM or self is CallKind.BIDI_STREAM


def _made(name: str, qualname: str, lines: list[str], scope: dict[str, Any]) -> Any:
    """The function `name` that the source `lines` define, its globals `scope` (code made for one method, once, as
    dataclasses makes __init__: the checks of its own parameters inline, no loop over them)."""
    exec("\n".join(lines), scope)
    function = scope[name]
    function.__qualname__ = qualname
    return function


@dataclass(frozen=True, slots=True)
class MethodOptions:
    """Per-method options set with @kubrpc.method."""

    name: str | None = None
    idempotent: bool = False
    timeout: float | None = None


def interface(*, name: str | None = None) -> Callable[[C], C]:
    """Class decorator: set the wire name of a service (default: the Protocol's class name)."""
    if name is not None and (not name or "/" in name):
        raise ValueError(f"bad service name {name!r}")

    def apply(cls: C) -> C:
        setattr(cls, _NAME_ATTR, name or cls.__name__)
        return cls

    return apply


def method(*, name: str | None = None, idempotent: bool = False, timeout: float | None = None) -> Callable[[F], F]:
    """Method decorator: wire name, whether retries are safe, and a default timeout in seconds."""
    if name is not None and (not name or "/" in name):
        raise ValueError(f"bad method name {name!r}")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"method timeout must be > 0, not {timeout!r}")
    options = MethodOptions(name=name, idempotent=idempotent, timeout=timeout)

    def apply(fn: F) -> F:
        setattr(fn, _OPTIONS_ATTR, options)
        return fn

    return apply


@dataclass(frozen=True, slots=True, eq=False)
class Param:
    """One parameter of a service method."""

    name: str
    annotation: object
    required: bool
    default: object
    decode: codec.Decoder


@dataclass(frozen=True, slots=True, eq=False)
class MethodSpec:
    """One RPC: its names, parameters, result type and options, with the codec plans built once."""

    service: str
    name: str
    attr: str
    params: tuple[Param, ...]
    """The ordinary arguments, sent in the request (a client stream's `AsyncIterable` parameter is `stream`)."""
    returns: object
    """The result type; for a stream of results, the type of each message (`T` of `AsyncIterator[T]`)."""
    options: MethodOptions
    decode_result_value: codec.Decoder
    """Client side: the result plan, which ignores unknown keys (Param.decode, for arguments, refuses them)."""
    positional: tuple[str, ...] = field(default=())
    kind: CallKind = CallKind.UNARY
    stream: Param | None = None
    """The `AsyncIterable[T]` parameter of a client or bidirectional stream; its `annotation` is `T`."""
    declared: tuple[tuple[str, bool], ...] = ()
    """Every parameter as (name, keyword-only), in order, the stream parameter included."""
    declared_returns: object = None
    """The return annotation as declared (`AsyncIterator[T]` for a stream of results)."""
    encode_message: Callable[[object], bytes] = codec.dumps
    """Client side: one message of the request stream as JSON bytes."""
    parse_message: Callable[[bytes], Any] = orjson.loads
    encode_result: Callable[[object], bytes] = codec.dumps
    """Server side: the result as JSON bytes (floats-aware when the return type may hold floats)."""
    encode_arguments: Callable[[object], bytes] = codec.dumps
    parse_arguments: Callable[[bytes], Any] = orjson.loads
    """Server side: codec.loads (exact integers) where needs_exact_ints() says so, else orjson.loads."""
    parse_result: Callable[[bytes], Any] = orjson.loads
    param_names: frozenset[str] = frozenset()
    """The names of `params`: a call that names exactly these is bound without looking further."""
    attach_args: bool = False
    """The arguments hold bytes values that can travel as attachments (codec.attachable); likewise the result
    (each message of a stream of results) and the messages of a request stream."""
    attach_result: bool = False
    attach_messages: bool = False

    @property
    def attachable(self) -> bool:
        """Does this method carry bytes values that a transport may send as attachments (TCP)?"""
        return self.attach_args or self.attach_result or self.attach_messages

    @property
    def path(self) -> str:
        """`Service/method`, the address of this method on every transport."""
        return f"{self.service}/{self.name}"

    def decode_args(self, payload: bytes) -> dict[str, Any]:
        """Server side: parse and validate a request body into keyword arguments (RpcError on bad input).

        A codec.Packed body is in the attachments format (the TCP transport's raw bytes values).
        """
        if type(payload) is Packed:  # its JSON comes back here, as bytes
            try:
                unpacked: dict[str, Any] = codec.unpacked(payload, self.decode_args)
            except codec.DecodeError as exc:
                raise RpcError(Status.INVALID_ARGUMENT, f"invalid arguments: {exc.reason}") from None
            return unpacked
        try:
            obj = self.parse_arguments(payload) if payload else {}
        except orjson.JSONDecodeError:
            raise RpcError(Status.INVALID_ARGUMENT, "request body is not valid JSON") from None
        except codec.DecodeError as exc:
            raise RpcError(Status.INVALID_ARGUMENT, f"invalid arguments: {exc.reason}") from None
        if type(obj) is not dict:
            raise RpcError(Status.INVALID_ARGUMENT, "request body must be a JSON object of named arguments")
        # Nesting deeper than the encoder can write needs as many brackets: count them before looking.
        if len(payload) > _DEEP_SIZE and payload.count(b"[") + payload.count(b"{") > codec.MAX_DEPTH:
            for name, value in obj.items():
                try:
                    codec.check_depth(value)
                except codec.DecodeError as exc:
                    raise RpcError(Status.INVALID_ARGUMENT, f"argument {name!r} is {exc.reason}") from None
        kwargs = {}
        try:
            for p in self.params:
                if p.name in obj:
                    kwargs[p.name] = p.decode(obj[p.name], p.name)
                elif p.required:
                    raise self._invalid(obj)
        except codec.DecodeError:
            raise self._invalid(obj) from None
        except RecursionError:
            raise RpcError(Status.INVALID_ARGUMENT, "arguments are nested too deeply") from None
        if len(kwargs) != len(obj):
            raise self._invalid(obj)
        return kwargs

    def args_decoder(self) -> Callable[[bytes], dict[str, Any]]:
        """decode_args() for a server to keep: a body that names every parameter, each value of its type, is
        decoded by code made for this method (a few checks inline, no loop); any other body goes to decode_args()."""
        params = self.params
        if not params or len(params) > _FAST_PARAMS or self.stream is not None:
            return self.decode_args
        scope: dict[str, Any] = {
            "_slow": self.decode_args,
            "_parse": self.parse_arguments,
            "_DecodeError": codec.DecodeError,
            "_DEEP": _DEEP_SIZE,
            "_invalid": self._invalid,
            "_RpcError": RpcError,
            "_INVALID_ARGUMENT": Status.INVALID_ARGUMENT,
        }
        fetch, checks, values = [], [], []
        for i, p in enumerate(params):
            name = repr(p.name)
            fetch.append(f"v{i} = obj[{name}]")
            plain = codec.passes_as_is(p.decode)  # int, str, bool: the value itself, if it has that exact type
            if plain is not None:
                scope[f"_t{i}"] = plain
                checks.append(f"type(v{i}) is _t{i}")
                values.append(f"{name}: v{i}")
            else:
                scope[f"_d{i}"] = p.decode
                values.append(f"{name}: _d{i}(v{i}, {name})")
        lines = [
            "def decode_args(payload):",
            "    if type(payload) is bytes and len(payload) <= _DEEP:",
            "        try:",
            "            obj = _parse(payload)",
            "        except Exception:",  # not JSON, or an integer out of range: decode_args() says which
            "            return _slow(payload)",
            f"        if type(obj) is dict and len(obj) == {len(params)}:",
            "            try:",
            f"                {'; '.join(fetch)}",
            "            except KeyError:",
            "                return _slow(payload)",
            f"            if {' and '.join(checks) or 'True'}:",
            "                try:",
            f"                    return {{{', '.join(values)}}}",
            # What decode_args() would raise, without decoding it all again (user code: __post_init__)
            "                except _DecodeError:",
            "                    raise _invalid(obj) from None",
            "                except RecursionError:",
            "                    raise _RpcError(_INVALID_ARGUMENT, 'arguments are nested too deeply') from None",
            "    return _slow(payload)",
        ]
        decode: Callable[[bytes], dict[str, Any]] = _made("decode_args", f"{self.path}.decode_args", lines, scope)
        return decode

    def _invalid(self, obj: dict[str, Any]) -> RpcError:
        """INVALID_ARGUMENT listing every error of the arguments, as a `google.rpc.BadRequest` detail.

        Run only once decoding failed: it decodes again, collecting the errors that decoding stops at.
        """
        errors: list[tuple[str, str, str]] = []  # (field path, description, the one-error message)
        try:
            for p in self.params:
                if p.name in obj:
                    errors.extend(
                        (exc.path, exc.reason, f"invalid argument {exc.path!r}: {exc.reason}")
                        for exc in codec.collect_errors(p.decode, obj[p.name], p.name)
                    )
                elif p.required:
                    errors.append((p.name, "missing argument", f"missing argument {p.name!r}"))
        except RecursionError:
            return RpcError(Status.INVALID_ARGUMENT, "arguments are nested too deeply")
        names = {p.name for p in self.params}
        unknown = sorted(set(obj) - names)
        errors.extend((name, "unexpected argument", f"unexpected argument {name!r}") for name in unknown)
        del errors[codec.MAX_ERRORS :]  # the report stays small
        if not errors:  # (decoding failed, but collecting found nothing: not expected)
            return RpcError(Status.INVALID_ARGUMENT, "invalid arguments")
        if len(errors) == 1:
            message = errors[0][2]
        else:
            listed = "; ".join(f"{path}: {reason}" if path else reason for path, reason, _ in errors[:_LISTED])
            more = f"; and {len(errors) - _LISTED} more (see the error details)" if len(errors) > _LISTED else ""
            at_least = "at least " if len(errors) == codec.MAX_ERRORS else ""
            message = f"{at_least}{len(errors)} invalid arguments: {listed}{more}"
        return RpcError(Status.INVALID_ARGUMENT, message, [bad_request((path, why) for path, why, _ in errors)])

    def encode_call(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bytes:
        """Client side: bind a Python call to named arguments and encode them (TypeError like Python's)."""
        named = self._bind(args, kwargs)
        try:
            return self.encode_arguments(named)
        except TypeError as exc:
            reason = exc.__cause__ if isinstance(exc.__cause__, TypeError) else exc  # orjson wraps default()'s
            raise RpcError(Status.INVALID_ARGUMENT, f"cannot encode arguments of {self.path}: {reason}") from None

    def call_encoder(self) -> Callable[[tuple[Any, ...], Mapping[str, Any]], bytes]:
        """encode_call() for a stub to keep: a call that gives every argument by position skips its checks."""
        positional, count, encode = self.positional, len(self.params), self.encode_arguments
        if self.stream is not None or count != len(positional):
            return self.encode_call
        named = ", ".join(f"{name!r}: args[{i}]" for i, name in enumerate(positional))
        lines = [
            "def encode_positional(args, kwargs):",
            f"    if kwargs or len(args) != {count}:",
            "        return _encode_call(args, kwargs)",
            "    try:",
            f"        return _encode({{{named}}})",
            "    except TypeError:",
            "        return _encode_call(args, kwargs)",  # which raises encode_call()'s error
        ]
        scope = {"_encode_call": self.encode_call, "_encode": encode}
        encoder: Callable[[tuple[Any, ...], Mapping[str, Any]], bytes]
        encoder = _made("encode_positional", f"{self.path}.encode_positional", lines, scope)
        return encoder

    def _bind(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The arguments of a call by name, checked as Python checks them."""
        if args:
            positional = self.positional
            if self.stream is not None:
                positional = tuple(name for name in positional if name != self.stream.name)
            if len(args) > len(positional):
                raise TypeError(f"{self.attr}() takes {len(positional)} positional arguments, got {len(args)}")
            named = dict(zip(positional, args, strict=False))
            for key, value in kwargs.items():
                if key in named:
                    raise TypeError(f"{self.attr}() got multiple values for argument {key!r}")
                named[key] = value
        else:
            named = dict(kwargs)
        if len(named) != len(self.params) or named.keys() != self.param_names:
            for p in self.params:
                if p.required and p.name not in named:
                    raise TypeError(f"{self.attr}() missing required argument {p.name!r}")
            for key in named:
                if not any(p.name == key for p in self.params):
                    raise TypeError(f"{self.attr}() got an unexpected keyword argument {key!r}")
        return named

    def encode_call_attached(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bytes:
        """encode_call() as a codec.Attached: bytes values as attachments, for a transport that sends them (TCP).

        Its `plain()` is what encode_call() returns, for a server that does not read attachments. (encode_call()
        binds the arguments itself: the calls of methods without bytes pay for no extra step.)
        """
        plain = partial(self.encode_call, args, kwargs)
        if not self.attach_args:
            out = codec.Attached(plain())
            out.attachments = []
        else:
            named = self._bind(args, kwargs)  # a wrong call: TypeError as Python's (and as encode_call()'s)
            try:
                out = codec.pack(named, self.encode_arguments is codec.dumps_floats)
            except TypeError:
                plain()  # raises the RpcError encode_call() would
                raise
        out.plain = plain
        return out

    def decode_message(self, data: bytes, index: int) -> Any:
        """Server side: parse and validate message `index` (from 0) of the request stream (RpcError on bad input)."""
        assert self.stream is not None
        where = f"{self.stream.name}[{index}]"
        try:
            if type(data) is Packed:
                stream = self.stream
                return codec.unpacked(data, lambda json: stream.decode(self.parse_message(json), where))
            return self.stream.decode(self.parse_message(data), where)
        except orjson.JSONDecodeError:
            raise RpcError(Status.INVALID_ARGUMENT, f"message {where} is not valid JSON") from None
        except codec.DecodeError as exc:
            raise RpcError(Status.INVALID_ARGUMENT, f"invalid message {exc.path or where!r}: {exc.reason}") from None
        except RecursionError:
            raise RpcError(Status.INVALID_ARGUMENT, f"message {where} is nested too deeply") from None

    def split_stream(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[bytes, Any]:
        """Client side: a client stream's call as (the encoded ordinary arguments, the stream argument)."""
        args, kwargs, stream = self._split(args, kwargs)
        return self.encode_call(args, kwargs), stream

    def split_stream_attached(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[bytes, Any]:
        """split_stream() with the ordinary arguments encoded by encode_call_attached()."""
        args, kwargs, stream = self._split(args, kwargs)
        return self.encode_call_attached(args, kwargs), stream

    def _split(
        self, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> tuple[tuple[Any, ...], Mapping[str, Any], Any]:
        """A client stream's call as (its ordinary positional and keyword arguments, the stream argument)."""
        assert self.stream is not None
        name = self.stream.name
        if name in kwargs:
            stream = kwargs[name]
            kwargs = {k: v for k, v in kwargs.items() if k != name}
            at = self.positional.index(name) if name in self.positional else len(args)
            if at < len(args):  # given by position too, as Python would refuse
                raise TypeError(f"{self.attr}() got multiple values for argument {name!r}")
        else:
            at = self.positional.index(name) if name in self.positional else len(args)
            if at >= len(args):
                raise TypeError(f"{self.attr}() missing required argument {name!r}")
            stream = args[at]
            args = args[:at] + args[at + 1 :]
        if not isinstance(stream, collections.abc.AsyncIterable):
            raise TypeError(f"{self.attr}() argument {name!r} must be an async iterable, not {type(stream).__name__}")
        return args, kwargs, stream

    def decode_result(self, data: bytes) -> Any:
        """Client side: parse a result body back into the annotated return type."""
        try:
            return self.decode_result_value(self.parse_result(data), "result")
        except (orjson.JSONDecodeError, codec.DecodeError, RecursionError) as exc:
            raise RpcError(Status.INTERNAL, f"malformed result from {self.path}: {exc}") from None

    def result_decoder(self) -> Callable[[bytes], Any]:
        """decode_result() for a client to keep: a result of a type that codec.passes_as_is() names (int, str,
        bool) is checked inline; any other goes to decode_result()."""
        plain = codec.passes_as_is(self.decode_result_value)
        if plain is None:
            return self.decode_result
        lines = [
            "def decode_result(data):",
            "    try:",
            "        value = _parse(data)",
            "    except Exception:",  # decode_result() says why
            "        return _slow(data)",
            "    return value if type(value) is _type else _slow(data)",
        ]
        scope = {"_parse": self.parse_result, "_slow": self.decode_result, "_type": plain}
        decode: Callable[[bytes], Any] = _made("decode_result", f"{self.path}.decode_result", lines, scope)
        return decode

    def decode_result_attached(self, data: bytes) -> Any:
        """decode_result() of an answer that may be in the attachments format (a codec.Packed)."""
        if type(data) is not Packed:
            return self.decode_result(data)
        try:
            return codec.unpacked(data, lambda json: self.decode_result_value(self.parse_result(json), "result"))
        except (orjson.JSONDecodeError, codec.DecodeError, RecursionError) as exc:
            raise RpcError(Status.INTERNAL, f"malformed result from {self.path}: {exc}") from None

    def encode_result_attached(self, result: object) -> bytes:
        """Server side: encode_result(), as a codec.Attached if the result's bytes values can be attachments."""
        if self.attach_result:
            return codec.pack(result, self.encode_result is codec.dumps_floats)
        return self.encode_result(result)

    def encode_message_attached(self, item: object) -> bytes:
        """Client side: encode_message(), as a codec.Attached (whose `plain()` is encode_message's) if it may be."""
        if not self.attach_messages:
            return self.encode_message(item)
        out = codec.pack(item, self.encode_message is codec.dumps_floats)
        out.plain = partial(self.encode_message, item)
        return out


@dataclass(frozen=True, slots=True, eq=False)
class ServiceSpec:
    """A service: its wire name and methods (keyed by Python attribute name)."""

    name: str
    protocol: type
    methods: Mapping[str, MethodSpec]


_specs: dict[type, ServiceSpec] = {}


def service_spec(protocol: type) -> ServiceSpec:
    """Introspect a Protocol class into a ServiceSpec (cached); TypeError if it cannot be served."""
    try:
        return _specs[protocol]
    except KeyError:
        pass
    if not isinstance(protocol, type):
        raise TypeError(f"a service must be a class (a typing.Protocol), not {protocol!r}")
    name = protocol.__dict__.get(_NAME_ATTR, protocol.__name__)
    methods = {}
    for attr in _rpc_names(protocol):
        fn = inspect.getattr_static(protocol, attr)
        methods[attr] = _method_spec(name, protocol, attr, fn)
    if not methods:
        raise TypeError(f"{protocol.__name__} declares no methods")
    wire = [m.name for m in methods.values()]
    if len(set(wire)) != len(wire):
        raise TypeError(f"{protocol.__name__} has two methods with the same wire name")
    spec = ServiceSpec(name, protocol, methods)
    _specs[protocol] = spec
    return spec


def _rpc_names(protocol: type) -> list[str]:
    names: dict[str, None] = {}
    for klass in reversed(protocol.__mro__):
        if klass in (object, typing.Generic) or getattr(klass, "__module__", "") == "typing":
            continue
        for attr, value in vars(klass).items():
            if not attr.startswith("_") and callable(value):
                names[attr] = None
    return list(names)


def _bare(tp: object) -> object:
    """`tp` without an outer Annotated (an implementation may declare `datetime` for `AwareDatetime`)."""
    return typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Annotated else tp


class _NotAStream:
    """What _streamed() says of an annotation that is not a stream (None is a message type: AsyncIterator[None])."""


NOT_A_STREAM: object = _NotAStream()


def _streamed(tp: object, origins: tuple[object, ...]) -> object:
    """T if `tp` is one of `origins`[T] (AsyncIterator[T], AsyncIterable[T], ...), else NOT_A_STREAM."""
    if any(tp is origin for origin in origins):
        raise TypeError(f"{_name(tp)} needs the type of its messages, e.g. {_name(tp)}[int]")
    if typing.get_origin(tp) in origins:
        args = typing.get_args(tp)
        if not args:
            raise TypeError(f"{tp!r} needs the type of its messages, e.g. AsyncIterator[int]")
        item: object = args[0]
        return item
    return NOT_A_STREAM


_RESULT_STREAMS = (collections.abc.AsyncIterator, collections.abc.AsyncGenerator)
_REQUEST_STREAMS = (collections.abc.AsyncIterable, collections.abc.AsyncIterator)
_SYNC_ITERATORS = (
    collections.abc.Iterator,
    collections.abc.Iterable,
    collections.abc.Generator,
)
_ITERATORS = (*_RESULT_STREAMS, collections.abc.AsyncIterable, *_SYNC_ITERATORS)


def _name(tp: object) -> str:
    """`AsyncIterator[int]` rather than `collections.abc.AsyncIterator[int]`, for error messages."""
    return repr(tp).replace("collections.abc.", "").replace("typing.", "") if not isinstance(tp, type) else tp.__name__


def _iterator_in(tp: object) -> object | None:
    """The first (async or sync) iterator type in the annotation `tp`, at any depth; None if there is none."""
    origin = typing.get_origin(tp)
    if any(tp is it or origin is it for it in _ITERATORS):
        return tp
    if origin is typing.Annotated:
        return _iterator_in(typing.get_args(tp)[0])
    if origin is typing.Literal:
        return None
    for arg in typing.get_args(tp):
        found = _iterator_in(arg)
        if found is not None:
            return found
    return None


def _stream_misuse(tp: object, attr: str, param: str | None) -> str | None:
    """Why the annotation `tp` (of parameter `param`, or the result) cannot be a stream, and how to declare one.

    None if `tp` holds no iterator type: the codec's own error then says what is wrong with it.
    """
    found = _iterator_in(tp)
    if found is None:
        return None
    origin = typing.get_origin(found) or found
    item = typing.get_args(found)[0] if typing.get_args(found) else "T"
    item_name = _name(item)
    whole = found is tp
    if param is None:
        fix = f"declare a stream of results as `def {attr}(...) -> AsyncIterator[{item_name}]` (without `async`)"
        if not whole:
            return f"{_name(tp)}: a stream can only be the whole result, not inside another type; {fix}"
        if any(origin is it for it in _SYNC_ITERATORS):
            return f"{_name(tp)} cannot be sent; {fix}, or return a list: `async def {attr}(...) -> list[{item_name}]`"
        return f"{_name(tp)} is not a stream of results; {fix}"
    fix = f"declare a stream of requests as `{param}: AsyncIterable[{item_name}]`"
    if not whole:
        return f"{_name(tp)}: a stream can only be a whole parameter (not optional, nor inside another type); {fix}"
    if any(origin is it for it in _SYNC_ITERATORS):
        return f"{_name(tp)} cannot be sent; {fix}, or send a list: `{param}: list[{item_name}]`"
    return f"{_name(tp)} is not a stream of requests; {fix}"


def _method_spec(service: str, protocol: type, attr: str, fn: Callable[..., Any]) -> MethodSpec:
    where = f"{protocol.__name__}.{attr}"
    try:
        hints = typing.get_type_hints(fn, include_extras=True)  # Annotated kept: AwareDatetime
    except Exception as exc:
        raise TypeError(f"cannot resolve the annotations of {where}: {exc}") from None
    if "return" not in hints:
        raise TypeError(f"{where} has no return annotation")
    try:
        result_item = _streamed(hints["return"], _RESULT_STREAMS)
        streams_results = result_item is not NOT_A_STREAM
    except TypeError as exc:
        raise TypeError(f"{where}: return type: {exc}") from None
    if not streams_results and not inspect.iscoroutinefunction(fn):
        misuse = _stream_misuse(hints["return"], attr, None)
        if misuse is not None:
            raise TypeError(f"{where}: return type {misuse}")
        raise TypeError(
            f"{where} must be declared `async def` (or `def {attr}(...) -> AsyncIterator[T]` for a stream of results)"
        )
    if streams_results and inspect.iscoroutinefunction(fn):
        raise TypeError(
            f"{where} returns a stream: declare it `def {attr}(...) -> AsyncIterator[...]`, without `async`, since "
            "an `async def` without `yield` is a coroutine that returns an iterator (`async for x in await ...`)"
        )
    params = []
    positional = []
    declared = []
    stream: Param | None = None
    for p in list(inspect.signature(fn).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"{where}: *args and **kwargs cannot be sent over the wire")
        if p.name not in hints:
            raise TypeError(f"{where}: parameter {p.name!r} has no annotation")
        declared.append((p.name, p.kind is p.KEYWORD_ONLY))
        if p.kind is not p.KEYWORD_ONLY:
            positional.append(p.name)
        try:
            item = _streamed(hints[p.name], _REQUEST_STREAMS)
        except TypeError as exc:
            raise TypeError(f"{where}: parameter {p.name!r}: {exc}") from None
        if item is not NOT_A_STREAM:
            if stream is not None:
                raise TypeError(
                    f"{where}: parameters {stream.name!r} and {p.name!r} are both streams; a method takes at most "
                    "one AsyncIterable parameter (send one stream of a dataclass that holds both)"
                )
            if p.default is not p.empty:
                raise TypeError(f"{where}: the stream parameter {p.name!r} cannot have a default")
            if _iterator_in(item) is not None:
                raise TypeError(
                    f"{where}: parameter {p.name!r}: the messages of a stream cannot be streams themselves "
                    f"({_name(hints[p.name])}); send a list in each message: AsyncIterable[list[...]]"
                )
            try:
                stream = Param(p.name, item, True, None, codec.decoder(item))
            except TypeError as exc:
                raise TypeError(f"{where}: parameter {p.name!r}: messages: {exc}") from None
            continue
        try:
            decode = codec.decoder(hints[p.name])
        except TypeError as exc:
            misuse = _stream_misuse(hints[p.name], attr, p.name)
            raise TypeError(f"{where}: parameter {p.name!r}: {misuse or exc}") from None
        required = p.default is p.empty
        params.append(Param(p.name, hints[p.name], required, None if required else p.default, decode))
    returns = result_item if streams_results else hints["return"]
    if streams_results and _iterator_in(returns) is not None:
        raise TypeError(
            f"{where}: return type: the messages of a stream cannot be streams themselves "
            f"({_name(hints['return'])}); send a list in each message: AsyncIterator[list[...]]"
        )
    try:
        # A result ignores unknown keys at every level (a newer server may add fields); arguments refuse them.
        decode_result = codec.decoder(returns, ignore_unknown=True)
    except TypeError as exc:
        misuse = None if streams_results else _stream_misuse(returns, attr, None)
        raise TypeError(f"{where}: return type {misuse}" if misuse else f"{where}: return type: {exc}") from None
    if stream is None:
        kind = CallKind.SERVER_STREAM if streams_results else CallKind.UNARY
    else:
        kind = CallKind.BIDI_STREAM if streams_results else CallKind.CLIENT_STREAM
    options = getattr(fn, _OPTIONS_ATTR, None) or MethodOptions()
    result_floats = codec.may_hold_float(returns)
    argument_floats = any(codec.may_hold_float(p.annotation) for p in params)
    exact_result = codec.needs_exact_ints(returns)
    exact_arguments = any(codec.needs_exact_ints(p.annotation) for p in params)
    message_floats = stream is not None and codec.may_hold_float(stream.annotation)
    exact_messages = stream is not None and codec.needs_exact_ints(stream.annotation)
    return MethodSpec(
        service=service,
        name=options.name or attr,
        attr=attr,
        params=tuple(params),
        param_names=frozenset(p.name for p in params),
        returns=returns,
        options=options,
        decode_result_value=decode_result,
        positional=tuple(positional),
        encode_result=codec.dumps_floats if result_floats else codec.dumps,
        encode_arguments=codec.dumps_floats if argument_floats else codec.dumps,
        parse_arguments=codec.loads if exact_arguments else orjson.loads,
        parse_result=codec.loads if exact_result else orjson.loads,
        kind=kind,
        stream=stream,
        declared=tuple(declared),
        declared_returns=hints["return"],
        encode_message=codec.dumps_floats if message_floats else codec.dumps,
        parse_message=codec.loads if exact_messages else orjson.loads,
        attach_args=codec.attachable(*(p.annotation for p in params)),
        attach_result=codec.attachable(returns),
        attach_messages=stream is not None and codec.attachable(stream.annotation),
    )


def check_implementation(spec: ServiceSpec, impl: object) -> dict[str, Callable[..., Any]]:
    """The bound handlers of `impl` for each method; TypeError if one is missing, sync or mismatched."""
    handlers = {}
    proto = spec.protocol.__name__
    for attr, m in spec.methods.items():
        fn = getattr(impl, attr, None)
        if fn is None or not callable(fn):
            raise TypeError(f"{type(impl).__name__} does not implement {proto}.{attr}")
        if m.kind.streams_results:
            if not inspect.isasyncgenfunction(fn):
                raise TypeError(
                    f"{type(impl).__name__}.{attr} must be an async generator (`async def` that `yield`s each message) "
                    f"to implement the stream of results of {proto}.{attr}"
                )
        elif not inspect.iscoroutinefunction(fn):
            raise TypeError(f"{type(impl).__name__}.{attr} must be `async def` to implement {proto}.{attr}")
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            raise TypeError(f"cannot inspect the signature of {type(impl).__name__}.{attr}") from None
        got = [(p.name, p.kind is p.KEYWORD_ONLY) for p in sig.parameters.values()]
        want = list(m.declared) or [(p.name, p.name not in m.positional) for p in m.params]
        if got != want:
            raise TypeError(
                f"{type(impl).__name__}.{attr}{sig} does not match {proto}.{attr}: "
                f"expected parameters ({', '.join(name for name, _ in want)})"
            )
        try:
            impl_hints = typing.get_type_hints(fn)
        except Exception:
            impl_hints = {}
        for p in m.params if m.stream is None else (*m.params, m.stream):
            if p is m.stream and p.name in impl_hints:
                if _streamed(impl_hints[p.name], _REQUEST_STREAMS) not in (p.annotation, _bare(p.annotation)):
                    raise TypeError(
                        f"{type(impl).__name__}.{attr}: parameter {p.name!r} is {impl_hints[p.name]!r}, "
                        f"but {proto}.{attr} declares a stream of {p.annotation!r}"
                    )
                continue
            if p.name in impl_hints and impl_hints[p.name] not in (p.annotation, _bare(p.annotation)):
                raise TypeError(
                    f"{type(impl).__name__}.{attr}: parameter {p.name!r} is {impl_hints[p.name]!r}, "
                    f"but {proto}.{attr} declares {p.annotation!r}"
                )
        returns = m.declared_returns if m.declared_returns is not None else m.returns
        if "return" in impl_hints and impl_hints["return"] != returns and not _same_stream(impl_hints["return"], m):
            raise TypeError(
                f"{type(impl).__name__}.{attr} returns {impl_hints['return']!r}, "
                f"but {proto}.{attr} declares {returns!r}"
            )
        handlers[attr] = fn
    return handlers


def _same_stream(declared: object, m: MethodSpec) -> bool:
    """An implementation may declare AsyncIterator[T] or AsyncGenerator[T, None] for the Protocol's AsyncIterator[T]."""
    if not m.kind.streams_results:
        return False
    try:  # an async generator may be annotated as any of these
        item = _streamed(declared, (*_RESULT_STREAMS, collections.abc.AsyncIterable))
    except TypeError:
        return False
    return item in (m.returns, _bare(m.returns))
