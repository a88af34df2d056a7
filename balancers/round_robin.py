"""round_robin: each ready endpoint in turn, from a random start."""

from __future__ import annotations

import random
from collections.abc import Sequence

from kubrpc.endpoint import Endpoint

from ._eligible import eligible, unavailable

__all__ = ("RoundRobin",)


class RoundRobin:
    """Exact rotation: any n*k consecutive picks over n endpoints choose each exactly k times."""

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._endpoints: tuple[Endpoint, ...] = ()
        self._next = self._rng.randrange(1 << 30)

    def update(self, endpoints: Sequence[Endpoint], /) -> None:
        """Replace the endpoint set; the rotation continues rather than restarting."""
        old = self._endpoints
        new = eligible(endpoints)
        if old and new:
            # Continue after the endpoint picked last, if it survives; else keep the position.
            last = old[(self._next - 1) % len(old)]
            try:
                self._next = new.index(last) + 1
            except ValueError:
                self._next %= len(new)
        self._endpoints = new

    def pick(self) -> Endpoint:
        """The next endpoint in the rotation."""
        endpoints = self._endpoints
        if not endpoints:
            raise unavailable()
        i = self._next % len(endpoints)
        self._next = i + 1
        return endpoints[i]

    def __repr__(self) -> str:
        return f"<RoundRobin [{len(self._endpoints)} ready]>"
