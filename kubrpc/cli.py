"""The `kubrpc` command: demo, serve, call, resolve."""

from __future__ import annotations

import argparse
import collections
import functools
import importlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack, aclosing
from typing import Protocol

import anyio
import orjson

from .client import connect
from .errors import RpcError
from .server import Server, event_loop_options

__all__ = ("main",)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="kubrpc", description="Typed asyncio RPC for Python services on Kubernetes.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="start 3 local servers (weights 1/2/5) and balance calls over them")
    demo.add_argument("--calls", type=int, default=4000, help="calls per balancer (default 4000)")
    demo.add_argument("--concurrency", type=int, default=32, help="calls in flight at once (default 32)")
    demo.add_argument("--transport", default="tcp", choices=["tcp", "http"])

    serve = commands.add_parser("serve", help="serve MODULE:SERVER until SIGTERM/SIGINT")
    serve.add_argument("server", help="import path of a kubrpc.Server, e.g. myapp.service:server")
    serve.add_argument("--bind", action="append", default=[], help="tcp://HOST:PORT or http://HOST:PORT (repeatable)")

    call = commands.add_parser("call", help="call one method and print the JSON result")
    call.add_argument("target", help="tcp://HOST:PORT, http://HOST:PORT, static://..., k8s://SVC.NS:PORT")
    call.add_argument("method", help="Service.method")
    call.add_argument("arguments", nargs="?", default="{}", help="a JSON object of named arguments")
    call.add_argument("--transport", choices=["tcp", "http"], default=None)
    call.add_argument("--timeout", type=float, default=10.0)

    resolve = commands.add_parser("resolve", help="print the live endpoint set of a target as it changes")
    resolve.add_argument("target")
    resolve.add_argument("--count", type=int, default=0, help="stop after this many snapshots (0: never)")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.command == "demo":
        return anyio.run(_demo, args.calls, args.concurrency, args.transport, backend_options=event_loop_options())
    if args.command == "serve":
        return _serve(args.server, args.bind)
    if args.command == "call":
        return anyio.run(_call, args.target, args.method, args.arguments, args.transport, args.timeout)
    return anyio.run(_resolve, args.target, args.count, args.verbose)


def _serve(spec: str, binds: list[str]) -> int:
    module_name, _, attr = spec.partition(":")
    sys.path.insert(0, os.getcwd())
    server = getattr(importlib.import_module(module_name), attr or "server")
    if not isinstance(server, Server):
        print(f"kubrpc: {spec} is not a kubrpc.Server", file=sys.stderr)
        return 2

    def ready(urls: list[str]) -> None:
        print("serving on " + " ".join(urls), flush=True)

    serve = functools.partial(server.serve_forever, *(binds or ["tcp://0.0.0.0:9000"]), ready=ready)
    anyio.run(serve, backend_options=event_loop_options())
    return 0


async def _call(target: str, method: str, arguments: str, transport: str | None, timeout: float) -> int:
    service, dot, name = method.rpartition(".")
    if not dot or not service:
        print("kubrpc: METHOD must be Service.method", file=sys.stderr)
        return 2
    try:
        orjson.loads(arguments)
    except orjson.JSONDecodeError as exc:
        print(f"kubrpc: arguments are not valid JSON: {exc}", file=sys.stderr)
        return 2
    async with connect(target, transport=transport) as channel:
        try:
            result = await channel.call(f"{service}/{name}", arguments.encode(), timeout=timeout)
        except RpcError as exc:
            print(orjson.dumps(exc.to_json()).decode(), file=sys.stderr)
            return 1
    print(orjson.dumps(orjson.loads(result), option=orjson.OPT_INDENT_2).decode())
    return 0


async def _resolve(target: str, count: int, verbose: bool = False) -> int:
    """Print each snapshot; problems (no kubeconfig, 403, no such port...) as one `kubrpc:` line each on stderr.

    Exits 1 on a permanent problem, 2 on a bad target; never prints a traceback.
    """
    from .interfaces import ResolverDiagnostics
    from .resolvers import create

    try:
        resolver = create(target)
    except (ValueError, TypeError) as exc:
        print(f"kubrpc: {exc}", file=sys.stderr)
        return 2
    if not verbose:  # the problem lines below say it once; the resolver's retry warnings would repeat it
        logging.getLogger("kubrpc.resolvers").setLevel(logging.ERROR)
    diagnostics = resolver if isinstance(resolver, ResolverDiagnostics) else None
    printed: set[str] = set()
    status = 0

    def report(problem: str) -> None:
        problem = " ".join(problem.split())
        if problem not in printed:
            printed.add(problem)
            print(f"kubrpc: {problem}", file=sys.stderr, flush=True)

    async def watch_problems(scope: anyio.CancelScope) -> None:
        nonlocal status
        assert diagnostics is not None
        while True:
            problem = diagnostics.problem
            if problem:
                report(problem)
                if diagnostics.problem_is_permanent:
                    status = 1
                    scope.cancel()
                    return
            await anyio.sleep(0.1)

    async def follow(scope: anyio.CancelScope) -> None:
        nonlocal status
        seen = 0
        try:
            async with aclosing(resolver.watch()) as snapshots:  # type: ignore[type-var]
                async for endpoints in snapshots:
                    stamp = time.strftime("%H:%M:%S")
                    ready = sum(1 for ep in endpoints if ep.ready)
                    print(f"{stamp} {len(endpoints)} endpoints, {ready} ready", flush=True)
                    for ep in endpoints:
                        print(f"  {ep!r} {dict(ep.metadata)}", flush=True)
                    seen += 1
                    if count and seen >= count:
                        break
        except Exception as exc:  # one line, never a traceback
            report(str(exc) if isinstance(exc, RuntimeError) else f"{type(exc).__name__}: {exc}")
            status = 1
        scope.cancel()

    try:
        async with anyio.create_task_group() as tasks:
            if diagnostics is not None:
                tasks.start_soon(watch_problems, tasks.cancel_scope)
            tasks.start_soon(follow, tasks.cancel_scope)
    finally:
        await resolver.aclose()
    return status


class Demo(Protocol):
    """The demo's service: each server answers with its own name."""

    async def whoami(self) -> str: ...


class _DemoImpl:
    def __init__(self, name: str) -> None:
        self.name = name

    async def whoami(self) -> str:
        return self.name


async def _demo_worker(stub: Demo, counts: collections.Counter[str], n: int) -> None:
    for _ in range(n):
        counts[await stub.whoami()] += 1


async def _demo(calls: int, concurrency: int, transport: str) -> int:
    from .balancers import names as balancer_names
    from .endpoint import Endpoint

    weights = {"a": 1.0, "b": 2.0, "c": 5.0}
    async with AsyncExitStack() as stack:
        endpoints = []
        for name, weight in weights.items():
            server = Server()
            server.register(Demo, _DemoImpl(name))
            listener = await stack.enter_async_context(server.serve(f"{transport}://127.0.0.1:0"))
            host, _, port = listener.url.partition("://")[2].rpartition(":")
            endpoints.append(Endpoint(host, int(port), weight=weight, metadata={"name": name}))
        total = sum(weights.values())
        print(f"3 {transport} servers on 127.0.0.1, weights " + ", ".join(f"{n}={w:g}" for n, w in weights.items()))
        available = balancer_names()
        for balancer in [b for b in ("round_robin", "weighted_random", "smooth_weighted", "p2c") if b in available]:
            counts: collections.Counter[str] = collections.Counter()
            async with connect(endpoints, transport=transport, balancer=balancer) as channel:
                stub = channel.stub(Demo, timeout=10)
                await stub.whoami()  # connect before timing
                started = time.perf_counter()
                per_worker = calls // concurrency

                async with anyio.create_task_group() as tg:
                    for i in range(concurrency):
                        tg.start_soon(_demo_worker, stub, counts, per_worker + (1 if i < calls % concurrency else 0))
                elapsed = time.perf_counter() - started
            print(f"\n{balancer}: {calls} calls in {elapsed:.2f} s = {calls / elapsed:,.0f} calls/s")
            print("  endpoint  weight  calls   share   expected")
            for name, weight in weights.items():
                if balancer == "p2c":
                    expected = "by load"  # p2c follows in-flight calls and latency, not weights
                else:
                    expected = f"{1 / len(weights) if balancer == 'round_robin' else weight / total:6.1%}"
                share = counts[name] / calls
                print(f"  {name:8}  {weight:6g}  {counts[name]:5d}  {share:6.1%}   {expected}")
    return 0
