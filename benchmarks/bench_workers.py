"""Multi-core serving: `kubrpc serve --workers N` for 1 and 2 workers over TCP, side by side in one run.

Run `python benchmarks/bench_workers.py` (about a minute) or `--quick` (a smoke test, ~15 s). For each worker
count it reports calls/s, its ratio to 1 worker's in the same round, and the server's and the clients' CPU time
per call; it prints a Markdown table and writes it to benchmarks/results/workers.md (a --quick run writes only
with --output).

Each measurement starts a fresh `kubrpc serve bench_workers:server --workers N` (this file is the service
module) and `--clients` fresh client processes (`python bench_workers.py drive URL ...`), which call
`add(1, 2)` from `--concurrency` tasks each, spread over `--connections` channels each: a TCP connection, and
every call on it, stays with the worker that accepted it, so one connection would load one worker only. Nothing
is pinned: the workers and the clients share the machine's CPUs, so on a machine with few cores the clients
compete with the workers, and the ratio says how much a second worker adds there, not what it adds on a
dedicated host. Rounds are interleaved (each round runs every worker count, in a rotated order), and a row
reports the round with the median calls/s. The server's CPU is the supervisor's and every worker's together.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from _peers import cpu_seconds, machine_busy_seconds, save

import kubrpc

HERE = Path(__file__).resolve().parent
RESULT = HERE / "results" / "workers.md"
KUBRPC = Path(sys.executable).parent / "kubrpc"
START_TIMEOUT = 60.0
CALL_TIMEOUT = 10.0


class Bench(Protocol):
    """The benchmarked service: add, and which worker process answers."""

    async def add(self, a: int, b: int) -> int: ...

    async def pid(self) -> int: ...


class BenchImpl:
    async def add(self, a: int, b: int) -> int:
        return a + b

    async def pid(self) -> int:
        return os.getpid()


server = kubrpc.Server()
"""What `kubrpc serve bench_workers:server` serves."""
server.register(Bench, BenchImpl())


@dataclass(frozen=True)
class Settings:
    rounds: int
    warmup: float
    duration: float
    workers: tuple[int, ...]
    clients: int
    concurrency: int
    connections: int


FULL = Settings(rounds=3, warmup=1.0, duration=3.0, workers=(1, 2), clients=2, concurrency=64, connections=4)
QUICK = Settings(rounds=2, warmup=0.3, duration=1.0, workers=(1, 2), clients=2, concurrency=32, connections=4)


@dataclass(frozen=True)
class Sample:
    """One worker count in one round."""

    workers: int
    calls_per_s: float
    server_cpu_per_call: float  # seconds
    client_cpu_per_call: float
    other_cpu: float  # CPUs busy with anything else meanwhile
    spread: str  # connections per worker


def children(pid: int) -> list[int]:
    """The child processes of `pid` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return sorted(found)


# --- the client process --------------------------------------------------------------------------------------------


async def drive(url: str, concurrency: int, connections: int, warmup: float, duration: float, pids: list[int]) -> None:
    """Call add(1, 2) from `concurrency` tasks over `connections` channels; print one JSON line of results.

    With `pids` (the server's processes), also measure their CPU and the machine's over the timed window.
    """
    clock = time.perf_counter
    start = clock() + warmup
    stop = start + duration
    calls = 0
    async with contextlib.AsyncExitStack() as stack:
        channels = [await stack.enter_async_context(kubrpc.connect(url)) for _ in range(connections)]
        stubs = [channel.stub(Bench, timeout=CALL_TIMEOUT) for channel in channels]
        answering = [await stub.pid() for stub in stubs]  # the worker behind each connection

        async def caller(stub: Bench) -> None:
            nonlocal calls
            while True:
                if await stub.add(1, 2) != 3:
                    raise AssertionError("add(1, 2) != 3")
                now = clock()
                if now >= stop:
                    return
                if now >= start:
                    calls += 1

        async def usage() -> tuple[float, float, float]:
            await asyncio.sleep(max(0.0, start - clock()))
            t0, me0, machine0 = clock(), cpu_seconds(None), machine_busy_seconds()
            server0 = sum(cpu_seconds(pid) for pid in pids)
            await asyncio.sleep(max(0.0, stop - clock()))
            server1 = sum(cpu_seconds(pid) for pid in pids)
            elapsed = clock() - t0
            me, machine = cpu_seconds(None) - me0, machine_busy_seconds() - machine0
            return me, server1 - server0, max(0.0, (machine - me - (server1 - server0)) / elapsed)

        async with asyncio.timeout(warmup + duration + 2 * CALL_TIMEOUT), asyncio.TaskGroup() as tg:
            measured = tg.create_task(usage())
            for n in range(concurrency):
                tg.create_task(caller(stubs[n % connections]))
        client_cpu, server_cpu, other = measured.result()
    print(
        json.dumps(
            {"calls": calls, "client_cpu": client_cpu, "server_cpu": server_cpu, "other_cpu": other, "pids": answering}
        ),
        flush=True,
    )


# --- the orchestrator ---------------------------------------------------------------------------------------------


async def run_one(workers: int, settings: Settings, cwd: str) -> Sample:
    """Serve with `workers` workers, drive it from the client processes, stop everything."""
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    command = [str(KUBRPC), "serve", "bench_workers:server", "--workers", str(workers), "--bind", "tcp://127.0.0.1:0"]
    serving = await asyncio.create_subprocess_exec(*command, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE)
    try:
        assert serving.stdout is not None
        line = (await asyncio.wait_for(serving.stdout.readline(), START_TIMEOUT)).decode()
        if not line.startswith("serving on "):
            raise RuntimeError(f"the server did not start: {line!r}")
        url = line.split()[2]
        pids = [serving.pid, *children(serving.pid)]
        drivers = []
        for n in range(settings.clients):
            args = [str(Path(__file__)), "drive", url, "--concurrency", str(settings.concurrency)]
            args += ["--connections", str(settings.connections), "--warmup", str(settings.warmup)]
            args += ["--duration", str(settings.duration)]
            if n == 0:  # one client measures the server's CPU
                args += ["--server-pids", ",".join(map(str, pids))]
            drivers.append(
                await asyncio.create_subprocess_exec(sys.executable, *args, cwd=cwd, stdout=asyncio.subprocess.PIPE)
            )
        outputs = await asyncio.wait_for(
            asyncio.gather(*(d.communicate() for d in drivers)), settings.warmup + settings.duration + START_TIMEOUT
        )
        if any(d.returncode != 0 for d in drivers):
            raise RuntimeError("a client process failed")
        results = [json.loads(out.decode().splitlines()[-1]) for out, _ in outputs]
    finally:
        if serving.returncode is None:
            serving.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(serving.wait(), 30)
        except TimeoutError:
            serving.kill()
            await serving.wait()
    calls = sum(r["calls"] for r in results)
    if not calls:
        raise RuntimeError("no call completed in the timed window")
    per_worker: dict[int, int] = {}
    for r in results:
        for pid in r["pids"]:
            per_worker[pid] = per_worker.get(pid, 0) + 1
    return Sample(
        workers=workers,
        calls_per_s=calls / settings.duration,
        server_cpu_per_call=results[0]["server_cpu"] / calls,
        client_cpu_per_call=sum(r["client_cpu"] for r in results) / calls,
        other_cpu=results[0]["other_cpu"],
        spread="/".join(str(n) for n in sorted(per_worker.values(), reverse=True)),
    )


async def run_rounds(settings: Settings) -> list[list[Sample]]:
    """Every round runs each worker count once, in a rotated order; returns the rounds."""
    rounds = []
    with tempfile.TemporaryDirectory() as cwd:
        for n in range(settings.rounds):
            order = settings.workers[n % len(settings.workers) :] + settings.workers[: n % len(settings.workers)]
            samples = {}
            for workers in order:
                s = samples[workers] = await run_one(workers, settings, cwd)
                print(
                    f"round {n + 1}: {workers} worker(s): {s.calls_per_s:,.0f} calls/s, server "
                    f"{s.server_cpu_per_call * 1e6:.0f} µs CPU/call, connections {s.spread}",
                    file=sys.stderr,
                    flush=True,
                )
            rounds.append([samples[w] for w in settings.workers])
    return rounds


def table(rounds: list[list[Sample]], settings: Settings) -> str:
    """One row per worker count: its median round, and its calls/s over 1 worker's in that same round."""
    rows = [
        "| workers | calls/s | × 1 worker (same round) | server CPU / call | client CPU / call | other load | "
        "connections per worker |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, workers in enumerate(settings.workers):
        ordered = sorted(range(len(rounds)), key=lambda r: rounds[r][i].calls_per_s)
        r = ordered[len(ordered) // 2]
        s, base = rounds[r][i], rounds[r][0]
        rows.append(
            f"| {workers} | {s.calls_per_s:,.0f} | {s.calls_per_s / base.calls_per_s:.2f}× | "
            f"{s.server_cpu_per_call * 1e6:.0f} µs | {s.client_cpu_per_call * 1e6:.0f} µs | {s.other_cpu:.2f} | "
            f"{s.spread} |"
        )
    return "\n".join(rows)


def report(rounds: list[list[Sample]], settings: Settings, command: str) -> str:
    """The whole Markdown document."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return "\n".join(
        [
            "# Multi-core: `kubrpc serve --workers N` over TCP",
            "",
            f"{settings.clients} client processes × {settings.concurrency} tasks over {settings.connections} "
            "connections each, calling add(1, 2); × 1 worker = calls/s over 1 worker's in the same round; CPU per "
            "call = CPU time of the server (supervisor and workers) and of the clients over the calls made; other "
            "load = CPUs busy with anything else meanwhile. Produced by `benchmarks/bench_workers.py`.",
            "",
            table(rounds, settings),
            "",
            f"- command: `{command}`; {cpus} CPUs, nothing pinned; load average at the end "
            f"{os.getloadavg()[0]:.2f}; {settings.rounds} interleaved rounds, {settings.warmup:g} s warm-up then "
            f"{settings.duration:g} s timed; each row is the round with the median calls/s",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    """Run the rounds (or, as `drive`, one client process) and print the table."""
    if (argv if argv is not None else sys.argv[1:])[:1] == ["drive"]:
        drive_parser = argparse.ArgumentParser(prog="bench_workers.py drive")
        drive_parser.add_argument("url")
        drive_parser.add_argument("--concurrency", type=int, required=True)
        drive_parser.add_argument("--connections", type=int, required=True)
        drive_parser.add_argument("--warmup", type=float, required=True)
        drive_parser.add_argument("--duration", type=float, required=True)
        drive_parser.add_argument("--server-pids", default="")
        a = drive_parser.parse_args((argv if argv is not None else sys.argv[1:])[1:])
        pids = [int(p) for p in a.server_pids.split(",") if p]
        asyncio.run(drive(a.url, a.concurrency, a.connections, a.warmup, a.duration, pids))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short smoke run, ~15 s")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3, 2 with --quick)")
    parser.add_argument("--workers", help="comma-separated worker counts, the first is the baseline (default 1,2)")
    parser.add_argument("--clients", type=int, help="client processes (default 2)")
    parser.add_argument("--output", type=Path, help=f"results file (default {RESULT.relative_to(HERE.parent)})")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL
    settings = Settings(
        rounds=args.rounds or base.rounds,
        warmup=base.warmup,
        duration=base.duration,
        workers=tuple(int(w) for w in args.workers.split(",")) if args.workers else base.workers,
        clients=args.clients or base.clients,
        concurrency=base.concurrency,
        connections=base.connections,
    )
    command = " ".join(["python benchmarks/bench_workers.py", *sys.argv[1:]]) if argv is None else "main()"
    started = time.monotonic()
    rounds = asyncio.run(run_rounds(settings))
    document = report(rounds, settings, command)
    print(document)
    print(f"({time.monotonic() - started:.0f} s)", file=sys.stderr)
    save(document, args.output, args.quick, RESULT)
    if math.isnan(sum(s.calls_per_s for r in rounds for s in r)):
        sys.exit(1)


if __name__ == "__main__":
    main()
