"""Shared by the balancers: which endpoints may be picked, and the error when none may."""

from __future__ import annotations

import math
from collections.abc import Sequence

from kubrpc.endpoint import Endpoint
from kubrpc.errors import RpcError
from kubrpc.status import Status


def eligible(endpoints: Sequence[Endpoint]) -> tuple[Endpoint, ...]:
    """The ready endpoints, deduplicated by address (the first ready occurrence wins), in order."""
    seen: set[tuple[str, int]] = set()
    out: list[Endpoint] = []
    for ep in endpoints:
        key = (ep.host, ep.port)
        if ep.ready and key not in seen:
            seen.add(key)
            out.append(ep)
    return tuple(out)


def weighted(endpoints: Sequence[Endpoint]) -> tuple[tuple[Endpoint, ...], list[float]]:
    """The eligible endpoints that may take traffic, with their weights scaled into [0, 1).

    Weight 0 is never picked, unless every eligible weight is 0: then all count as weight 1.
    The scale is a power of two, so ratios and ties stay exact; it keeps sums finite and the
    largest weight in [0.5, 1) whatever the absolute weights are.
    """
    ready = eligible(endpoints)
    top = max((ep.weight for ep in ready), default=0.0)
    if top <= 0:
        return ready, [1.0] * len(ready)
    exponent = math.frexp(top)[1]
    # A weight below 2**-1074 of the largest scales to 0 and is dropped: its share is unobservable.
    pairs = [(ep, math.ldexp(ep.weight, -exponent)) for ep in ready]
    kept = [(ep, w) for ep, w in pairs if w > 0]
    return tuple(ep for ep, _ in kept), [w for _, w in kept]


def unavailable() -> RpcError:
    """The error every balancer raises when nothing is eligible."""
    return RpcError(Status.UNAVAILABLE, "no ready endpoint")
