"""Instructions per unary call, counted by valgrind: kubrpc TCP beside the raw-socket floor (and HTTP beside Starlette).

Run `python benchmarks/bench_instructions.py` (about 5 minutes; `--quick`: the TCP pair at concurrency 64 only, about
a minute). Needs valgrind (`apt install valgrind`). Calls/s on a shared machine move with its load; the number of
machine instructions a call executes does not: callgrind counts them, the same total twice for the same run (it
simulates one CPU, so it is slow, and the count does not depend on what else the machine does). This is the
benchmark of each step in docs/performance.md.

Each peer of benchmarks/_peers.py (server and client, the same code as bench_unary.py's) runs in one process on one
stock asyncio loop, over a loopback socket, making `calls` add(1, 2) calls from `concurrency` tasks. Each count is
taken twice, with few and with many calls, under `valgrind --tool=callgrind`; instructions per call is the
difference of the two totals over the difference of the calls, so start-up, imports and connection set-up cancel
out. It counts the server's and the client's work together (one process), the kernel's not (valgrind sees user
space only). `× raw-tcp` is a peer's instructions over the floor's, `× starlette` the HTTP pair's. It prints a
Markdown table and writes it to benchmarks/results/instructions.md (a --quick run writes only with --output).

    python benchmarks/bench_instructions.py --child PEER CALLS CONCURRENCY   (one counted run, used by the above)
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import _peers
from _peers import client, save, serve

RESULT = Path(__file__).resolve().parent / "results" / "instructions.md"
FLOORS = {"kubrpc-tcp": "raw-tcp", "raw-tcp": "raw-tcp", "kubrpc-http": "starlette", "starlette": "starlette"}
COLLECTED = re.compile(rb"Collected : (\d+)")


@dataclass(frozen=True)
class Settings:
    """What one run counts."""

    peers: tuple[str, ...]
    concurrencies: tuple[int, ...]
    calls: tuple[int, int]  # few, many (TCP; HTTP peers make a fifth of them: each costs several times more)


FULL = Settings(("raw-tcp", "kubrpc-tcp", "starlette", "kubrpc-http"), (1, 64), (1_000, 5_000))
QUICK = Settings(("raw-tcp", "kubrpc-tcp"), (64,), (500, 2_500))


async def child(peer: str, calls: int, concurrency: int) -> None:
    """`calls` add(1, 2) calls through `peer` from `concurrency` tasks, server and client on this loop."""
    # Under valgrind everything runs some 50 times slower: kubrpc's HTTP client opening its 64 connections at the
    # start overran the benchmarks' 10 s call timeout (the timeout's value does not change what a call executes).
    _peers.CALL_TIMEOUT = 600.0
    async with serve(peer) as url, client(peer, url) as call:
        share, extra = divmod(calls, concurrency)

        async def worker(count: int) -> None:
            for _ in range(count):
                if await call() != 3:
                    raise AssertionError("add(1, 2) != 3")

        await asyncio.gather(*(worker(share + (i < extra)) for i in range(concurrency)))


def counted(peer: str, calls: int, concurrency: int) -> int:
    """The instructions that one child run executes, all of it, as callgrind counts them."""
    with tempfile.TemporaryDirectory() as scratch:
        command = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={scratch}/out",
            sys.executable,
            __file__,
            "--child",
            peer,
            str(calls),
            str(concurrency),
        ]
        env = {**os.environ, "PYTHONHASHSEED": "0"}  # the same dict layouts, so the same instructions, every run
        done = subprocess.run(command, capture_output=True, env=env, timeout=1800, check=False)
    found = COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        tail = done.stderr.decode(errors="replace")[-2000:]
        raise SystemExit(f"{peer} at concurrency {concurrency} failed (exit {done.returncode}):\n{tail}")
    return int(found.group(1))


def per_call(peer: str, concurrency: int, settings: Settings) -> float:
    """Instructions per call: the difference of a short and a long run over the difference of their calls."""
    few, many = settings.calls if peer.endswith("tcp") else (n // 5 for n in settings.calls)
    counts = [counted(peer, n, concurrency) for n in (few, many)]
    value = (counts[1] - counts[0]) / (many - few)
    print(f"  {peer} c={concurrency}: {value:,.0f} instructions per call", file=sys.stderr)
    return value


def table(figures: dict[tuple[str, int], float], settings: Settings) -> str:
    """The Markdown table of instructions per call and their ratio to each peer's floor."""
    rows = []
    for concurrency in settings.concurrencies:
        for peer in settings.peers:
            value, floor = figures[peer, concurrency], FLOORS[peer]
            ratio = f"{value / figures[floor, concurrency]:.2f}" if (floor, concurrency) in figures else "–"
            rows.append(f"| {peer} | {concurrency} | {value:,.0f} | {ratio} ({floor}) |")
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    few, many = settings.calls
    return "\n".join(
        [
            "# Instructions per unary call (valgrind callgrind)",
            "",
            "| peer | concurrency | instructions per call | × its floor |",
            "|---|---:|---:|---:|",
            *rows,
            "",
            f"{when}, Python {platform.python_version()} on {platform.machine()}, stock asyncio loop; server and",
            f"client in one process (their sum, user space only); per call = difference of a {few:,}- and a",
            f"{many:,}-call run (HTTP peers: a fifth of that). `python benchmarks/bench_instructions.py`.",
            "",
        ]
    )


def main() -> None:
    """Parse the command line: count every peer, print and write the table; or be one counted child run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="the TCP pair at concurrency 64 only, fewer calls")
    parser.add_argument("--output", type=Path, help=f"where to write the table (default: {RESULT}, not with --quick)")
    parser.add_argument("--peers", help="comma-separated, from: " + ", ".join(FLOORS))
    parser.add_argument("--child", nargs=3, metavar=("PEER", "CALLS", "CONCURRENCY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        peer, calls, concurrency = args.child
        asyncio.run(child(peer, int(calls), int(concurrency)))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind not found: install it (Debian: apt install valgrind)")
    settings = QUICK if args.quick else FULL
    if args.peers:
        unknown = set(args.peers.split(",")) - set(FLOORS)
        if unknown:
            parser.error(f"unknown peers {sorted(unknown)}; choose from {', '.join(FLOORS)}")
        settings = Settings(tuple(args.peers.split(",")), settings.concurrencies, settings.calls)
    figures = {(p, c): per_call(p, c, settings) for c in settings.concurrencies for p in settings.peers}
    text = table(figures, settings)
    print(text)
    save(text, args.output, args.quick, RESULT)


if __name__ == "__main__":
    main()
