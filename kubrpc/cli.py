"""The `kubrpc` command: serve, call, list, describe (grpcurl's trio), resolve, proto, and a demo.

Options also come from the environment (flags win): KUBRPC_BIND (serve's listen URLs, comma-separated),
KUBRPC_WORKERS (serve's worker processes), KUBRPC_LOG_LEVEL, KUBRPC_ACCESS_LOG (1: log every call),
KUBRPC_TIMEOUT (seconds, for call, list and describe).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from contextlib import aclosing
from urllib.parse import urlsplit

import anyio

from ._cli_call import _Fail, _one_line
from ._version import __version__
from .server import Server, event_loop_options

__all__ = ("main",)

DEFAULT_BIND = "tcp://127.0.0.1:9000"
_LEVELS = ("debug", "info", "warning", "error", "critical")


class _Help(argparse.HelpFormatter):
    """Shows an option's default when it has one worth showing (not None, False or empty)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and "default" not in text and action.default not in (None, False, [], "==SUPPRESS=="):
            text += " (default: %(default)s)"
        return text


def _parser() -> argparse.ArgumentParser:
    env = os.environ
    # -v and --log-level are accepted before and after the subcommand: SUPPRESS keeps a subcommand's
    # default from overwriting what was given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log at INFO level")
    common.add_argument(
        "--log-level",
        choices=_LEVELS,
        type=str.lower,
        default=argparse.SUPPRESS,
        help="log level (default: $KUBRPC_LOG_LEVEL, else warning)",
    )
    parser = argparse.ArgumentParser(
        prog="kubrpc",
        description="Typed asyncio RPC for Python services on Kubernetes.",
        epilog="Environment: KUBRPC_BIND, KUBRPC_WORKERS, KUBRPC_LOG_LEVEL, KUBRPC_ACCESS_LOG, KUBRPC_TIMEOUT "
        "(flags win).",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"kubrpc {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=help,
            description=help,
            parents=[common],
            formatter_class=_Help,
        )

    serve = command("serve", "serve MODULE:SERVER until SIGTERM/SIGINT, then drain")
    serve.add_argument(
        "server", help="import path of a kubrpc.Server, e.g. myapp.service:server (default attr: server)"
    )
    serve.add_argument(
        "--bind",
        action="append",
        metavar="URL",
        help=f"tcp://HOST:PORT or http://HOST:PORT, repeatable (default: $KUBRPC_BIND, else {DEFAULT_BIND}; "
        "in a pod bind 0.0.0.0)",
    )
    serve.add_argument(
        "--access-log",
        action="store_true",
        default=env.get("KUBRPC_ACCESS_LOG", "") not in ("", "0", "false", "no"),
        help="log one line per call: peer, path, status, duration ($KUBRPC_ACCESS_LOG=1)",
    )
    serve.add_argument(
        "--workers",
        type=_worker_count,
        default=None,
        metavar="N",
        help="serve from N processes that share the ports; SIGTERM drains them all (default: $KUBRPC_WORKERS, else 1)",
    )

    call = command(
        "call",
        "call one method and print its JSON result; a stream of results prints one JSON line per message, "
        "a stream of requests reads one JSON message per line from stdin (until EOF)",
    )
    _connection_options(call)
    call.add_argument("method", metavar="METHOD", help="Service/method or Service.method (wire names)")
    call.add_argument("arguments", nargs="?", default=None, metavar="JSON", help="a JSON object of named arguments")
    call.add_argument("-d", "--data", help="the arguments: JSON, @FILE, or - for stdin (instead of JSON)")

    listing = command("list", "list the services of a server, or the methods of one")
    _connection_options(listing)
    listing.add_argument("service", nargs="?", metavar="SERVICE")

    describe = command("describe", "show the signatures and JSON schemas of a server's services or of one method")
    _connection_options(describe)
    describe.add_argument("name", nargs="?", metavar="SERVICE[/METHOD]")
    describe.add_argument("--json", action="store_true", help="print the OpenAPI fragment as JSON")

    resolve = command("resolve", "print the live endpoint set of a target as it changes")
    resolve.add_argument("target")
    resolve.add_argument("--count", type=int, default=0, help="stop after this many snapshots (0: never)")

    proto = command("proto", "print the proto3 schema of MODULE:ATTR, a kubrpc.Server or a service Protocol")
    proto.add_argument("target", metavar="MODULE:ATTR", help="e.g. myapp.service:server (default attr: server)")
    proto.add_argument("-o", "--out", metavar="DIR", help="write one PACKAGE.proto per protobuf package into DIR")

    demo = command("demo", "start 3 local servers (weights 1/2/5) and draw how each balancer spreads calls")
    demo.add_argument("--calls", type=int, default=4000, help="calls per balancer")
    demo.add_argument("--concurrency", type=int, default=32, help="calls in flight at once")
    demo.add_argument("--transport", default="tcp", choices=["tcp", "http", "inproc"])
    return parser


def _connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help="tcp://HOST:PORT, http(s)://HOST:PORT, static://..., k8s://SVC.NS:PORT")
    parser.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        metavar="'KEY: VALUE'",
        help="metadata (HTTP header or TCP frame metadata), repeatable: -H 'authorization: Bearer TOKEN'",
    )
    parser.add_argument("--transport", default=None, help="tcp or http (default: from the target's scheme, else tcp)")
    parser.add_argument("--balancer", default="round_robin", help="balancer name")
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds (default: $KUBRPC_TIMEOUT, else 10; a stream call has no deadline unless given: Ctrl-C ends it)",
    )
    parser.add_argument("--cacert", metavar="FILE", help="TLS: verify the server against this CA bundle")
    parser.add_argument("--cert", metavar="FILE", help="TLS: client certificate (mutual TLS)")
    parser.add_argument("--key", metavar="FILE", help="TLS: the client certificate's private key")
    parser.add_argument("--insecure", action="store_true", help="TLS: do not verify the server's certificate")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line, parsed; for call, list and describe, `timeout` resolved and `stream_timeout` set.

    `stream_timeout` is the deadline of a stream call: only what --timeout or $KUBRPC_TIMEOUT says, since a
    stream (a watch) may rightly run until the user ends it.
    """
    args = _parser().parse_args(argv)
    if args.command in ("call", "list", "describe"):
        given = os.environ.get("KUBRPC_TIMEOUT")
        if args.timeout is None and given is not None:
            try:
                args.timeout = float(given)
            except ValueError:
                pass  # main() says so
        args.stream_timeout = args.timeout
        if args.timeout is None:
            args.timeout = 10.0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parse(argv)
    level = getattr(args, "log_level", None) or os.environ.get("KUBRPC_LOG_LEVEL", "").lower() or "warning"
    if getattr(args, "verbose", False) and level == "warning":
        level = "info"
    if level not in _LEVELS:
        print(f"kubrpc: bad KUBRPC_LOG_LEVEL {level!r}: expected one of {', '.join(_LEVELS)}", file=sys.stderr)
        return 2
    try:
        float(os.environ.get("KUBRPC_TIMEOUT", "10"))
    except ValueError:
        print(f"kubrpc: bad KUBRPC_TIMEOUT {os.environ['KUBRPC_TIMEOUT']!r}: expected seconds", file=sys.stderr)
        return 2
    logging.basicConfig(level=level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "serve":
            workers = args.workers or _env_workers()
            return _serve(args.server, args.bind or _env_binds(), args.access_log, workers)
        if args.command in ("call", "list", "describe"):
            from . import _cli_call

            run = {"call": _cli_call.call, "list": _cli_call.list_services, "describe": _cli_call.describe}
            try:
                return anyio.run(run[args.command], args)
            except KeyboardInterrupt:  # Ctrl-C: the call was cancelled (a stream too, on the server); no traceback
                return 130
        if args.command == "proto":
            return _proto(args.target, args.out)
        if args.command == "demo":
            from ._cli_demo import demo

            options = event_loop_options()
            return anyio.run(demo, args.calls, args.concurrency, args.transport, backend_options=options)
        return anyio.run(_resolve, args.target, args.count, level in ("debug", "info"))
    except _Fail as exc:
        print(f"kubrpc: {_one_line(str(exc))}", file=sys.stderr)
        return exc.status
    except (BrokenPipeError, BaseExceptionGroup) as exc:  # `kubrpc demo | head`: stop quietly, as cat does
        if isinstance(exc, BaseExceptionGroup) and exc.split(BrokenPipeError)[1] is not None:
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141


def _env_binds() -> list[str]:
    binds = os.environ.get("KUBRPC_BIND", "").replace(",", " ").split()
    return binds or [DEFAULT_BIND]


def _worker_count(text: str) -> int:
    """--workers: a whole number >= 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a number of worker processes >= 1, not {text!r}")
    return int(text)


def _env_workers() -> int:
    text = os.environ.get("KUBRPC_WORKERS", "").strip()
    if not text:
        return 1
    try:
        return _worker_count(text)
    except argparse.ArgumentTypeError as exc:
        raise _Fail(f"bad KUBRPC_WORKERS: {exc}", 2) from None


def _check_bind(url: str) -> None:
    """A listen URL `kubrpc serve` can use, else _Fail saying what is wrong with it."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _Fail(f"bad --bind {url!r}: {exc}") from None
    if parts.scheme == "https":
        raise _Fail(
            f"bad --bind {url!r}: https needs a TLS context; serve it from Python with server.serve(url, ssl=...)"
        )
    if parts.scheme not in ("tcp", "http") or not parts.hostname or port is None or parts.path not in ("", "/"):
        raise _Fail(f"bad --bind {url!r}: expected tcp://HOST:PORT or http://HOST:PORT (port 0: any free port)")


def _load_server(spec: str) -> Server:
    """The Server at MODULE:ATTR (ATTR defaults to `server`), imported from the current directory."""
    where, server = _load(spec)
    if not isinstance(server, Server):
        raise _Fail(f"{where} is not a kubrpc.Server (its type is {type(server).__name__})")
    return server


def _load(spec: str) -> tuple[str, object]:
    """`MODULE:ATTR` (ATTR defaults to `server`) and the object there, imported from the current directory."""
    module_name, _, attr = spec.partition(":")
    attr = attr or "server"
    if not module_name or not attr.isidentifier():
        raise _Fail(f"bad server {spec!r}: expected MODULE:ATTR, e.g. myapp.service:server")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise  # a module the user's module imports is missing: its traceback says where
        raise _Fail(f"cannot import {module_name!r}: no module named {exc.name!r} (from {os.getcwd()})") from None
    try:
        return f"{module_name}:{attr}", getattr(module, attr)
    except AttributeError:
        raise _Fail(f"module {module_name!r} has no attribute {attr!r}") from None


def _proto(spec: str, out: str | None) -> int:
    """Print the proto3 schema of a Server or a Protocol, or write one file per package into `out`."""
    from . import proto

    where, target = _load(spec)
    if not isinstance(target, Server | type):
        raise _Fail(f"{where} is not a kubrpc.Server or a service Protocol (its type is {type(target).__name__})")
    try:
        if out is None:
            print(proto.render(target), end="")
            return 0
        files = proto.render_files(target)
    except (TypeError, ValueError) as exc:
        raise _Fail(f"cannot render {where} as protobuf: {exc}") from None
    for name, text in files.items():
        try:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, name), "w", encoding="utf-8") as file:
                file.write(text)
        except OSError as exc:
            raise _Fail(f"cannot write {os.path.join(out, name)}: {exc.strerror or exc}") from None
        print(os.path.join(out, name))
    return 0


def _serving(spec: str, access_log: bool) -> Server:
    """The Server at `spec`, with the access log if asked for."""
    server = _load_server(spec)
    if access_log:
        from .access_log import AccessLog

        logging.getLogger("kubrpc.access").setLevel(logging.INFO)
        server.interceptors = (AccessLog(), *server.interceptors)  # first: it sees rejected calls too
    return server


def _serve(spec: str, binds: list[str], access_log: bool, workers: int = 1) -> int:
    for url in binds:
        _check_bind(url)

    def ready(urls: list[str]) -> None:
        print("serving on " + " ".join(urls), flush=True)

    if workers > 1:  # each worker imports the module itself (kubrpc._workers); the supervisor never does
        from ._workers import WorkerStartupError, supervise

        load = functools.partial(_serving, spec, access_log)
        try:
            options = event_loop_options()
            return supervise(load, binds, workers, ready=ready, expected=(_Fail, OSError), backend_options=options)
        except WorkerStartupError as exc:
            raise _Fail(f"a worker failed to start: {_one_line(str(exc))}") from None
        except OSError as exc:  # address in use, no such host, permission denied
            raise _Fail(str(exc.strerror or exc)) from None
    server = _serving(spec, access_log)
    try:
        anyio.run(functools.partial(server.serve_forever, *binds, ready=ready), backend_options=event_loop_options())
    except OSError as exc:  # address in use, no such host, permission denied
        raise _Fail(str(exc.strerror or exc)) from None
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
