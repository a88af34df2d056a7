"""`kubrpc call`, `list` and `describe`: a server's methods from the command line, as grpcurl does it.

list and describe read the server's OpenAPI document: over HTTP from GET /openapi.json, over TCP (and
in-process) from the built-in `kubrpc.Reflection` service. Both print the same. Stream methods are in the
document's `x-kubrpc-streams` (OpenAPI's `paths` cannot describe them); `call` looks there for a method the
server refuses as a unary call, and runs it as the stream it is.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import ssl
import sys
import threading
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import anyio
import orjson

from ._limits import DEFAULT_MAX_MESSAGE_SIZE
from ._streaming import StreamCall
from .client import Channel, connect
from .codec import check_metadata
from .errors import RpcError
from .interface import CallKind
from .openapi import STREAMS
from .reflection import REFLECTION_SERVICE
from .status import Status

_SCHEMAS = "#/components/schemas/"
# C0 controls (newlines included), DEL and C1: what a server's text could use to rewrite the user's terminal.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}


def _one_line(text: str) -> str:
    """`text` with control characters escaped: one line, and no terminal escape sequence from a server's text."""
    return text.translate(_CONTROLS)


class _Fail(Exception):
    """A one-line error for the user: printed as `kubrpc: message`, exit status `status`."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The client's SSLContext from --cacert, --cert, --key and --insecure; None leaves the default."""
    if args.key and not args.cert:
        raise _Fail("--key needs --cert", 2)
    if not (args.cacert or args.cert or args.insecure):
        return None  # https:// still verifies against the system's CAs
    try:
        context = ssl.create_default_context(cafile=args.cacert)
        if args.cert:
            context.load_cert_chain(args.cert, args.key)
    except (OSError, ssl.SSLError) as exc:
        raise _Fail(f"cannot load TLS files: {exc}", 2) from None
    if args.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _headers(args: argparse.Namespace) -> dict[str, str]:
    """The -H metadata, checked as the library checks a call's (no reserved names, no CR/LF): else _Fail."""
    metadata = {}
    for header in args.header:
        key, colon, value = header.partition(":")
        if not colon or not key.strip():
            raise _Fail(f"bad -H {header!r}: expected 'KEY: VALUE'", 2)
        metadata[key.strip().lower()] = value.strip()
    try:  # here too for list and describe over HTTP, whose GET /openapi.json does not go through Channel.call
        check_metadata(metadata)
    except ValueError as exc:
        raise _Fail(f"bad -H: {exc}", 2) from None
    return metadata


def _channel(args: argparse.Namespace) -> Channel:
    try:
        return connect(args.target, transport=args.transport, balancer=args.balancer, ssl=_tls(args))
    except (ValueError, TypeError, LookupError) as exc:  # bad target, unknown transport or balancer
        raise _Fail(str(exc), 2) from None


def _arguments(args: argparse.Namespace) -> bytes:
    """The JSON arguments: positional, or -d JSON / -d @FILE / -d - (stdin); `{}` when none."""
    if args.arguments is not None and args.data is not None:
        raise _Fail("give the arguments either as JSON or with -d, not both", 2)
    text: str | bytes = args.arguments if args.arguments is not None else args.data or "{}"
    limit = DEFAULT_MAX_MESSAGE_SIZE  # what the channel sends at most: read one byte more, never the whole of it
    if text == "-":
        if sys.stdin is None:
            raise _Fail("-d - reads the arguments from stdin, and there is none", 2)
        text = sys.stdin.buffer.read(limit + 1)
    elif isinstance(text, str) and text.startswith("@"):
        try:
            with open(text[1:], "rb") as file:
                text = file.read(limit + 1)
        except OSError as exc:
            raise _Fail(f"cannot read {text[1:]!r}: {exc.strerror or exc}", 2) from None
    data = text.encode() if isinstance(text, str) else text
    if len(data) > limit:
        raise _Fail(f"arguments over the maximum message size of {limit} bytes", 2)
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise _Fail(f"arguments are not valid JSON: {exc}", 2) from None
    if type(value) is not dict:
        raise _Fail("arguments must be a JSON object of named arguments, e.g. '{\"a\": 1}'", 2)
    return data


def _path(method: str) -> str:
    """`Service/method` from `Service/method`, `/Service/method` or `Service.method`."""
    method = method.lstrip("/")
    service, sep, name = method.rpartition("/") if "/" in method else method.rpartition(".")
    if not sep or not service or not name:
        raise _Fail(f"bad METHOD {method!r}: expected Service/method or Service.method", 2)
    return f"{service}/{name}"


async def call(args: argparse.Namespace) -> int:
    """`kubrpc call`: print the result as JSON, or the error as JSON on stderr (exit 1).

    A stream method (the server refuses it as a unary call; its reflection says which kind it is) prints each
    message of a stream of results as one JSON line as it arrives, and reads the messages of a stream of
    requests from stdin, one JSON message per line, until EOF.
    """
    path, payload, metadata = _path(args.method), _arguments(args), _headers(args)
    async with _channel(args) as channel:
        try:
            result = await channel.call(path, payload, timeout=args.timeout, metadata=metadata)
        except RpcError as exc:
            kind = await _stream_kind(args, channel, path, exc) if exc.code is Status.UNIMPLEMENTED else None
            if kind is None:
                print(orjson.dumps(exc.to_json()).decode(), file=sys.stderr)
                return 1
            if kind.streams_requests and args.data == "-":
                raise _Fail(f"{path} reads its stream of messages from stdin: give the arguments as JSON", 2) from None
            return await _stream(args, channel, path, payload, metadata, kind)
    print(orjson.dumps(_value(args, result), option=orjson.OPT_INDENT_2).decode())
    return 0


def _value(args: argparse.Namespace, data: bytes) -> Any:
    """A result or message from the server, parsed; _Fail if it is not JSON."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:  # not a kubrpc server (a web server that answers any POST with 200)
        start = data[:60].decode("utf-8", "replace")  # repr() escapes its control characters
        problem = f"the answer is not JSON ({len(data)} bytes: {start!r}...): is {args.target} a kubrpc server?"
        raise _Fail(problem) from None


async def _stream_kind(args: argparse.Namespace, channel: Channel, path: str, refusal: RpcError) -> CallKind | None:
    """The kind of a stream method, as the server describes it; None if it is no stream method (or cannot say).

    The server's reflection (or /openapi.json) says; without it (`Server(reflection=False)`, or a token not
    granted `kubrpc.Reflection/*`), the words of a kubrpc server's refusal of the unary call do.
    """
    try:
        if channel.transport_name == "http":
            document = await _openapi_over_http(args, channel)
        else:
            document = await _reflect(args, channel, _headers(args), "describe", {"name": path})
    except (_Fail, RpcError):
        document = {}
    entry = document.get(STREAMS, {}).get(f"/{path}") if isinstance(document, dict) else None
    if isinstance(entry, dict) and entry.get("kind") in _KIND_NAMES:
        return CallKind(entry["kind"])
    said = _REFUSAL.match(refusal.message)
    if said is not None and said["path"] == path:
        return _REFUSED_KINDS[said["kind"]]
    return None


#: How a kubrpc server refuses a stream method called as a unary call (kubrpc.server.Server._not_served).
_REFUSAL = re.compile(r"(?P<path>\S+) is a (?P<kind>server stream|client stream|bidi stream) call: ")
_REFUSED_KINDS = {
    "server stream": CallKind.SERVER_STREAM,
    "client stream": CallKind.CLIENT_STREAM,
    "bidi stream": CallKind.BIDI_STREAM,
}


async def _stream(
    args: argparse.Namespace, channel: Channel, path: str, payload: bytes, metadata: dict[str, str], kind: CallKind
) -> int:
    """Run a stream call: the results as JSON lines (or the one result), stdin's lines as the requests."""
    try:
        stream = await channel.open_stream(path, payload, kind=kind, timeout=args.stream_timeout, metadata=metadata)
    except RpcError as exc:
        print(orjson.dumps(exc.to_json()).decode(), file=sys.stderr)
        return 1
    failure: BaseException | None = None
    try:
        async with anyio.create_task_group() as tasks:
            if kind.streams_requests:
                tasks.start_soon(_send_lines, stream)
            try:
                if kind.streams_results:
                    while (data := await stream.receive()) is not None:
                        print(orjson.dumps(_value(args, data)).decode(), flush=True)
                else:
                    data = await stream.receive()
                    if data is None:
                        raise RpcError(Status.INTERNAL, f"{path} ended without a result")
                    print(orjson.dumps(_value(args, data), option=orjson.OPT_INDENT_2).decode())
            except (RpcError, _Fail) as exc:
                failure = exc
            tasks.cancel_scope.cancel()  # stop reading stdin: the call has ended
    finally:
        stream.cancel()
    if isinstance(failure, RpcError):
        print(orjson.dumps(failure.to_json()).decode(), file=sys.stderr)
        return 1
    if failure is not None:
        raise failure
    return 0


async def _send_lines(stream: StreamCall) -> None:
    """Send each line of stdin as one message of the stream (blank lines skipped), then half-close at EOF.

    A problem on this side (a line that is no JSON message, stdin unreadable) cancels the call, and the
    receiving side raises it.
    """
    limit = DEFAULT_MAX_MESSAGE_SIZE
    number = 0
    try:
        async with aclosing(_lines(limit + 2)) as lines:
            async for line in lines:
                number += 1
                message = line.strip()
                if not message:
                    continue
                if len(message) > limit:
                    raise _Fail(f"line {number} of stdin is over the maximum message size of {limit} bytes", 2)
                try:
                    orjson.loads(message)
                except orjson.JSONDecodeError as exc:
                    raise _Fail(f"line {number} of stdin is not one JSON message: {exc}", 2) from None
                try:
                    if not await stream.send(message):
                        return  # the call has ended: the receiving side says how
                except RpcError as exc:
                    if exc.code is Status.RESOURCE_EXHAUSTED:  # too large to send: this side's fault
                        raise
                    return  # the call has ended: the receiving side says how
        with contextlib.suppress(RpcError):
            await stream.close_send()
    except (_Fail, RpcError) as exc:
        stream.fail(exc)


async def _lines(limit: int) -> AsyncGenerator[bytes, None]:
    """stdin's lines (each up to `limit` bytes), read one at a time by a daemon thread.

    A daemon thread, not a worker thread: a read of a terminal cannot be interrupted, and the process must be
    able to exit while one waits (the server ended the stream while the user still types).
    """
    source = sys.stdin.buffer if sys.stdin is not None else None
    if source is None:
        return
    loop = asyncio.get_running_loop()
    ready: asyncio.Queue[bytes | BaseException] = asyncio.Queue()
    wanted = threading.Semaphore(0)  # one line read per line asked for: nothing piles up in memory
    stopped = False

    def deliver(item: bytes | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            loop.call_soon_threadsafe(ready.put_nowait, item)

    def read() -> None:
        while True:
            wanted.acquire()
            if stopped:
                return
            try:
                line = source.readline(limit)
            except BaseException as exc:  # handed to the event loop, raised there
                deliver(exc)
                return
            deliver(line)
            if not line:
                return

    threading.Thread(target=read, name="kubrpc stdin", daemon=True).start()
    try:
        while True:
            wanted.release()
            item = await ready.get()
            if isinstance(item, BaseException):
                raise _Fail(f"cannot read stdin: {item}", 2)
            if not item:
                return
            yield item
    finally:
        stopped = True
        wanted.release()


async def list_services(args: argparse.Namespace) -> int:
    """`kubrpc list`: the services, or the methods of one (as Service/method, with the kind of a stream)."""
    document = await _document(args, args.service)
    services: dict[str, list[str]] = {}
    for path, operation in _methods(document):
        service, _, name = path[1:].rpartition("/")
        kind = operation.get("kind") if STREAMS in operation else None
        services.setdefault(service, []).append(f"{name} ({_KIND_NAMES[kind]})" if kind in _KIND_NAMES else name)
    if args.service is None:
        for service in services:
            print(_one_line(service))
    else:
        for name in services.get(args.service, []):
            print(_one_line(f"{args.service}/{name}"))
    return 0


_KIND_NAMES = {
    CallKind.SERVER_STREAM.value: "server stream",
    CallKind.CLIENT_STREAM.value: "client stream",
    CallKind.BIDI_STREAM.value: "bidirectional stream",
}


def _methods(document: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(path, operation) of every method, each service's together; a stream's operation has the key STREAMS.

    A unary method's operation is its OpenAPI `post`; a stream's is its entry of `x-kubrpc-streams`.
    """
    by_service: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for path, item in document.get("paths", {}).items():
        operation = item.get("post", {}) if isinstance(item, dict) else {}
        by_service.setdefault(path[1:].rpartition("/")[0], []).append((path, operation))
    for path, entry in document.get(STREAMS, {}).items():
        operation = {**entry, STREAMS: True} if isinstance(entry, dict) else {STREAMS: True}
        by_service.setdefault(path[1:].rpartition("/")[0], []).append((path, operation))
    return [method for methods in by_service.values() for method in methods]


async def describe(args: argparse.Namespace) -> int:
    """`kubrpc describe`: each method's signature, then its request and result schemas (JSON Schema)."""
    document = await _document(args, args.name)
    if args.json:
        print(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
        return 0
    components = document.get("components", {}).get("schemas", {})
    service_shown = ""
    for path, operation in _methods(document):
        service = path[1:].rpartition("/")[0]
        if service != service_shown:
            print(f"{'' if not service_shown else chr(10)}service {_one_line(service)}")
            service_shown = service
        if STREAMS in operation:
            request, result = _arguments_schema(operation, components), operation.get("result", {})
            kind = CallKind(operation["kind"]) if operation.get("kind") in _KIND_NAMES else CallKind.UNARY
            stream = operation.get("stream") if kind.streams_requests else None
            text = signature(path[1:], request, result, stream=stream, streams_results=kind.streams_results)
        else:
            request, result = _request_schema(operation, components), _result_schema(operation)
            text, kind, stream = signature(path[1:], request, result), CallKind.UNARY, None
        print(f"  {_one_line(text)}")
        doc = operation.get("description") or operation.get("summary")
        if doc:
            print("    " + "\n    ".join(_one_line(line) for line in str(doc).splitlines()))
        if args.name and "/" in args.name:  # one method: its schemas in full
            print(f"    {'arguments' if kind is not CallKind.UNARY else 'request'}: {_json(request)}")
            if isinstance(stream, dict):
                print(f"    each request: {_json(stream.get('schema', {}))}")
            print(f"    {'each result' if kind.streams_results else 'result'}: {_json(result)}")
    wanted = _referenced([document.get("paths", {}), document.get(STREAMS, {})], components)
    if wanted:
        print("\nschemas:")
        for name in wanted:
            schema = components[name]
            if "properties" in schema:  # a dataclass, as its fields
                fields = ", ".join(f"{k}: {type_text(v)}" for k, v in schema["properties"].items())
                print(_one_line(f"  {name}({fields})"))
            else:
                print(_one_line(f"  {name}: {type_text(schema)}"))
            print(f"    {_json(schema)}")
    return 0


async def _document(args: argparse.Namespace, name: str | None) -> dict[str, Any]:
    """The server's OpenAPI document, narrowed to `name` (a service or Service/method) if given."""
    async with _channel(args) as channel:
        if channel.transport_name == "http":
            document = await _openapi_over_http(args, channel)
            if name:
                document = _narrow(document, name)
            return document
        metadata = _headers(args)
        names = [name] if name else await _reflect(args, channel, metadata, "services", {})
        paths: dict[str, Any] = {}
        streams: dict[str, Any] = {}
        schemas: dict[str, Any] = {}
        for each in names:
            part = await _reflect(args, channel, metadata, "describe", {"name": each})
            paths.update(part.get("paths", {}))
            streams.update(part.get(STREAMS, {}))
            schemas.update(part.get("components", {}).get("schemas", {}))
        described: dict[str, Any] = {"paths": paths}
        if streams:
            described[STREAMS] = streams
        described["components"] = {"schemas": schemas}
        return described


async def _reflect(
    args: argparse.Namespace, channel: Channel, metadata: dict[str, str], method: str, arguments: dict[str, str]
) -> Any:
    """Call a method of the server's reflection service; _Fail saying why if it cannot."""
    try:
        result = await channel.call(
            f"{REFLECTION_SERVICE}/{method}", orjson.dumps(arguments), timeout=args.timeout, metadata=metadata
        )
    except RpcError as exc:
        if exc.code is Status.UNIMPLEMENTED and REFLECTION_SERVICE in exc.message:
            raise _Fail(f"{args.target} does not serve {REFLECTION_SERVICE} (Server(reflection=False))") from None
        raise _Fail(f"{exc.code.name}: {exc.message}") from None
    return orjson.loads(result)


async def _openapi_over_http(args: argparse.Namespace, channel: Channel) -> dict[str, Any]:
    """GET /openapi.json from one of the channel's endpoints (the first, once resolved)."""
    import aiohttp

    with anyio.move_on_after(args.timeout):
        while not channel.endpoints:  # noqa: ASYNC110 - a Channel has no event for its first snapshot
            await anyio.sleep(0.02)
    if not channel.endpoints:
        raise _Fail(f"no endpoint for {args.target} within {args.timeout:g} s")
    tls = _tls(args)
    secure = tls is not None or args.target.startswith("https://")
    url = f"{'https' if secure else 'http'}://{channel.endpoints[0].address}/openapi.json"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=args.timeout)) as session:
            async with session.get(url, headers=_headers(args), ssl=tls if tls is not None else secure) as response:
                body = await response.read()
                if response.status != 200:
                    text = body[:200].decode("utf-8", "replace")
                    raise _Fail(f"GET {url}: HTTP {response.status}: {text}")
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise _Fail(f"GET {url}: {exc or type(exc).__name__}") from None
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _Fail(f"GET {url}: not a JSON document") from None
    return document if isinstance(document, dict) else {}


def _narrow(document: dict[str, Any], name: str) -> dict[str, Any]:
    """The paths of one service or method, as the reflection service answers; _Fail (with a hint) if unknown."""
    from .reflection import _used, suggest

    service, slash, method = name.partition("/")
    paths, streams = document.get("paths", {}), document.get(STREAMS, {})
    services = {p[1:].rpartition("/")[0] for p in [*paths, *streams]}
    if service not in services:
        raise _Fail(f"NOT_FOUND: unknown service {service!r}{suggest(service, services)}")
    mine = {p: item for p, item in paths.items() if p[1:].rpartition("/")[0] == service}
    my_streams = {p: item for p, item in streams.items() if p[1:].rpartition("/")[0] == service}
    if slash:
        methods = [p.rpartition("/")[2] for p in [*mine, *my_streams]]
        if method not in methods:
            raise _Fail(f"NOT_FOUND: unknown method {method!r} of service {service!r}{suggest(method, methods)}")
        wanted = f"/{service}/{method}"
        mine = {p: item for p, item in mine.items() if p == wanted}
        my_streams = {p: item for p, item in my_streams.items() if p == wanted}
    schemas = document.get("components", {}).get("schemas", {})
    narrowed: dict[str, Any] = {"paths": mine}  # as the reflection service answers
    if my_streams:
        narrowed[STREAMS] = my_streams
    narrowed["components"] = {"schemas": {n: schemas[n] for n in _used([mine, my_streams], schemas)}}
    return narrowed


def _request_schema(operation: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = (
        operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
    )
    ref = schema.get("$ref", "")
    if ref.startswith(_SCHEMAS):  # a request body kept under components
        schema = components.get(ref[len(_SCHEMAS) :], {})
    return schema


def _arguments_schema(operation: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = operation.get("arguments", {})
    if not isinstance(schema, dict):
        return {}
    ref = schema.get("$ref", "")
    if isinstance(ref, str) and ref.startswith(_SCHEMAS):
        schema = components.get(ref[len(_SCHEMAS) :], {})
    return schema


def _result_schema(operation: dict[str, Any]) -> dict[str, Any]:
    ok: dict[str, Any] = operation.get("responses", {}).get("200", {})
    return dict(ok.get("content", {}).get("application/json", {}).get("schema", {}))


def signature(
    path: str,
    request: dict[str, Any],
    result: dict[str, Any],
    *,
    stream: dict[str, Any] | None = None,
    streams_results: bool = False,
) -> str:
    """`Service/method(a: int, b: int = 0) -> int`, read from the JSON schemas of its request and result.

    A stream method: `ticks(n: int) -> stream int`, `total(values: stream int) -> int`, where `stream` is the
    `x-kubrpc-streams` description of the stream parameter (its name, position and schema of one message).
    """
    required = set(request.get("required", []))
    params = []
    for name, schema in request.get("properties", {}).items():
        text = f"{name}: {type_text(schema)}"
        if name not in required:
            text += f" = {orjson.dumps(schema['default']).decode()}" if "default" in schema else " = ..."
        params.append(text)
    if stream is not None:
        position = stream.get("position")
        at = position if isinstance(position, int) and 0 <= position <= len(params) else len(params)
        params.insert(at, f"{stream.get('name', 'messages')}: stream {type_text(stream.get('schema'))}")
    return f"{path}({', '.join(params)}) -> {'stream ' if streams_results else ''}{type_text(result)}"


_FORMATS = {"date-time": "datetime", "date": "date", "uuid": "UUID"}
_TYPES = {"integer": "int", "number": "float", "boolean": "bool", "null": "None", "string": "str"}


def type_text(schema: Any) -> str:
    """A JSON schema written as the Python annotation it came from (`list[int]`, `Point | None`, ...)."""
    if not isinstance(schema, dict) or not schema:
        return "Any"
    if "$ref" in schema:
        return str(schema["$ref"]).rpartition("/")[2].removesuffix("-Input")
    if "anyOf" in schema:
        options = schema["anyOf"]
        if {"type": "number"} in options and any(o.get("enum") == ["NaN", "Infinity", "-Infinity"] for o in options):
            return "float"  # a float: a number or one of the spelled non-finite values
        return " | ".join(type_text(o) for o in options)
    if "enum" in schema:
        return f"Literal[{', '.join(orjson.dumps(v).decode() for v in schema['enum'])}]"
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join(type_text({**schema, "type": k}) for k in kind)
    if kind == "string":
        if schema.get("contentEncoding") == "base64":
            return "bytes"
        return _FORMATS.get(schema.get("format", ""), "str")
    if kind == "array":
        if "prefixItems" in schema:
            return f"tuple[{', '.join(type_text(s) for s in schema['prefixItems'])}]"
        outer = "set" if schema.get("uniqueItems") else "list"
        return f"{outer}[{type_text(schema['items'])}]" if "items" in schema else outer
    if kind == "object":
        values = schema.get("additionalProperties")
        return f"dict[str, {type_text(values)}]" if isinstance(values, dict) else "dict"
    return _TYPES.get(str(kind), "Any")


def _referenced(paths: Any, components: dict[str, Any]) -> list[str]:
    """The component schemas `paths` refer to, directly or through each other, in order of first use."""
    seen: dict[str, None] = {}
    todo: list[Any] = [paths]
    while todo:  # depth first, as a recursive walk would go, but with no recursion: a server's JSON can be deep
        value = todo.pop()
        if isinstance(value, dict):
            todo.extend(reversed(value.values()))
            ref = value.get("$ref")
            if isinstance(ref, str) and ref.startswith(_SCHEMAS):
                name = ref[len(_SCHEMAS) :]
                if name not in seen and name in components:
                    seen[name] = None
                    todo.append(components[name])
        elif isinstance(value, list):
            todo.extend(reversed(value))
    return [name for name in seen if name != "Error"]


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()
