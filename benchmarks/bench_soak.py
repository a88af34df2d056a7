"""Soak: 1 million calls through one channel over 3 TCP servers, one of which drains and restarts every second.

Run `python benchmarks/bench_soak.py` (1,000,000 calls, 1-2 minutes) or `--quick` (50,000 calls, a smoke test).
It reports calls/s, failed calls by status code (target 0), the number of flaps, the RSS of the client and of
the server process after warm-up and at the end (target: growth under 10%), and p50/p99 latency; it prints a
Markdown table and writes it to benchmarks/results/soak.md (a --quick run writes only with --output).

Three processes: this one only orchestrates. A server process pinned to CPU 0 serves three kubrpc TCP servers on
fixed ports; a client process pinned to CPU 1 calls `add(a, b)` (an idempotent method) from 64 tasks over one
channel (`round_robin` over the three endpoints, timeout 10 s per call). After 5,000 warm-up calls the client
takes its RSS readings and the server starts flapping: every second it drains and stops one server in turn
(GOAWAY, running calls finish), keeps it down 0.2 s, then serves again on the same port. This is a soak, not a
speed comparison: no peer framework runs beside kubrpc (for that, see bench_unary.py).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import importlib.metadata
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from array import array
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import kubrpc

SCRIPT = Path(__file__).resolve()
HERE = SCRIPT.parent
RESULT = HERE / "results" / "soak.md"
HOST = "127.0.0.1"
SERVER_CPU = 0
CLIENT_CPU = 1
SERVERS = 3
CONCURRENCY = 64
CALL_TIMEOUT = 10.0
WARMUP_CALLS = 5_000
FULL_CALLS = 1_000_000
QUICK_CALLS = 50_000
FLAP_PERIOD = 1.0  # seconds from one flap's start to the next
DOWN_TIME = 0.2  # seconds a stopped server stays down before it serves again
DRAIN_TIMEOUT = 5.0
START_TIMEOUT = 30.0
MAX_SECONDS = 300.0  # the timed phase stops here even if not every call was made
RSS_TARGET = 0.10
ERROR_LOG = 50  # failed calls recorded in detail (all are counted)


class Arith(Protocol):
    """The soaked service: retries on UNAVAILABLE are allowed."""

    @kubrpc.method(idempotent=True)
    async def add(self, a: int, b: int) -> int: ...


class ArithImpl:
    """a + b."""

    async def add(self, a: int, b: int) -> int:
        """a + b."""
        return a + b


# --- shared helpers ----------------------------------------------------------------------------------------------


def rss_kib(pid: int | str = "self") -> int:
    """VmRSS of process `pid` in KiB, from /proc/PID/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def pin(cpu: int) -> None:
    """Pin this process to `cpu`, if it exists and there is more than one."""
    if not hasattr(os, "sched_setaffinity"):
        return
    allowed = os.sched_getaffinity(0)
    if cpu in allowed and len(allowed) > 1:
        os.sched_setaffinity(0, {cpu})


async def stdin_reader() -> asyncio.StreamReader:
    """This process's stdin as an asyncio stream."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def emit(message: dict[str, Any]) -> None:
    """One JSON line to the orchestrator."""
    print(json.dumps(message), flush=True)


# --- server process ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flap:
    """One stop-and-restart of one server (time.monotonic() readings, comparable across processes on Linux)."""

    server: int
    port: int
    stop: float  # drain started
    closed: float  # drained and closed
    up: float  # serving again
    in_flight: int  # calls running on it when the drain started


class Instance:
    """One kubrpc TCP server that restart() stops (drain, close), keeps down for DOWN_TIME, and serves again."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.port = 0  # bind any port first, then keep it
        self.up = asyncio.Event()
        self._down = asyncio.Event()
        self._closed = asyncio.Event()
        self._stopping = False
        self._active = 0

    async def run(self) -> None:
        """Serve, and serve again after each restart(), until stop()."""
        impl: Arith = ArithImpl()
        while True:
            server = kubrpc.Server(drain_timeout=DRAIN_TIMEOUT)
            server.register(Arith, impl)
            async with server.serve(f"tcp://{HOST}:{self.port}") as listener:
                self.port = int(listener.url.rsplit(":", 1)[1])
                self.up.set()
                await self._down.wait()
                self._active = int(getattr(listener, "active_calls", -1))
            # Drained and closed: down for a moment, as a restarting pod would be.
            self._down.clear()
            self._closed.set()
            if self._stopping:
                return
            await asyncio.sleep(DOWN_TIME)

    async def restart(self) -> Flap:
        """Stop this server (it drains), and return once it serves again."""
        self.up.clear()
        self._closed.clear()
        stop = time.monotonic()
        self._down.set()
        await self._closed.wait()
        closed = time.monotonic()
        await self.up.wait()
        return Flap(self.index, self.port, stop, closed, time.monotonic(), self._active)

    def stop(self) -> None:
        """Drain and stop for good."""
        self._stopping = True
        self._down.set()


async def flap_forever(instances: list[Instance], flaps: list[Flap]) -> None:
    """Every FLAP_PERIOD seconds, restart the next server, round-robin."""
    start = time.monotonic()
    k = 0
    while True:
        k += 1
        tick = start + k * FLAP_PERIOD
        now = time.monotonic()
        if tick < now:  # a restart overran the period: skip the ticks missed, do not burst
            k += math.ceil((now - tick) / FLAP_PERIOD)
            tick = start + k * FLAP_PERIOD
        await asyncio.sleep(tick - now)
        flaps.append(await instances[len(flaps) % len(instances)].restart())


async def run_server() -> None:
    """Serve SERVERS servers and print their ports; on a "flap" line, flap; at EOF, stop and print the flaps."""
    instances = [Instance(i) for i in range(SERVERS)]
    flaps: list[Flap] = []
    async with asyncio.TaskGroup() as tg:
        for instance in instances:
            tg.create_task(instance.run())
            await instance.up.wait()
        emit({"ports": [i.port for i in instances], "pid": os.getpid()})
        stdin = await stdin_reader()
        flapper = None
        while line := await stdin.readline():
            if line.strip() == b"flap" and flapper is None:
                flapper = tg.create_task(flap_forever(instances, flaps))
        if flapper is not None:
            flapper.cancel()
        for instance in instances:
            instance.stop()
    emit({"flaps": [asdict(f) for f in flaps]})


# --- client process ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    """One failed call."""

    at: float  # time.monotonic() when it failed
    seconds: float  # how long the call took
    code: str
    message: str


def percentile(ordered: list[float], q: float) -> float:
    """The nearest-rank q-quantile (0 < q <= 1) of an ascending, non-empty list."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def run_client(ports: list[int], calls: int, server_pid: int, max_seconds: float) -> None:
    """Warm up, report RSS, make `calls` calls from CONCURRENCY tasks, report everything as one JSON line."""
    latencies = array("d", bytes(8 * calls))  # allocated before the first RSS reading
    errors: Counter[str] = Counter()
    failures: list[Failure] = []
    rss_series: list[tuple[float, int, int]] = []
    clock = time.perf_counter
    endpoints = [kubrpc.Endpoint(HOST, port) for port in ports]

    async with kubrpc.connect(endpoints, transport="tcp", balancer="round_robin") as channel:
        arith = channel.stub(Arith, timeout=CALL_TIMEOUT)

        async def run(n: int, record: bool, deadline: float) -> int:
            """n calls from CONCURRENCY tasks (or fewer, if the deadline passes first); returns the calls made."""
            issued = 0

            async def worker() -> None:
                nonlocal issued
                while issued < n and clock() < deadline:
                    k = issued
                    issued += 1
                    t0 = clock()
                    try:
                        if await arith.add(k, 1) != k + 1:
                            errors["WRONG_RESULT"] += 1
                    except kubrpc.RpcError as exc:
                        errors[exc.code.name] += 1
                        if len(failures) < ERROR_LOG:
                            failures.append(Failure(time.monotonic(), clock() - t0, exc.code.name, exc.message))
                    except Exception as exc:
                        errors[type(exc).__name__] += 1
                        if len(failures) < ERROR_LOG:
                            failures.append(Failure(time.monotonic(), clock() - t0, type(exc).__name__, str(exc)))
                    if record:
                        latencies[k] = clock() - t0

            async with asyncio.TaskGroup() as tg:
                for _ in range(CONCURRENCY):
                    tg.create_task(worker())
            return issued

        await run(WARMUP_CALLS, False, clock() + START_TIMEOUT)
        warmup_errors = sum(errors.values())
        errors.clear()
        failures.clear()
        gc.collect()
        rss_start = (rss_kib(), rss_kib(server_pid))
        emit({"warm": True})  # the orchestrator now tells the server to start flapping

        started_at = time.monotonic()
        start = clock()

        async def sample_rss() -> None:
            while True:
                await asyncio.sleep(5.0)
                rss_series.append((clock() - start, rss_kib(), rss_kib(server_pid)))

        sampler = asyncio.create_task(sample_rss())
        made = await run(calls, True, start + max_seconds)
        wall = clock() - start
        sampler.cancel()
        gc.collect()
        rss_end = (rss_kib(), rss_kib(server_pid))
        budget = channel.retry_budget
        retries, refused = budget.retries, budget.refused
        connections = len(channel.connections)

    ordered = sorted(latencies[:made])
    emit(
        {
            "calls": made,
            "wall": wall,
            "started_at": started_at,
            "errors": dict(errors),
            "warmup_errors": warmup_errors,
            "failures": [asdict(f) for f in failures],
            "p50_ms": percentile(ordered, 0.50) * 1e3 if ordered else math.nan,
            "p99_ms": percentile(ordered, 0.99) * 1e3 if ordered else math.nan,
            "max_ms": ordered[-1] * 1e3 if ordered else math.nan,
            "client_rss": [rss_start[0], rss_end[0]],
            "server_rss": [rss_start[1], rss_end[1]],
            "rss_series": rss_series,
            "retries": retries,
            "retries_refused": refused,
            "connections": connections,
        }
    )


# --- orchestrator ------------------------------------------------------------------------------------------------


class SoakFailed(Exception):
    """A process failed or overran its time."""


async def _read_json(stream: asyncio.StreamReader, timeout: float, what: str) -> dict[str, Any]:
    try:
        line = await asyncio.wait_for(stream.readline(), timeout)
    except TimeoutError:
        raise SoakFailed(f"no {what} within {timeout:.0f} s") from None
    if not line:
        raise SoakFailed(f"the process exited before it sent {what}")
    result: dict[str, Any] = json.loads(line)
    return result


async def _finish(process: asyncio.subprocess.Process, timeout: float) -> None:
    try:
        await asyncio.wait_for(process.wait(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()


async def orchestrate(calls: int, max_seconds: float, log: IO[bytes]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run the server and client processes (their stderr to `log`); return the client's result and the flaps."""
    me = str(SCRIPT)
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        me,
        "--role",
        "server",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=log,
    )
    client: asyncio.subprocess.Process | None = None
    try:
        assert server.stdin is not None and server.stdout is not None
        ports = (await _read_json(server.stdout, START_TIMEOUT, "the server's ports"))["ports"]
        client = await asyncio.create_subprocess_exec(
            sys.executable,
            me,
            "--role",
            "client",
            "--ports",
            ",".join(map(str, ports)),
            "--calls",
            str(calls),
            "--server-pid",
            str(server.pid),
            "--max-seconds",
            str(max_seconds),
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )
        assert client.stdout is not None
        await _read_json(client.stdout, START_TIMEOUT + 30, "the end of the warm-up")
        print(f"warmed up; {calls:,} calls with a server flapping every {FLAP_PERIOD:g} s", file=sys.stderr)
        server.stdin.write(b"flap\n")
        await server.stdin.drain()
        result = await _read_json(client.stdout, max_seconds + 2 * CALL_TIMEOUT + 30, "the client's result")
        await _finish(client, 30)
        if client.returncode != 0:
            raise SoakFailed(f"the client exited with {client.returncode}")
        server.stdin.close()
        flaps: list[dict[str, Any]] = (await _read_json(server.stdout, 30, "the server's flaps"))["flaps"]
        await _finish(server, 30)
        return result, flaps
    finally:
        for process in (client, server):
            if process is not None and process.returncode is None:
                process.kill()
                await process.wait()


# --- report ------------------------------------------------------------------------------------------------------


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def _growth(pair: list[int]) -> float:
    return (pair[1] - pair[0]) / pair[0]


def table(result: dict[str, Any], flaps: list[dict[str, Any]], target_calls: int) -> str:
    """The Markdown table of the run."""
    errors: dict[str, int] = result["errors"]
    failed = sum(errors.values())
    by_code = ", ".join(f"{code} {n:,}" for code, n in sorted(errors.items(), key=lambda kv: -kv[1])) or "none"
    client_growth, server_growth = _growth(result["client_rss"]), _growth(result["server_rss"])
    complete = result["calls"] == target_calls

    def ok(good: bool) -> str:
        return "✅" if good else "❌"

    rows = [
        ("calls", f"{result['calls']:,}" + ("" if complete else f" of {target_calls:,} (time limit)"), ok(complete)),
        ("wall time", f"{result['wall']:.1f} s", ""),
        ("calls/s", f"{result['calls'] / result['wall']:,.0f}", ""),
        ("failed calls", f"{failed:,} ({by_code})", f"0 {ok(failed == 0)}"),
        ("flaps (drain, 0.2 s down, serve again)", f"{len(flaps)}", ""),
        (
            "retries charged to the retry budget / refused by it",
            f"{result['retries']:,} / {result['retries_refused']:,}",
            "",
        ),
        ("client RSS start → end", f"{_mib(result['client_rss'][0])} → {_mib(result['client_rss'][1])}", ""),
        ("client RSS growth", f"{client_growth:+.1%}", f"< 10% {ok(client_growth < RSS_TARGET)}"),
        ("server process RSS start → end", f"{_mib(result['server_rss'][0])} → {_mib(result['server_rss'][1])}", ""),
        ("server process RSS growth", f"{server_growth:+.1%}", f"< 10% {ok(server_growth < RSS_TARGET)}"),
        ("latency p50 / p99 / max", f"{result['p50_ms']:.2f} / {result['p99_ms']:.2f} / {result['max_ms']:.1f} ms", ""),
    ]
    return "\n".join(["| metric | value | target |", "|---|---:|---|", *(f"| {a} | {b} | {c} |" for a, b, c in rows)])


def details(result: dict[str, Any], flaps: list[dict[str, Any]], log_lines: list[str]) -> str:
    """Flap timings, failed calls next to the flaps, RSS over time, the processes' warnings."""
    t0 = result["started_at"]
    lines: list[str] = []
    if flaps:
        drains = sorted(f["closed"] - f["stop"] for f in flaps)
        downs = sorted(f["up"] - f["stop"] for f in flaps)
        in_flight = sorted(f["in_flight"] for f in flaps)
        lines.append(
            f"- flaps: drain (GOAWAY until closed) median {drains[len(drains) // 2] * 1e3:.0f} ms, "
            f"max {drains[-1] * 1e3:.0f} ms; stop to serving again median {downs[len(downs) // 2] * 1e3:.0f} ms, "
            f"max {downs[-1] * 1e3:.0f} ms; calls running on the server when its drain began: median "
            f"{in_flight[len(in_flight) // 2]}, max {in_flight[-1]}"
        )
    if result["failures"]:
        lines.append(f"- the first {len(result['failures'])} failed calls (time since the start of the timed phase):")
        for f in result["failures"]:
            near = min(flaps, key=lambda fl: abs(f["at"] - fl["stop"]), default=None)
            where = (
                f"; nearest flap: server {near['server']} (port {near['port']}) stopped at "
                f"{near['stop'] - t0:.3f} s, closed {near['closed'] - t0:.3f} s, up {near['up'] - t0:.3f} s"
                if near
                else ""
            )
            lines.append(
                f"  - {f['at'] - t0:.3f} s: {f['code']} {f['message']!r} after {f['seconds'] * 1e3:.1f} ms{where}"
            )
    if result["warmup_errors"]:
        lines.append(f"- failed calls during the warm-up (no flapping yet): {result['warmup_errors']}")
    if result["rss_series"]:
        series = ", ".join(f"{t:.0f} s {_mib(c)} / {_mib(s)}" for t, c, s in result["rss_series"])
        lines.append(f"- RSS every 5 s, client / server process (no gc.collect() before these): {series}")
    lines.append(f"- open connections at the end: {result['connections']}")
    warnings = [line for line in log_lines if line.strip()]
    if warnings:
        lines.append(f"- server and client stderr: {len(warnings)} lines, the first ones:")
        lines.extend(f"  - `{line[:200]}`" for line in warnings[:10])
    else:
        lines.append("- server and client stderr: empty (kubrpc logs at WARNING and above)")
    return "\n".join(lines)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def environment(calls: int, command: str, load: tuple[float, float, float]) -> str:
    """The conditions of the run."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return "\n".join(
        [
            f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; command: `{command}`",
            f"- Python {platform.python_version()} ({platform.python_implementation()}) on {platform.machine()}, "
            f"stdlib asyncio event loop; {cpus} CPUs; load average at start {load[0]:.2f}",
            f"- {SERVERS} kubrpc TCP servers in one server process pinned to CPU {SERVER_CPU}; the client process "
            f"pinned to CPU {CLIENT_CPU}: one channel (`round_robin`, default max_attempts and retry budget), "
            f"{CONCURRENCY} tasks calling `add(k, 1)` (`@kubrpc.method(idempotent=True)`, timeout {CALL_TIMEOUT:g} s) "
            f"and checking the result; {WARMUP_CALLS:,} warm-up calls before the RSS start readings (after "
            f"gc.collect() in the client), then {calls:,} timed calls while one server flaps every {FLAP_PERIOD:g} s "
            f"(drain timeout {DRAIN_TIMEOUT:g} s, down {DOWN_TIME:g} s, same port)",
            "- latency percentiles over every timed call (failed ones included), nearest rank",
            "- no peer framework in this run: this is a soak (errors and memory under restarts), not a speed "
            "comparison; for calls/s beside grpcio.aio see unary.md",
            f"- kubrpc {_version('kubrpc')}, anyio {_version('anyio')}, orjson {_version('orjson')}",
        ]
    )


def report(result: dict[str, Any], flaps: list[dict[str, Any]], calls: int, env: str, log_lines: list[str]) -> str:
    """The whole Markdown document."""
    return "\n".join(
        [
            f"# Soak: {calls:,} calls over {SERVERS} TCP servers, one restarting every {FLAP_PERIOD:g} s",
            "",
            "Produced by `benchmarks/bench_soak.py` (method: its docstring and benchmarks/README.md). Targets: no "
            "failed call (the method is idempotent, so UNAVAILABLE is retried; calls turned away by a draining "
            "server are retried anyway), RSS growth under 10% from after the warm-up to the end.",
            "",
            table(result, flaps, calls),
            "",
            details(result, flaps, log_lines),
            "",
            env,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    """The orchestrator, or (with --role) one of its processes."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, help=f"timed calls (default {FULL_CALLS:,}; {QUICK_CALLS:,} with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke run; prints only, unless --output")
    parser.add_argument("--max-seconds", type=float, default=MAX_SECONDS, help="bound on the timed phase")
    parser.add_argument("--output", type=Path, help=f"results file (default {RESULT.relative_to(HERE.parent)})")
    parser.add_argument("--role", choices=("server", "client"), help=argparse.SUPPRESS)
    parser.add_argument("--ports", help=argparse.SUPPRESS)
    parser.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    calls = args.calls or (QUICK_CALLS if args.quick else FULL_CALLS)
    if calls < 1:
        parser.error("--calls must be at least 1")

    if args.role is not None:
        logging.basicConfig(level=logging.WARNING, format=f"{args.role} %(levelname)s %(name)s: %(message)s")
        if args.role == "server":
            pin(SERVER_CPU)
            asyncio.run(run_server())
        else:
            pin(CLIENT_CPU)
            ports = [int(p) for p in args.ports.split(",")]
            asyncio.run(run_client(ports, calls, args.server_pid, args.max_seconds))
        return

    command = " ".join(["python benchmarks/bench_soak.py", *sys.argv[1:]]) if argv is None else "main()"
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "stderr.log"
        try:
            with open(log_path, "wb") as log:
                result, flaps = asyncio.run(orchestrate(calls, args.max_seconds, log))
        except SoakFailed as exc:
            sys.stderr.write(log_path.read_text(errors="replace")[-4000:])
            sys.exit(f"soak failed: {exc}")
        log_lines = log_path.read_text(errors="replace").splitlines()
    document = report(result, flaps, calls, environment(calls, command, load), log_lines)
    print(document)
    output = args.output if args.output is not None else (None if args.quick else RESULT)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(document)
        print(f"written to {output}", file=sys.stderr)
    if result["errors"] or result["calls"] != calls:
        sys.exit(1)


if __name__ == "__main__":
    main()
