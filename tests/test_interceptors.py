"""Interceptors and the call context on both sides, and bearer-token auth, over real loopback sockets."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol

import anyio
import httpx
import orjson
import pytest
from services import Arith, Control, make_server

import kubrpc
from kubrpc import CallInfo, ClientCall, RpcError, Status, current_call
from kubrpc.auth import BearerAuth, BearerToken
from kubrpc.interceptors import Proceed

Start = Callable[..., Any]


class Context(Protocol):
    async def describe(self) -> dict[str, str]: ...


class ContextImpl:
    """Returns what current_call() says about the call it serves."""

    async def describe(self) -> dict[str, str]:
        call = current_call()
        remaining = call.time_remaining()
        return {
            "service": call.service,
            "method": call.method,
            "path": call.path,
            "peer": call.peer,
            "tenant": call.metadata.get("x-tenant", ""),
            "remaining": "none" if remaining is None else f"{remaining:.3f}",
        }


@asynccontextmanager
async def serving(scheme: str, interceptors: list[Any]) -> AsyncIterator[str]:
    """A test server with the Context service too, behind `interceptors`; yields its URL."""
    server, _ = make_server(interceptors=interceptors)
    server.register(Context, ContextImpl())
    async with server.serve(f"{scheme}://127.0.0.1:0") as listener:
        yield listener.url


class Recorder:
    """A server interceptor that logs what it sees and when it runs."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log
        self.calls: list[CallInfo] = []

    async def __call__(self, call: CallInfo, proceed: Proceed, /) -> bytes:
        self.calls.append(call)
        assert current_call() is call
        self.log.append(f"{self.name} before")
        try:
            return await proceed()
        finally:
            self.log.append(f"{self.name} after")


async def test_server_interceptors_wrap_calls_in_order(scheme: str) -> None:
    log: list[str] = []
    outer, inner = Recorder("outer", log), Recorder("inner", log)
    async with serving(scheme, [outer, inner]) as url, kubrpc.connect(url) as channel:
        stub = channel.stub(Arith, timeout=5.0, metadata={"X-Tenant": "acme"})
        assert await stub.add(1, 2) == 3
        with pytest.raises(RpcError) as caught:
            await stub.div(1, 0)  # a handler's RpcError passes through the interceptors unchanged
    assert caught.value == RpcError(Status.INVALID_ARGUMENT, "division by zero")
    assert log == ["outer before", "inner before", "inner after", "outer after"] * 2
    call = outer.calls[0]
    assert inner.calls[0] is call
    assert (call.service, call.method, call.path) == ("Arith", "add", "Arith/add")
    assert call.metadata["x-tenant"] == "acme"  # lower-case keys on both transports
    assert call.peer.startswith("127.0.0.1:") and call.peer != "127.0.0.1:0"
    assert call.deadline is not None and 3.0 < call.deadline - time.monotonic() < 5.0


async def test_handlers_read_the_current_call(scheme: str) -> None:
    async with serving(scheme, []) as url, kubrpc.connect(url) as channel:
        seen = await channel.stub(Context, metadata={"x-tenant": "t1"}).describe()
        untimed = await channel.stub(Context).describe()
        timed = await channel.stub(Context, timeout=10.0).describe()
    assert seen["service"] == "Context" and seen["path"] == "Context/describe"
    assert seen["tenant"] == "t1" and seen["peer"].startswith("127.0.0.1:")
    assert untimed["remaining"] == "none" and untimed["tenant"] == ""
    assert 8.0 < float(timed["remaining"]) <= 10.0


def test_current_call_outside_a_call() -> None:
    with pytest.raises(LookupError):
        current_call()


async def test_interceptor_rejects_before_arguments_are_decoded(scheme: str) -> None:
    async def deny(call: CallInfo, proceed: Proceed, /) -> bytes:
        if call.method == "div":
            raise RpcError(Status.PERMISSION_DENIED, "no division today")
        return await proceed()

    async with serving(scheme, [deny]) as url, kubrpc.connect(url) as channel:
        with pytest.raises(RpcError) as caught:
            await channel.call("Arith/div", b'{"a": "not a number"}', timeout=5.0)
        assert caught.value == RpcError(Status.PERMISSION_DENIED, "no division today")
        assert await channel.stub(Arith).add(2, 2) == 4


async def test_interceptor_failures_do_not_leak(scheme: str, caplog: pytest.LogCaptureFixture) -> None:
    async def broken(call: CallInfo, proceed: Proceed, /) -> bytes:
        raise KeyError("secret internal detail /etc/passwd")

    async with serving(scheme, [broken]) as url, kubrpc.connect(url) as channel:
        with pytest.raises(RpcError) as caught:
            await channel.stub(Arith).add(1, 1)
    assert caught.value == RpcError(Status.INTERNAL, "internal error")
    assert "secret internal detail" in caplog.text  # logged on the server, not sent


async def test_interceptor_may_answer_itself_but_only_with_bytes(scheme: str, caplog: pytest.LogCaptureFixture) -> None:
    async def cached(call: CallInfo, proceed: Proceed, /) -> bytes:
        return b"42" if call.method == "add" else "not bytes"  # type: ignore[return-value]

    async with serving(scheme, [cached]) as url, kubrpc.connect(url) as channel:
        assert await channel.stub(Arith).add(1, 1) == 42
        with pytest.raises(RpcError) as caught:
            await channel.stub(Arith).div(1, 1)
    assert caught.value == RpcError(Status.INTERNAL, "internal error")


async def test_the_deadline_covers_interceptors(scheme: str) -> None:
    async def slow(call: CallInfo, proceed: Proceed, /) -> bytes:
        await anyio.sleep(10)
        return await proceed()

    async with serving(scheme, [slow]) as url, kubrpc.connect(url) as channel:
        with anyio.fail_after(5), pytest.raises(RpcError) as caught:
            await channel.stub(Arith, timeout=0.2).add(1, 1)
    assert caught.value.code is Status.DEADLINE_EXCEEDED


async def test_unknown_methods_are_unimplemented_without_interceptors_running(scheme: str) -> None:
    log: list[str] = []
    async with serving(scheme, [Recorder("r", log)]) as url, kubrpc.connect(url) as channel:
        with pytest.raises(RpcError) as caught:
            await channel.call("Arith/nope", b"{}", timeout=5.0)
    assert caught.value.code is Status.UNIMPLEMENTED and log == []


async def test_client_interceptors_add_metadata(scheme: str, start_server: Start) -> None:
    seen: list[ClientCall] = []
    order: list[str] = []

    async def tenant(call: ClientCall, proceed: Proceed, /) -> bytes:
        seen.append(call)
        order.append("tenant")
        call.metadata["x-tenant"] = "acme"
        return await proceed()

    async def trace(call: ClientCall, proceed: Proceed, /) -> bytes:
        order.append("trace")
        call.metadata["x-trace"] = "t-1"
        result = await proceed()
        order.append("trace done")
        return result

    async with serving(scheme, []) as url, kubrpc.connect(url, interceptors=[tenant, trace]) as channel:
        described = await channel.stub(Context, timeout=5.0, metadata={"X-Tenant": "overridden"}).describe()
    assert described["tenant"] == "acme"
    assert order == ["tenant", "trace", "trace done"]
    call = seen[0]
    assert (call.service, call.method, call.path, call.target) == ("Context", "describe", "Context/describe", url)
    assert call.metadata == {"x-tenant": "acme", "x-trace": "t-1"}
    assert call.deadline is not None and not call.idempotent


async def test_client_interceptor_errors_and_deadline(scheme: str, start_server: Start) -> None:
    url, _, _ = await start_server(scheme)

    async def refuse(call: ClientCall, proceed: Proceed, /) -> bytes:
        raise RpcError(Status.UNAUTHENTICATED, "no token configured")

    async def stall(call: ClientCall, proceed: Proceed, /) -> bytes:
        await anyio.sleep(10)
        return await proceed()

    async with kubrpc.connect(url, interceptors=[refuse]) as channel:
        with pytest.raises(RpcError) as caught:
            await channel.stub(Arith).add(1, 2)
        assert caught.value == RpcError(Status.UNAUTHENTICATED, "no token configured")
    async with kubrpc.connect(url, interceptors=[stall]) as channel:
        with anyio.fail_after(5), pytest.raises(RpcError) as caught:
            await channel.stub(Arith, timeout=0.2).add(1, 2)
        assert caught.value.code is Status.DEADLINE_EXCEEDED


# Bearer-token auth: kubrpc.auth

TOKENS = {"reader-token": ["Arith/add", "Context/*"], "admin-token": ["*"]}


@pytest.fixture
async def auth_url(scheme: str) -> AsyncIterator[str]:
    async with serving(scheme, [BearerAuth(TOKENS)]) as url:
        yield url


async def _call(url: str, token: str | None, method: str = "add") -> object:
    interceptors = [] if token is None else [BearerToken(token)]
    async with kubrpc.connect(url, interceptors=interceptors, timeout=5.0) as channel:
        arith = channel.stub(Arith)
        return await (arith.add(1, 2) if method == "add" else arith.div(1, 2))


@pytest.mark.parametrize(
    ("token", "method", "code", "message"),
    [
        (None, "add", Status.UNAUTHENTICATED, "missing bearer token"),
        ("wrong-token", "add", Status.UNAUTHENTICATED, "invalid bearer token"),
        ("reader-token", "div", Status.PERMISSION_DENIED, "the token does not allow Arith/div"),
    ],
)
async def test_bearer_auth_rejects(auth_url: str, token: str | None, method: str, code: Status, message: str) -> None:
    with pytest.raises(RpcError) as caught:
        await _call(auth_url, token, method)
    assert caught.value == RpcError(code, message)


async def test_bearer_auth_admits(auth_url: str) -> None:
    assert await _call(auth_url, "reader-token") == 3
    assert await _call(auth_url, "admin-token", "div") == 0.5

    calls = 0

    async def fetch() -> str:  # a token provider, asked on every call
        nonlocal calls
        calls += 1
        return "admin-token"

    async with kubrpc.connect(auth_url, interceptors=[BearerToken(fetch)]) as channel:
        assert await channel.stub(Arith).add(2, 2) == 4
        assert await channel.stub(Control).whoami() == "server"
    assert calls == 2
    # Static metadata on a stub works too, and the scheme name is case-insensitive.
    async with kubrpc.connect(auth_url) as channel:
        assert await channel.stub(Arith, metadata={"Authorization": "bearer reader-token"}).add(1, 1) == 2
        described = await channel.stub(Context, metadata={"authorization": "Bearer reader-token"}).describe()
        assert described["path"] == "Context/describe"


async def test_bearer_auth_on_the_http_wire(start_server: Start) -> None:
    """curl's view: 401 without a valid token, 403 without the grant; the error body never echoes the token."""
    async with serving("http", [BearerAuth(TOKENS)]) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        body = {"a": 1, "b": 2}
        cases = [
            ({}, "/Arith/add", 401, "unauthenticated"),
            ({"authorization": "Basic dXNlcjpwYXNz"}, "/Arith/add", 401, "unauthenticated"),
            ({"authorization": "Bearer leaked-guess"}, "/Arith/add", 401, "unauthenticated"),
            ({"authorization": "Bearer reader-token"}, "/Arith/div", 403, "permission_denied"),
        ]
        for headers, path, status, code in cases:
            response = await client.post(path, json=body, headers=headers)
            assert (response.status_code, response.json()["code"]) == (status, code)
            assert "leaked-guess" not in response.text and "reader-token" not in response.text
        response = await client.post("/Arith/add", json=body, headers={"authorization": "Bearer reader-token"})
        assert (response.status_code, orjson.loads(response.content)) == (200, 3)


def test_bearer_auth_checks_its_configuration() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        BearerAuth({"": ["*"]})
    with pytest.raises(TypeError, match="list of grants"):
        BearerAuth({"t": "Arith/*"})
