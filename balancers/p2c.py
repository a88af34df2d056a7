"""p2c: power of two choices over in-flight calls and a peak latency EWMA, as Finagle and Linkerd do."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence

from kubrpc.endpoint import Endpoint
from kubrpc.status import Status

from ._eligible import unavailable, weighted

__all__ = ("PowerOfTwoChoices",)

# Outcomes that say the endpoint failed, not the call's arguments or the caller: fast ones must not attract calls
# (a crashed handler answering INTERNAL in 0.1 ms drew 98% of the calls before these counted).
_SERVER_FAILURES = frozenset(
    {Status.UNAVAILABLE, Status.INTERNAL, Status.UNKNOWN, Status.DATA_LOSS, Status.RESOURCE_EXHAUSTED}
)


class _Load:
    """What p2c knows about one endpoint (kept across updates while its address stays)."""

    __slots__ = ("cost", "in_flight", "inverse_weight", "penalty", "penalty_stamp", "sampled", "stamp")

    def __init__(self, cost: float, stamp: float) -> None:
        self.cost = cost
        self.stamp = stamp
        self.sampled = False  # until its first answer it is priced by _unsampled()
        self.in_flight = 0
        self.inverse_weight = 1.0
        self.penalty = 0.0
        self.penalty_stamp = stamp


class PowerOfTwoChoices:
    """Picks two distinct endpoints at random and takes the one with the lower load.

    load = latency × (in_flight + 1) / weight, where latency is a peak EWMA (Finagle's PeakEwma,
    Linkerd's tower): a sample above the estimate replaces it at once, a lower one is blended in
    with weight 1 - exp(-Δt / decay), and without samples the estimate decays toward 0 so that an
    idle endpoint is tried again. An endpoint that has not answered yet is priced at `default_latency`
    or at the latest latency measured on any endpoint, whichever is lower, so that a new endpoint is
    tried at once instead of waiting for its guess to decay to what the others measure (scaled-out
    pods would otherwise get nothing from a low-concurrency client). A call that ends in a
    failure of the server (UNAVAILABLE, INTERNAL, UNKNOWN, DATA_LOSS or RESOURCE_EXHAUSTED) adds
    `failure_penalty` seconds to the endpoint's latency, so an endpoint that fails fast does not attract
    traffic; the penalty is kept apart from the latency estimate and fades with time constant
    `penalty_decay` (from 1 s to under 1 ms in about 3.5 s by default), and the next success clears it,
    so a recovered endpoint gets its share back within seconds, however many calls failed before. A
    CANCELLED call says nothing about the endpoint and only ends its in-flight count. Weight 0
    is never picked unless every eligible weight is 0.

    The channel reports calls through `on_start` and `on_finish` (CallFeedback); reports for an
    endpoint that is no longer in the set are ignored.
    """

    def __init__(
        self,
        *,
        rng: random.Random | None = None,
        decay: float = 10.0,
        default_latency: float = 0.1,
        failure_penalty: float = 1.0,
        penalty_decay: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not decay > 0 or not default_latency > 0 or not failure_penalty >= 0 or not penalty_decay > 0:
            raise ValueError("decay, default_latency and penalty_decay must be > 0, failure_penalty >= 0")
        self._random = (rng or random.Random()).random
        self._decay = float(decay)
        self._default_latency = float(default_latency)
        self._failure_penalty = float(failure_penalty)
        self._penalty_decay = float(penalty_decay)
        self._clock = clock
        self._endpoints: tuple[Endpoint, ...] = ()
        self._loads: list[_Load] = []
        self._by_address: dict[tuple[str, int], _Load] = {}
        # The latest estimate measured on any endpoint: the price of endpoints that have not answered yet.
        self._reference = _Load(self._default_latency, clock())

    def update(self, endpoints: Sequence[Endpoint], /) -> None:
        """Replace the endpoint set; what is known about endpoints that stay is kept."""
        ready, weights = weighted(endpoints)
        now = self._clock()
        old = self._by_address
        by_address: dict[tuple[str, int], _Load] = {}
        loads: list[_Load] = []
        for ep, w in zip(ready, weights, strict=True):
            key = (ep.host, ep.port)
            load = old.get(key) or _Load(self._default_latency, now)
            load.inverse_weight = 1.0 / w
            by_address[key] = load
            loads.append(load)
        self._endpoints, self._loads, self._by_address = ready, loads, by_address

    def pick(self) -> Endpoint:
        """The less loaded of two distinct random endpoints, in O(1)."""
        endpoints = self._endpoints
        n = len(endpoints)
        if n < 2:
            if n:
                return endpoints[0]
            raise unavailable()
        i = int(self._random() * n)
        j = int(self._random() * (n - 1))
        if j >= i:
            j += 1
        a, b = self._loads[i], self._loads[j]
        now = self._clock()
        decay = self._decay
        latency_a = a.cost * math.exp((a.stamp - now) / decay) if a.sampled else self._unsampled(now)
        latency_b = b.cost * math.exp((b.stamp - now) / decay) if b.sampled else self._unsampled(now)
        if a.penalty:
            latency_a += self._penalty(a, now)
        if b.penalty:
            latency_b += self._penalty(b, now)
        cost_a = latency_a * (a.in_flight + 1) * a.inverse_weight
        cost_b = latency_b * (b.in_flight + 1) * b.inverse_weight
        return endpoints[i] if cost_a <= cost_b else endpoints[j]

    def _unsampled(self, now: float) -> float:
        """The price of an endpoint that has not answered yet: optimistic, so that it is tried soon."""
        ref = self._reference
        return min(self._default_latency, ref.cost * math.exp((ref.stamp - now) / self._decay))

    def _penalty(self, load: _Load, now: float) -> float:
        """What is left of `load`'s failure penalty at `now` (0 once it has faded below a microsecond)."""
        penalty = load.penalty * math.exp(min(load.penalty_stamp - now, 0.0) / self._penalty_decay)
        if penalty < 1e-6:
            load.penalty = penalty = 0.0
        return penalty

    def on_start(self, endpoint: Endpoint, /) -> None:
        """A call to `endpoint` started."""
        load = self._by_address.get((endpoint.host, endpoint.port))
        if load is not None:
            load.in_flight += 1

    def on_finish(self, endpoint: Endpoint, /, *, status: Status, latency: float) -> None:
        """A call to `endpoint` ended with `status` after `latency` seconds; update its estimate."""
        load = self._by_address.get((endpoint.host, endpoint.port))
        if load is None:
            return
        if load.in_flight > 0:
            load.in_flight -= 1
        if status is Status.CANCELLED or not 0.0 <= latency < math.inf:
            return
        now = self._clock()
        if status in _SERVER_FAILURES:  # a failure's latency says little: penalise, fading fast
            if self._failure_penalty:
                load.penalty = self._failure_penalty  # not summed: a burst costs no more than one failure
                load.penalty_stamp = now
            return
        load.penalty = 0.0  # it answered: healthy again
        if not load.sampled:  # its first answer: start from what it measured, not from the borrowed price
            load.sampled = True
            load.cost, load.stamp = latency, now
        else:
            weight = math.exp(min(load.stamp - now, 0.0) / self._decay)
            estimate = load.cost * weight
            load.cost = latency if latency > estimate else estimate + latency * (1.0 - weight)
            load.stamp = now
        ref = self._reference
        ref.cost, ref.stamp = load.cost, now

    def __repr__(self) -> str:
        in_flight = sum(load.in_flight for load in self._loads)
        return f"<PowerOfTwoChoices [{len(self._endpoints)} ready, {in_flight} in flight]>"
