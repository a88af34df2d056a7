"""Unary add(a, b) in one process: kubrpc inproc beside kubrpc TCP over loopback, and a direct await, in one run.

Run `python benchmarks/bench_inproc.py` (about a minute; `--quick`: under 10 s). Server and client share one process
and one event loop, as a unit test or a monolith using `inproc://` does; the TCP rows are the same server and
client over a loopback socket in that same process, so the two transports are compared on equal terms. "direct
await" calls the implementation with no RPC at all: the floor. Each round runs every peer once (in a rotated
order) and a row reports the round with the median calls/s. It prints a Markdown table and writes it to
benchmarks/results/inproc.md (a --quick run writes only with --output).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import platform
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
from _peers import Arith, ArithImpl, Call, Settings, save

import kubrpc

RESULT = Path(__file__).resolve().parent / "results" / "inproc.md"
PEERS = ("direct await", "kubrpc inproc", "kubrpc TCP")
BASELINE = "kubrpc TCP"

FULL = Settings(rounds=3, warmup=0.3, duration=1.0, concurrencies=(1, 64))
QUICK = Settings(rounds=1, warmup=0.1, duration=0.3, concurrencies=(1, 64))


@dataclass(frozen=True)
class Sample:
    """One peer at one concurrency in one round."""

    peer: str
    loop: str
    concurrency: int
    calls_per_s: float
    p50_us: float
    p99_us: float


@asynccontextmanager
async def peer_call(peer: str) -> AsyncIterator[Call]:
    """A no-argument coroutine function that makes one add(1, 2) call through `peer`."""
    impl = ArithImpl()
    if peer == "direct await":

        async def direct() -> int:
            return await impl.add(1, 2)

        yield direct
        return
    server = kubrpc.Server()
    server.register(Arith, impl)
    url = "inproc://bench" if peer == "kubrpc inproc" else "tcp://127.0.0.1:0"
    async with server.serve(url) as listener, kubrpc.connect(listener.url) as channel:
        arith = channel.stub(Arith, timeout=10)

        async def call() -> int:
            return await arith.add(1, 2)

        yield call


async def drive(call: Call, concurrency: int, warmup: float, duration: float) -> tuple[int, float, list[float]]:
    """`concurrency` tasks call in a loop; (calls, seconds, latencies) of the calls that end in the timed window."""
    latencies: list[float] = []
    start = time.perf_counter() + warmup
    end = start + duration

    async def worker() -> None:
        # Each worker stops by the clock: a direct await never yields to the event loop, so no flag set by
        # another task could stop it.
        while True:
            t0 = time.perf_counter()
            if await call() != 3:
                raise AssertionError("add(1, 2) != 3")
            t1 = time.perf_counter()
            if t1 >= end:
                return
            if t1 >= start:
                latencies.append(t1 - t0)

    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    return len(latencies), duration, latencies


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of `values`, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(settings: Settings, loop: str) -> list[Sample]:
    """Every peer at every concurrency, `settings.rounds` times, in rotated order, on the running `loop`."""
    samples = []
    for round_ in range(settings.rounds):
        order = PEERS[round_ % len(PEERS) :] + PEERS[: round_ % len(PEERS)]
        for peer in order:
            async with peer_call(peer) as call:
                for concurrency in settings.concurrencies:
                    calls, seconds, latencies = await drive(call, concurrency, settings.warmup, settings.duration)
                    samples.append(
                        Sample(
                            peer,
                            loop,
                            concurrency,
                            calls / seconds,
                            percentile(latencies, 0.5) * 1e6,
                            percentile(latencies, 0.99) * 1e6,
                        )
                    )
                    rate = f"{calls / seconds:,.0f}"
                    print(f"  {loop} round {round_ + 1} {peer} c={concurrency}: {rate} calls/s", file=sys.stderr)
    return samples


def table(samples: list[Sample], settings: Settings, loops: list[str]) -> str:
    """The Markdown table: per loop, concurrency and peer, the round with the median calls/s."""
    rows = []
    for concurrency in settings.concurrencies:
        for loop in loops:
            chosen: dict[str, Sample] = {}
            for peer in PEERS:
                runs = sorted(
                    (s for s in samples if (s.peer, s.loop, s.concurrency) == (peer, loop, concurrency)),
                    key=lambda s: s.calls_per_s,
                )
                chosen[peer] = runs[len(runs) // 2]
            base = chosen[BASELINE].calls_per_s
            for peer in PEERS:
                s = chosen[peer]
                rows.append(
                    f"| {peer} | {loop} | {concurrency} | {s.calls_per_s:,.0f} | {s.calls_per_s / base:.2f} "
                    f"| {s.p50_us:,.1f} | {s.p99_us:,.1f} |"
                )
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    rounds = f"median of {settings.rounds} interleaved rounds" if settings.rounds > 1 else "one round"
    return "\n".join(
        [
            "# Unary add(a, b) in one process: inproc beside TCP",
            "",
            "| peer | loop | concurrency | calls/s | × kubrpc TCP | p50 µs | p99 µs |",
            "|---|---|---:|---:|---:|---:|---:|",
            *rows,
            "",
            f"{when}, Python {platform.python_version()} on {platform.machine()}; server and client in one process",
            f"and one event loop; {settings.warmup:g} s warm-up, {settings.duration:g} s timed, {rounds}.",
            "`python benchmarks/bench_inproc.py`.",
            "",
        ]
    )


def main() -> None:
    """Parse the command line, measure, print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--output", type=Path, help=f"where to write the table (default: {RESULT}, not with --quick)")
    parser.add_argument("--asyncio", action="store_true", help="only the stock asyncio loop, even with uvloop")
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    loops = ["asyncio"]
    if not args.asyncio and importlib.util.find_spec("uvloop") is not None:
        loops.append("uvloop")
    samples = []
    for loop in loops:
        samples += anyio.run(measure, settings, loop, backend_options={"use_uvloop": loop == "uvloop"})
    text = table(samples, settings, loops)
    print(text)
    save(text, args.output, args.quick, RESULT)


if __name__ == "__main__":
    main()
