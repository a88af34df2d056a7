"""`kubrpc call`, `list` and `describe` on stream methods.

In-process first (the CLI's call/list/describe coroutines, on this test's event loop, against an inproc
server), then as a user runs it: the installed `kubrpc` command in a subprocess, over TCP and HTTP, with a
pipe as its stdin and Ctrl-C (SIGINT) ending a stream that would never end.
"""

from __future__ import annotations

import asyncio
import functools
import io
import itertools
import json
import os
import signal
import sys
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from stream_services import Feed, FeedImpl

import kubrpc
from kubrpc import _cli_call
from kubrpc.cli import _parse

pytestmark = pytest.mark.anyio

KUBRPC = [str(Path(sys.executable).parent / "kubrpc")]
NEUTRAL = Path(sys.executable).parent  # not the repository root, whose kubrpc/ folder would shadow the install
_names = itertools.count()


@kubrpc.interface(name="test.Slow")
class Slow(Protocol):
    def hang(self, first: int) -> AsyncIterator[int]:
        """Send `first` messages, then wait until cancelled."""
        ...

    async def last(self, values: AsyncIterable[int], *, start: int = 0) -> int: ...


class SlowImpl:
    def __init__(self) -> None:
        self.cancelled = 0
        self.running = 0
        self.received: list[int] = []

    async def hang(self, first: int) -> AsyncIterator[int]:
        self.running += 1
        try:
            for i in range(first):
                yield i
            await asyncio.Event().wait()
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise
        finally:
            self.running -= 1

    async def last(self, values: AsyncIterable[int], *, start: int = 0) -> int:
        self.running += 1
        try:
            value = start
            async for value in values:
                self.received.append(value)
            return value
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1


async def settle(check: Any, rounds: int = 500) -> bool:
    """Poll `check` for a while (a hang guard, not a timing assertion)."""
    for _ in range(rounds):
        if check():
            return True
        await asyncio.sleep(0.01)
    return bool(check())


@asynccontextmanager
async def serving(scheme: str = "inproc", **options: Any) -> AsyncIterator[tuple[str, FeedImpl, SlowImpl]]:
    server = kubrpc.Server(drain_timeout=1, **options)
    feed, slow = FeedImpl(), SlowImpl()
    server.register(Feed, feed)
    server.register(Slow, slow)
    url = f"inproc://cli-{next(_names)}" if scheme == "inproc" else f"{scheme}://127.0.0.1:0"
    async with server.serve(url) as listener:
        yield listener.url, feed, slow


async def cli(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *argv: str, stdin: bytes | Any = b""
) -> tuple[int, str, str]:
    """`kubrpc ARGV` (call, list or describe) on this event loop, as main() runs it: (status, stdout, stderr)."""
    source = io.TextIOWrapper(io.BytesIO(stdin)) if isinstance(stdin, bytes) else stdin
    monkeypatch.setattr(sys, "stdin", source)
    args = _parse(list(argv))
    run = {"call": _cli_call.call, "list": _cli_call.list_services, "describe": _cli_call.describe}
    try:
        with anyio.fail_after(30):
            status = await run[args.command](args)
    except _cli_call._Fail as exc:
        print(f"kubrpc: {exc}", file=sys.stderr)
        status = exc.status
    out, err = capsys.readouterr()
    return status, out, err


Capsys = pytest.CaptureFixture[str]


async def test_list_and_describe_show_the_kind(capsys: Capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    async with serving() as (url, _, _):
        assert await cli(capsys, monkeypatch, "list", url) == (0, "test.Feed\ntest.Slow\n", "")
        status, out, err = await cli(capsys, monkeypatch, "list", url, "test.Feed")
        assert status == 0, err
        assert out.splitlines() == [
            "test.Feed/add",
            "test.Feed/ticks (server stream)",
            "test.Feed/total (client stream)",
            "test.Feed/chat (bidirectional stream)",
            "test.Feed/fail_after (server stream)",
            "test.Feed/forever (server stream)",
            "test.Feed/count (client stream)",
            "test.Feed/watch (server stream)",
        ]
        status, out, err = await cli(capsys, monkeypatch, "describe", url)
        assert status == 0, err
        for line in (
            "  test.Feed/add(a: int, b: int) -> int",
            "  test.Feed/ticks(n: int) -> stream int",
            "  test.Feed/total(values: stream int) -> int",
            "  test.Feed/chat(words: stream str) -> stream str",
            "  test.Feed/count(values: stream bytes, stop_after: int = -1) -> int",
            "  test.Feed/watch(kinds: list[str]) -> stream Event",
            "  test.Slow/hang(first: int) -> stream int",
            "    Send `first` messages, then wait until cancelled.",
            "  test.Slow/last(values: stream int, start: int = 0) -> int",
            "  Event(seq: int, kind: str)",  # the schema a stream's messages use
        ):
            assert f"\n{line}\n" in out, (line, out)
        status, out, err = await cli(capsys, monkeypatch, "describe", url, "test.Feed/chat")
        assert status == 0, err
        assert "    arguments: {" in out
        assert '    each request: {"type":"string"}' in out
        assert '    each result: {"type":"string"}' in out
        status, out, err = await cli(capsys, monkeypatch, "describe", url, "test.Feed/count", "--json")
        described = json.loads(out)
        assert described["paths"] == {}
        stream = described["x-kubrpc-streams"]["/test.Feed/count"]
        assert stream["kind"] == "client_stream"
        assert stream["stream"] == {
            "name": "values",
            "position": 0,
            "schema": {"type": "string", "contentEncoding": "base64"},
        }
        status, _, err = await cli(capsys, monkeypatch, "describe", url, "test.Feed/tick")
        assert status == 1 and "did you mean 'ticks'?" in err


async def test_call_prints_each_message_as_a_json_line(capsys: Capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    async with serving() as (url, _, _):
        assert await cli(capsys, monkeypatch, "call", url, "test.Feed/ticks", '{"n": 3}') == (0, "0\n1\n2\n", "")
        assert await cli(capsys, monkeypatch, "call", url, "test.Feed.ticks", '{"n": 0}') == (0, "", "")
        status, out, err = await cli(capsys, monkeypatch, "call", url, "test.Feed/watch", '{"kinds": ["put", "del"]}')
        assert (status, err) == (0, "")
        assert out == '{"seq":0,"kind":"put"}\n{"seq":1,"kind":"del"}\n'
        # bad arguments of a stream: the server's INVALID_ARGUMENT, as for a unary call
        status, out, err = await cli(capsys, monkeypatch, "call", url, "test.Feed/ticks", '{"n": "3"}')
        assert (status, out) == (1, "") and '"code":"invalid_argument"' in err
        # unary calls are as before
        assert await cli(capsys, monkeypatch, "call", url, "test.Feed/add", '{"a": 1, "b": 2}') == (0, "3\n", "")


async def test_an_error_after_messages_comes_after_them(capsys: Capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    async with serving() as (url, _, _):
        status, out, err = await cli(
            capsys, monkeypatch, "call", url, "test.Feed/fail_after", '{"n": 2, "code": "not_found"}'
        )
        assert (status, out) == (1, "0\n1\n")
        assert err == '{"code":"not_found","message":"failed after 2"}\n'


async def test_a_stream_of_requests_is_read_from_stdin(capsys: Capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    async with serving() as (url, _, slow):
        total = await cli(capsys, monkeypatch, "call", url, "test.Feed/total", stdin=b"1\n2\n\n  3 \r\n")
        assert total == (0, "6\n", "")  # blank lines skipped, spaces and CR/LF around a message too
        assert await cli(capsys, monkeypatch, "call", url, "test.Feed/total", stdin=b"") == (0, "0\n", "")
        assert await cli(capsys, monkeypatch, "call", url, "test.Feed/total", stdin=b"4") == (0, "4\n", "")  # no \n
        chat = await cli(capsys, monkeypatch, "call", url, "test.Feed/chat", stdin=b'"a"\n"b"\n')
        assert chat == (0, '"A"\n"B"\n', "")
        # ordinary arguments beside the stream, as for any call
        last = await cli(capsys, monkeypatch, "call", url, "test.Slow/last", '{"start": 7}', stdin=b"")
        assert last == (0, "7\n", "")
        assert await cli(capsys, monkeypatch, "call", url, "test.Slow/last", stdin=b"5\n9\n") == (0, "9\n", "")
        # the server stops reading early: the call ends with its result, whatever is left on stdin
        count = await cli(
            capsys, monkeypatch, "call", url, "test.Feed/count", '{"stop_after": 2}', stdin=b'"YQ=="\n' * 100
        )
        assert count == (0, "2\n", "")
        assert slow.running == 0


async def test_bad_lines_of_stdin_end_the_call(capsys: Capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    async with serving() as (url, _, slow):
        # not JSON: the CLI refuses the line (a usage error), and the call is cancelled on the server
        status, out, err = await cli(capsys, monkeypatch, "call", url, "test.Slow/last", stdin=b"1\n{oops\n3\n")
        assert (status, out) == (2, "")
        assert err.startswith("kubrpc: line 2 of stdin is not one JSON message: ") and err.count("\n") == 1
        assert await settle(lambda: slow.running == 0)
        assert slow.received == [1] and slow.cancelled == 1
        # JSON, but not what the method takes: the server's INVALID_ARGUMENT naming the message
        status, out, err = await cli(capsys, monkeypatch, "call", url, "test.Feed/total", stdin=b'1\n"two"\n')
        assert (status, out) == (1, "")
        assert '"code":"invalid_argument"' in err and "values[1]" in err
        # a line over the maximum message size is refused before it is sent
        big = b'"' + b"x" * (4 * 1024 * 1024 + 10) + b'"\n'
        status, out, err = await cli(capsys, monkeypatch, "call", url, "test.Feed/chat", stdin=big)
        assert status == 2 and "line 1 of stdin is over the maximum message size" in err
        # stdin cannot carry both the arguments and the stream
        status, _, err = await cli(capsys, monkeypatch, "call", url, "test.Feed/total", "-d", "-", stdin=b"{}")
        assert status == 2 and "reads its stream of messages from stdin: give the arguments as JSON" in err


async def test_bidirectional_lines_go_and_come_as_they_are_typed(
    capsys: Capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pipe as stdin: each answer is printed before the next line is written, and EOF ends the call."""
    read_end, write_end = os.pipe()
    stdin = io.TextIOWrapper(os.fdopen(read_end, "rb"))
    monkeypatch.setattr(sys, "stdin", stdin)
    printed: list[str] = []

    def answered(count: int) -> bool:
        printed.append(capsys.readouterr().out)
        return "".join(printed).count("\n") >= count

    try:
        async with serving() as (url, _, _):
            task = asyncio.ensure_future(_cli_call.call(_parse(["call", url, "test.Feed/chat"])))
            for count, word in enumerate(("hello", "world"), 1):
                os.write(write_end, f'"{word}"\n'.encode())
                assert await settle(functools.partial(answered, count)), (
                    "a line was not answered before the next was written"
                )
            assert "".join(printed) == '"HELLO"\n"WORLD"\n'
            assert not task.done()  # the stream stays open until stdin ends
            os.close(write_end)
            write_end = -1
            with anyio.fail_after(30):
                assert await task == 0
    finally:
        if write_end != -1:
            os.close(write_end)
        stdin.close()


async def test_cancelling_the_command_cancels_the_stream(capsys: Capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """What Ctrl-C does to `kubrpc call` (asyncio cancels the main task): the handler is cancelled too."""
    async with serving() as (url, _, slow):
        args = _parse(["call", url, "test.Slow/hang", '{"first": 2}'])
        assert args.stream_timeout is None  # a stream has no deadline unless asked for: it runs until Ctrl-C
        with anyio.move_on_after(30) as scope:
            task = asyncio.ensure_future(_cli_call.call(args))
            printed: list[str] = []

            def both_printed() -> bool:
                printed.append(capsys.readouterr().out)
                return "".join(printed) == "0\n1\n"

            assert await settle(both_printed)
            assert slow.running == 1  # the handler waits, after its two messages
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert not scope.cancelled_caught
        assert await settle(lambda: slow.running == 0)
        assert slow.cancelled == 1


async def test_timeout_is_the_deadline_of_the_whole_stream(capsys: Capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    async with serving() as (url, _, slow):
        status, out, err = await cli(
            capsys, monkeypatch, "call", url, "test.Slow/hang", '{"first": 2}', "--timeout", "0.3"
        )
        assert (status, out) == (1, "0\n1\n")
        assert '"code":"deadline_exceeded"' in err
        assert await settle(lambda: slow.running == 0)
        monkeypatch.setenv("KUBRPC_TIMEOUT", "0.3")
        status, out, err = await cli(capsys, monkeypatch, "call", url, "test.Slow/hang", '{"first": 1}')
        assert (status, out) == (1, "0\n") and '"code":"deadline_exceeded"' in err
        monkeypatch.delenv("KUBRPC_TIMEOUT")
    assert _parse(["call", "tcp://127.0.0.1:9", "A/b"]).timeout == 10.0  # a unary call keeps its default


async def test_without_reflection_the_servers_refusal_says_the_kind(
    capsys: Capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(reflection=False) as (url, _, _):
        assert await cli(capsys, monkeypatch, "call", url, "test.Feed/ticks", '{"n": 2}') == (0, "0\n1\n", "")
        assert await cli(capsys, monkeypatch, "call", url, "test.Feed/total", stdin=b"1\n2\n") == (0, "3\n", "")
        assert await cli(capsys, monkeypatch, "call", url, "test.Feed/chat", stdin=b'"a"\n') == (0, '"A"\n', "")
        status, out, err = await cli(capsys, monkeypatch, "call", url, "test.Feed/nope", "{}")
        assert (status, out) == (1, "") and '"code":"unimplemented"' in err and "unknown method 'nope'" in err


async def test_list_and_describe_over_http_read_the_streams_from_openapi_json(
    capsys: Capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same answers from /openapi.json (HTTP) as from the reflection service (in-process, TCP)."""
    outputs = []
    for scheme in ("inproc", "http"):
        async with serving(scheme) as (url, _, _):
            status, out, err = await cli(capsys, monkeypatch, "list", url, "test.Slow")
            assert (status, out, err) == (0, "test.Slow/hang (server stream)\ntest.Slow/last (client stream)\n", "")
            status, out, err = await cli(capsys, monkeypatch, "describe", url)
            assert status == 0 and "  test.Feed/chat(words: stream str) -> stream str\n" in out, err
            status, one, err = await cli(capsys, monkeypatch, "describe", url, "test.Slow/last")
            assert status == 0 and "  test.Slow/last(values: stream int, start: int = 0) -> int\n" in one, err
            assert "test.Slow/hang" not in one
            status, _, err = await cli(capsys, monkeypatch, "describe", url, "test.Slow/lost")
            assert status == 1 and "did you mean 'last'?" in err
            outputs.append(out)
    assert outputs[0] == outputs[1]


# ---- as a user runs it: a subprocess over sockets ------------------------------------------------------------


@pytest.fixture(params=["tcp", "http"])
def socket_scheme(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def run(*argv: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    """The installed `kubrpc` command, from a neutral directory: (status, stdout, stderr)."""
    with anyio.fail_after(60):
        result = await anyio.run_process([*KUBRPC, *argv], check=False, input=stdin, cwd=NEUTRAL)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_the_command_calls_every_kind(socket_scheme: str) -> None:
    async with serving(socket_scheme) as (url, _, _):
        assert await run("call", url, "test.Feed/ticks", '{"n": 3}') == (0, "0\n1\n2\n", "")
        assert await run("call", url, "test.Feed/total", stdin=b"1\n2\n3\n") == (0, "6\n", "")
        assert await run("call", url, "test.Feed/chat", stdin=b'"a"\n"b"\n') == (0, '"A"\n"B"\n', "")
        status, out, err = await run("call", url, "test.Feed/fail_after", '{"n": 2, "code": "not_found"}')
        assert (status, out) == (1, "0\n1\n") and '"code":"not_found"' in err
        status, out, err = await run("list", url, "test.Feed")
        assert status == 0 and "test.Feed/chat (bidirectional stream)\n" in out, err


async def test_ctrl_c_ends_a_stream_cleanly(socket_scheme: str) -> None:
    async with serving(socket_scheme) as (url, _, slow):
        argv = [*KUBRPC, "call", url, "test.Slow/hang", '{"first": 1}']
        async with await anyio.open_process(argv, cwd=NEUTRAL) as process:
            assert process.stdout is not None and process.stderr is not None
            with anyio.fail_after(30):  # printed as it arrives (a pipe may hand the line over in pieces)
                assert await BufferedByteReceiveStream(process.stdout).receive_until(b"\n", 1000) == b"0"
            assert await settle(lambda: slow.running == 1)
            process.send_signal(signal.SIGINT)
            with anyio.fail_after(30):
                status = await process.wait()
            err = b"".join([chunk async for chunk in process.stderr]).decode()
        assert status == 130 and "Traceback" not in err, err
        assert await settle(lambda: slow.running == 0)
        assert slow.cancelled == 1


async def test_a_pipe_feeds_a_bidirectional_stream_line_by_line(socket_scheme: str) -> None:
    async with serving(socket_scheme) as (url, _, _):
        argv = [*KUBRPC, "call", url, "test.Feed/chat"]
        async with await anyio.open_process(argv, cwd=NEUTRAL) as process:
            assert process.stdin is not None and process.stdout is not None
            lines = BufferedByteReceiveStream(process.stdout)
            for word in ("hello", "world"):
                await process.stdin.send(f'"{word}"\n'.encode())
                with anyio.fail_after(30):
                    assert await lines.receive_until(b"\n", 1000) == f'"{word.upper()}"'.encode()
            await process.stdin.aclose()  # EOF half-closes: the server's loop ends, and so does the call
            with anyio.fail_after(30):
                assert await process.wait() == 0


async def test_ctrl_c_on_any_call_exits_130_without_a_traceback(start_server: Any) -> None:
    """The SIGINT path of the command, on a unary call that would run for a minute (any transport has those)."""
    url, _, control = await start_server("tcp")
    argv = [*KUBRPC, "call", url, "Control/sleep", '{"seconds": 60}', "--timeout", "120"]
    async with await anyio.open_process(argv, cwd=NEUTRAL) as process:
        assert process.stderr is not None
        assert await settle(lambda: control.started == 1, rounds=3000)
        process.send_signal(signal.SIGINT)
        with anyio.fail_after(30):
            status = await process.wait()
        err = b"".join([chunk async for chunk in process.stderr]).decode()
    assert status == 130 and "Traceback" not in err, err
    assert await settle(lambda: control.cancelled == 1)
