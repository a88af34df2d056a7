"""weighted_random: endpoint i with probability w_i / sum(w), by bisection over cumulative weights."""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Sequence

from kubrpc.endpoint import Endpoint

from ._eligible import eligible, unavailable

__all__ = ("WeightedRandom",)


class WeightedRandom:
    """P(i) = w_i / sum_j w_j; weight 0 is never picked unless all weights are 0 (then uniform)."""

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._random = (rng or random.Random()).random
        self._endpoints: tuple[Endpoint, ...] = ()
        self._cumulative: list[float] = []
        self._total = 0.0

    def update(self, endpoints: Sequence[Endpoint], /) -> None:
        """Replace the endpoint set and rebuild the cumulative weights (O(n))."""
        ready = eligible(endpoints)
        total = sum(ep.weight for ep in ready)
        if total > 0:
            ready = tuple(ep for ep in ready if ep.weight > 0)
            cumulative = list(itertools.accumulate(ep.weight for ep in ready))
        else:
            cumulative = [float(i + 1) for i in range(len(ready))]
        self._endpoints, self._cumulative = ready, cumulative
        self._total = cumulative[-1] if cumulative else 0.0

    def pick(self) -> Endpoint:
        """A weighted random endpoint, in O(log n)."""
        endpoints = self._endpoints
        if not endpoints:
            raise unavailable()
        i = bisect.bisect_right(self._cumulative, self._random() * self._total)
        return endpoints[min(i, len(endpoints) - 1)]

    def __repr__(self) -> str:
        return f"<WeightedRandom [{len(self._endpoints)} ready, total weight {self._total:g}]>"
