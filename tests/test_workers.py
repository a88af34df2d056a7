"""Pre-fork workers (`kubrpc serve --workers N`, `Server.run(workers=N)`), run as a user runs them."""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Protocol

import anyio
import anyio.abc
import pytest
from services import Arith, make_server

import kubrpc
from kubrpc.errors import RpcError

pytestmark = pytest.mark.anyio

KUBRPC = str(Path(sys.executable).parent / "kubrpc")

APP = """
import os
import pathlib
import time
from typing import Protocol

import anyio
import kubrpc


class Workers(Protocol):
    async def pid(self) -> int: ...
    async def hold(self, started: str, release: str) -> int: ...
    async def slow(self, started: str, seconds: float) -> int: ...


class Impl:
    async def pid(self) -> int:
        return os.getpid()

    async def hold(self, started: str, release: str) -> int:
        # Blocks this worker's event loop (on purpose) until the test creates `release`: meanwhile the other
        # worker alone can accept connections.
        pathlib.Path(started).write_text(str(os.getpid()))
        for _ in range(600):
            if os.path.exists(release):
                break
            time.sleep(0.1)
        return os.getpid()

    async def slow(self, started: str, seconds: float) -> int:
        pathlib.Path(started).write_text(str(os.getpid()))
        await anyio.sleep(seconds)
        return os.getpid()


server = kubrpc.Server(drain_timeout=10, header_timeout=2)
server.register(Workers, Impl())
"""

MAIN = """
import logging
import sys

sys.path.insert(0, sys.argv[1])
import kubrpc
from app import Impl, Workers

logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
server = kubrpc.Server(drain_timeout=10)  # defined in __main__: the workers get it by fork
server.register(Workers, Impl())
server.run("tcp://127.0.0.1:0", workers=2)
"""


class Workers(Protocol):
    async def pid(self) -> int: ...

    async def hold(self, started: str, release: str) -> int: ...

    async def slow(self, started: str, seconds: float) -> int: ...


@pytest.fixture
def app(tmp_path: Path) -> Path:
    """A folder on PYTHONPATH holding the service module `app`, and `broken`, which raises when imported."""
    folder = tmp_path / "lib"
    folder.mkdir()
    (folder / "app.py").write_text(APP)
    (folder / "broken.py").write_text("raise RuntimeError('the database URL is not set')\n")
    return folder


def _env(app: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBRPC_")}
    env["PYTHONPATH"] = str(app)
    env.update(extra)
    return env


@asynccontextmanager
async def serving(
    app: Path, *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[anyio.abc.Process, list[str]]]:
    """`kubrpc -v serve app:server ARGS` from a neutral folder; yields the process and its `serving on` URLs."""
    cwd = app.parent / "cwd"
    cwd.mkdir(exist_ok=True)
    command = [KUBRPC, "-v", "serve", "app:server", *args]
    async with await anyio.open_process(command, cwd=cwd, env=env or _env(app)) as process:
        try:
            assert process.stdout is not None
            with anyio.fail_after(60):
                line = (await process.stdout.receive()).decode()
            assert line.startswith("serving on "), line
            yield process, line.split()[2:]
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


def children(pid: int) -> set[int]:
    """The live child processes of `pid` (from /proc)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rpartition(")")[2].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.add(int(entry))
    return found


async def wait_for_file(path: Path) -> str:
    """The text of `path`, once something has written it."""
    file = anyio.Path(path)
    with anyio.fail_after(60):
        while not await file.exists() or not await file.read_text():
            await anyio.sleep(0.02)
    return await file.read_text()


async def read_until(stream: anyio.abc.ByteReceiveStream, text: str, seen: bytearray) -> None:
    """Read `stream` into `seen` until `text` is in it."""
    with anyio.fail_after(60):
        while text.encode() not in seen:
            seen += await stream.receive()


async def test_two_workers_share_each_port_over_tcp_and_http(app: Path, tmp_path: Path) -> None:
    args = ["--workers", "2", "--bind", "tcp://127.0.0.1:0", "--bind", "http://127.0.0.1:0"]
    async with serving(app, *args) as (process, urls):
        assert all(not url.endswith(":0") for url in urls)  # the real ports, bound once by the supervisor
        workers = children(process.pid)
        assert len(workers) == 2
        for n, url in enumerate(urls):
            answered = set()
            for _ in range(20):  # a new connection each time
                async with kubrpc.connect(url) as channel:
                    stub = channel.stub(Workers, timeout=20)
                    answered |= {await stub.pid() for _ in range(3)}
            assert answered <= workers
            # While one worker's event loop is blocked, the other one accepts and answers.
            started, release = tmp_path / f"started{n}", tmp_path / f"release{n}"
            held: list[int] = []
            async with kubrpc.connect(url) as first, anyio.create_task_group() as tasks:
                tasks.start_soon(_hold, first, started, release, held)
                blocked = int(await wait_for_file(started))
                async with kubrpc.connect(url) as second:
                    other = await second.stub(Workers, timeout=20).pid()
                release.write_text("go")
            assert held == [blocked]
            assert {blocked, other} == workers
        process.send_signal(signal.SIGTERM)
        with anyio.fail_after(60):
            assert await process.wait() == 0
        assert not children(process.pid)


async def test_sigterm_drains_every_worker_then_exits_0(app: Path, tmp_path: Path) -> None:
    started = tmp_path / "started"
    env = _env(app, KUBRPC_WORKERS="2")  # the environment's worker count, no flag
    async with serving(app, "--bind", "tcp://127.0.0.1:0", env=env) as (process, urls):
        assert len(children(process.pid)) == 2
        async with kubrpc.connect(urls[0]) as channel:
            stub = channel.stub(Workers, timeout=60)
            results: list[int] = []

            async def slow() -> None:
                results.append(await stub.slow(str(started), 1.0))

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(slow)
                worker = int(await wait_for_file(started))  # the call is running in that worker
                process.send_signal(signal.SIGTERM)
            assert results == [worker]  # answered during the drain
        with anyio.fail_after(60):
            assert await process.wait() == 0
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):  # nobody holds the port any more
        host, port = urls[0].removeprefix("tcp://").rsplit(":", 1)
        probe.connect((host, int(port)))


async def test_a_worker_that_fails_while_draining_makes_the_exit_status_1(app: Path, tmp_path: Path) -> None:
    started = tmp_path / "started"
    async with serving(app, "--workers", "2", "--bind", "tcp://127.0.0.1:0") as (process, urls):
        assert process.stderr is not None
        stderr = bytearray()
        async with kubrpc.connect(urls[0]) as channel:
            failed: list[BaseException] = []

            async def slow() -> None:
                try:
                    await channel.stub(Workers, timeout=60).slow(str(started), 30.0)
                except RpcError as exc:
                    failed.append(exc)

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(slow)
                worker = int(await wait_for_file(started))
                process.send_signal(signal.SIGTERM)
                await read_until(process.stderr, "received SIGTERM; stopping 2 workers", stderr)
                os.kill(worker, signal.SIGKILL)  # dies in the middle of its drain
            assert len(failed) == 1
        with anyio.fail_after(60):
            assert await process.wait() == 1
        stderr += await _rest(process.stderr)
        assert f"(pid {worker}) was killed by SIGKILL while draining" in stderr.decode()
        assert "restarting" not in stderr.decode()


async def test_a_killed_worker_is_restarted(app: Path) -> None:
    async with serving(app, "--workers", "2", "--bind", "tcp://127.0.0.1:0") as (process, urls):
        assert process.stderr is not None
        before = children(process.pid)
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        with anyio.fail_after(60):
            while len(after := children(process.pid)) != 2 or victim in after:
                await anyio.sleep(0.05)
        assert len(after - before) == 1  # one new worker, the other one untouched
        for _ in range(10):
            async with kubrpc.connect(urls[0]) as channel:
                assert await channel.stub(Workers, timeout=20).pid() in after
        process.send_signal(signal.SIGTERM)
        with anyio.fail_after(60):
            assert await process.wait() == 0
        stderr = (await _rest(process.stderr)).decode()
        assert re.search(rf"worker [01] \(pid {victim}\) was killed by SIGKILL; restarting it in \d", stderr), stderr


async def test_workers_whose_supervisor_was_killed_drain_and_exit(app: Path) -> None:
    async with serving(app, "--workers", "2", "--bind", "tcp://127.0.0.1:0") as (process, _):
        workers = children(process.pid)
        assert len(workers) == 2
        process.kill()  # SIGKILL: no chance to forward anything
        await process.wait()
        with anyio.fail_after(60):
            while any(alive(pid) for pid in workers):
                await anyio.sleep(0.05)


def alive(pid: int) -> bool:
    """Is `pid` running (not gone, not a zombie)?"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("nope:server", "kubrpc: a worker failed to start: cannot import 'nope': no module named 'nope'"),
        ("app:missing", "kubrpc: a worker failed to start: module 'app' has no attribute 'missing'"),
        ("broken:server", "kubrpc: a worker failed to start: RuntimeError: the database URL is not set"),
    ],
)
async def test_a_worker_that_cannot_start_fails_everything_fast(app: Path, target: str, message: str) -> None:
    command = [KUBRPC, "serve", target, "--workers", "2", "--bind", "tcp://127.0.0.1:0"]
    with anyio.fail_after(60):
        result = await anyio.run_process(command, cwd=app.parent, env=_env(app), check=False)
    stderr = result.stderr.decode()
    assert (result.returncode, result.stdout) == (1, b""), stderr
    assert message in stderr
    assert "restarting" not in stderr


async def test_an_address_in_use_fails_before_any_worker_starts(app: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [KUBRPC, "serve", "app:server", "--workers", "2", "--bind", f"http://127.0.0.1:{port}"]
        with anyio.fail_after(60):
            result = await anyio.run_process(command, cwd=app.parent, env=_env(app), check=False)
    assert result.returncode == 1
    assert f"kubrpc: cannot listen on http://127.0.0.1:{port}: " in result.stderr.decode()
    assert "in use" in result.stderr.decode()


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--workers", "0"], {}, "--workers: expected a number of worker processes >= 1, not '0'"),
        ([], {"KUBRPC_WORKERS": "many"}, "kubrpc: bad KUBRPC_WORKERS: expected a number of worker processes >= 1"),
    ],
)
async def test_a_bad_worker_count_is_a_usage_error(
    app: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    command = [KUBRPC, "serve", "app:server", "--bind", "tcp://127.0.0.1:0", *args]
    with anyio.fail_after(60):
        result = await anyio.run_process(command, cwd=app.parent, env=_env(app, **env), check=False)
    assert result.returncode == 2
    assert message in result.stderr.decode()


async def test_server_run_with_workers_from_main(app: Path) -> None:
    script = app.parent / "main.py"
    script.write_text(MAIN)
    command = [sys.executable, str(script), str(app)]
    async with await anyio.open_process(command, cwd=app.parent, env=_env(app)) as process:
        assert process.stderr is not None
        stderr = bytearray()
        try:
            await read_until(process.stderr, " with 2 workers", stderr)
            line = next(line for line in stderr.decode().splitlines() if "kubrpc.workers: serving on" in line)
            url = line.split()[4]
            workers = children(process.pid)
            assert len(workers) == 2
            async with kubrpc.connect(url) as channel:
                assert await channel.stub(Workers, timeout=20).pid() in workers
            process.send_signal(signal.SIGINT)  # Ctrl-C: drains too
            with anyio.fail_after(60):
                assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


def test_run_with_workers_refuses_what_it_cannot_share() -> None:
    server = kubrpc.Server()
    with pytest.raises(ValueError, match="workers serve tcp://HOST:PORT and http://HOST:PORT URLs only"):
        server.run("inproc://here", workers=2)
    with pytest.raises(ValueError, match="workers must be an integer >= 1"):
        server.run("tcp://127.0.0.1:0", workers=0)


async def test_serve_takes_an_already_bound_socket() -> None:
    server, _ = make_server()
    for scheme in ("tcp", "http"):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        async with server.serve(f"{scheme}://127.0.0.1:9", sock=sock) as listener:  # the URL's port is not used
            assert listener.url == f"{scheme}://127.0.0.1:{port}"
            async with kubrpc.connect(listener.url) as channel:
                assert await channel.stub(Arith, timeout=10).add(1, 2) == 3
        assert sock.fileno() == -1  # the listener took it over and closed it


async def _hold(channel: kubrpc.Channel, started: Path, release: Path, held: list[int]) -> None:
    held.append(await channel.stub(Workers, timeout=60).hold(str(started), str(release)))


async def _rest(stream: anyio.abc.ByteReceiveStream) -> bytes:
    """What is left to read on `stream`, up to its end."""
    data = bytearray()
    with anyio.fail_after(60):
        async for chunk in stream:
            data += chunk
    return bytes(data)
