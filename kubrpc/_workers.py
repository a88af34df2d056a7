"""Pre-fork workers: `Server.run(*urls, workers=N)` and `kubrpc serve --workers N` serve from N processes.

The design is gunicorn's arbiter. The supervisor (the process that was started) binds every listening socket
once, so port 0 becomes one real port that all workers share and the `serving on` line names it; then it forks
N workers, each of which runs `Server.serve_forever` on the inherited sockets (the transports' `sock=` option).
The kernel hands each new connection to whichever worker accepts it first; a connection, and every call on it,
stays with that worker.

Why fork, not multiprocessing's "spawn" or "forkserver":

- The supervisor runs no event loop and starts no thread: it is a synchronous loop over `selectors`, woken by
  signals (`signal.set_wakeup_fd`) and by the workers' status pipes. A fork from it is a fork before any event
  loop exists in the child, which is what makes fork safe with asyncio (and uvloop), and a restart forks from
  the same clean state.
- The Server reaches the workers as it is: `Server.run(workers=N)` works for a Server built in `__main__`, in a
  closure, with any implementation objects, none of which "spawn" could pickle or re-import. Under spawn it
  would need an import path, as uvicorn's `--workers` does.
- The sockets are inherited; nothing to pass.

The constraint: fork copies one thread. A process that has started threads before `run(workers=N)` (a client
library's background thread, an exporter) forks children in which those threads are missing and their locks may
be held: start them in the workers instead. The supervisor logs a warning when it forks with other threads alive.
`kubrpc serve MODULE:ATTR --workers N` imports MODULE in each worker, never in the supervisor, so a module's
import-time threads and connections are each worker's own. Unix only (os.fork).

Lifecycle. A worker reports on a pipe once it serves (or why it could not). SIGTERM or SIGINT to the supervisor
is forwarded to every worker as SIGTERM; each drains as one process does (`shutdown_delay`, then
`drain_timeout`), and the supervisor returns once all have exited: status 1 if one of them failed, else 0. The
supervisor closes its own copies of the sockets when the shutdown begins, so once the workers close theirs the
port refuses connections, as a single process's does. A worker that exits after it served, while no shutdown
is under way (a crash, an OOM kill, a `kill -TERM` of one worker to recycle it), is restarted after a backoff
that grows while its replacements keep dying and resets once one lives `STABLE_AFTER` seconds. A worker that
exits before it serves (a bad import, a broken configuration) stops them all: WorkerStartupError, whose
message is the worker's own. A worker whose supervisor is gone (SIGKILL) drains and exits by itself.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

import anyio

from ._backoff import Backoff

if TYPE_CHECKING:
    from .server import Server

__all__ = ("STABLE_AFTER", "WorkerStartupError", "bind", "supervise")

log = logging.getLogger("kubrpc.workers")

#: Seconds a worker must live for its slot's restart backoff to start over.
STABLE_AFTER = 10.0
#: Schemes a pre-fork worker can serve on a shared socket.
SCHEMES = ("tcp", "http")
_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_BACKLOG = 1024


class WorkerStartupError(RuntimeError):
    """A worker process failed before it served (bad import, broken configuration); all were stopped."""


def bind(url: str) -> socket.socket:
    """A listening TCP socket for `tcp://HOST:PORT` or `http://HOST:PORT` (port 0: any), as the transports bind."""
    parts = urlsplit(url)
    try:
        port = parts.port or 0
    except ValueError as exc:
        raise ValueError(f"bad listen URL {url!r}: {exc}") from None
    if parts.scheme not in SCHEMES or parts.hostname is None:
        raise ValueError(f"workers serve tcp://HOST:PORT and http://HOST:PORT URLs only, not {url!r}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            parts.hostname, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)  # IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted sockets only then
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {url}: {exc.strerror or exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and parts.scheme == "tcp":  # as each transport binds: tcp's create_server is
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # IPv6 only, http's [::] dual-stack
        sock.bind(address)
        sock.listen(_BACKLOG)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {url}: {exc.strerror or exc}") from exc
    return sock


def supervise(
    load: Callable[[], Server],
    urls: Sequence[str],
    workers: int,
    *,
    ready: Callable[[list[str]], None] | None = None,
    expected: tuple[type[BaseException], ...] = (OSError,),
    backend_options: Mapping[str, Any] | None = None,
) -> int:
    """Serve the Server that `load()` returns (called in each worker) from `workers` forked processes.

    Binds `urls` here, calls `ready(urls)` with the bound URLs once every worker serves, and returns once all
    have exited after SIGTERM/SIGINT: 0, or 1 if one failed. Errors of the `expected` types, raised by `load()`
    or while a worker starts, are reported by their message alone, others with their traceback too. Each worker
    runs its event loop with anyio.run's `backend_options` (kubrpc.server.event_loop_options()).
    """
    if not hasattr(os, "fork"):
        raise RuntimeError("workers > 1 need os.fork (Unix)")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, not {workers!r}")
    if not urls:
        raise ValueError("give at least one URL to listen on, e.g. tcp://0.0.0.0:9000")
    socks: list[socket.socket] = []
    try:
        socks.extend(bind(url) for url in urls)  # one at a time: those bound before a failure are closed
        return _Supervisor(load, list(urls), socks, workers, ready, expected, dict(backend_options or {})).run()
    finally:
        for sock in socks:
            sock.close()


@dataclass(eq=False)
class _Worker:
    slot: int
    pid: int
    status: int  # the read end of the worker's status pipe; -1 once closed
    started: float
    ready: bool = False
    error: str | None = None
    buffer: bytes = b""


@dataclass(eq=False)
class _Slot:
    backoff: Backoff = field(default_factory=lambda: Backoff(initial=0.5, maximum=30.0, multiplier=2.0, jitter=0.1))
    restart_at: float | None = None


class _Supervisor:
    """Forks the workers, forwards signals to them, restarts the ones that die; see the module's docstring."""

    def __init__(
        self,
        load: Callable[[], Server],
        urls: list[str],
        socks: list[socket.socket],
        count: int,
        ready: Callable[[list[str]], None] | None,
        expected: tuple[type[BaseException], ...],
        backend_options: dict[str, Any],
    ) -> None:
        self.load = load
        self.backend_options = backend_options
        self.urls = urls
        self.socks = socks
        self.ready = ready
        self.expected = expected
        self.slots = [_Slot() for _ in range(count)]
        self.workers: dict[int, _Worker] = {}  # by pid
        self.bound: list[str] | None = None  # the URLs, once every worker serves
        self.signals: list[int] = []
        self.stopping = False
        self.failure: str | None = None
        self.status = 0
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe()
        self.mask: set[int | signal.Signals] = set()
        self.handlers: dict[signal.Signals, Callable[[int, Any], Any] | int] = {}

    def run(self) -> int:
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        self.selector.register(self.wake_r, selectors.EVENT_READ)
        old_wakeup = signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        old_handlers = {sig: signal.signal(sig, self._on_signal) for sig in (*_SIGNALS, signal.SIGCHLD)}
        self.handlers = {sig: signal.SIG_DFL if handler is None else handler for sig, handler in old_handlers.items()}
        try:
            if threading.active_count() > 1:
                log.warning(
                    "forking %d workers from a process with %d threads: a thread is not copied into a worker, and "
                    "the locks it holds stay held there; start threads in the workers instead",
                    len(self.slots),
                    threading.active_count(),
                )
            for slot in range(len(self.slots)):
                self._spawn(slot)
            self._loop()
        finally:
            for pid in self.workers:  # only after an error here: stop what was started
                _kill(pid, signal.SIGKILL)
            for pid in self.workers:
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
            for sig, handler in self.handlers.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(old_wakeup)
            self._close_fds()
        if self.failure is not None:
            raise WorkerStartupError(self.failure)
        log.info("all workers have exited")
        return self.status

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum != signal.SIGCHLD:  # SIGCHLD only wakes the loop up (set_wakeup_fd); exits are reaped there
            self.signals.append(signum)

    def _loop(self) -> None:
        while True:
            while self.signals:
                self._stop(signal.Signals(self.signals.pop(0)))
            self._reap()
            if self.stopping and not self.workers:
                return
            now = time.monotonic()
            due = [s.restart_at for s in self.slots if s.restart_at is not None]
            for slot, state in enumerate(self.slots):
                if state.restart_at is not None and state.restart_at <= now:
                    state.restart_at = None
                    self._spawn(slot)
            timeout = max(0.0, min(due) - now) if due else None
            for key, _ in self.selector.select(timeout):
                if key.fd == self.wake_r:
                    _drain(self.wake_r)
                else:
                    self._read(key.data)

    def _spawn(self, slot: int) -> None:
        """Fork a worker for `slot`: it serves on the inherited sockets and reports on its status pipe."""
        read, write = os.pipe()
        self.mask = signal.pthread_sigmask(signal.SIG_BLOCK, (*_SIGNALS, signal.SIGCHLD))  # none lost to the fork
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)
            os.close(read)
            os.close(write)
            raise
        if pid == 0:
            os.close(read)
            self._child(slot, write)
        signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)
        os.close(write)
        os.set_blocking(read, False)
        worker = _Worker(slot, pid, read, time.monotonic())
        self.workers[pid] = worker
        self.selector.register(read, selectors.EVENT_READ, worker)
        log.debug("worker %d started (pid %d)", slot, pid)

    def _child(self, slot: int, status: int) -> NoReturn:
        """In a new worker: forget the supervisor's signal handling and fds, then serve; never returns."""
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for sig, handler in self.handlers.items():  # as this process had them: serve_forever sets its own
                signal.signal(sig, handler)
            signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)
            self._close_fds()
            code = _serve_worker(self.load, self.urls, self.socks, status, self.expected, self.backend_options)
        except BaseException:  # reported by _serve_worker; the status says the rest
            pass
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:  # a closed stream: nothing to flush
                    pass
            os._exit(code)

    def _close_fds(self) -> None:
        """Close the supervisor's own fds: the wakeup pipe, the selector and the workers' status pipes."""
        self.selector.close()
        for fd in (self.wake_r, self.wake_w):
            os.close(fd)
        for worker in self.workers.values():
            if worker.status >= 0:
                os.close(worker.status)
                worker.status = -1

    def _read(self, worker: _Worker) -> None:
        """Read what a worker reported: `{"ready": [URL, ...]}` once it serves, or `{"error": MESSAGE}`."""
        try:
            data = os.read(worker.status, 65536)
        except BlockingIOError:
            return
        if not data:
            self._close_status(worker)
            return
        worker.buffer += data
        while b"\n" in worker.buffer:
            line, _, worker.buffer = worker.buffer.partition(b"\n")
            message = json.loads(line)
            if "error" in message:
                worker.error = str(message["error"])
            elif "ready" in message:
                worker.ready = True
                self._ready(worker, [str(url) for url in message["ready"]])

    def _close_status(self, worker: _Worker) -> None:
        if worker.status >= 0:
            self.selector.unregister(worker.status)
            os.close(worker.status)
            worker.status = -1

    def _ready(self, worker: _Worker, urls: list[str]) -> None:
        if self.bound is not None:
            log.info("worker %d serves again (pid %d)", worker.slot, worker.pid)
            return
        if self.stopping or not all(w.ready for w in self.workers.values()) or len(self.workers) < len(self.slots):
            return
        self.bound = urls
        log.info("serving on %s with %d workers (pids %s)", ", ".join(urls), len(self.slots), _pids(self.workers))
        if self.ready is not None:
            self.ready(urls)

    def _reap(self) -> None:
        """Collect the workers that exited: restart, fail fast, or count them, by the state they left in."""
        for pid, worker in list(self.workers.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # reaped by someone else (a SIGCHLD handler of the application's)
                done, status = pid, 0
            if done == 0:
                continue
            del self.workers[pid]
            while worker.status >= 0:  # what it wrote before it exited
                before = worker.status, len(worker.buffer), worker.ready, worker.error
                self._read(worker)
                if (worker.status, len(worker.buffer), worker.ready, worker.error) == before:
                    self._close_status(worker)
            self._exited(worker, os.waitstatus_to_exitcode(status))

    def _exited(self, worker: _Worker, code: int) -> None:
        how = _describe(code)
        if not worker.ready:
            if self.stopping and (code == 0 or -code in _SIGNALS):
                return  # stopped before it served: as asked
            if self.failure is None:
                self.failure = worker.error or f"worker {worker.slot} (pid {worker.pid}) {how} before it served"
                log.error("worker %d (pid %d) failed to start (%s); stopping", worker.slot, worker.pid, how)
                self._stop(None)
            self.status = 1
            return
        if self.stopping:
            if code != 0:
                log.error("worker %d (pid %d) %s while draining", worker.slot, worker.pid, how)
                self.status = 1
            return
        state = self.slots[worker.slot]
        if time.monotonic() - worker.started >= STABLE_AFTER:
            state.backoff.reset()
        delay = state.backoff.next_delay()
        state.restart_at = time.monotonic() + delay
        log.warning("worker %d (pid %d) %s; restarting it in %.1f s", worker.slot, worker.pid, how, delay)

    def _stop(self, signum: signal.Signals | None) -> None:
        """Begin (or press on with) the shutdown: every worker gets SIGTERM, and drains."""
        if not self.stopping:
            self.stopping = True
            if signum is not None:
                log.info("received %s; stopping %d workers", signum.name, len(self.workers))
            for state in self.slots:
                state.restart_at = None
            for sock in self.socks:  # once the workers close theirs, the port refuses connections
                sock.close()
        for pid in self.workers:
            _kill(pid, signal.SIGTERM)


def _serve_worker(
    load: Callable[[], Server],
    urls: Sequence[str],
    socks: Sequence[socket.socket],
    status: int,
    expected: tuple[type[BaseException], ...],
    backend_options: dict[str, Any],
) -> int:
    """A worker's life: load the Server, serve until SIGTERM, drain; returns the exit status."""
    served = False

    def ready(bound: list[str]) -> None:
        nonlocal served
        served = True
        _report(status, {"ready": bound})
        os.close(status)

    try:
        server = load()
        listens = [(url, {"sock": sock}) for url, sock in zip(urls, socks, strict=True)]
        anyio.run(partial(_serve, server, listens, ready, os.getppid()), backend_options=backend_options)
    except BaseException as exc:
        if isinstance(exc, expected):
            message = str(exc)
        else:
            traceback.print_exc()
            message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if not served:
            _report(status, {"error": message})
        elif not isinstance(exc, expected):
            log.error("worker failed: %s", message)
        return 1
    return 0


async def _serve(
    server: Server,
    listens: list[tuple[str, dict[str, socket.socket]]],
    ready: Callable[[list[str]], None],
    parent: int,
) -> None:
    """serve_forever on the inherited sockets; a worker whose supervisor died stops as if told to (SIGTERM)."""
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(_watch_parent, parent)
        await server._serve_forever(listens, ready)
        tasks.cancel_scope.cancel()


async def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:  # noqa: ASYNC110 - nothing tells a process that its parent died; poll
        await anyio.sleep(1.0)
    log.warning("the supervisor (pid %d) is gone; draining", parent)
    os.kill(os.getpid(), signal.SIGTERM)


def _report(fd: int, message: dict[str, object]) -> None:
    try:
        os.write(fd, json.dumps(message).encode() + b"\n")
    except OSError:  # the supervisor is gone
        pass


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _describe(code: int) -> str:
    """How a process ended, from its exit code (negative: the signal that killed it)."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _pids(workers: dict[int, _Worker]) -> str:
    return ", ".join(str(pid) for pid in sorted(workers))
