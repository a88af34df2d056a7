"""Stream methods in /openapi.json and the reflection service: described in `x-kubrpc-streams`, not in `paths`.

OpenAPI 3.1 cannot describe a stream of messages: a stream method as a POST operation would tell tools
(schemathesis, generators, Swagger UI's "Try it out") to send it one JSON body and expect one JSON result.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import pytest
from hypothesis import HealthCheck, settings
from stream_services import Feed, FeedImpl

import kubrpc
from kubrpc.interface import CallKind
from kubrpc.openapi import Info, openapi_document
from kubrpc.reflection import Reflection

pytestmark = pytest.mark.anyio


@dataclass
class Change:
    """One change of a key."""

    key: str
    value: bytes | None


@dataclass
class Put:
    key: str
    value: bytes


@kubrpc.interface(name="kv.Store")
class Store(Protocol):
    """A key-value store."""

    def watch(self, prefix: str) -> AsyncIterator[Change]:
        """Each change of a key under the prefix.

        As it happens.
        """
        ...

    async def load(self, puts: AsyncIterable[Put], *, replace: bool = False) -> int: ...

    def sync(self, node: str, changes: AsyncIterable[Change]) -> AsyncIterator[Change]: ...

    async def get(self, key: str) -> bytes | None: ...


class StoreImpl:
    async def watch(self, prefix: str) -> AsyncIterator[Change]:
        yield Change(prefix, None)

    async def load(self, puts: AsyncIterable[Put], *, replace: bool = False) -> int:
        return len([p async for p in puts])

    async def sync(self, node: str, changes: AsyncIterable[Change]) -> AsyncIterator[Change]:
        async for change in changes:
            yield change

    async def get(self, key: str) -> bytes | None:
        return None


def _server(**options: Any) -> kubrpc.Server:
    server = kubrpc.Server(**options)
    server.register(Store, StoreImpl())
    server.register(Feed, FeedImpl())
    return server


async def test_streams_are_described_beside_paths_not_in_them() -> None:
    document = openapi_document(_server())
    assert sorted(document["paths"]) == ["/kv.Store/get", "/test.Feed/add"]  # the unary methods only
    streams = document["x-kubrpc-streams"]
    assert list(streams)[:3] == ["/kv.Store/watch", "/kv.Store/load", "/kv.Store/sync"]
    assert {path: entry["kind"] for path, entry in streams.items() if path.startswith("/kv.")} == {
        "/kv.Store/watch": "server_stream",
        "/kv.Store/load": "client_stream",
        "/kv.Store/sync": "bidi_stream",
    }
    watch = streams["/kv.Store/watch"]
    assert watch["operationId"] == "kv.Store.watch" and watch["tags"] == ["kv.Store"]
    assert watch["summary"] == "Each change of a key under the prefix."
    assert watch["description"] == "Each change of a key under the prefix.\n\nAs it happens."
    assert watch["arguments"] == {
        "type": "object",
        "properties": {"prefix": {"type": "string"}},
        "required": ["prefix"],
        "additionalProperties": False,
    }
    assert "stream" not in watch
    assert watch["result"] == {"$ref": "#/components/schemas/Change"}  # each message
    load = streams["/kv.Store/load"]
    assert load["arguments"]["properties"] == {"replace": {"type": "boolean", "default": False}}
    assert load["stream"] == {"name": "puts", "position": 0, "schema": {"$ref": "#/components/schemas/Put-Input"}}
    assert load["result"]["type"] == "integer"
    sync = streams["/kv.Store/sync"]
    assert sync["stream"]["position"] == 1  # after `node`, as declared
    assert sync["stream"]["schema"] == {"$ref": "#/components/schemas/Change-Input"}  # a request refuses unknown keys
    schemas = document["components"]["schemas"]
    assert {"Change", "Change-Input", "Put-Input"} <= set(schemas)
    assert schemas["Change-Input"]["additionalProperties"] is False


async def test_info_description_lists_the_streams_after_the_configured_text() -> None:
    described = openapi_document(_server(openapi=Info(title="KV", description="Keys and *values*.")))
    text = described["info"]["description"]
    assert text.startswith("Keys and *values*.\n\n**Stream methods.** OpenAPI cannot describe a stream of messages")
    assert "- `kv.Store/watch(prefix: str) -> stream Change`: a stream of results\n" in text
    assert "- `kv.Store/load(puts: stream Put, replace: bool = ...) -> int`: a stream of requests, one result\n" in text
    assert "- `kv.Store/sync(node: str, changes: stream Change) -> stream Change`: a stream each way" in text
    assert "signature" not in described["x-kubrpc-streams"]["/kv.Store/watch"]
    only_unary = openapi_document(_unary_server())
    assert "description" not in only_unary["info"] and "x-kubrpc-streams" not in only_unary


def _unary_server() -> kubrpc.Server:
    @kubrpc.interface(name="u.U")
    class U(Protocol):
        async def get(self, key: str) -> str: ...

    class UImpl:
        async def get(self, key: str) -> str:
            return key

    server = kubrpc.Server()
    server.register(U, UImpl())
    return server


async def test_the_document_over_http_is_valid_openapi_3_1() -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    server = _server(header_timeout=5, drain_timeout=1)
    async with (
        server.serve("http://127.0.0.1:0") as listener,
        httpx.AsyncClient(base_url=listener.url, timeout=10) as client,
    ):
        document = (await client.get("/openapi.json")).json()
        validator.validate(document)
        assert "x-kubrpc-streams" in document
        page = await client.get("/docs")
        assert page.status_code in (200, 404)  # the page (or what to install): it reads the same document


async def test_reflection_describes_streams_with_only_their_schemas() -> None:
    server = _server()
    async with server.serve("inproc://openapi-streams") as listener, kubrpc.connect(listener.url) as channel:
        reflect = channel.stub(Reflection, timeout=10)
        store = await reflect.describe("kv.Store")
        assert store["paths"].keys() == {"/kv.Store/get"}
        assert list(store["x-kubrpc-streams"]) == ["/kv.Store/watch", "/kv.Store/load", "/kv.Store/sync"]
        assert sorted(store["components"]["schemas"]) == ["Change", "Change-Input", "Error", "Put-Input"]
        watch = await reflect.describe("kv.Store/watch")
        assert watch["paths"] == {} and list(watch["x-kubrpc-streams"]) == ["/kv.Store/watch"]
        assert sorted(watch["components"]["schemas"]) == ["Change"]
        feed = await reflect.describe("test.Feed/add")
        assert "x-kubrpc-streams" not in feed and list(feed["paths"]) == ["/test.Feed/add"]


schemathesis = pytest.importorskip("schemathesis")
_fuzzed = _server()
schema = schemathesis.openapi.from_asgi("/openapi.json", _fuzzed.asgi())


@schema.parametrize()  # type: ignore[untyped-decorator]
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzzing_every_described_operation_of_a_server_with_streams(case: Any) -> None:
    """Every operation the document describes answers as it says: no stream method is offered as a POST."""
    response = case.call()
    assert response.status_code < 500, (case, response.status_code, response.text)
    method = _fuzzed.method(case.path.lstrip("/"))
    assert method is not None and method.kind is CallKind.UNARY
    if response.status_code == 200:
        method.decode_result(response.content)
