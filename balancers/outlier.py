"""outlier: eject endpoints after consecutive UNAVAILABLE failures, for a growing interval."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kubrpc.endpoint import Endpoint
from kubrpc.interfaces import Balancer
from kubrpc.status import Status

from ._eligible import eligible
from ._wrapped import Wrapper

__all__ = ("OutlierEjection",)

# These end a call without saying anything about the endpoint: the caller gave up.
_NEUTRAL = frozenset({Status.CANCELLED, Status.DEADLINE_EXCEEDED})


class _Health:
    """Failure streak and ejection history of one address."""

    __slots__ = ("ejections", "failures", "returned_at", "until")

    def __init__(self) -> None:
        self.failures = 0
        self.ejections = 0
        self.until = -math.inf
        self.returned_at = -math.inf


class OutlierEjection(Wrapper):
    """Outlier detection (Envoy's consecutive failures) in front of any balancer.

    An endpoint whose calls end in UNAVAILABLE `consecutive_failures` times in a row, as reported
    through `on_finish`, is hidden from the inner balancer for `base_ejection` seconds, doubled on
    each repeat ejection and capped at `max_ejection`; the count of repeats is forgotten once the
    endpoint has stayed in for `max_ejection` seconds. Any other status resets the streak, except
    CANCELLED and DEADLINE_EXCEEDED, which are ignored. At most `max_ejected_fraction` of the
    ready endpoints are out at once (at least one if there are two or more), so never all of
    them. Ejected endpoints come back at the first pick after their interval. Feedback is
    forwarded to the inner balancer whether or not the endpoint is ejected.
    """

    def __init__(
        self,
        *,
        inner: str | Balancer = "round_robin",
        inner_options: Mapping[str, Any] | None = None,
        consecutive_failures: int = 5,
        base_ejection: float = 30.0,
        max_ejection: float = 300.0,
        max_ejected_fraction: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if consecutive_failures < 1:
            raise ValueError("consecutive_failures must be >= 1")
        if not 0 < base_ejection <= max_ejection < math.inf:
            raise ValueError("need 0 < base_ejection <= max_ejection < inf")
        if not 0.0 <= max_ejected_fraction <= 1.0:
            raise ValueError("max_ejected_fraction must be in [0, 1]")
        super().__init__(inner, inner_options)
        self._threshold = consecutive_failures
        self._base = float(base_ejection)
        self._max = float(max_ejection)
        self._fraction = max_ejected_fraction
        self._clock = clock
        self._endpoints: Sequence[Endpoint] = ()
        self._health: dict[tuple[str, int], _Health] = {}
        self._ready = 0
        self._ejected: set[tuple[str, int]] = set()
        self._next_return = math.inf

    @property
    def ejected(self) -> frozenset[tuple[str, int]]:
        """The (host, port) addresses that are ejected now."""
        return frozenset(self._ejected)

    def update(self, endpoints: Sequence[Endpoint], /) -> None:
        """Replace the endpoint set; the failure history of addresses that stay is kept."""
        ready = eligible(endpoints)
        self._endpoints = tuple(endpoints)
        self._ready = len(ready)
        health: dict[tuple[str, int], _Health] = {}
        for ep in ready:
            key = (ep.host, ep.port)
            health[key] = self._health.get(key) or _Health()
        self._health = health
        ejected = [key for key in self._ejected if key in health]
        limit = self._limit()
        if len(ejected) > limit:
            # Fewer endpoints now: let the ones due back soonest return early.
            ejected.sort(key=lambda key: health[key].until, reverse=True)
            now = self._clock()
            for key in ejected[limit:]:
                self._return(health[key], now)
            ejected = ejected[:limit]
        self._ejected = set(ejected)
        self._push()

    def pick(self) -> Endpoint:
        """The inner balancer's pick among the endpoints that are not ejected."""
        if self._ejected and self._next_return <= self._clock():
            self._readmit()
        return self.inner.pick()

    def pick_for(self, key: str, /) -> Endpoint:
        """The inner balancer's pick for `key` among the endpoints that are not ejected."""
        if self._ejected and self._next_return <= self._clock():
            self._readmit()
        return super().pick_for(key)

    def on_finish(self, endpoint: Endpoint, /, *, status: Status, latency: float) -> None:
        """Count the outcome toward ejection, then forward it to the inner balancer."""
        super().on_finish(endpoint, status=status, latency=latency)
        key = (endpoint.host, endpoint.port)
        health = self._health.get(key)
        if health is None or status in _NEUTRAL:
            return
        if status is not Status.UNAVAILABLE:
            health.failures = 0
            return
        health.failures += 1
        if health.failures >= self._threshold and key not in self._ejected and len(self._ejected) < self._limit():
            self._eject(key, health)

    def _limit(self) -> int:
        """How many endpoints may be ejected at once."""
        n = self._ready
        return min(n - 1, max(1, math.floor(self._fraction * n))) if n > 1 else 0

    def _eject(self, key: tuple[str, int], health: _Health) -> None:
        now = self._clock()
        if now - health.returned_at >= self._max:
            health.ejections = 0
        health.ejections += 1
        health.failures = 0
        health.until = now + min(self._base * 2.0 ** min(health.ejections - 1, 64), self._max)
        self._ejected.add(key)
        self._push()

    def _return(self, health: _Health, now: float) -> None:
        health.until = -math.inf
        health.returned_at = now
        health.failures = 0

    def _readmit(self) -> None:
        now = self._clock()
        due = [key for key in self._ejected if self._health[key].until <= now]
        for key in due:
            self._return(self._health[key], now)
        self._ejected.difference_update(due)
        self._push()

    def _push(self) -> None:
        """Give the inner balancer every endpoint that is not ejected."""
        ejected = self._ejected
        kept = [ep for ep in self._endpoints if (ep.host, ep.port) not in ejected] if ejected else self._endpoints
        self._next_return = min((self._health[key].until for key in ejected), default=math.inf)
        self.inner.update(kept)

    def __repr__(self) -> str:
        return f"<OutlierEjection [{len(self._ejected)} of {self._ready} ejected] inner={self.inner!r}>"
