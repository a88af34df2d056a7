"""An access log as a server interceptor: one line per call with its peer, path, status and duration.

    server = kubrpc.Server(interceptors=[AccessLog()])      # `kubrpc serve --access-log` adds it for you

Lines go to the `kubrpc.access` logger at INFO, e.g. `127.0.0.1:50412 arith.Arith/add OK 0.21 ms`.
Calls of unknown services or methods are answered before any interceptor runs, so they are not in it.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .errors import RpcError
from .interceptors import CallInfo, Proceed

__all__ = ("AccessLog",)


class AccessLog:
    """Server interceptor: logs `peer path STATUS duration` for every call, to `logger` at INFO."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger("kubrpc.access")

    async def __call__(self, call: CallInfo, proceed: Proceed, /) -> bytes:
        """Run the call, then log its outcome."""
        start = time.perf_counter()
        status = "INTERNAL"
        try:
            result = await proceed()
            status = "OK"
            return result
        except RpcError as exc:
            status = exc.code.name
            raise
        except asyncio.CancelledError:  # the client went away, or the deadline passed
            late = call.deadline is not None and call.deadline <= time.monotonic()
            status = "DEADLINE_EXCEEDED" if late else "CANCELLED"
            raise
        finally:
            elapsed = (time.perf_counter() - start) * 1000
            self.logger.info("%s %s %s %.2f ms", call.peer or "-", call.path, status, elapsed)

    def __repr__(self) -> str:
        return f"<AccessLog {self.logger.name}>"
