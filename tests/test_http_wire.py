"""The HTTP/JSON wire as curl sees it: paths, statuses, error bodies, limits, health and schema."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import anyio
import httpx
import pytest
from services import ControlImpl, make_server, wait_until

import kubrpc

pytestmark = pytest.mark.anyio

JSON = {"content-type": "application/json"}


@pytest.fixture
async def http(start_server: Callable[..., object]) -> AsyncIterator[tuple[httpx.AsyncClient, object, ControlImpl]]:
    url, server, control = await start_server("http", max_message_size=64 * 1024)  # type: ignore[operator]
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        yield client, server, control


async def test_success_is_200_with_the_json_result(http: tuple[httpx.AsyncClient, object, object]) -> None:
    client, _, _ = http
    response = await client.post("/Arith/add", content=b'{"a": 1, "b": 2}', headers=JSON)
    assert (response.status_code, response.json()) == (200, 3)
    assert response.headers["content-type"] == "application/json"
    response = await client.post("/test.Store/echo", json={"value": [7, "x"], "mode": "b"})
    assert (response.status_code, response.json()) == (200, [7, "x"])


@pytest.mark.parametrize(
    ("path", "body", "status", "code", "message"),
    [
        (
            "/Arith/add",
            b'{"a": "1", "b": 2}',
            400,
            "invalid_argument",
            "invalid argument 'a': expected integer, got string",
        ),
        ("/Arith/add", b'{"a": 1}', 400, "invalid_argument", "missing argument 'b'"),
        ("/Arith/add", b"{not json", 400, "invalid_argument", "request body is not valid JSON"),
        ("/Arith/add", b'"a string"', 400, "invalid_argument", "request body must be a JSON object of named arguments"),
        ("/Arith/div", b'{"a": 1, "b": 0}', 400, "invalid_argument", "division by zero"),
        ("/Nope/add", b"{}", 501, "unimplemented", "unknown service 'Nope' (known: Arith, Control, test.Store)"),
        ("/Arith/nope", b"{}", 501, "unimplemented", "unknown method 'nope' of service 'Arith' (known: add, div)"),
        ("/Control/crash", b"{}", 500, "internal", "internal error"),
        ("/Control/fail", b'{"code": "NOT_FOUND", "message": "m"}', 404, "not_found", "m"),
        ("/Control/fail", b'{"code": "UNAUTHENTICATED", "message": "m"}', 401, "unauthenticated", "m"),
        ("/Control/fail", b'{"code": "PERMISSION_DENIED", "message": "m"}', 403, "permission_denied", "m"),
        ("/Control/fail", b'{"code": "ALREADY_EXISTS", "message": "m"}', 409, "already_exists", "m"),
        ("/Control/fail", b'{"code": "CANCELLED", "message": "m"}', 499, "canceled", "m"),
        ("/Control/fail", b'{"code": "UNAVAILABLE", "message": "m"}', 503, "unavailable", "m"),
        ("/Control/fail", b'{"code": "DEADLINE_EXCEEDED", "message": "m"}', 504, "deadline_exceeded", "m"),
        ("/Control/fail", b'{"code": "RESOURCE_EXHAUSTED", "message": "m"}', 429, "resource_exhausted", "m"),
    ],
)
async def test_errors_use_connect_statuses(
    http: tuple[httpx.AsyncClient, object, object], path: str, body: bytes, status: int, code: str, message: str
) -> None:
    client, _, _ = http
    response = await client.post(path, content=body, headers=JSON)
    assert response.status_code == status
    assert {k: v for k, v in response.json().items() if k != "details"} == {"code": code, "message": message}


async def test_wrong_content_type_and_method(http: tuple[httpx.AsyncClient, object, object]) -> None:
    client, _, _ = http
    response = await client.post("/Arith/add", content=b"a=1&b=2", headers={"content-type": "text/plain"})
    assert response.status_code == 400
    assert response.json()["message"] == "Content-Type must be application/json, not 'text/plain'"
    response = await client.get("/Arith/add")
    assert response.status_code == 405 and response.json()["code"] == "unimplemented"
    assert response.headers["allow"] == "POST"
    assert (await client.post("/Arith/add", content=b'{"a": 1, "b": 1}')).json() == 2  # no content type is fine


async def test_oversized_body_is_refused_without_reading_it(http: tuple[httpx.AsyncClient, object, object]) -> None:
    client, _, _ = http
    big = b'{"a": 1, "b": 2, "pad": "' + b"x" * (64 * 1024) + b'"}'
    response = await client.post("/Arith/add", content=big, headers=JSON)
    assert response.status_code == 429
    assert response.json()["code"] == "resource_exhausted"

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the limit applies while reading
        yield b'{"a": 1, "pad": "'
        for _ in range(100):
            yield b"x" * 4096
        yield b'"}'

    response = await client.post("/Arith/add", content=chunked(), headers=JSON)
    assert response.status_code == 429
    response = await client.post("/Arith/add", content=b'{"a": 1, "b": 2}', headers=JSON)
    assert response.json() == 3


async def test_oversized_declared_length_answers_before_the_body_is_sent(
    http: tuple[httpx.AsyncClient, object, object],
) -> None:
    client, _, _ = http
    port = int(str(client.base_url).rstrip("/").rsplit(":", 1)[1])
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        head = b"POST /Arith/add HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        head += b"Content-Length: 900000000\r\n\r\n"
        await stream.send(head)  # and never send the 900 MB
        with anyio.fail_after(5):
            answer = await stream.receive()
    assert answer.startswith(b"HTTP/1.1 429")


async def test_timeout_header_sets_the_deadline(http: tuple[httpx.AsyncClient, object, ControlImpl]) -> None:
    client, _, control = http
    response = await client.post("/Control/sleep", json={"seconds": 30}, headers={"connect-timeout-ms": "100"})
    assert response.status_code == 504 and response.json()["code"] == "deadline_exceeded"
    assert control.cancelled == 1
    for bad in ("soon", "0", "-5", "012", "99999999999"):
        response = await client.post("/Control/sleep", json={"seconds": 0}, headers={"connect-timeout-ms": bad})
        assert response.status_code == 400 and "connect-timeout-ms" in response.json()["message"]


async def test_client_disconnect_cancels_the_handler(http: tuple[httpx.AsyncClient, object, ControlImpl]) -> None:
    client, _, control = http
    with anyio.move_on_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: client.post("/Control/sleep", json={"seconds": 30}))
            await wait_until(lambda: control.started == 1)
            tg.cancel_scope.cancel()  # httpx closes the connection
    await wait_until(lambda: control.cancelled == 1)
    assert control.finished == 0


async def test_health_and_readiness(http: tuple[httpx.AsyncClient, object, object]) -> None:
    client, server, _ = http
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).status_code == 200
    server.draining = True  # type: ignore[attr-defined]
    response = await client.get("/readyz")
    assert response.status_code == 503 and response.json() == {"status": "draining"}
    server.draining = False  # type: ignore[attr-defined]


async def test_openapi_document_describes_every_method(http: tuple[httpx.AsyncClient, object, object]) -> None:
    client, _, _ = http
    doc = (await client.get("/openapi.json")).json()
    assert doc["openapi"] == "3.1.0"
    add = doc["paths"]["/Arith/add"]["post"]
    schema = add["requestBody"]["content"]["application/json"]["schema"]
    integer = {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}
    assert schema["properties"] == {"a": integer, "b": integer}
    assert schema["required"] == ["a", "b"]
    assert add["responses"]["200"]["content"]["application/json"]["schema"] == integer
    put = doc["paths"]["/test.Store/put"]["post"]
    assert put["responses"]["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Item"}
    item = doc["components"]["schemas"]["Item"]
    assert item["properties"]["id"] == {"type": "string", "format": "uuid"}
    assert item["properties"]["tags"] == {"type": "array", "items": {"$ref": "#/components/schemas/Tag"}}
    assert item["properties"]["color"] == {"$ref": "#/components/schemas/Color"}
    assert doc["components"]["schemas"]["Color"] == {"enum": ["red", "green"]}
    find = doc["paths"]["/test.Store/find"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert find["required"] == ["names"]


async def test_asgi_app_works_under_any_asgi_server() -> None:
    from services import make_server

    server, _ = make_server()
    transport = httpx.ASGITransport(app=server.asgi())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/Arith/add", json={"a": 20, "b": 22})
    assert response.json() == 42


async def test_handlers_that_wait_answer_and_leave_no_cancellation_behind(
    http: tuple[httpx.AsyncClient, object, ControlImpl],
) -> None:
    client, _, control = http

    async def call(seconds: float) -> None:
        response = await client.post(
            "/Control/sleep", json={"seconds": seconds}, headers={"connect-timeout-ms": "5000"}
        )
        assert (response.status_code, response.json()) == (200, "slept")

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(call, (i % 3) * 0.005)
    assert (control.finished, control.cancelled) == (20, 0)


class Stubborn(Protocol):
    async def wait(self, seconds: float) -> str: ...


class StubbornImpl:
    """Swallows its cancellation, as a handler should not."""

    def __init__(self) -> None:
        self.cancelled = 0

    async def wait(self, seconds: float) -> str:
        try:
            await anyio.sleep(seconds)
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
        return "done"


async def _call_then_disconnect(app: Any, path: str, started: Callable[[], bool]) -> list[Any]:
    """Drive `app` as an ASGI server would: POST {"seconds": 30} to `path`, disconnect once started().

    Returns the messages the app sent, then what the app's task saw after the app returned: its pending
    cancellation requests and whether it could still wait.
    """
    disconnected = anyio.Event()
    messages = [{"type": "http.request", "body": b'{"seconds": 30}', "more_body": False}]
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"connect-timeout-ms", b"10000")],
    }

    async def run() -> None:
        await app(scope, receive, send)
        sent.append(("cancelling", asyncio.current_task().cancelling()))  # type: ignore[union-attr]
        await asyncio.sleep(0)  # no cancellation left over for the server's next await
        sent.append("still running")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await wait_until(started)
            disconnected.set()
    return sent


async def test_disconnect_cancels_the_handler_and_leaves_the_task_uncancelled() -> None:
    server, control = make_server()
    sent = await _call_then_disconnect(server.asgi(), "/Control/sleep", lambda: control.started == 1)
    assert sent == [("cancelling", 0), "still running"]
    assert (control.cancelled, control.finished) == (1, 0)


async def test_a_handler_that_swallows_its_cancellation_gets_no_answer() -> None:
    server = kubrpc.Server()
    impl = StubbornImpl()
    server.register(Stubborn, impl)
    original = server.dispatch
    started: list[bool] = []

    async def dispatch(*args: Any, **kwargs: Any) -> bytes:
        started.append(True)
        return await original(*args, **kwargs)

    server.dispatch = dispatch  # type: ignore[method-assign]
    sent = await _call_then_disconnect(server.asgi(), "/Stubborn/wait", lambda: bool(started))
    assert sent == [("cancelling", 0), "still running"]
    assert impl.cancelled == 1


async def test_the_portable_path_for_event_loops_other_than_asyncio(monkeypatch: pytest.MonkeyPatch) -> None:
    import kubrpc.transports.http as http_transport

    app_class: Any = http_transport._App
    calls: list[str] = []

    async def portable(self: Any, task: object, path: str, *args: Any) -> Any:
        calls.append(path)
        return await app_class._dispatch_anyio(self, path, *args)

    monkeypatch.setattr(app_class, "_dispatch_asyncio", portable)
    server, control = make_server()
    transport = httpx.ASGITransport(app=server.asgi())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.post("/Arith/add", json={"a": 20, "b": 22})).json() == 42
        response = await client.post("/Control/fail", json={"code": "NOT_FOUND", "message": "m"})
        assert (response.status_code, response.json()) == (404, {"code": "not_found", "message": "m"})
        assert (await client.post("/Control/sleep", json={"seconds": 0.001})).json() == "slept"
    assert calls == ["Arith/add", "Control/fail", "Control/sleep"]
    sent = await _call_then_disconnect(server.asgi(), "/Control/sleep", lambda: control.started == 2)
    assert sent == [("cancelling", 0), "still running"]
    assert (control.cancelled, control.finished) == (1, 1)


def test_random_request_bodies_never_cause_a_server_error() -> None:
    """Hypothesis throws arbitrary bytes and JSON at every method: only 200 or a 4xx error body come back."""
    from hypothesis import HealthCheck, given, settings, strategies as st
    from services import make_server

    server, _ = make_server()
    app = server.asgi()
    paths = ["/Arith/add", "/Arith/div", "/test.Store/put", "/test.Store/find", "/test.Store/echo", "/test.Store/blob"]
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=12,
    )
    bodies = st.one_of(
        st.binary(max_size=200),
        st.builds(lambda v: json.dumps(v).encode(), json_values),
        st.builds(
            lambda d: json.dumps(d).encode(),
            st.dictionaries(
                st.sampled_from(["a", "b", "item", "names", "limit", "value", "mode", "size"]), json_values
            ),
        ),
    )

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(paths), bodies)
    def check(path: str, body: bytes) -> None:
        async def post() -> httpx.Response:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await client.post(path, content=body, headers=JSON)

        response = anyio.run(post)
        assert response.status_code == 200 or 400 <= response.status_code < 500, (path, body, response.text)
        if response.status_code != 200:
            assert set(response.json()) - {"details"} == {"code", "message"}  # details: validation errors

    check()
