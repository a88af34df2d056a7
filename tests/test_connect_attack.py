"""The attack pass on the Connect path: bad bodies, wrong types, bad protocol headers and oversized messages.

Each bad request gets its Connect code, the HTTP status Connect gives that code, and a message that says what to
send instead; the server keeps serving the next call, Connect's and native ones alike. Over real sockets: a kubrpc
HTTP server on 127.0.0.1 and httpx.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from connect_shop import make_shop_server

pytestmark = pytest.mark.anyio

CONNECT = {"content-type": "application/json", "connect-protocol-version": "1"}
LIMIT = 64 * 1024
LINE = {"sku": "s", "quantity": "2", "unitPrice": {"units": "3"}}


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    server = make_shop_server(max_message_size=LIMIT, header_timeout=0.3)
    async with server.serve("http://127.0.0.1:0") as listener:
        async with httpx.AsyncClient(base_url=listener.url, timeout=10) as http:
            yield http
            # Whatever the test sent, the server still serves the next caller, over both wires.
            good = await http.post("/shop.v1.Shop/total", json={"lines": [LINE]}, headers=CONNECT)
            assert (good.status_code, good.json()) == (200, {"result": "6"})
            native = await http.post(
                "/shop.v1.Shop/total", json={"lines": [{"sku": "s", "quantity": 2, "unit_price": {"units": 3}}]}
            )
            assert (native.status_code, native.json()) == (200, 6)


async def call(
    client: httpx.AsyncClient, method: str, body: object, headers: dict[str, str] | None = None
) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return await client.post(
        f"/shop.v1.Shop/{method}", content=content, headers=CONNECT if headers is None else headers
    )


def error(response: httpx.Response) -> tuple[int, str, str, list[Any]]:
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    return response.status_code, body["code"], body["message"], body.get("details", [])


async def test_a_good_call_and_the_native_wire_beside_it(client: httpx.AsyncClient) -> None:
    response = await call(client, "total", {"lines": [LINE, LINE]})
    assert (response.status_code, response.json()) == (200, {"result": "12"})
    assert response.headers["content-type"] == "application/json"
    # The same server, without Connect-Protocol-Version: the native wire, a bare result.
    native = await client.post("/shop.v1.Shop/total", json={"lines": []})
    assert (native.status_code, native.content) == (200, b"0")


@pytest.mark.parametrize(
    ("method", "body", "message"),
    [
        ("total", b"{not json", "the body is not valid JSON"),
        ("total", b"[1, 2]", "the body must be a JSON object: the TotalRequest message in proto3 JSON"),
        ("total", b"\xff\xfe", "the body is not valid JSON"),
        ("total", b'{"lines": [' * 2000, "the body is not valid JSON"),
        ("echo_any", b'{"value": ' + b"[" * 300 + b"]" * 300 + b"}", "nested deeper than 254 levels"),
        ("echo_any", b'{"value": ' + b"[" * 2000 + b"]" * 2000 + b"}", "the body is not valid JSON"),
    ],
)
async def test_a_body_that_is_no_json_message(
    client: httpx.AsyncClient, method: str, body: bytes, message: str
) -> None:
    status, code, text, _ = error(await call(client, method, body))
    assert (status, code) == (400, "invalid_argument")
    assert message in text


@pytest.mark.parametrize(
    ("method", "body", "field", "reason"),
    [
        ("total", {"lines": "x"}, "lines", "expected an array, got string"),
        ("total", {"lines": [{**LINE, "sku": 5}]}, "lines[0].sku", "expected a string, got number"),
        ("total", {"lines": [{**LINE, "quantity": "12abc"}]}, "lines[0].quantity", "expected an int64"),
        ("total", {"lines": [{**LINE, "quantity": "--5"}]}, "lines[0].quantity", "expected an int64"),
        ("total", {"lines": [{**LINE, "quantity": "\u00b2"}]}, "lines[0].quantity", "expected an int64"),
        ("total", {"lines": [{**LINE, "quantity": "1" * 5000}]}, "lines[0].quantity", "outside the int64 range"),
        ("total", {"lines": [{**LINE, "quantity": "1e999999999"}]}, "lines[0].quantity", "outside the int64 range"),
        ("total", {"lines": [{**LINE, "quantity": "1e-999999999"}]}, "lines[0].quantity", "expected an integer"),
        ("total", {"lines": [{**LINE, "quantity": "1.5"}]}, "lines[0].quantity", "expected an integer"),
        ("total", {"lines": [{**LINE, "quantity": " 5"}]}, "lines[0].quantity", "expected an int64"),
        ("total", {"lines": [{**LINE, "quantity": "99999999999999999999"}]}, "lines[0].quantity", "outside the int64"),
        ("total", {"lines": [{**LINE, "quantity": 1e300}]}, "lines[0].quantity", "outside the int64"),
        ("total", {"lines": [{**LINE, "quantity": [1]}]}, "lines[0].quantity", "expected an int64"),
        ("total", {"lines": [{**LINE, "unit_price": {"units": 1}}]}, "lines[0].unit_price", "field given twice"),
        ("total", {"lines": [LINE], "colour": "red"}, "colour", "unexpected field 'colour' in TotalRequest"),
        (
            "total",
            {"lines": [{**LINE, "unitPrice": {"units": 1, "cents": 5}}]},
            "lines[0].unitPrice.cents",
            "unexpected",
        ),
        ("echo_any", {"value": 1, "blob": "not base64!"}, "blob", "expected base64"),
        ("echo_any", {"value": 1, "states": ["RED"]}, "states[0]", "expected one of ORDER_STATE_NEW"),
        ("shift", {"when": "yesterday", "seconds": 1}, "when", "expected an RFC 3339 timestamp"),
        ("shift", {"when": "2024-13-01T00:00:00Z", "seconds": 1}, "when", "expected an RFC 3339 timestamp"),
        ("shift", {"when": "2024-05-01T00:00:00+25:00", "seconds": 1}, "when", "expected an RFC 3339 timestamp"),
        ("find", {"orderId": ""}, "orderId", "expected UUID string, got ''"),
        ("find", {}, "orderId", "missing field: give a UUID string"),
        ("count", {"words": ["a"], "mode": "shout"}, "mode", "expected one of 'upper', 'lower'"),
        ("describe", {"value": {"int64Value": "1", "string_value": "x"}}, "value", "set only one of"),
    ],
)
async def test_bad_fields_are_invalid_argument_naming_the_field_as_sent(
    client: httpx.AsyncClient, method: str, body: object, field: str, reason: str
) -> None:
    status, code, message, details = error(await call(client, method, body))
    assert (status, code) == (400, "invalid_argument")
    assert f"'{field}'" in message and reason in message, message
    assert details[0]["type"] == "google.rpc.BadRequest"
    assert details[0]["debug"]["fieldViolations"][0]["field"] == field
    assert details[0]["value"]  # the binary google.rpc.BadRequest, base64 (connect-es decodes it: test_connect_node)


async def test_a_charset_parameter_and_an_empty_body(client: httpx.AsyncClient) -> None:
    headers = {**CONNECT, "content-type": "application/json; charset=utf-8"}
    response = await call(client, "total", {"lines": [LINE]}, headers)
    assert (response.status_code, response.json()) == (200, {"result": "6"})
    response = await call(client, "total", b"", headers)  # no body: every field absent
    assert (response.status_code, response.json()) == (200, {})


async def test_camel_case_and_original_names_mixed(client: httpx.AsyncClient) -> None:
    body = {
        "lines": [
            {"sku": "s", "quantity": 2, "unit_price": {"units": 3}},
            {"sku": "t", "quantity": "1", "unitPrice": {"units": 4}},
        ]
    }
    response = await call(client, "total", body)
    assert (response.status_code, response.json()) == (200, {"result": "10"})


async def test_an_oversized_body_is_resource_exhausted(client: httpx.AsyncClient) -> None:
    body = orjson.dumps({"lines": [LINE] * (LIMIT // len(orjson.dumps(LINE)) + 10)})
    assert len(body) > LIMIT
    status, code, message, _ = error(await call(client, "total", body))
    assert (status, code) == (429, "resource_exhausted")
    assert f"exceeds the limit of {LIMIT} bytes" in message

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(3):
            yield body

    response = await client.post("/shop.v1.Shop/total", content=chunks(), headers=CONNECT)
    assert error(response)[:2] == (429, "resource_exhausted")


@pytest.mark.parametrize("version", ["2", "0", "", "1.0", "v1"])
async def test_a_wrong_connect_protocol_version_is_400(client: httpx.AsyncClient, version: str) -> None:
    status, code, message, _ = error(await call(client, "total", {}, {**CONNECT, "connect-protocol-version": version}))
    assert (status, code) == (400, "invalid_argument")
    assert (
        message
        == f"Connect-Protocol-Version must be 1, not {version!r}: kubrpc speaks version 1 of the Connect protocol"
    )


@pytest.mark.parametrize(
    ("content_type", "message"),
    [
        (None, "no Content-Type: kubrpc speaks Connect with the JSON codec only: send Content-Type application/json"),
        ("application/proto", "Content-Type application/proto is not supported: kubrpc speaks Connect with the JSON"),
        ("text/plain", "Content-Type text/plain is not supported"),
    ],
)
async def test_an_unsupported_codec_is_415(client: httpx.AsyncClient, content_type: str | None, message: str) -> None:
    headers = {"connect-protocol-version": "1"}
    if content_type is not None:
        headers["content-type"] = content_type
    response = await call(client, "total", b"{}", headers)
    status, code, text, _ = error(response)
    assert (status, code) == (415, "unimplemented")
    assert text.startswith(message), text
    assert response.headers["accept-post"] == "application/json"


async def test_compression_is_unimplemented(client: httpx.AsyncClient) -> None:
    response = await call(client, "total", b"\x1f\x8b", {**CONNECT, "content-encoding": "gzip"})
    status, code, message, _ = error(response)
    assert (status, code) == (501, "unimplemented")
    assert message == "Content-Encoding 'gzip' is not supported: send the request uncompressed"


async def test_connect_get_requests_are_405(client: httpx.AsyncClient) -> None:
    response = await client.get("/shop.v1.Shop/total", params={"connect": "v1", "encoding": "json", "message": "{}"})
    status, code, message, _ = error(response)
    assert (status, code, message) == (405, "unimplemented", "RPC methods are called with POST")
    assert response.headers["allow"] == "POST"


async def test_unknown_methods_and_services(client: httpx.AsyncClient) -> None:
    response = await client.post("/shop.v1.Shop/nope", content=b"{}", headers=CONNECT)
    status, code, message, _ = error(response)
    assert (status, code) == (501, "unimplemented")
    assert "unknown method 'nope' of service 'shop.v1.Shop'" in message


async def test_connect_timeout_ms_is_the_deadline(client: httpx.AsyncClient) -> None:
    response = await call(client, "wait", {"seconds": 30}, {**CONNECT, "connect-timeout-ms": "50"})
    assert error(response)[:2] == (504, "deadline_exceeded")
    response = await call(client, "wait", {"seconds": 0}, {**CONNECT, "connect-timeout-ms": "60000"})
    assert (response.status_code, response.json()) == (200, {})  # a zero double is left out
    for bad in ("soon", "-1", "0", "12345678901"):
        response = await call(client, "wait", {"seconds": 0}, {**CONNECT, "connect-timeout-ms": bad})
        status, code, message, _ = error(response)
        assert (status, code) == (400, "invalid_argument")
        assert "bad connect-timeout-ms header" in message


@pytest.mark.parametrize("charset", ["latin-1", "utf-16", '"iso-8859-1"'])
async def test_a_charset_other_than_utf8_is_415(client: httpx.AsyncClient, charset: str) -> None:
    """Before: the body was read as UTF-8 whatever the charset said (a latin-1 body's 'é' was invalid JSON, or
    another string). JSON is UTF-8 (RFC 8259); Connect servers refuse other charsets."""
    headers = {**CONNECT, "content-type": f"application/json; charset={charset}"}
    response = await call(client, "total", {"lines": [LINE]}, headers)
    status, code, message, _ = error(response)
    assert (status, code) == (415, "unimplemented")
    assert (
        message == f"charset {charset[:40]!r} is not supported: JSON messages are UTF-8 (send charset=utf-8, or none)"
    )
    for fine in ("utf-8", "UTF-8", '"utf-8"', "utf8"):
        headers = {**CONNECT, "content-type": f"application/json; charset={fine}"}
        response = await call(client, "total", {"lines": [LINE]}, headers)
        assert (response.status_code, response.json()) == (200, {"result": "6"})


async def test_a_charset_other_than_utf8_on_a_stream_is_415(client: httpx.AsyncClient) -> None:
    headers = {"content-type": "application/connect+json; charset=latin-1", "connect-protocol-version": "1"}
    response = await client.post("/shop.v1.Shop/total", content=b"\0\0\0\0\x02{}", headers=headers)
    status, code, message, _ = error(response)
    assert (status, code) == (415, "unimplemented") and "'latin-1' is not supported" in message


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"null", "the body must be a JSON object"),
        (b"{} {}", "unexpected content after document"),
        (b"\xef\xbb\xbf{}", "byte order mark"),
        (b'{"lines": [null]}', "null is not a value of a repeated field"),
        (b'{"lines": [{"sku": "\\ud800"}]}', "no low surrogate"),
        (b'{"lines": {"sku": "s"}}', "expected an array"),
    ],
)
async def test_more_bodies_that_are_no_message(client: httpx.AsyncClient, body: bytes, message: str) -> None:
    status, code, text, _ = error(await call(client, "total", body))
    assert (status, code) == (400, "invalid_argument")
    assert message in text, text


async def test_the_native_codec_header_does_not_change_a_unary_connect_call(client: httpx.AsyncClient) -> None:
    """Kubrpc-Codec is for streams of kubrpc's client: on a Connect unary call it is metadata, and the body is
    still the proto3 JSON message (validated as one), the answer still a message, not a bare result."""
    headers = {**CONNECT, "kubrpc-codec": "native"}
    response = await call(client, "total", {"lines": [LINE]}, headers)
    assert (response.status_code, response.json()) == (200, {"result": "6"})
    status, code, message, _ = error(await call(client, "total", {"lines": [{**LINE, "colour": 1}]}, headers))
    assert (status, code) == (400, "invalid_argument") and "unexpected field 'colour'" in message


async def test_a_unary_connect_call_to_a_stream_method_says_how_to_call_it() -> None:
    from test_http_streams import serving

    async with serving() as (url, _, _, _), httpx.AsyncClient(base_url=url, timeout=10) as http:
        response = await http.post("/test.Feed/ticks", json={"n": "2"}, headers=CONNECT)
        status, code, message, _ = error(response)
        assert (status, code) == (501, "unimplemented")
        assert "server stream call" in message and "application/connect+json" in message
