"""The peers of benchmarks/bench_unary.py, and the server and client processes that run them.

Every peer serves and calls the same unary method, add(a, b) -> a + b with JSON-encoded arguments:

- ``kubrpc-tcp`` and ``kubrpc-http``: a ``kubrpc.Server`` and a ``kubrpc.connect()`` channel's typed stub;
- ``grpcio.aio``: a generic handler with orjson (de)serializers (no protoc step), ``channel.unary_unary``;
- ``starlette``: a bare ``POST /Arith/add`` route served by uvicorn, driven by aiohttp as kubrpc's HTTP transport is.
- ``raw-tcp``: the floor that issue 15 measures kubrpc's TCP transport against: asyncio protocols with nothing but
  length-prefixed frames (an id and JSON), the handler run inline where its request is read (no task), the
  answers of one read written at once, and a client that writes the requests of one loop turn at once. No deadlines,
  metadata, limits, errors, cancellation or balancing: what any RPC over asyncio TCP must at least cost.
- opt-in (``--peers``): ``kubrpc-tcp+metrics`` with kubrpc.metrics on both sides, ``kubrpc-tcp+tracing`` with
  kubrpc.tracing's interceptors on both sides: the cost of observability.

bench_unary.py starts this file as two processes, each pinned to one CPU::

    python _peers.py serve PEER [--cpu N] [--profile FILE]
        prints the bound URL on one line, serves until stdin closes (or SIGTERM), then exits
    python _peers.py drive PEER URL --concurrency 1,64 --warmup S --duration S [--cpu N] [--profile FILE]
        [--server-pid PID]   prints one JSON line per concurrency:
        {"concurrency", "calls", "seconds", "p50_ms", "p99_ms", "client_cpu", "server_cpu", "other_cpu"}
        (CPU: in cores; other = every other process on the machine, from /proc/stat; both need --server-pid)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import math
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson
import uvicorn

PEERS = ("kubrpc-tcp", "raw-tcp", "kubrpc-http", "grpcio.aio", "starlette", "kubrpc-tcp+uvloop", "kubrpc-http+uvloop")
UVLOOP = "+uvloop"  # a peer name ending in this runs both of its processes on uvloop (kubrpc's optional extra)
EXTRA_PEERS = ("kubrpc-tcp+metrics", "kubrpc-tcp+tracing")  # not run by default
OBSERVED = ("+metrics", "+tracing")
BASELINE = "grpcio.aio"
HOST = "127.0.0.1"
CALL_TIMEOUT = 10.0

Call = Callable[[], Awaitable[int]]


class Arith(Protocol):
    """The benchmarked service."""

    async def add(self, a: int, b: int) -> int: ...


class ArithImpl:
    """The implementation every kubrpc server registers."""

    async def add(self, a: int, b: int) -> int:
        """a + b."""
        return a + b


@dataclass(frozen=True)
class Settings:
    """How long and how often each peer is measured (by bench_unary.py and bench_inproc.py)."""

    rounds: int
    warmup: float
    duration: float
    concurrencies: tuple[int, ...]


# --- servers: each yields the URL it is bound to --------------------------------------------------------------


@asynccontextmanager
async def serve_kubrpc(scheme: str, observe: str = "") -> AsyncIterator[str]:
    """A kubrpc.Server with Arith on `scheme`://127.0.0.1:0; `observe` is "", "+metrics" or "+tracing"."""
    import kubrpc

    if observe == "+metrics":
        from kubrpc.metrics import ServerMetrics

        server = kubrpc.Server(metrics=ServerMetrics())
    elif observe == "+tracing":
        from kubrpc.tracing import ServerTracing

        server = kubrpc.Server(interceptors=[ServerTracing()])
    else:
        server = kubrpc.Server()
    impl: Arith = ArithImpl()  # so that register()'s type variable is Arith
    server.register(Arith, impl)
    async with server.serve(f"{scheme}://{HOST}:0") as listener:
        yield listener.url


@asynccontextmanager
async def serve_grpc() -> AsyncIterator[str]:
    """A grpc.aio server with a generic unary handler for /Arith/add, JSON in and out."""
    import grpc

    async def add(request: dict[str, int], context: object) -> int:
        return request["a"] + request["b"]

    handler = grpc.method_handlers_generic_handler(
        "Arith",
        {
            "add": grpc.unary_unary_rpc_method_handler(
                add, request_deserializer=orjson.loads, response_serializer=orjson.dumps
            )
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{HOST}:0")
    await server.start()
    try:
        yield f"grpc://{HOST}:{port}"
    finally:
        await server.stop(None)


class _QuietServer(uvicorn.Server):
    """uvicorn without its signal handlers: the owner of the event loop handles signals, as in kubrpc."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Install nothing."""
        yield


@asynccontextmanager
async def serve_starlette() -> AsyncIterator[str]:
    """A bare Starlette app with one POST /Arith/add route, served by uvicorn as kubrpc's http transport serves."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def add(request: Request) -> Response:
        args = orjson.loads(await request.body())
        return Response(orjson.dumps(args["a"] + args["b"]), media_type="application/json")

    app = Starlette(routes=[Route("/Arith/add", add, methods=["POST"])])
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
    userver = _QuietServer(config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, 0))
        sock.listen(1024)
        sock.setblocking(False)
        task = asyncio.create_task(userver.serve([sock]))
        async with asyncio.timeout(10):
            while not userver.started:
                if task.done():
                    task.result()
                    raise OSError("uvicorn exited before it started")
                await asyncio.sleep(0.002)
        try:
            yield f"http://{HOST}:{sock.getsockname()[1]}"
        finally:
            userver.should_exit = True
            await task


_RAW_HEAD = struct.Struct(">II")  # raw-tcp: payload length, call id


class _RawServerProtocol(asyncio.Protocol):
    """raw-tcp's server: each request's handler runs inline as its frame is read; one write per read."""

    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.impl = ArithImpl()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        head, out, pos, end = _RAW_HEAD.unpack_from, [], 0, len(buffer)
        while end - pos >= 8:
            size, call = head(buffer, pos)
            if end - pos - 8 < size:
                break
            args = orjson.loads(buffer[pos + 8 : pos + 8 + size])
            pos += 8 + size
            coro = self.impl.add(args["a"], args["b"])
            try:
                coro.send(None)
            except StopIteration as done:  # add never waits: its first step is its whole run
                body = orjson.dumps(done.value)
            out.append(_RAW_HEAD.pack(len(body), call) + body)
        self.buffer = buffer[pos:]
        if out and self.transport is not None:
            self.transport.write(b"".join(out))


@asynccontextmanager
async def serve_raw() -> AsyncIterator[str]:
    """raw-tcp's server on 127.0.0.1:0."""
    server = await asyncio.get_running_loop().create_server(_RawServerProtocol, HOST, 0)
    try:
        yield f"tcp://{HOST}:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


class _RawClientProtocol(asyncio.Protocol):
    """raw-tcp's client connection: a future per call id; answers resolve them as they are read."""

    def __init__(self) -> None:
        self.buffer = b""
        self.waiting: dict[int, asyncio.Future[int]] = {}

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        head, pos, end = _RAW_HEAD.unpack_from, 0, len(buffer)
        while end - pos >= 8:
            size, call = head(buffer, pos)
            if end - pos - 8 < size:
                break
            future = self.waiting.pop(call)
            if not future.done():
                future.set_result(orjson.loads(buffer[pos + 8 : pos + 8 + size]))
            pos += 8 + size
        self.buffer = buffer[pos:]


@asynccontextmanager
async def raw_client(url: str) -> AsyncIterator[Call]:
    """raw-tcp's client: one connection; each call writes its frame at once and waits for its future."""
    host, _, port = url.removeprefix("tcp://").rpartition(":")
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_connection(_RawClientProtocol, host, int(port))
    ids = iter(range(1, 2**32))
    waiting, write, pack, body = protocol.waiting, transport.write, _RAW_HEAD.pack, orjson.dumps({"a": 1, "b": 2})
    out: list[bytes] = []

    def flush() -> None:
        write(b"".join(out))
        out.clear()

    async def add() -> int:
        call = next(ids)
        future: asyncio.Future[int] = loop.create_future()
        waiting[call] = future
        if len(waiting) == 1:  # nothing else in flight: send now
            write(pack(len(body), call) + body)
        else:  # requests made in one loop turn go out in one write
            if not out:
                loop.call_soon(flush)
            out.append(pack(len(body), call) + body)
        return await future

    try:
        yield add
    finally:
        transport.close()


def serve(peer: str) -> contextlib.AbstractAsyncContextManager[str]:
    """The server of `peer`."""
    peer = peer.removesuffix(UVLOOP)
    for observe in OBSERVED:
        if peer == "kubrpc-tcp" + observe:
            return serve_kubrpc("tcp", observe)
    if peer == "kubrpc-tcp":
        return serve_kubrpc("tcp")
    if peer == "kubrpc-http":
        return serve_kubrpc("http")
    if peer == "grpcio.aio":
        return serve_grpc()
    if peer == "starlette":
        return serve_starlette()
    if peer == "raw-tcp":
        return serve_raw()
    raise ValueError(f"unknown peer {peer!r}")


# --- clients: each yields a function that makes one add(1, 2) call ---------------------------------------------


@asynccontextmanager
async def kubrpc_client(url: str, observe: str = "") -> AsyncIterator[Call]:
    """A typed kubrpc stub over one channel (the transport comes from the URL's scheme), `observe` as for the server."""
    import kubrpc

    options: dict[str, Any] = {}
    if observe == "+metrics":
        from kubrpc.metrics import ClientMetrics

        options["metrics"] = ClientMetrics()
    elif observe == "+tracing":
        from kubrpc.tracing import ClientTracing

        options["interceptors"] = [ClientTracing()]
    async with kubrpc.connect(url, **options) as channel:
        arith = channel.stub(Arith, timeout=CALL_TIMEOUT)
        yield lambda: arith.add(1, 2)


@asynccontextmanager
async def grpc_client(url: str) -> AsyncIterator[Call]:
    """One grpc.aio channel and its unary_unary multicallable for /Arith/add."""
    import grpc

    async with grpc.aio.insecure_channel(url.removeprefix("grpc://")) as channel:
        method = channel.unary_unary("/Arith/add", request_serializer=orjson.dumps, response_deserializer=orjson.loads)
        await channel.channel_ready()

        async def add() -> int:
            return int(await method({"a": 1, "b": 2}, timeout=CALL_TIMEOUT))

        yield add


@asynccontextmanager
async def aiohttp_client(url: str) -> AsyncIterator[Call]:
    """POST /Arith/add with an aiohttp session configured as kubrpc's http transport configures its own."""
    import aiohttp

    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=100, limit_per_host=0, force_close=False),
        timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT, sock_connect=5.0),
        headers={"content-type": "application/json"},
        skip_auto_headers=("User-Agent",),
    )
    target = f"{url}/Arith/add"

    async def add() -> int:
        async with session.post(target, data=orjson.dumps({"a": 1, "b": 2})) as response:
            body = await response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {body[:200]!r}")
        return int(orjson.loads(body))

    async with session:
        yield add


def client(peer: str, url: str) -> contextlib.AbstractAsyncContextManager[Call]:
    """The client of `peer`, connected to `url`."""
    peer = peer.removesuffix(UVLOOP)
    for observe in OBSERVED:
        if peer == "kubrpc-tcp" + observe:
            return kubrpc_client(url, observe)
    if peer in ("kubrpc-tcp", "kubrpc-http"):
        return kubrpc_client(url)
    if peer == "grpcio.aio":
        return grpc_client(url)
    if peer == "starlette":
        return aiohttp_client(url)
    if peer == "raw-tcp":
        return raw_client(url)
    raise ValueError(f"unknown peer {peer!r}")


# --- measurement -------------------------------------------------------------------------------------------------


def percentile(ordered: list[float], q: float) -> float:
    """The nearest-rank q-quantile (0 < q <= 1) of an ascending, non-empty list."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def cpu_seconds(pid: int | None) -> float:
    """CPU time (user + system, every thread) used so far by process `pid`, or by this process if None."""
    if pid is None:
        return time.process_time()
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU time the whole machine has spent busy (every CPU, steal included), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


async def cpu_usage(start: float, stop: float, server_pid: int | None) -> tuple[float, float, float]:
    """CPUs used by the client, the server, and everything else, between perf_counter() times start and stop."""
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    if server_pid is None:
        t0, client0 = time.perf_counter(), cpu_seconds(None)
        await asyncio.sleep(max(0.0, stop - time.perf_counter()))
        return (cpu_seconds(None) - client0) / (time.perf_counter() - t0), math.nan, math.nan
    t0, machine0 = time.perf_counter(), machine_busy_seconds()
    client0, server0 = cpu_seconds(None), cpu_seconds(server_pid)
    await asyncio.sleep(max(0.0, stop - time.perf_counter()))
    elapsed = time.perf_counter() - t0
    client = (cpu_seconds(None) - client0) / elapsed
    server = (cpu_seconds(server_pid) - server0) / elapsed
    machine = (machine_busy_seconds() - machine0) / elapsed
    return client, server, max(0.0, machine - client - server)


async def measure(
    call: Call, concurrency: int, warmup: float, duration: float, server_pid: int | None = None
) -> dict[str, float]:
    """`concurrency` tasks call in a loop for warmup + duration seconds; calls that end in the timed window count."""
    latencies: list[float] = []
    clock = time.perf_counter
    start = clock() + warmup
    stop = start + duration
    usage = asyncio.create_task(cpu_usage(start, stop, server_pid))

    async def worker() -> None:
        record = latencies.append
        while True:
            t0 = clock()
            if await call() != 3:
                raise AssertionError("add(1, 2) != 3")
            t1 = clock()
            if t1 >= stop:
                return
            if t1 >= start:
                record(t1 - t0)

    async with asyncio.timeout(warmup + duration + 2 * CALL_TIMEOUT), asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(worker())
    client_cpu, server_cpu, other_cpu = await usage
    if not latencies:
        raise RuntimeError("no call completed in the timed window")
    latencies.sort()
    return {
        "concurrency": concurrency,
        "calls": len(latencies),
        "seconds": duration,
        "p50_ms": percentile(latencies, 0.50) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
        "client_cpu": client_cpu,
        "server_cpu": server_cpu,
        "other_cpu": other_cpu,
    }


# --- process entry points ----------------------------------------------------------------------------------------


def save(document: str, output: Path | None, quick: bool, default: Path) -> None:
    """Write a results document to `output`, or else to `default` unless this was a --quick run (printed only)."""
    target = output if output is not None else (None if quick else default)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(document)
        print(f"written to {target}", file=sys.stderr)


def pin(cpu: int | None) -> None:
    """Pin this process (and the threads it starts later) to `cpu`, if it exists and there is more than one."""
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        return
    allowed = os.sched_getaffinity(0)
    if cpu in allowed and len(allowed) > 1:
        os.sched_setaffinity(0, {cpu})


ServePeer = Callable[[str], contextlib.AbstractAsyncContextManager[str]]


async def run_server(peer: str, serve_peer: ServePeer = serve) -> None:
    """Serve `peer`, print its URL, and return when stdin reaches EOF (the parent is done or gone) or on SIGTERM."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, done.set)

    class _EofWatcher(asyncio.Protocol):
        def connection_lost(self, exc: Exception | None) -> None:
            done.set()

    transport, _ = await loop.connect_read_pipe(_EofWatcher, sys.stdin)
    try:
        async with serve_peer(peer) as url:
            print(url, flush=True)
            await done.wait()
    finally:
        transport.close()


class PeerFailed(Exception):
    """A server or client process of a peer failed or overran its time."""


async def stop_process(process: asyncio.subprocess.Process, timeout: float = 10.0) -> None:
    """Close the process's stdin (its signal to exit), wait up to `timeout` seconds, then kill it."""
    if process.stdin is not None:
        process.stdin.close()
    try:
        await asyncio.wait_for(process.wait(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()


async def run_client(
    peer: str, url: str, concurrencies: list[int], warmup: float, duration: float, server_pid: int | None
) -> None:
    """Measure `peer` at each concurrency in turn, printing one JSON line each."""
    async with client(peer, url) as call:
        for concurrency in concurrencies:
            result = await measure(call, concurrency, warmup, duration, server_pid)
            print(json.dumps(result), flush=True)


def profiled(main: Callable[[], Any], path: str | None) -> None:
    """Run main(), under cProfile when `path` is given (stats written there)."""
    if path is None:
        main()
        return
    profile = cProfile.Profile()
    try:
        profile.runcall(main)
    finally:
        profile.dump_stats(path)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the server and client processes."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", choices=("serve", "drive"))
    parser.add_argument("peer", choices=PEERS + EXTRA_PEERS)
    parser.add_argument("url", nargs="?")
    parser.add_argument("--cpu", type=int)
    parser.add_argument("--profile", metavar="FILE")
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--server-pid", type=int, help="also report this process's CPU usage (Linux)")
    args = parser.parse_args(argv)
    pin(args.cpu)
    run: Callable[[Any], Any] = asyncio.run
    if args.peer.endswith(UVLOOP):
        import uvloop

        run = uvloop.run
    if args.role == "serve":
        profiled(lambda: run(run_server(args.peer)), args.profile)
    else:
        if args.url is None:
            parser.error("drive needs the server's URL")
        concurrencies = [int(c) for c in args.concurrency.split(",")]
        job = run_client(args.peer, args.url, concurrencies, args.warmup, args.duration, args.server_pid)
        profiled(lambda: run(job), args.profile)


if __name__ == "__main__":
    main()
