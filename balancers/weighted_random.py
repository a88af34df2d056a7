"""weighted_random: endpoint i with probability w_i / sum(w), by bisection over cumulative weights."""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Sequence

from kubrpc.endpoint import Endpoint

from ._eligible import unavailable, weighted

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
        ready, weights = weighted(endpoints)
        self._endpoints = ready
        self._cumulative = list(itertools.accumulate(weights))
        self._total = self._cumulative[-1] if ready else 0.0

    def pick(self) -> Endpoint:
        """A weighted random endpoint, in O(log n)."""
        endpoints = self._endpoints
        if not endpoints:
            raise unavailable()
        # random() < 1 and the total is a normal float (the largest weight is scaled into
        # [0.5, 1)), so the rounded product stays below the total and the index is in range.
        return endpoints[bisect.bisect_right(self._cumulative, self._random() * self._total)]

    def __repr__(self) -> str:
        return f"<WeightedRandom [{len(self._endpoints)} ready]>"
