"""Stream calls: kubrpc TCP and HTTP side by side with grpcio.aio's streaming, in one run.

Three workloads, each measured for every peer at each concurrency (streams running at once):

- ``server-stream``: messages/s of a stream of results, `count(n) -> AsyncIterator[int]` (small messages; a
  worker reads a stream of 100,000 and opens the next one when it ends);
- ``bidi``: round trips/s on bidirectional streams, `echo(values) -> AsyncIterator[int]`: a worker sends one
  message and waits for its echo before it sends the next;
- ``bytes``: MB/s of a stream of 1 MiB `bytes` messages, `blobs(n, size) -> AsyncIterator[bytes]` (kubrpc
  TCP sends them as raw attachments after the JSON, kubrpc HTTP as base64 in JSON; grpcio.aio as raw bytes, as
  protobuf's `bytes` would be).

Run `python benchmarks/bench_streaming.py` (about 3 minutes) or `--quick` (under a minute, a smoke test). As
in bench_unary.py, each measurement runs a fresh server process pinned to CPU 0 and a fresh client process
pinned to CPU 1 (the helpers of _peers.py), rounds are interleaved in a rotated order, and a row reports the
round with the median rate and its ratio to grpcio.aio's. The `kubrpc-inproc` peer (only with `--peers`)
runs server and client in the client process, with no sockets: a smoke test of the benchmark itself. It
prints a Markdown table and writes it to benchmarks/results/streaming.md (a --quick run writes only with
--output).

    python benchmarks/bench_streaming.py serve PEER [--cpu N]        (a server process: prints its URL)
    python benchmarks/bench_streaming.py drive PEER URL --workload W --concurrency 1,16 ...   (a client process)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import orjson
from _peers import PeerFailed, cpu_usage, pin, run_server as run_peer_server, save, stop_process

SCRIPT = Path(__file__).resolve()
HERE = SCRIPT.parent
RESULT = HERE / "results" / "streaming.md"
PEERS = ("kubrpc-tcp", "kubrpc-http", "grpcio.aio")
EXTRA_PEERS = ("kubrpc-inproc", "kubrpc-tcp+uvloop")
UVLOOP = "+uvloop"
BASELINE = "grpcio.aio"
WORKLOADS = ("server-stream", "bidi", "bytes")
HOST = "127.0.0.1"
SERVER_CPU = 0
CLIENT_CPU = 1
START_TIMEOUT = 30.0
STREAM_LENGTH = 100_000  # messages of one server stream before a worker opens the next
BLOB = 1024 * 1024  # the `bytes` workload's message size
BLOBS_PER_STREAM = 64
HAVE_PROC = os.path.exists("/proc/self/stat")


@dataclass(frozen=True)
class Settings:
    """How long and how often each peer is measured, and the concurrencies of each workload."""

    rounds: int
    warmup: float
    duration: float
    concurrencies: dict[str, tuple[int, ...]]


FULL = Settings(5, 1.0, 2.5, {"server-stream": (1, 16), "bidi": (1, 16), "bytes": (1,)})
QUICK = Settings(2, 0.3, 1.0, {"server-stream": (1, 16), "bidi": (1, 16), "bytes": (1,)})


class Streams(Protocol):
    """The benchmarked service (kubrpc's; grpcio.aio serves the same three methods with generic handlers)."""

    def count(self, n: int) -> AsyncIterator[int]: ...

    def echo(self, values: AsyncIterable[int]) -> AsyncIterator[int]: ...

    def blobs(self, n: int, size: int) -> AsyncIterator[bytes]: ...


class StreamsImpl:
    """The implementation every kubrpc server registers."""

    async def count(self, n: int) -> AsyncIterator[int]:
        """0, 1, ..., n - 1."""
        for i in range(n):
            yield i

    async def echo(self, values: AsyncIterable[int]) -> AsyncIterator[int]:
        """Each message back, as it comes."""
        async for value in values:
            yield value

    async def blobs(self, n: int, size: int) -> AsyncIterator[bytes]:
        """n messages of `size` random bytes."""
        data = os.urandom(size)
        for _ in range(n):
            yield data


# --- servers: each yields the URL it is bound to ------------------------------------------------------------


@asynccontextmanager
async def serve_kubrpc(scheme: str) -> AsyncIterator[str]:
    """A kubrpc.Server with Streams on `scheme`://127.0.0.1:0 (or inproc://bench-streaming)."""
    import kubrpc

    server = kubrpc.Server(drain_timeout=1)
    impl: Streams = StreamsImpl()
    server.register(Streams, impl)
    url = "inproc://bench-streaming" if scheme == "inproc" else f"{scheme}://{HOST}:0"
    async with server.serve(url) as listener:
        yield listener.url


def _raw(data: bytes) -> bytes:
    return data


@asynccontextmanager
async def serve_grpc() -> AsyncIterator[str]:
    """A grpc.aio server with generic streaming handlers for /Streams/{count,echo,blobs}."""
    import grpc

    async def count(request: dict[str, int], context: object) -> AsyncIterator[int]:
        for i in range(request["n"]):
            yield i

    async def echo(requests: AsyncIterator[int], context: object) -> AsyncIterator[int]:
        async for value in requests:
            yield value

    async def blobs(request: dict[str, int], context: object) -> AsyncIterator[bytes]:
        data = os.urandom(request["size"])
        for _ in range(request["n"]):
            yield data

    loads, dumps = orjson.loads, orjson.dumps
    handler = grpc.method_handlers_generic_handler(
        "Streams",
        {
            "count": grpc.unary_stream_rpc_method_handler(count, request_deserializer=loads, response_serializer=dumps),
            "echo": grpc.stream_stream_rpc_method_handler(echo, request_deserializer=loads, response_serializer=dumps),
            "blobs": grpc.unary_stream_rpc_method_handler(blobs, request_deserializer=loads, response_serializer=_raw),
        },
    )
    options = [("grpc.max_send_message_length", 8 * BLOB), ("grpc.max_receive_message_length", 8 * BLOB)]
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{HOST}:0")
    await server.start()
    try:
        yield f"grpc://{HOST}:{port}"
    finally:
        await server.stop(None)


def serve(peer: str) -> contextlib.AbstractAsyncContextManager[str]:
    """The server of `peer`."""
    peer = peer.removesuffix(UVLOOP)
    if peer == "grpcio.aio":
        return serve_grpc()
    if peer in ("kubrpc-tcp", "kubrpc-http", "kubrpc-inproc"):
        return serve_kubrpc(peer.removeprefix("kubrpc-"))
    raise ValueError(f"unknown peer {peer!r}")


# --- clients: the three workloads of one peer ---------------------------------------------------------------


class Client(Protocol):
    """What a peer's client does for each workload."""

    def count(self, n: int) -> AsyncGenerator[int, None]:
        """A stream of results; closing the generator cancels the call."""
        ...

    def blobs(self, n: int, size: int) -> AsyncGenerator[bytes, None]: ...

    def bidi(self) -> contextlib.AbstractAsyncContextManager[Callable[[int], Awaitable[int]]]:
        """An open bidirectional stream, as a function that sends a message and waits for its echo."""
        ...


class KubrpcClient:
    """A typed kubrpc stub over one channel: every stream of the workers multiplexed on it."""

    def __init__(self, streams: Streams) -> None:
        self.streams = streams

    async def count(self, n: int) -> AsyncGenerator[int, None]:
        results = cast(AsyncGenerator[int, None], self.streams.count(n))
        async with contextlib.aclosing(results):
            async for value in results:
                yield value

    async def blobs(self, n: int, size: int) -> AsyncGenerator[bytes, None]:
        results = cast(AsyncGenerator[bytes, None], self.streams.blobs(n, size))
        async with contextlib.aclosing(results):
            async for value in results:
                yield value

    @asynccontextmanager
    async def bidi(self) -> AsyncIterator[Callable[[int], Awaitable[int]]]:
        outbox: asyncio.Queue[int] = asyncio.Queue()

        async def requests() -> AsyncIterator[int]:
            while True:
                yield await outbox.get()

        replies = cast(AsyncGenerator[int, None], self.streams.echo(requests()))

        async def round_trip(value: int) -> int:
            outbox.put_nowait(value)
            return await anext(replies)

        async with contextlib.aclosing(replies):
            yield round_trip


class GrpcClient:
    """One grpc.aio channel and its streaming multicallables."""

    def __init__(self, channel: Any) -> None:
        self._count = channel.unary_stream(
            "/Streams/count", request_serializer=orjson.dumps, response_deserializer=orjson.loads
        )
        self._blobs = channel.unary_stream(
            "/Streams/blobs", request_serializer=orjson.dumps, response_deserializer=_raw
        )
        self._echo = channel.stream_stream(
            "/Streams/echo", request_serializer=orjson.dumps, response_deserializer=orjson.loads
        )

    async def count(self, n: int) -> AsyncGenerator[int, None]:
        call = self._count({"n": n})
        try:
            async for value in call:
                yield int(value)
        finally:
            call.cancel()

    async def blobs(self, n: int, size: int) -> AsyncGenerator[bytes, None]:
        call = self._blobs({"n": n, "size": size})
        try:
            async for value in call:
                yield bytes(value)
        finally:
            call.cancel()

    @asynccontextmanager
    async def bidi(self) -> AsyncIterator[Callable[[int], Awaitable[int]]]:
        call = self._echo()

        async def round_trip(value: int) -> int:
            await call.write(value)
            return int(await call.read())

        try:
            yield round_trip
        finally:
            call.cancel()


@asynccontextmanager
async def client(peer: str, url: str) -> AsyncIterator[Client]:
    """The client of `peer`, connected to `url` (kubrpc-inproc: a server started here, in this process)."""
    peer = peer.removesuffix(UVLOOP)
    if peer == "grpcio.aio":
        import grpc

        options = [("grpc.max_send_message_length", 8 * BLOB), ("grpc.max_receive_message_length", 8 * BLOB)]
        async with grpc.aio.insecure_channel(url.removeprefix("grpc://"), options=options) as channel:
            await channel.channel_ready()
            yield GrpcClient(channel)
        return
    import kubrpc

    async with contextlib.AsyncExitStack() as stack:
        if peer == "kubrpc-inproc":
            url = await stack.enter_async_context(serve_kubrpc("inproc"))
        # 1 MiB of bytes is 1.4 MB of JSON: under the default max_message_size of 4 MiB
        channel = await stack.enter_async_context(kubrpc.connect(url))
        yield KubrpcClient(channel.stub(Streams))


# --- measurement ----------------------------------------------------------------------------------------------


async def measure(
    peer_client: Client, workload: str, concurrency: int, warmup: float, duration: float, server_pid: int | None
) -> dict[str, Any]:
    """`concurrency` workers run `workload` for warmup + duration seconds; what ends in the timed window counts."""
    clock = time.perf_counter
    start = clock() + warmup
    stop = start + duration
    usage = asyncio.create_task(cpu_usage(start, stop, server_pid))
    counts = [0, 0]  # messages (or round trips), bytes

    async def read_streams() -> None:
        while True:
            async with contextlib.aclosing(peer_client.count(STREAM_LENGTH)) as stream:  # leaving cancels it
                async for _ in stream:
                    now = clock()
                    if now >= stop:
                        return
                    if now >= start:
                        counts[0] += 1

    async def read_blobs() -> None:
        while True:
            async with contextlib.aclosing(peer_client.blobs(BLOBS_PER_STREAM, BLOB)) as stream:
                async for blob in stream:
                    now = clock()
                    if now >= stop:
                        return
                    if now >= start:
                        counts[0] += 1
                        counts[1] += len(blob)

    async def round_trips() -> None:
        async with peer_client.bidi() as round_trip:
            i = 0
            while True:
                if await round_trip(i) != i:
                    raise AssertionError("echo returned another message")
                i += 1
                now = clock()
                if now >= stop:
                    return
                if now >= start:
                    counts[0] += 1

    worker = {"server-stream": read_streams, "bidi": round_trips, "bytes": read_blobs}[workload]
    async with asyncio.timeout(warmup + duration + 30), asyncio.TaskGroup() as tasks:
        for _ in range(concurrency):
            tasks.create_task(worker())
    client_cpu, server_cpu, other_cpu = await usage
    if not counts[0]:
        raise RuntimeError(f"no message in the timed window of {workload}")
    return {
        "workload": workload,
        "concurrency": concurrency,
        "messages": counts[0],
        "bytes": counts[1],
        "seconds": duration,
        "client_cpu": client_cpu,
        "server_cpu": server_cpu,
        "other_cpu": other_cpu,
    }


# --- process entry points -------------------------------------------------------------------------------------


async def run_client(
    peer: str, url: str, workload: str, concurrencies: list[int], warmup: float, duration: float, pid: int | None
) -> None:
    """Measure `peer` on `workload` at each concurrency in turn, printing one JSON line each."""
    async with client(peer, url) as peer_client:
        for concurrency in concurrencies:
            result = await measure(peer_client, workload, concurrency, warmup, duration, pid)
            print(json.dumps(result), flush=True)


def process_main(argv: list[str]) -> None:
    """The server and client processes."""
    parser = argparse.ArgumentParser(prog="bench_streaming.py serve|drive")
    parser.add_argument("role", choices=("serve", "drive"))
    parser.add_argument("peer", choices=PEERS + EXTRA_PEERS)
    parser.add_argument("url", nargs="?")
    parser.add_argument("--cpu", type=int)
    parser.add_argument("--workload", choices=WORKLOADS, default="server-stream")
    parser.add_argument("--concurrency", default="1")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=2.5)
    parser.add_argument("--server-pid", type=int)
    args = parser.parse_args(argv)
    pin(args.cpu)
    run: Callable[[Any], Any] = asyncio.run
    if args.peer.endswith(UVLOOP):
        import uvloop

        run = uvloop.run
    if args.role == "serve":
        run(run_peer_server(args.peer, serve))
        return
    if args.url is None:
        parser.error("drive needs the server's URL")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    run(run_client(args.peer, args.url, args.workload, concurrencies, args.warmup, args.duration, args.server_pid))


# --- the orchestrator -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One peer, one workload, one concurrency, one round."""

    peer: str
    workload: str
    concurrency: int
    rate: float  # messages/s (round trips/s for bidi)
    mb_per_s: float
    server_cpu: float
    client_cpu: float
    other_cpu: float


async def run_peer(peer: str, workload: str, settings: Settings) -> list[Sample]:
    """Start the peer's server (kubrpc-inproc: none), drive it on `workload` at every concurrency, stop both."""
    python, script = sys.executable, str(SCRIPT)
    concurrencies = settings.concurrencies[workload]
    server: asyncio.subprocess.Process | None = None
    url = "inproc://"
    try:
        if peer != "kubrpc-inproc":
            server = await asyncio.create_subprocess_exec(
                python, script, "serve", peer, "--cpu", str(SERVER_CPU), stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            assert server.stdout is not None
            try:
                url = (await asyncio.wait_for(server.stdout.readline(), START_TIMEOUT)).decode().strip()
            except TimeoutError:
                raise PeerFailed(f"{peer}: the server did not start within {START_TIMEOUT:.0f} s") from None
            if not url:
                raise PeerFailed(f"{peer}: the server exited with {await server.wait()}")
        pid = ["--server-pid", str(server.pid)] if server is not None and HAVE_PROC else []
        driver = await asyncio.create_subprocess_exec(
            python, script, "drive", peer, url, "--cpu", str(CLIENT_CPU), "--workload", workload,
            "--concurrency", ",".join(map(str, concurrencies)), "--warmup", str(settings.warmup),
            "--duration", str(settings.duration), *pid, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        budget = len(concurrencies) * (settings.warmup + settings.duration + 30) + START_TIMEOUT
        try:
            out, _ = await asyncio.wait_for(driver.communicate(), budget)
        except TimeoutError:
            driver.kill()
            await driver.wait()
            raise PeerFailed(f"{peer} {workload}: the client overran {budget:.0f} s") from None
        if driver.returncode != 0:
            raise PeerFailed(f"{peer} {workload}: the client exited with {driver.returncode}")
    finally:
        if server is not None:
            await stop_process(server)
    samples = []
    for line in out.decode().splitlines():
        row = json.loads(line)
        seconds = row["seconds"]
        samples.append(
            Sample(
                peer,
                workload,
                row["concurrency"],
                row["messages"] / seconds,
                row["bytes"] / seconds / 1e6,
                row["server_cpu"],
                row["client_cpu"],
                row["other_cpu"],
            )
        )
    return samples


Results = dict[tuple[str, str, int], list[Sample]]


async def run_rounds(settings: Settings, peers: tuple[str, ...], workloads: tuple[str, ...]) -> Results:
    """Every peer on every workload once per round, peers in an order rotated each round."""
    results: Results = {}
    for r in range(settings.rounds):
        shift = r % len(peers)
        for workload in workloads:
            for peer in peers[shift:] + peers[:shift]:
                try:
                    samples = await run_peer(peer, workload, settings)
                except PeerFailed as exc:
                    print(f"round {r + 1}: {exc}", file=sys.stderr, flush=True)
                    continue
                for s in samples:
                    results.setdefault((s.peer, s.workload, s.concurrency), []).append(s)
                    mb = f"  {s.mb_per_s:,.0f} MB/s" if s.workload == "bytes" else ""
                    print(
                        f"round {r + 1}/{settings.rounds}  {workload:<13} {peer:<18} c={s.concurrency:<3}"
                        f" {s.rate:>10,.0f} {_UNITS[workload]}{mb}"
                        f"  CPU server {_share(s.server_cpu)} client {_share(s.client_cpu)}",
                        file=sys.stderr,
                        flush=True,
                    )
    return results


_UNITS = {"server-stream": "messages/s", "bidi": "round trips/s", "bytes": "messages/s"}


def median_round(samples: list[Sample]) -> Sample:
    """The sample with the median rate (the lower middle one of an even count)."""
    ordered = sorted(samples, key=lambda s: s.rate)
    return ordered[(len(ordered) - 1) // 2]


def _share(share: float) -> str:
    return "—" if math.isnan(share) else f"{share:.0%}"


def _cpu(share: float, rate: float, unit: str) -> str:
    return "—" if math.isnan(share) else f"{share:.0%} · {share / rate * 1e6:.1f} µs/{unit}"


def table(results: Results, settings: Settings, peers: tuple[str, ...], workloads: tuple[str, ...]) -> str:
    """The Markdown table: one row per workload, concurrency and peer, the median round of each."""
    lines = [
        "| workload | streams | peer | rate | × grpcio.aio | MB/s | server CPU | client CPU | other load "
        "| rate range over rounds |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for workload in workloads:
        unit = "round trip" if workload == "bidi" else "message"
        for concurrency in settings.concurrencies[workload]:
            baseline = results.get((BASELINE, workload, concurrency))
            base = median_round(baseline).rate if baseline else None
            for peer in peers:
                samples = results.get((peer, workload, concurrency))
                if not samples:
                    lines.append(f"| {workload} | {concurrency} | {peer} | failed |" + " — |" * 6)
                    continue
                m = median_round(samples)
                ratio = f"{m.rate / base:.2f}" if base else "—"
                mb = f"{m.mb_per_s:,.0f}" if workload == "bytes" else "—"
                low, high = min(s.rate for s in samples), max(s.rate for s in samples)
                other = "—" if math.isnan(m.other_cpu) else f"{m.other_cpu:.2f}"
                lines.append(
                    f"| {workload} | {concurrency} | {peer} | {m.rate:,.0f} {_UNITS[workload]} | {ratio} | {mb} "
                    f"| {_cpu(m.server_cpu, m.rate, unit)} | {_cpu(m.client_cpu, m.rate, unit)} | {other} "
                    f"| {low:,.0f}–{high:,.0f} |"
                )
    return "\n".join(lines)


def environment(settings: Settings, load: tuple[float, float, float], command: str) -> str:
    """The conditions of the run, for the results file."""
    from bench_unary import _version, cpu_model

    versions = ", ".join(
        f"{p} {_version(p)}" for p in ("kubrpc", "grpcio", "starlette", "uvicorn", "aiohttp", "orjson")
    )
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return "\n".join(
        [
            f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; command: `{command}`",
            f"- Python {platform.python_version()} ({platform.python_implementation()}) on {platform.machine()}, "
            "stdlib asyncio event loop unless the peer says uvloop",
            f"- CPU: {cpu_model()}, {cpus} CPUs; server pinned to CPU {SERVER_CPU}, client to CPU {CLIENT_CPU} "
            f"(kubrpc-inproc: both in the client process); load average at start {load[0]:.2f}",
            f"- {settings.rounds} interleaved rounds; each peer and workload: a fresh server and client process, "
            f"{settings.warmup:g} s warm-up then {settings.duration:g} s timed per concurrency; each row is the "
            "round with the median rate",
            f"- server streams of {STREAM_LENGTH:,} int messages; bytes: streams of {BLOBS_PER_STREAM} messages of "
            f"{BLOB // 1024} KiB",
            f"- {versions}",
        ]
    )


def report(results: Results, settings: Settings, peers: tuple[str, ...], workloads: tuple[str, ...], env: str) -> str:
    """The whole Markdown document."""
    return "\n".join(
        [
            "# Streams: messages/s, round trips/s and MB/s, side by side",
            "",
            "server-stream = messages/s read from streams of results (small int messages); bidi = round trips/s on "
            "bidirectional streams, each worker waiting for the echo of a message before sending the next; bytes = "
            "a stream of 1 MiB `bytes` messages (kubrpc TCP: raw attachments after the JSON, HTTP: base64 in JSON; "
            "grpcio.aio: raw bytes). streams = how many "
            "run at once on one channel. × grpcio.aio = the rate over grpcio.aio's for the same workload and "
            "streams, in the same run; server and client CPU = the share of its one core each process used while "
            "timed, and its CPU time per message or round trip. Produced by `benchmarks/bench_streaming.py` "
            "(method: benchmarks/README.md).",
            "",
            table(results, settings, peers, workloads),
            "",
            env,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    """Parse the options, run the rounds, print the table and write the results file."""
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] in (["serve"], ["drive"]):
        process_main(arguments)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short smoke run, under a minute")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5, 2 with --quick)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per concurrency")
    parser.add_argument("--duration", type=float, help="seconds timed per concurrency")
    parser.add_argument("--peers", help=f"comma-separated subset of {','.join(PEERS + EXTRA_PEERS)}")
    parser.add_argument("--workloads", help=f"comma-separated subset of {','.join(WORKLOADS)}")
    parser.add_argument("--output", type=Path, help=f"results file (default {RESULT.relative_to(HERE.parent)})")
    args = parser.parse_args(arguments)
    base = QUICK if args.quick else FULL
    settings = Settings(
        rounds=args.rounds or base.rounds,
        warmup=base.warmup if args.warmup is None else args.warmup,
        duration=args.duration or base.duration,
        concurrencies=base.concurrencies,
    )
    peers = tuple(args.peers.split(",")) if args.peers else PEERS
    if unknown := set(peers) - set(PEERS + EXTRA_PEERS):
        parser.error(f"unknown peers: {', '.join(sorted(unknown))}")
    workloads = tuple(args.workloads.split(",")) if args.workloads else WORKLOADS
    if unknown := set(workloads) - set(WORKLOADS):
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    command = " ".join(["python benchmarks/bench_streaming.py", *arguments])
    load = os.getloadavg()
    started = time.monotonic()
    results = asyncio.run(run_rounds(settings, peers, workloads))
    document = report(results, settings, peers, workloads, environment(settings, load, command))
    print(document)
    print(f"({time.monotonic() - started:.0f} s)", file=sys.stderr)
    save(document, args.output, args.quick, RESULT)
    if any(not results.get((p, w, c)) for p in peers for w in workloads for c in settings.concurrencies[w]):
        sys.exit(1)


if __name__ == "__main__":
    main()
