"""Server lifecycle under load: drain, go-away and restarts lose no calls."""

from __future__ import annotations

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
from services import Arith, Control, Instance, make_server

import kubrpc
from kubrpc import Endpoint

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("scheme", ["tcp", "http"])
async def test_rolling_restart_under_load_fails_no_call(scheme: str) -> None:
    instances = [Instance(lambda name=name: make_server(name, drain_timeout=5)[0], scheme) for name in ("a", "b", "c")]
    ok = 0
    failures: list[BaseException] = []
    async with anyio.create_task_group() as servers:
        for instance in instances:
            await servers.start(instance.run)
        endpoints = [Endpoint("127.0.0.1", i.port) for i in instances]
        async with kubrpc.connect(endpoints, transport=scheme, max_attempts=4) as channel:
            # Plain (non-idempotent) calls survive on both transports: TCP sends GOAWAY, and a draining HTTP
            # server answers a request on a kept-alive connection 503 + kubrpc-not-started (both: retried elsewhere).
            arith = channel.stub(Arith, timeout=10)
            done = anyio.Event()

            async def worker() -> None:
                nonlocal ok
                while not done.is_set():
                    try:
                        n = ok
                        assert await arith.add(n, 1) == n + 1
                        ok += 1
                    except Exception as exc:
                        failures.append(exc)
                    await anyio.lowlevel.checkpoint()

            async with anyio.create_task_group() as load:
                for _ in range(16):
                    load.start_soon(worker)
                for instance in instances:
                    await anyio.sleep(0.3)
                    await instance.restarted()
                await anyio.sleep(0.5)
                done.set()
        restarted = [i.restarts for i in instances]
        for instance in instances:
            instance.stop()
    assert failures == []
    assert ok > 100
    assert restarted == [1, 1, 1]


async def test_draining_server_finishes_running_calls_and_turns_away_new_ones() -> None:
    server, control = make_server(drain_timeout=5)
    results: list[str] = []
    cm = server.serve("tcp://127.0.0.1:0")
    listener = await cm.__aenter__()
    async with kubrpc.connect(listener.url) as channel:
        stub = channel.stub(Control, timeout=10)

        async def slow() -> None:
            results.append(await stub.sleep(0.5))

        async with anyio.create_task_group() as tg:
            tg.start_soon(slow)
            with anyio.fail_after(5):
                while control.started < 1:
                    await anyio.sleep(0.01)
            with anyio.fail_after(5):
                await cm.__aexit__(None, None, None)  # drains: returns once the running call is answered
        assert results == ["slept"]
        with pytest.raises(kubrpc.RpcError) as info:
            await channel.stub(Arith, timeout=2).add(1, 1)
        assert info.value.code is kubrpc.Status.UNAVAILABLE


async def test_calls_running_on_a_draining_server_are_answered_while_new_ones_go_elsewhere() -> None:
    instances = [Instance(lambda name=name: make_server(name, drain_timeout=5)[0]) for name in ("a", "b")]
    async with anyio.create_task_group() as servers:
        for instance in instances:
            await servers.start(instance.run)
        endpoints = [Endpoint("127.0.0.1", i.port) for i in instances]
        async with kubrpc.connect(endpoints, transport="tcp", balancer="round_robin") as channel:
            control, arith = channel.stub(Control, timeout=10), channel.stub(Arith, timeout=10)
            slow: list[str] = []

            async def sleep() -> None:
                slow.append(await control.sleep(0.5))

            async with anyio.create_task_group() as calls:
                for _ in range(4):  # two on each server
                    calls.start_soon(sleep)
                await anyio.sleep(0.1)
                instances[0].restart()  # GOAWAY: its two calls still run
                await anyio.sleep(0.05)
                # New calls find a's connection going away: they must not close it under the running calls.
                assert [await arith.add(i, 1) for i in range(6)] == [i + 1 for i in range(6)]
            assert slow == ["slept"] * 4
        for instance in instances:
            instance.stop()
