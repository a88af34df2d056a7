"""Unary add(a, b): kubrpc TCP and HTTP side by side with grpcio.aio and a bare Starlette route, in one run.

Run `python benchmarks/bench_unary.py` (about 3 minutes) or `--quick` (under a minute, a smoke test). For each
peer and concurrency it reports calls/s, p50 and p99 latency and the ratio of calls/s to grpcio.aio, prints a
Markdown table and writes it to benchmarks/results/unary.md (a --quick run writes only with --output).

Each measurement runs a fresh server process pinned to CPU 0 and a fresh client process pinned to CPU 1 (see
_peers.py); the client warms up, then times every concurrency in turn. Rounds are interleaved, each round runs
every peer once (in a rotated order), and a row reports the round with the median calls/s. `--profile DIR` runs
cProfile in the kubrpc server and client processes instead, and prints where their time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import pstats
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from _peers import BASELINE, EXTRA_PEERS, PEERS, PeerFailed, Settings, save, stop_process

HERE = Path(__file__).resolve().parent
PEERS_SCRIPT = HERE / "_peers.py"
RESULT = HERE / "results" / "unary.md"
SERVER_CPU = 0
CLIENT_CPU = 1
START_TIMEOUT = 30.0
HAVE_PROC = os.path.exists("/proc/self/stat")  # for the server's CPU usage


FULL = Settings(rounds=5, warmup=1.0, duration=2.5, concurrencies=(1, 64))
QUICK = Settings(rounds=2, warmup=0.3, duration=1.0, concurrencies=(1, 64))


@dataclass(frozen=True)
class Sample:
    """One peer at one concurrency in one round."""

    peer: str
    concurrency: int
    calls_per_s: float
    p50_ms: float
    p99_ms: float
    server_cpu: float
    client_cpu: float
    other_cpu: float


async def run_peer(peer: str, settings: Settings, profile_dir: Path | None = None) -> list[Sample]:
    """Start the peer's server, drive it from a client process at every concurrency, stop both."""
    python = sys.executable
    server_args = [str(PEERS_SCRIPT), "serve", peer, "--cpu", str(SERVER_CPU)]
    client_profile: list[str] = []
    if profile_dir is not None:
        server_args += ["--profile", str(profile_dir / f"{peer}-server.prof")]
        client_profile = ["--profile", str(profile_dir / f"{peer}-client.prof")]
    server = await asyncio.create_subprocess_exec(
        python, *server_args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert server.stdout is not None
        try:
            url = (await asyncio.wait_for(server.stdout.readline(), START_TIMEOUT)).decode().strip()
        except TimeoutError:
            raise PeerFailed(f"{peer}: the server did not start within {START_TIMEOUT:.0f} s") from None
        if not url:
            raise PeerFailed(f"{peer}: the server exited with {await server.wait()}")
        client = await asyncio.create_subprocess_exec(
            python,
            str(PEERS_SCRIPT),
            "drive",
            peer,
            url,
            "--cpu",
            str(CLIENT_CPU),
            "--concurrency",
            ",".join(map(str, settings.concurrencies)),
            "--warmup",
            str(settings.warmup),
            "--duration",
            str(settings.duration),
            *client_profile,
            *(["--server-pid", str(server.pid)] if HAVE_PROC else []),
            stdout=asyncio.subprocess.PIPE,
        )
        budget = len(settings.concurrencies) * (settings.warmup + settings.duration) + START_TIMEOUT
        try:
            out, _ = await asyncio.wait_for(client.communicate(), budget)
        except TimeoutError:
            client.kill()
            await client.wait()
            raise PeerFailed(f"{peer}: the client overran {budget:.0f} s") from None
        if client.returncode != 0:
            raise PeerFailed(f"{peer}: the client exited with {client.returncode}")
    finally:
        await stop_process(server)
    samples = []
    for line in out.decode().splitlines():
        row = json.loads(line)
        calls_per_s = row["calls"] / row["seconds"]
        samples.append(
            Sample(
                peer,
                row["concurrency"],
                calls_per_s,
                row["p50_ms"],
                row["p99_ms"],
                row["server_cpu"],
                row["client_cpu"],
                row["other_cpu"],
            )
        )
    return samples


async def run_rounds(settings: Settings, peers: tuple[str, ...]) -> dict[tuple[str, int], list[Sample]]:
    """Every peer once per round, in an order rotated each round; samples by (peer, concurrency)."""
    results: dict[tuple[str, int], list[Sample]] = {}
    for r in range(settings.rounds):
        shift = r % len(peers)
        for peer in peers[shift:] + peers[:shift]:
            try:
                samples = await run_peer(peer, settings)
            except PeerFailed as exc:
                print(f"round {r + 1}: {exc}", file=sys.stderr, flush=True)
                continue
            for s in samples:
                results.setdefault((s.peer, s.concurrency), []).append(s)
                print(
                    f"round {r + 1}/{settings.rounds}  {peer:<12} c={s.concurrency:<3} {s.calls_per_s:>9,.0f} calls/s"
                    f"  p50 {s.p50_ms:.3f} ms  p99 {s.p99_ms:.3f} ms"
                    f"  CPU server {s.server_cpu:.0%} client {s.client_cpu:.0%} others {s.other_cpu:.2f}",
                    file=sys.stderr,
                    flush=True,
                )
    return results


def median_round(samples: list[Sample]) -> Sample:
    """The sample with the median calls/s (the lower middle one of an even count)."""
    ordered = sorted(samples, key=lambda s: s.calls_per_s)
    return ordered[(len(ordered) - 1) // 2]


def table(results: dict[tuple[str, int], list[Sample]], settings: Settings, peers: tuple[str, ...]) -> str:
    """The Markdown table: one row per peer and concurrency, the median round of each."""
    lines = [
        "| peer | concurrency | calls/s | × grpcio.aio | p50 ms | p99 ms | server CPU | client CPU | other load "
        "| calls/s range over rounds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for concurrency in settings.concurrencies:
        baseline = results.get((BASELINE, concurrency))
        base = median_round(baseline).calls_per_s if baseline else None
        for peer in peers:
            samples = results.get((peer, concurrency))
            if not samples:
                lines.append(f"| {peer} | {concurrency} | failed |" + " — |" * 7)
                continue
            m = median_round(samples)
            ratio = f"{m.calls_per_s / base:.2f}" if base else "—"
            low = min(s.calls_per_s for s in samples)
            high = max(s.calls_per_s for s in samples)
            lines.append(
                f"| {peer} | {concurrency} | {m.calls_per_s:,.0f} | {ratio} | {m.p50_ms:.3f} | {m.p99_ms:.3f} "
                f"| {_cpu(m.server_cpu, m.calls_per_s)} | {_cpu(m.client_cpu, m.calls_per_s)} "
                f"| {'—' if math.isnan(m.other_cpu) else f'{m.other_cpu:.2f}'} | {low:,.0f}–{high:,.0f} |"
            )
    return "\n".join(lines)


def floor(results: dict[tuple[str, int], list[Sample]], settings: Settings) -> list[str]:
    """kubrpc TCP as a share of the raw-tcp floor (issue 15), per concurrency, each from its median round."""
    shares = []
    for concurrency in settings.concurrencies:
        ours, raw = results.get(("kubrpc-tcp", concurrency)), results.get(("raw-tcp", concurrency))
        if ours and raw:
            share = median_round(ours).calls_per_s / median_round(raw).calls_per_s
            shares.append(f"{share:.2f}× at concurrency {concurrency}")
    if not shares:
        return []
    return [
        "kubrpc TCP as a share of the raw-tcp floor (asyncio protocols with bare frames, each handler run inline "
        f"where its request is read; benchmarks/_peers.py): {', '.join(shares)}.",
        "",
    ]


def _cpu(share: float, calls_per_s: float) -> str:
    """A process's CPU use: the share of its core, and CPU µs per call."""
    if math.isnan(share):
        return "—"
    micros = share / calls_per_s * 1e6
    return f"{share:.0%} · {micros:.{1 if micros < 20 else 0}f} µs"


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def environment(settings: Settings, load: tuple[float, float, float], command: str) -> str:
    """The conditions of the run, for the results file."""
    versions = ", ".join(
        f"{p} {_version(p)}" for p in ("kubrpc", "grpcio", "starlette", "uvicorn", "aiohttp", "orjson", "anyio")
    )
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return "\n".join(
        [
            f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; command: `{command}`",
            f"- Python {platform.python_version()} ({platform.python_implementation()}) on {platform.machine()}, "
            f"stdlib asyncio event loop; uvicorn HTTP parser: {http}",
            f"- CPU: {cpu_model()}, {cpus} CPUs; server pinned to CPU {SERVER_CPU}, client to CPU {CLIENT_CPU}; "
            f"load average at start {load[0]:.2f}",
            f"- {settings.rounds} interleaved rounds; each peer: a fresh server and client process, "
            f"{settings.warmup:g} s warm-up then {settings.duration:g} s timed per concurrency; "
            "each row is the round with the median calls/s",
            f"- {versions}",
        ]
    )


def report(results: dict[tuple[str, int], list[Sample]], settings: Settings, peers: tuple[str, ...], env: str) -> str:
    """The whole Markdown document."""
    return "\n".join(
        [
            "# Unary add(a, b): calls/s and latency, side by side",
            "",
            "Concurrency = client tasks, each calling in a loop; × grpcio.aio = calls/s over grpcio.aio's at the same "
            "concurrency; server and client CPU = the share of its one core each process used while timed (100% = "
            "that side is the bottleneck) and its CPU time per call; other load = CPUs busy with anything else on "
            "the machine meanwhile (near 0 for a clean measurement). Produced by `benchmarks/bench_unary.py` "
            "(method: benchmarks/README.md).",
            "",
            table(results, settings, peers),
            "",
            *floor(results, settings),
            env,
            "",
        ]
    )


async def run_profiles(settings: Settings, peers: tuple[str, ...], directory: Path, top: int) -> None:
    """One profiled run of each peer (server and client under cProfile); print the top functions of each."""
    for peer in peers:
        for s in await run_peer(peer, settings, directory):
            print(f"{peer} c={s.concurrency}: {s.calls_per_s:,.0f} calls/s under cProfile", flush=True)
        for side in ("server", "client"):
            path = directory / f"{peer}-{side}.prof"
            print(f"\n=== {peer} {side}: {path}", flush=True)
            stats = pstats.Stats(str(path), stream=sys.stdout)
            stats.sort_stats(pstats.SortKey.TIME).print_stats(top)
            stats.sort_stats(pstats.SortKey.CUMULATIVE).print_stats(top)


def main(argv: list[str] | None = None) -> None:
    """Parse the options, run the rounds, print the table and write the results file."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short smoke run, under a minute")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5, 2 with --quick)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per concurrency")
    parser.add_argument("--duration", type=float, help="seconds timed per concurrency")
    parser.add_argument("--concurrency", help="comma-separated client task counts (default 1,64)")
    parser.add_argument("--peers", help=f"comma-separated subset of {','.join(PEERS + EXTRA_PEERS)}")
    parser.add_argument("--output", type=Path, help=f"results file (default {RESULT.relative_to(HERE.parent)})")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="profile the kubrpc peers into DIR instead")
    parser.add_argument("--top", type=int, default=25, help="functions shown per profile")
    args = parser.parse_args(argv)

    base = QUICK if args.quick else FULL
    settings = Settings(
        rounds=args.rounds or base.rounds,
        warmup=base.warmup if args.warmup is None else args.warmup,
        duration=args.duration or base.duration,
        concurrencies=tuple(int(c) for c in args.concurrency.split(",")) if args.concurrency else base.concurrencies,
    )
    if args.peers:
        peers = tuple(args.peers.split(","))
        if unknown := set(peers) - set(PEERS + EXTRA_PEERS):
            parser.error(f"unknown peers: {', '.join(sorted(unknown))}")
    else:
        peers = PEERS if args.profile is None else ("kubrpc-tcp", "kubrpc-http")

    if args.profile is not None:
        if not args.concurrency:
            settings = Settings(settings.rounds, settings.warmup, settings.duration, (64,))
        args.profile.mkdir(parents=True, exist_ok=True)
        asyncio.run(run_profiles(settings, peers, args.profile, args.top))
        return

    command = " ".join(["python benchmarks/bench_unary.py", *sys.argv[1:]]) if argv is None else "main()"
    load = os.getloadavg()
    started = time.monotonic()
    results = asyncio.run(run_rounds(settings, peers))
    document = report(results, settings, peers, environment(settings, load, command))
    print(document)
    print(f"({time.monotonic() - started:.0f} s)", file=sys.stderr)
    save(document, args.output, args.quick, RESULT)
    if any(not results.get((p, c)) for p in peers for c in settings.concurrencies):
        sys.exit(1)


if __name__ == "__main__":
    main()
