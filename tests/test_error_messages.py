"""Errors that say what to do (issue 12.3), over real sockets on both transports."""

from __future__ import annotations

import logging
from typing import Protocol

import anyio
import httpx
import pytest
from services import Arith, ArithImpl

import kubrpc
from kubrpc import RpcError, Status
from kubrpc.access_log import AccessLog
from kubrpc.reflection import REFLECTION_SERVICE, Reflection

pytestmark = pytest.mark.anyio


@kubrpc.interface(name="lib.Loans")
class Loans(Protocol):
    async def lend(self, book: str) -> str: ...


class LoansImpl:
    async def lend(self, book: str) -> str:
        return book


def make() -> kubrpc.Server:
    server = kubrpc.Server(drain_timeout=1)
    server.register(Arith, ArithImpl())
    server.register(Loans, LoansImpl())
    return server


def other(url: str) -> str:
    """The same address under the other transport's scheme."""
    scheme, rest = url.split("://")
    return f"{'http' if scheme == 'tcp' else 'tcp'}://{rest}"


class TestWrongTransport:
    async def test_a_tcp_client_at_an_http_port_is_told_to_use_http(self) -> None:
        async with make().serve("http://127.0.0.1:0") as listener, kubrpc.connect(other(listener.url)) as channel:
            with anyio.fail_after(20), pytest.raises(RpcError) as info:
                await channel.stub(Arith, timeout=5).add(1, 2)
        address = listener.url.partition("://")[2]
        assert info.value.code is Status.FAILED_PRECONDITION  # permanent: not retried, not waited for
        assert info.value.message == (
            f"{address} speaks HTTP, not kubrpc's TCP protocol: use http://{address} (or https://)"
        )
        assert "bytes" not in info.value.message  # no longer "frame of 1213486160 bytes"

    async def test_an_http_client_at_a_tcp_port_is_told_to_use_tcp(self) -> None:
        async with make().serve("tcp://127.0.0.1:0") as listener:
            async with kubrpc.connect(other(listener.url)) as channel:
                with anyio.fail_after(20), pytest.raises(RpcError) as info:
                    await channel.stub(Arith, timeout=5).add(1, 2)
            assert info.value.code is Status.FAILED_PRECONDITION
            assert info.value.message == f"this is a kubrpc TCP port, not HTTP: use {listener.url}"
            # curl (here httpx) sees an HTTP answer that says so, not a reset or binary bytes
            async with httpx.AsyncClient(timeout=5) as client:
                for request in (
                    client.post(other(listener.url) + "/Arith/add", json={"a": 1}),
                    client.get(other(listener.url) + "/"),
                ):
                    response = await request
                    assert response.status_code == 400
                    assert response.json() == {"code": "failed_precondition", "message": info.value.message}
            # the port keeps serving kubrpc clients
            async with kubrpc.connect(listener.url) as channel:
                assert await channel.stub(Arith, timeout=5).add(1, 2) == 3

    async def test_other_garbage_still_gets_a_goaway(self) -> None:
        async with make().serve("tcp://127.0.0.1:0") as listener:
            host, port = listener.url.partition("://")[2].rsplit(":", 1)
            async with await anyio.connect_tcp(host, int(port)) as stream:
                await stream.send(b"\x16\x03\x01 not http, not kubrpc")
                with anyio.fail_after(10):
                    data = await stream.receive()
            assert not data.startswith(b"HTTP/") and b"bad preface: not a kubrpc client" in data


async def test_a_stub_of_a_closed_channel_says_so(served: tuple[str, kubrpc.Server, object]) -> None:
    url = served[0]
    async with kubrpc.connect(url) as channel:
        arith = channel.stub(Arith, timeout=5)
        assert await arith.add(1, 2) == 3
    with pytest.raises(RuntimeError, match=r"^channel is closed \("):
        await arith.add(1, 2)
    with pytest.raises(RuntimeError, match="async with"):  # never opened: says how to open it
        await kubrpc.connect(url).stub(Arith).add(1, 2)


async def test_a_missing_stub_method_names_the_service() -> None:
    async with kubrpc.connect("tcp://127.0.0.1:9") as channel:
        arith = channel.stub(Arith)
        with pytest.raises(AttributeError, match=r"^Arith has no method 'ad'; did you mean 'add'\?$"):
            arith.ad  # type: ignore[attr-defined]  # noqa: B018
        with pytest.raises(AttributeError, match=r"^Arith has no method 'multiply' \(known: add, div\)$"):
            arith.multiply  # type: ignore[attr-defined]  # noqa: B018
        assert not hasattr(arith, "__wrapped__")


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("lib.Loan/lend", "unknown service 'lib.Loan'; did you mean 'lib.Loans'?"),
        ("Loans/lend", "unknown service 'Loans'; did you mean 'lib.Loans'?"),
        ("lib.Loans/lent", "unknown method 'lent' of service 'lib.Loans'; did you mean 'lend'?"),
        ("Zzz/q", "unknown service 'Zzz' (known: Arith, lib.Loans)"),
    ],
)
async def test_unknown_names_suggest_the_nearest(scheme: str, path: str, message: str) -> None:
    async with make().serve(f"{scheme}://127.0.0.1:0") as listener, kubrpc.connect(listener.url) as channel:
        with pytest.raises(RpcError) as info:
            await channel.call(path, b"{}", timeout=5)
        assert (info.value.code, info.value.message) == (Status.UNIMPLEMENTED, message)
        if scheme == "http":  # and as curl sees it
            async with httpx.AsyncClient(timeout=5) as client:
                response = await client.post(f"{listener.url}/{path}", json={})
            assert (response.status_code, response.json()["message"]) == (501, message)


class TestReflection:
    async def test_served_on_both_transports_and_hidden_from_the_listing(self, scheme: str) -> None:
        server = make()
        assert list(server.services) == ["Arith", "lib.Loans"]
        async with server.serve(f"{scheme}://127.0.0.1:0") as listener, kubrpc.connect(listener.url) as channel:
            reflection = channel.stub(Reflection, timeout=5)
            assert await reflection.services() == ["Arith", "lib.Loans"]
            part = await reflection.describe("lib.Loans/lend")
            assert list(part["paths"]) == ["/lib.Loans/lend"]
            assert part["paths"]["/lib.Loans/lend"]["post"]["requestBody"]["content"]["application/json"]["schema"][
                "required"
            ] == ["book"]
            assert list((await reflection.describe("Arith"))["paths"]) == ["/Arith/add", "/Arith/div"]
            with pytest.raises(RpcError) as info:
                await reflection.describe("Arth")
            assert (info.value.code, info.value.message) == (
                Status.NOT_FOUND,
                "unknown service 'Arth'; did you mean 'Arith'?",
            )
            if scheme == "http":
                async with httpx.AsyncClient(timeout=5) as client:
                    document = (await client.get(f"{listener.url}/openapi.json")).json()
                assert not any(REFLECTION_SERVICE in path for path in document["paths"])

    async def test_opt_out(self, scheme: str) -> None:
        server = kubrpc.Server(reflection=False)
        server.register(Arith, ArithImpl())
        async with server.serve(f"{scheme}://127.0.0.1:0") as listener, kubrpc.connect(listener.url) as channel:
            with pytest.raises(RpcError) as info:
                await channel.stub(Reflection, timeout=5).services()
            assert info.value.code is Status.UNIMPLEMENTED

    def test_its_name_is_reserved(self) -> None:
        server = kubrpc.Server()
        with pytest.raises(ValueError, match="reflection"):
            server.register(Reflection, object())


async def test_access_log_one_line_per_call(scheme: str, caplog: pytest.LogCaptureFixture) -> None:
    server = kubrpc.Server(interceptors=[AccessLog()])
    server.register(Arith, ArithImpl())
    caplog.set_level(logging.INFO, logger="kubrpc.access")
    async with server.serve(f"{scheme}://127.0.0.1:0") as listener, kubrpc.connect(listener.url) as channel:
        arith = channel.stub(Arith, timeout=5)
        assert await arith.add(1, 2) == 3
        with pytest.raises(RpcError):
            await channel.call("Arith/add", b'{"a": "x", "b": 1}', timeout=5)
    lines = [r.getMessage().split() for r in caplog.records if r.name == "kubrpc.access"]
    assert [line[1:3] for line in lines] == [["Arith/add", "OK"], ["Arith/add", "INVALID_ARGUMENT"]]
    assert all(line[0].startswith("127.0.0.1:") and line[-1] == "ms" for line in lines)


async def test_listen_errors_name_the_url() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        for scheme in ("tcp", "http"):
            url = f"{scheme}://127.0.0.1:{taken.getsockname()[1]}"
            with pytest.raises(OSError) as info:
                async with make().serve(url):
                    pass
            assert info.value.strerror is not None
            assert info.value.strerror.startswith(f"cannot listen on {url}: ")  # EADDRINUSE stays its errno
            assert info.value.errno is not None and "in use" in info.value.strerror.lower()
