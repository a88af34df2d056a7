"""An OpenAPI 3.1 document of every service a Server has registered, for /openapi.json."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import types
import typing
import uuid
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .status import Status

if TYPE_CHECKING:
    from .server import Server

__all__ = ("json_schema", "openapi_document")

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
        defs.setdefault(tp.__name__, {"enum": [m.value for m in tp]})
        return {"$ref": f"#/components/schemas/{tp.__name__}"}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        name = f"{tp.__name__}-Input" if request else tp.__name__
        if name not in defs:
            defs[name] = {}  # placeholder first: a dataclass may refer to itself
            hints = typing.get_type_hints(tp)
            fields = [f for f in dataclasses.fields(tp) if f.init]
            defs[name] = {
                "type": "object",
                "properties": {f.name: json_schema(hints[f.name], defs, request=request) for f in fields},
                "required": [
                    f.name
                    for f in fields
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                ],
            }
            if request:  # unknown keys in arguments are refused; results may carry fields added later
                defs[name]["additionalProperties"] = False
        return {"$ref": f"#/components/schemas/{name}"}
    return {}


def openapi_document(server: Server) -> dict[str, Any]:
    """The OpenAPI 3.1 document: one POST operation per method, with request, result and error schemas."""
    defs: dict[str, Any] = {
        "Error": {
            "type": "object",
            "properties": {
                "code": {"type": "string", "enum": sorted({s.wire_name for s in Status if s is not Status.OK})},
                "message": {"type": "string"},
            },
            "required": ["code", "message"],
        }
    }
    error = {
        "description": "error",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    paths: dict[str, Any] = {}
    for service in server.services.values():
        for m in service.methods.values():
            request = {
                "type": "object",
                "properties": {p.name: json_schema(p.annotation, defs, request=True) for p in m.params},
                "required": [p.name for p in m.params if p.required],
                "additionalProperties": False,
            }
            paths[f"/{m.path}"] = {
                "post": {
                    "operationId": f"{service.name}.{m.name}",
                    "tags": [service.name],
                    "requestBody": {"required": True, "content": {"application/json": {"schema": request}}},
                    "parameters": [
                        {
                            "name": "Connect-Timeout-Ms",
                            "in": "header",
                            "required": False,
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
            }
    return {
        "openapi": "3.1.0",
        "info": {"title": ", ".join(server.services) or "kubrpc", "version": __version__},
        "paths": paths,
        "components": {"schemas": defs},
    }
