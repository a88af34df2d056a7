"""Attacks on the user-facing surfaces of issue 12: the CLI, reflection, error hints, /docs, the wire sniffs."""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import anyio
import httpx
import pytest

import kubrpc
from kubrpc import RpcError, Status
from kubrpc.cli import main
from kubrpc.endpoint import Endpoint
from kubrpc.reflection import Reflection, suggest

pytestmark = pytest.mark.anyio

KUBRPC = str(Path(sys.executable).parent / "kubrpc")


@kubrpc.interface(name="admin.Secrets")
class Secrets(Protocol):
    async def rotate(self, key: str) -> str: ...


class SecretsImpl:
    async def rotate(self, key: str) -> str:
        return key


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`kubrpc ARGV` run in a worker thread (its own event loop), against servers on this test's loop."""
    status = await anyio.to_thread.run_sync(main, list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def receive_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


# ---- the TCP server's HTTP sniff --------------------------------------------------------------------------


async def test_an_http_request_line_split_across_reads_still_gets_the_http_400() -> None:
    # Broke: the sniff judged the first read alone; "G" is no preface and no "GET ": a binary GOAWAY came back.
    server = kubrpc.Server()
    async with server.serve("tcp://127.0.0.1:0", preface_timeout=5) as listener:
        port = int(listener.url.rpartition(":")[2])
        for first, rest in ((b"G", b"ET / HTTP/1.1\r\n\r\n"), (b"OPTI", b"ONS * HTTP/1.1\r\n\r\n"), (b"PO", b"ST /")):

            def exchange(first: bytes = first, rest: bytes = rest) -> bytes:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sock.sendall(first)
                    import time

                    time.sleep(0.2)  # two reads on the server (the answer does not depend on it)
                    sock.sendall(rest)
                    return receive_all(sock)

            with anyio.fail_after(20):
                answer = await anyio.to_thread.run_sync(exchange)
            assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer[:80]
            assert b"this is a kubrpc TCP port, not HTTP: use tcp://127.0.0.1:" in answer


async def test_a_byte_that_cannot_start_either_protocol_is_refused_and_one_that_waits_is_timed() -> None:
    # Held: the sniff waits for at most "OPTIONS " (8 bytes) and within preface_timeout, never longer.
    server = kubrpc.Server()
    async with server.serve("tcp://127.0.0.1:0", preface_timeout=0.3) as listener:
        port = int(listener.url.rpartition(":")[2])

        def send(data: bytes) -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(data)
                return receive_all(sock)

        with anyio.fail_after(20):
            refused = await anyio.to_thread.run_sync(send, b"X")  # at once: a GOAWAY, not HTTP
            assert refused and not refused.startswith(b"HTTP/")
            slow = await anyio.to_thread.run_sync(send, b"GE")  # "GET " never completed: preface_timeout
            assert b"no preface within 0.3 s" in slow
            long_line = await anyio.to_thread.run_sync(send, b"GET /" + b"a" * 200_000)
            assert long_line.startswith(b"HTTP/1.1 400 ")  # broke: a reset, the 400 lost (the line was unread)
            while listener.connections:  # type: ignore[attr-defined]  # each one closed: nothing held
                await anyio.sleep(0.01)


# ---- the TCP client's HTTP sniff --------------------------------------------------------------------------


@pytest.mark.parametrize("split", [1, 4, 5, 9])
async def test_the_client_sees_http_even_when_the_status_line_arrives_in_pieces(split: int) -> None:
    # Broke for 1, 4 and 5: the sniff looked at the read that overflowed the frame header, not at the
    # server's first bytes, and the user got "connection lost before the server acknowledged it".
    answer = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n"

    async def http_server(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await stream.receive()
            await stream.send(answer[:split])
            await anyio.sleep(0.2)
            await stream.send(answer[split:])
            with anyio.move_on_after(5), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await stream.receive()  # until the client has gone

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, http_server)
        async with kubrpc.connect(f"tcp://127.0.0.1:{port}", max_attempts=1) as channel:
            with pytest.raises(RpcError) as caught:
                await channel.call("A/b", b"{}", timeout=10)
        assert caught.value.code is Status.FAILED_PRECONDITION
        assert f"use http://127.0.0.1:{port}" in caught.value.message
        tasks.cancel_scope.cancel()


# ---- error hints ------------------------------------------------------------------------------------------


async def test_a_server_without_reflection_names_none_of_its_services_to_a_stranger(scheme: str) -> None:
    # Broke: Server(reflection=False) turns listing off, but any unknown path answered
    # "unknown service 'x' (known: admin.Secrets)" and "did you mean ...?" to anyone, before interceptors ran.
    for reflection in (False, True):
        server = kubrpc.Server(reflection=reflection)
        server.register(Secrets, SecretsImpl())
        async with server.serve(f"{scheme}://127.0.0.1:0") as listener, kubrpc.connect(listener.url) as channel:
            messages = []
            for path in ("nosuch.Svc/get", "admin.Secret/rotate", "admin.Secrets/rotat"):
                with pytest.raises(RpcError) as caught:
                    await channel.call(path, b"{}", timeout=10)
                assert caught.value.code is Status.UNIMPLEMENTED
                messages.append(caught.value.message)
        if reflection:  # the hints stay where the server describes itself anyway
            assert "admin.Secrets" in messages[0] and "did you mean 'rotate'?" in messages[2]
        else:
            assert messages == [
                "unknown service 'nosuch.Svc'",
                "unknown service 'admin.Secret'",
                "unknown method 'rotat' of service 'admin.Secrets'",
            ]


async def test_hostile_names_are_escaped_and_cut_short_where_errors_repeat_them(scheme: str) -> None:
    # Broke: a 60,000-character service name came back whole in the error (over TCP; HTTP caps the path
    # at max_header_size), and reflection's describe() repeated a 1 MB name in full.
    server = kubrpc.Server()
    server.register(Secrets, SecretsImpl())
    async with server.serve(f"{scheme}://127.0.0.1:0") as listener, kubrpc.connect(listener.url) as channel:
        long = "x" * (60_000 if scheme == "tcp" else 8_000)
        for path in (f"{long}/get", f"admin.Secrets/{long}", "a\x1b[2J\nb/get"):
            with pytest.raises(RpcError) as caught:
                await channel.call(path, b"{}", timeout=10)
            message = caught.value.message
            assert len(message) < 400 and "\x1b" not in message and "\n" not in message, message[:500]
        if scheme == "tcp":  # (HTTP carries the path percent-encoded)
            assert caught.value.message.startswith("unknown service 'a\\x1b[2J\\nb'")
        reflect = channel.stub(Reflection)
        with pytest.raises(RpcError) as caught:
            await reflect.describe("y" * 1_000_000)
        assert caught.value.code is Status.NOT_FOUND
        assert len(caught.value.message) < 400 and "(1000000 characters)" in caught.value.message


def test_suggestions_skip_fuzzy_matching_when_a_caller_could_make_it_costly(monkeypatch: pytest.MonkeyPatch) -> None:
    # Broke: difflib ran on every unknown call, whatever the name's length and the number of services
    # (measured: 90 ms of the event loop per call with 5,000 services; 0.28 s for a 4 MB name).
    many = [f"svc{i}.Service{i}" for i in range(5000)]
    assert suggest("svc12.Servce12", many[:50]) == "; did you mean 'svc12.Service12'?"  # the fuzzy match, when cheap

    def refuse(*args: object, **kwargs: object) -> list[str]:
        raise AssertionError("difflib was called")

    monkeypatch.setattr(difflib, "get_close_matches", refuse)
    assert suggest("x" * 1_000_000, ["a.B"]) == " (known: a.B)"
    assert suggest("Service17", many) == "; did you mean 'svc17.Service17'?"  # the last dotted part still matches
    assert suggest("zzz", many).startswith(" (known: svc0.Service0, ")


# ---- the CLI ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "target"),
    [("call", "tcp://127.0.0.1:9"), ("call", "http://127.0.0.1:9"), ("describe", "http://127.0.0.1:9")],
)
@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("content-length: 5", "reserved"),
        ("connect-timeout-ms: 1", "reserved"),
        ("host: evil.example", "reserved"),
        ("x-a: 1\r\nx-b: 2", "no CR, LF"),
        ("x-\x1b[2J: 1", "not a valid header name"),
    ],
)
async def test_h_refuses_what_the_library_refuses_on_every_command(
    capsys: pytest.CaptureFixture[str], command: str, target: str, header: str, message: str
) -> None:
    # Broke: `call` sent it and printed the library's refusal as if it were the server's answer (exit 1),
    # and `describe` over HTTP put it on its GET /openapi.json unchecked (a CR/LF was aiohttp's traceback).
    argv = [command, target, *(["Arith/add", "{}"] if command == "call" else []), "-H", header]
    status, out, err = await cli(capsys, *argv)
    assert (status, out) == (2, "")
    assert err.startswith("kubrpc: bad -H: ") and message in err and err.count("\n") == 1, err
    assert "\x1b" not in err and "\r" not in err


async def test_d_reads_no_more_than_a_message_and_says_so(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # Broke: -d @FILE read and parsed the whole file (a 4 MiB + 1 file went to the network; /dev/zero never ends).
    big = tmp_path / "big.json"
    big.write_bytes(b'{"a": "' + b"x" * (4 * 1024 * 1024) + b'"}')
    status, out, err = await cli(capsys, "call", "tcp://127.0.0.1:9", "Arith/add", "-d", f"@{big}")
    assert (status, out) == (2, "")
    assert err == f"kubrpc: arguments over the maximum message size of {4 * 1024 * 1024} bytes\n"


async def test_d_dash_without_a_stdin_is_a_usage_error(tmp_path: Path) -> None:
    # Broke: with stdin closed (`<&-`), sys.stdin is None: an AttributeError traceback.
    def run(stdin: int | None, close: bool) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [KUBRPC, "call", "tcp://127.0.0.1:9", "Arith/add", "-d", "-"],
            stdin=stdin,
            capture_output=True,
            timeout=60,
            cwd=tmp_path,
            preexec_fn=(lambda: os.close(0)) if close else None,
        )

    closed = await anyio.to_thread.run_sync(run, None, True)
    assert closed.returncode == 2, closed.stderr
    assert closed.stderr == b"kubrpc: -d - reads the arguments from stdin, and there is none\n"
    empty = await anyio.to_thread.run_sync(run, subprocess.DEVNULL, False)  # held: an empty stdin is no JSON
    assert empty.returncode == 2 and empty.stderr.startswith(b"kubrpc: arguments are not valid JSON")


async def test_a_servers_text_cannot_drive_the_users_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    # Broke: list/describe printed a server's error message and descriptions as they came: terminal escape
    # sequences ran, and a newline broke the one-line error.
    async def hostile(call: Any, proceed: Callable[[], Any]) -> bytes:
        if call.path == "kubrpc.Reflection/services":
            raise RpcError(Status.UNAUTHENTICATED, "go away\n\x1b]0;pwned\x07\x1b[2J")
        return await proceed()  # type: ignore[no-any-return]

    @kubrpc.interface(name="doc.Doc")
    class Doc(Protocol):
        async def get(self) -> int:
            """Line one.\x1b[31m

            Line \x9b two."""
            ...

    class DocImpl:
        async def get(self) -> int:
            return 1

    server = kubrpc.Server(interceptors=[hostile])
    server.register(Doc, DocImpl())
    async with server.serve("tcp://127.0.0.1:0") as listener:
        status, out, err = await cli(capsys, "list", listener.url)
        assert status == 1 and err.count("\n") == 1 and "\x1b" not in err and "\x07" not in err, repr(err)
        assert "go away\\x0a\\x1b]0;pwned\\x07" in err
        status, out, err = await cli(capsys, "describe", listener.url, "doc.Doc")
        assert status == 0, err
        assert "\x1b" not in out and "\x9b" not in out and "Line one.\\x1b[31m" in out


# ---- /docs assets -----------------------------------------------------------------------------------------


async def test_docs_assets_serve_only_their_own_files() -> None:
    # Held: the name is looked up in a fixed table; nothing reaches the file system by a caller's path.
    server = kubrpc.Server(max_header_size=4096)
    server.register(Secrets, SecretsImpl())
    async with server.serve("http://127.0.0.1:0") as listener, httpx.AsyncClient(base_url=listener.url) as http:
        for path in (
            "/docs/assets/..%2f..%2f..%2fetc%2fpasswd",
            "/docs/assets/%2e%2e",
            "/docs/assets/%2fetc%2fpasswd",
            "/docs/assets/swagger-ui.css%00.png",
            "/docs/assets/index.html",
            "/docs/assets/" + "a" * 2000,
        ):
            response = await http.get(path)
            assert response.status_code == 404, (path, response.status_code)
            assert b"root:" not in response.content
        assert (await http.get("/docs/assets/" + "a" * 8000)).status_code == 431
        ok = await http.get("/docs/assets/init.js")
        assert ok.status_code == 200
        etag = ok.headers["etag"]
        assert (await http.get("/docs/assets/init.js", headers={"if-none-match": etag})).status_code == 304
        assert (await http.get("/docs/assets/init.js", headers={"if-none-match": "x" * 3000})).status_code == 200
        head = await http.head("/docs/assets/init.js")
        assert head.status_code == 200 and head.content == b""


# ---- kubrpc.testing.balancers -----------------------------------------------------------------------------


class _Returns:
    def __init__(self, value: object) -> None:
        self.value = value

    def update(self, snapshot: Sequence[Endpoint]) -> None:
        pass

    def pick(self) -> Any:
        return self.value


class _AsyncPick(_Returns):
    async def pick(self) -> Any:
        return self.value


def test_assert_distribution_says_what_a_pick_returned_instead_of_an_endpoint() -> None:
    # Broke: an unhashable return was a bare TypeError from Counter, and an `async def pick` left a
    # coroutine that was never awaited (a RuntimeWarning; an error under filterwarnings=error).
    from kubrpc.testing.balancers import assert_distribution

    a = Endpoint("10.0.0.1", 1)
    with pytest.raises(AssertionError, match=r"pick\(\) returned \['10.0.0.1'\], not an Endpoint at pick 1"):
        assert_distribution(_Returns(["10.0.0.1"]), {a: 1}, picks=10)
    with pytest.raises(AssertionError, match="must be a plain method"):
        assert_distribution(_AsyncPick(a), {a: 1}, picks=10)  # type: ignore[arg-type]


def test_assert_contract_says_an_async_pick_is_the_problem() -> None:
    from kubrpc.testing.balancers import assert_contract

    with pytest.raises(AssertionError, match="must be a plain method"):
        assert_contract(lambda: _AsyncPick(None))  # type: ignore[arg-type,return-value]


# ---- inproc -----------------------------------------------------------------------------------------------


async def test_inproc_names_are_checked_and_another_loop_is_told_so() -> None:
    # Held: odd names are refused with what a good one looks like; a call from another event loop says so.
    server = kubrpc.Server()
    server.register(Secrets, SecretsImpl())
    for name in ("caf\u00e9", "a/b", "a b", "", "a\x1b"):
        with pytest.raises(ValueError, match="expected inproc://NAME"):
            async with server.serve(f"inproc://{name}"):
                pass
    async with server.serve("inproc://ux-attack"):

        def other_loop() -> str:
            async def go() -> str:
                async with kubrpc.connect("inproc://ux-attack", max_attempts=1) as channel:
                    try:
                        await channel.call("admin.Secrets/rotate", b'{"key": "k"}', timeout=5)
                    except RpcError as exc:
                        return exc.message
                return ""

            return asyncio.run(go())

        message = await anyio.to_thread.run_sync(other_loop)
        assert "served on another event loop" in message


# ---- reflection -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Tree:
    """A recursive type: its schema refers to itself."""

    value: int
    children: list[Tree]


@kubrpc.interface(name="forest.Trees")
class Trees(Protocol):
    async def grow(self, tree: Tree) -> Tree: ...


class TreesImpl:
    async def grow(self, tree: Tree) -> Tree:
        return tree


async def test_describe_answers_one_services_schemas_recursive_ones_included(
    capsys: pytest.CaptureFixture[str], scheme: str
) -> None:
    # Broke: describe("admin.Secrets") answered the components of every service on the server (a `kubrpc list`
    # of N services fetched N times all of them), and made the whole OpenAPI document again on every call.
    server = kubrpc.Server()
    server.register(Secrets, SecretsImpl())
    server.register(Trees, TreesImpl())
    async with server.serve(f"{scheme}://127.0.0.1:0") as listener, kubrpc.connect(listener.url) as channel:
        reflect = channel.stub(Reflection)
        assert sorted((await reflect.describe("admin.Secrets"))["components"]["schemas"]) == ["Error"]
        trees = await reflect.describe("forest.Trees/grow")
        assert sorted(trees["components"]["schemas"]) == ["Error", "Tree", "Tree-Input"]
        status, out, err = await cli(capsys, "describe", listener.url, "forest.Trees", "--json")
        assert status == 0, err
        assert sorted(json.loads(out)["components"]["schemas"]) == ["Error", "Tree", "Tree-Input"]
        status, out, err = await cli(capsys, "describe", listener.url, "forest.Trees")
        assert status == 0 and "Tree(value: int, children: list[Tree])" in out, err


async def test_call_says_when_the_answer_is_not_json(capsys: pytest.CaptureFixture[str]) -> None:
    # Broke: a web server that answers any POST with 200 and HTML gave an orjson traceback.
    async def web_server(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await stream.receive()
            body = b"<html>hello\x1b[2J</html>"
            head = b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\nconnection: close\r\ncontent-length: %d\r\n\r\n"
            await stream.send(head % len(body) + body)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, web_server)
        status, out, err = await cli(capsys, "call", f"http://127.0.0.1:{port}", "A/b", "{}")
        tasks.cancel_scope.cancel()
    assert (status, out) == (1, "")
    assert err.startswith("kubrpc: the answer is not JSON (22 bytes: '<html>hello\\x1b[2J</html>'...)"), err
    assert "a kubrpc server?" in err and err.count("\n") == 1 and "\x1b" not in err


async def test_describe_survives_a_deeply_nested_document(capsys: pytest.CaptureFixture[str]) -> None:
    # Broke: the walk for the schemas a path uses recursed once per JSON level: a server's document 1,000
    # levels deep (orjson reads up to 1,024) was a RecursionError traceback.
    deep = "[" * 1000 + '{"$ref": "#/components/schemas/Leaf"}' + "]" * 1000  # written out: json.dumps recurses
    paths = '{"/a.B/c": {"post": {"x": ' + deep + "}}}"
    body = ('{"paths": ' + paths + ', "components": {"schemas": {"Leaf": {"type": "integer"}}}}').encode()

    async def web_server(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await stream.receive()
            head = (
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n"
            )
            await stream.send(head % len(body) + body)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, web_server)
        status, out, err = await cli(capsys, "describe", f"http://127.0.0.1:{port}")
        tasks.cancel_scope.cancel()
    assert status == 0, err
    assert "service a.B\n  a.B/c() -> Any\n" in out and "  Leaf: int\n" in out
