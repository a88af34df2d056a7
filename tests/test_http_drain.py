"""HTTP drain is exactly-once for non-idempotent calls: a request that reaches a draining server on a kept-alive
connection is answered 503 "not started" (the client retries it elsewhere), not lost in a close race."""

from __future__ import annotations

import itertools
from collections import Counter
from functools import partial
from typing import Protocol

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
from services import Instance

import kubrpc
from kubrpc import Endpoint

pytestmark = pytest.mark.anyio


class Ledger(Protocol):
    async def record(self, call_id: int) -> int: ...


class LedgerImpl:
    """Counts the executions of each call id across every server of the test."""

    def __init__(self, runs: Counter[int]) -> None:
        self.runs = runs

    async def record(self, call_id: int) -> int:
        self.runs[call_id] += 1
        return call_id


def ledger_server(runs: Counter[int], drain_timeout: float) -> kubrpc.Server:
    server = kubrpc.Server(drain_timeout=drain_timeout, header_timeout=1.0)
    server.register(Ledger, LedgerImpl(runs))
    return server


@pytest.mark.parametrize("drain_timeout", [5.0, 0.5])
async def test_rolling_http_drains_run_each_non_idempotent_call_exactly_once(drain_timeout: float) -> None:
    runs: Counter[int] = Counter()
    instances = [Instance(partial(ledger_server, runs, drain_timeout), "http", down=0.05) for _ in range(3)]
    ids = itertools.count()
    answered: list[int] = []
    failed: list[tuple[int, BaseException]] = []
    async with anyio.create_task_group() as servers:
        for instance in instances:
            await servers.start(instance.run)
        endpoints = [Endpoint("127.0.0.1", i.port) for i in instances]
        async with kubrpc.connect(endpoints, transport="http", max_attempts=6) as channel:
            ledger = channel.stub(Ledger, timeout=10)
            done = anyio.Event()

            async def caller() -> None:
                while not done.is_set():
                    call_id = next(ids)
                    try:
                        assert await ledger.record(call_id) == call_id
                        answered.append(call_id)
                    except Exception as exc:
                        failed.append((call_id, exc))
                    await anyio.lowlevel.checkpoint()

            async with anyio.create_task_group() as load:
                for _ in range(4):
                    load.start_soon(caller)
                for round_ in range(12):  # a rolling restart, four times over
                    await anyio.sleep(0.05)
                    await instances[round_ % 3].restarted()
                await anyio.sleep(0.05)
                done.set()
        restarted = [i.restarts for i in instances]
        for instance in instances:
            instance.stop()
    assert restarted == [4, 4, 4]
    assert len(answered) > 50
    assert all(runs[call_id] == 1 for call_id in answered)  # every answered call ran exactly once
    assert all(runs[call_id] == 0 for call_id, _ in failed)  # a failed call did not run
    assert failed == []  # and no call failed: refused ones went elsewhere


async def test_a_request_on_an_idle_connection_of_a_draining_server_is_refused_not_started() -> None:
    """The wire: a kept-alive connection that sends a request after the drain began gets 503 + not-started +
    connection: close, and the handler does not run."""
    runs: Counter[int] = Counter()
    server = kubrpc.Server(drain_timeout=5)
    server.register(Ledger, LedgerImpl(runs))
    body = b'{"call_id": 7}'
    request = (
        b"POST /Ledger/record HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
    )
    request %= (len(body), body)
    urls: list[str] = []
    stop = anyio.Event()

    async def serve(*, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with server.serve("http://127.0.0.1:0") as listener:
            urls.append(listener.url)
            task_status.started()
            await stop.wait()
        # drained

    async with anyio.create_task_group() as tg:
        await tg.start(serve)
        host, port = urls[0].removeprefix("http://").rsplit(":", 1)
        async with await anyio.connect_tcp(host, int(port)) as stream:
            try:
                await stream.send(request)
                first = await _response(stream)
                stop.set()  # the drain begins
                await anyio.sleep(0.3)  # uvicorn's shutdown starts on its next 0.1 s tick
                try:
                    await stream.send(request)
                    second = await _response(stream)
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:  # the old close race
                    second = repr(exc).encode()
            finally:
                stop.set()
    assert first.startswith(b"HTTP/1.1 200")
    head = second.lower()
    assert head.startswith(b"http/1.1 503"), second
    assert b"kubrpc-not-started: 1" in head
    assert b"connection: close" in head
    assert runs[7] == 1  # the refused request did not run


async def _response(stream: anyio.abc.ByteStream) -> bytes:
    data = b""
    with anyio.fail_after(10):
        while b"\r\n\r\n" not in data:
            data += await stream.receive()
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(
            next(line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length")).split(b":")[1]
        )
        while len(rest) < length:
            rest += await stream.receive()
    return head + b"\r\n\r\n" + rest
