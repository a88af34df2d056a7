"""An OpenAPI 3.1 document of every service a Server has registered, for /openapi.json."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import inspect
import re
import types
import typing
import uuid
from typing import TYPE_CHECKING, Any

import orjson

from . import codec
from ._version import __version__
from .interface import CallKind
from .status import Status

if TYPE_CHECKING:
    from .interface import MethodSpec, ServiceSpec
    from .interfaces import ServerCore

__all__ = ("STREAMS", "Info", "json_schema", "openapi_document")


@dataclasses.dataclass(frozen=True, slots=True)
class Info:
    """The `info` of the OpenAPI document: `Server(openapi=Info(title=..., version=..., description=...))`.

    Left empty, the title is the names of the registered services, the version kubrpc's, and the
    description absent. The description may use CommonMark, as OpenAPI allows.
    """

    title: str = ""
    version: str = ""
    description: str = ""


def _doc(obj: object) -> str:
    """An object's own docstring, cleaned; "" when it has none (or only the one dataclasses makes up)."""
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    if not isinstance(doc, str):
        return ""
    if isinstance(obj, type) and dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}("):
        return ""  # dataclasses write the signature into __doc__ when the class has no docstring
    return inspect.cleandoc(doc)


def _json_default(value: object) -> tuple[bool, Any]:
    """(True, value as it travels in JSON), or (False, None) for a default that does not encode."""
    try:
        return True, orjson.loads(codec.dumps_floats(value))
    except (TypeError, ValueError):
        return False, None


_SIMPLE: dict[object, dict[str, Any]] = {
    int: {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1},  # JSON numbers kubrpc reads exactly
    float: {"anyOf": [{"type": "number"}, {"enum": ["NaN", "Infinity", "-Infinity"]}]},  # as protobuf JSON
    str: {"type": "string"},
    bool: {"type": "boolean"},
    type(None): {"type": "null"},
    None: {"type": "null"},
    bytes: {"type": "string", "contentEncoding": "base64"},
    datetime.datetime: {"type": "string", "format": "date-time"},
    datetime.date: {"type": "string", "format": "date"},
    uuid.UUID: {"type": "string", "format": "uuid"},
    typing.Any: {},
    object: {},
}


def json_schema(tp: object, defs: dict[str, Any], *, request: bool = False) -> dict[str, Any]:
    """The JSON Schema of an annotation; dataclasses and enums go to `defs` and are referenced.

    A dataclass in a request refuses unknown keys (as the server does): it is `Name-Input`, with
    additionalProperties false. In a result it is `Name` and allows them: a newer server may add fields.
    """
    if tp in _SIMPLE:
        return dict(_SIMPLE[tp])
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return json_schema(args[0], defs, request=request)
    if isinstance(tp, typing.NewType):
        return json_schema(tp.__supertype__, defs, request=request)
    if origin is typing.Union or origin is types.UnionType:
        return {"anyOf": [json_schema(a, defs, request=request) for a in args]}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if tp in (list, set, frozenset) or origin in (list, set, frozenset):
        schema: dict[str, Any] = {"type": "array"}
        if args:
            schema["items"] = json_schema(args[0], defs, request=request)
        if tp in (set, frozenset) or origin in (set, frozenset):
            schema["uniqueItems"] = True
        return schema
    if tp is tuple or origin is tuple:
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            return (
                {"type": "array", "items": json_schema(args[0], defs, request=request)} if args else {"type": "array"}
            )
        items = [json_schema(a, defs, request=request) for a in args if a != ()]
        return {"type": "array", "prefixItems": items, "minItems": len(items), "maxItems": len(items)}
    if tp is dict or origin is dict:
        return {"type": "object", "additionalProperties": json_schema(args[1], defs, request=request) if args else {}}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if tp.__name__ not in defs:
            defs[tp.__name__] = {"enum": [m.value for m in tp]}
            if description := _doc(tp):
                defs[tp.__name__]["description"] = description
        return {"$ref": f"#/components/schemas/{tp.__name__}"}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        name = f"{tp.__name__}-Input" if request else tp.__name__
        if name not in defs:
            defs[name] = {}  # placeholder first: a dataclass may refer to itself
            hints = typing.get_type_hints(tp)
            fields = [f for f in dataclasses.fields(tp) if f.init]
            properties: dict[str, Any] = {}
            for f in fields:
                properties[f.name] = json_schema(hints[f.name], defs, request=request)
                if f.default is not dataclasses.MISSING:
                    _with_default(properties, f.name, f.default)
            schema = {
                "type": "object",
                "properties": properties,
                "required": [
                    f.name
                    for f in fields
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                ],
            }
            if description := _doc(tp):
                schema["description"] = description
            if request:  # unknown keys in arguments are refused; results may carry fields added later
                schema["additionalProperties"] = False
            defs[name] = schema
        return {"$ref": f"#/components/schemas/{name}"}
    return {}


def _with_default(properties: dict[str, Any], name: str, default: object) -> None:
    """Add `default` to a property's schema (beside a $ref, which 3.1 allows), if the value encodes."""
    ok, value = _json_default(default)
    if ok:
        properties[name] = {**properties[name], "default": value}


def openapi_document(server: ServerCore, *, root_path: str = "") -> dict[str, Any]:
    """The OpenAPI 3.1 document: one POST operation per unary method, with request, result and error schemas.

    Stream methods are not operations (OpenAPI cannot describe a stream of messages): the document's
    `x-kubrpc-streams` describes them, keyed by path, and info.description lists them.

    Docstrings of the service Protocols, their methods and the dataclasses become descriptions, and
    parameter defaults become `default`. `root_path` (the ASGI one, set when the app is mounted under a
    prefix or run with `uvicorn --root-path`) becomes the document's `servers`.
    """
    defs: dict[str, Any] = {
        "Error": {
            "type": "object",
            "properties": {
                "code": {"type": "string", "enum": sorted({s.wire_name for s in Status if s is not Status.OK})},
                "message": {"type": "string"},
                "details": {  # Connect error details: INVALID_ARGUMENT lists its field violations
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"type": {"type": "string"}, "value": {"type": "string"}, "debug": {}},
                    },
                },
            },
            "required": ["code", "message"],
        }
    }
    error = {
        "description": "error",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    paths: dict[str, Any] = {}
    streams: dict[str, Any] = {}
    tags: list[dict[str, str]] = []
    for service in server.services.values():
        tag = {"name": service.name}
        if description := _doc(service.protocol):
            tag["description"] = description
        tags.append(tag)
        for m in service.methods.values():
            if m.kind is not CallKind.UNARY:
                streams[f"/{m.path}"] = _stream(service, m, defs)
                continue
            request = _arguments(m, defs)
            operation = _operation(service, m)
            operation.update(
                {
                    "requestBody": {"required": True, "content": {"application/json": {"schema": request}}},
                    "parameters": [
                        {
                            "name": "Connect-Timeout-Ms",
                            "in": "header",
                            "required": False,
                            "description": "the call's deadline in milliseconds",
                            "schema": {"type": "string", "pattern": "^[1-9][0-9]{0,9}$"},
                        }
                    ],
                    "responses": {
                        "200": {
                            "description": "result",
                            "content": {"application/json": {"schema": json_schema(m.returns, defs)}},
                        },
                        "default": error,
                    },
                }
            )
            paths[f"/{m.path}"] = {"post": operation}
    configured = server.openapi or Info()
    info: dict[str, Any] = {
        "title": configured.title or ", ".join(server.services) or "kubrpc",
        "version": configured.version or __version__,
    }
    description = "\n\n".join(filter(None, [configured.description, _streams_note(streams)]))
    if description:
        info["description"] = description
    document: dict[str, Any] = {"openapi": "3.1.0", "info": info}
    if root_path:
        document["servers"] = [{"url": root_path}]
    document.update({"tags": tags, "paths": paths})
    if streams:
        document[STREAMS] = streams
    document["components"] = {"schemas": defs}
    return document


def _arguments(m: MethodSpec, defs: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema of a method's ordinary arguments, as one object (a unary call's request body)."""
    properties: dict[str, Any] = {}
    for p in m.params:
        properties[p.name] = json_schema(p.annotation, defs, request=True)
        if not p.required:
            _with_default(properties, p.name, p.default)
    return {
        "type": "object",
        "properties": properties,
        "required": [p.name for p in m.params if p.required],
        "additionalProperties": False,
    }


def _operation(service: ServiceSpec, m: MethodSpec) -> dict[str, Any]:
    """operationId, tags, and the summary and description from the method's docstring."""
    operation: dict[str, Any] = {"operationId": f"{service.name}.{m.name}", "tags": [service.name]}
    if doc := _doc(getattr(service.protocol, m.attr, None)):
        operation["summary"] = doc.partition("\n")[0]
        operation["description"] = doc
    return operation


def _stream(service: ServiceSpec, m: MethodSpec, defs: dict[str, Any]) -> dict[str, Any]:
    """A stream method, for the document's `x-kubrpc-streams`: its kind and the schemas of its messages."""
    entry = _operation(service, m)
    entry["kind"] = m.kind.value
    entry["arguments"] = _arguments(m, defs)
    if m.stream is not None:
        position = [name for name, _ in m.declared].index(m.stream.name)
        schema = json_schema(m.stream.annotation, defs, request=True)
        entry["stream"] = {"name": m.stream.name, "position": position, "schema": schema}
    entry["result"] = json_schema(m.returns, defs)
    entry[_SIGNATURE] = _signature(m)  # for the note in info.description, which takes it out
    return entry


def _streams_note(streams: dict[str, Any]) -> str:
    """The paragraph of info.description that lists the stream methods, which `paths` leaves out."""
    if not streams:
        return ""
    lines = [
        "**Stream methods.** OpenAPI cannot describe a stream of messages, so these methods are not in `paths` "
        "(and cannot be tried from this page); `x-kubrpc-streams` describes them (their kind, and the JSON Schema "
        "of their arguments and of each message). Call them with a kubrpc client, `kubrpc call` (one JSON message "
        "per line), or a Connect client generated from `kubrpc proto` (streams of results and of requests).",
        "",
    ]
    for path, entry in streams.items():
        lines.append(f"- `{path[1:]}{entry.pop(_SIGNATURE)}`: {_KINDS[entry['kind']]}")
    return "\n".join(lines)


def _signature(m: MethodSpec) -> str:
    """`(room: str, words: stream str, loud: bool = ...) -> stream str`: a stream method as it is declared."""
    params = {p.name: p for p in m.params}
    shown = []
    for name, _ in m.declared:
        if m.stream is not None and name == m.stream.name:
            shown.append(f"{name}: stream {_annotation(m.stream.annotation)}")
        else:
            p = params[name]
            shown.append(f"{name}: {_annotation(p.annotation)}{'' if p.required else ' = ...'}")
    stream = "stream " if m.kind.streams_results else ""
    return f"({', '.join(shown)}) -> {stream}{_annotation(m.returns)}"


_MODULES = re.compile(r"(?<![\w.'\"])(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_])")


def _annotation(tp: object) -> str:
    """An annotation as a user writes it: `list[Event]`, `int | None` (no module names)."""
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__qualname__
    return _MODULES.sub("", repr(tp))


#: The document's extension that describes the stream methods (left out of `paths`).
STREAMS = "x-kubrpc-streams"
_SIGNATURE = "signature"
_KINDS = {
    CallKind.SERVER_STREAM.value: "a stream of results",
    CallKind.CLIENT_STREAM.value: "a stream of requests, one result",
    CallKind.BIDI_STREAM.value: "a stream each way (bidirectional)",
}
