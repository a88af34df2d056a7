"""Shared by the balancers: which endpoints may be picked, and the error when none may."""

from __future__ import annotations

from collections.abc import Sequence

from kubrpc.endpoint import Endpoint
from kubrpc.errors import RpcError
from kubrpc.status import Status


def eligible(endpoints: Sequence[Endpoint]) -> tuple[Endpoint, ...]:
    """The ready endpoints, deduplicated by address (the first occurrence wins), in order."""
    seen: set[tuple[str, int]] = set()
    out: list[Endpoint] = []
    for ep in endpoints:
        key = (ep.host, ep.port)
        if ep.ready and key not in seen:
            seen.add(key)
            out.append(ep)
    return tuple(out)


def unavailable() -> RpcError:
    """The error every balancer raises when nothing is eligible."""
    return RpcError(Status.UNAVAILABLE, "no ready endpoint")
