"""The kubrpc command, run as a user runs it."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import anyio
import pytest

import kubrpc

pytestmark = pytest.mark.anyio


@kubrpc.interface(name="arith.Arith")
class Arith(Protocol):
    """The wire contract of examples/arith/service.py, as a client outside the repository declares it."""

    async def add(self, a: int, b: int) -> int: ...


#: The installed console script, as a user runs it (`python -m kubrpc` from the repository root would import the
#: source folder kubrpc/, which lacks the plugin folders that an install maps into it).
KUBRPC = [str(Path(sys.executable).parent / "kubrpc")]


async def test_demo_balances_by_weight() -> None:
    result = await anyio.run_process([*KUBRPC, "demo", "--calls", "800"], check=False)
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    rr = out[out.index("round_robin:") : out.index("weighted_random:")]
    assert [line.split()[2] for line in rr.splitlines()[2:5]] in (
        ["267", "267", "266"],
        ["267", "266", "267"],
        ["266", "267", "267"],
    )
    sw = out[out.index("smooth_weighted:") :]
    assert [line.split()[2] for line in sw.splitlines()[2:5]] == ["100", "200", "500"]


async def test_call_prints_json_and_fails_with_the_status(start_server: Callable[..., object]) -> None:
    for scheme in ("tcp", "http"):
        url, _, _ = await start_server(scheme)  # type: ignore[operator]
        ok = await anyio.run_process([*KUBRPC, "call", url, "Arith.add", '{"a": 2, "b": 40}'], check=False)
        assert (ok.returncode, ok.stdout.decode().strip()) == (0, "42")
        bad = await anyio.run_process([*KUBRPC, "call", url, "Arith.add", '{"a": "2"}'], check=False)
        assert bad.returncode == 1
        assert b'"code":"invalid_argument"' in bad.stderr


def test_resolve_prints_a_static_target() -> None:
    out = subprocess.run(
        [*KUBRPC, "resolve", "static://127.0.0.1:9000;weight=2,127.0.0.2:9000", "--count", "1"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert "2 endpoints, 2 ready" in out and "Endpoint('127.0.0.1', 9000, weight=2)" in out


async def test_serve_until_sigterm_then_exit_cleanly() -> None:
    args = [
        *KUBRPC,
        "serve",
        "examples.arith.service:server",
        "--bind",
        "tcp://127.0.0.1:0",
        "--bind",
        "http://127.0.0.1:0",
    ]
    root = str(Path(__file__).parent.parent)
    async with await anyio.open_process(args, cwd=root) as process:
        assert process.stdout is not None
        with anyio.fail_after(30):
            line = (await process.stdout.receive()).decode()
        assert line.startswith("serving on tcp://127.0.0.1:")
        tcp_url, http_url = line.split()[2:4]
        for url in (tcp_url, http_url):
            async with kubrpc.connect(url) as channel:
                assert await channel.stub(Arith, timeout=5).add(1, 2) == 3
        process.send_signal(signal.SIGTERM)
        with anyio.fail_after(30):
            assert await process.wait() == 0


async def test_sigterm_drains_running_calls_before_exiting() -> None:
    from services import Control

    args = [*KUBRPC, "serve", "services:server", "--bind", "tcp://127.0.0.1:0"]
    async with await anyio.open_process(args, cwd=str(Path(__file__).parent)) as process:
        assert process.stdout is not None
        with anyio.fail_after(30):
            url = (await process.stdout.receive()).decode().split()[2]
        async with kubrpc.connect(url) as channel:
            control = channel.stub(Control, timeout=20)
            results: list[str] = []

            async def slow() -> None:
                results.append(await control.sleep(1.0))

            async with anyio.create_task_group() as tg:
                tg.start_soon(slow)
                await anyio.sleep(0.3)  # the call is running on the server
                process.send_signal(signal.SIGTERM)
            assert results == ["slept"]  # answered during the drain
        with anyio.fail_after(30):
            assert await process.wait() == 0


async def test_shutdown_delay_keeps_serving_with_readyz_503() -> None:
    import httpx

    args = [*KUBRPC, "serve", "services:delayed_server", "--bind", "http://127.0.0.1:0"]
    async with await anyio.open_process(args, cwd=str(Path(__file__).parent)) as process:
        assert process.stdout is not None
        with anyio.fail_after(30):
            url = (await process.stdout.receive()).decode().split()[2]
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            assert (await client.get("/readyz")).status_code == 200
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(5):
                while (await client.get("/readyz")).status_code != 503:
                    await anyio.sleep(0.02)
            response = await client.post("/Arith/add", json={"a": 1, "b": 2})  # still serving calls
            assert (response.status_code, response.json()) == (200, 3)
        with anyio.fail_after(30):
            assert await process.wait() == 0
