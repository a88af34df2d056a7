"""smooth_weighted: nginx's smooth weighted round-robin, a deterministic interleaving by weight."""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence

from kubrpc.endpoint import Endpoint

from ._eligible import unavailable, weighted

__all__ = ("SmoothWeighted",)

# Fold the step counter into the stored offsets this often, so current weights stay small floats.
_REBASE_EVERY = 1 << 20


class _Group:
    """The endpoints that share one weight: their current weights all grow at the same rate."""

    __slots__ = ("heap", "weight")

    def __init__(self, weight: float) -> None:
        self.weight = weight
        # (-offset, tie, index): current weight = step * weight + offset; the heap top is the
        # largest current weight in the group, ties going to the smallest tie rank.
        self.heap: list[tuple[float, int, int]] = []


class SmoothWeighted:
    """nginx's smooth weighted round-robin: each pick adds w_i to every current weight c_i, picks
    the largest c_i (ties to the earliest endpoint) and subtracts the total weight from it.

    With integer weights and a fixed endpoint set, any sum(w) consecutive picks choose endpoint i
    exactly w_i times, spread out (weights 5, 1, 1 pick a a b a c a a). Endpoints with weight 0
    are never picked, unless every eligible weight is 0: then all count as 1 and this is plain
    round-robin. Each client breaks ties in the endpoint order rotated by a random offset, so
    clients do not move in lockstep. An update keeps the current weight of each endpoint that
    stays (new ones start at 0, then all shift so they sum to 0 again), so frequent updates do not
    restart the schedule. A pick costs O(d + log n) for d distinct weights (usually 1 or 2).
    """

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._offset = (rng or random.Random()).randrange(1 << 30)
        self._endpoints: tuple[Endpoint, ...] = ()
        self._groups: list[_Group] = []
        self._group_of: list[_Group] = []
        self._total = 0.0
        self._step = 0

    def update(self, endpoints: Sequence[Endpoint], /) -> None:
        """Replace the endpoint set, keeping the current weight of every endpoint that stays."""
        current = self._current_weights()
        ready, weights = weighted(endpoints)
        n = len(ready)
        kept = [current.get((ep.host, ep.port)) for ep in ready]
        fresh = [0.0 if c is None else c for c in kept]
        if n and (len(current) != n or None in kept):
            # Removed and added endpoints break sum(c) == 0, which bounds how far the schedule
            # strays from the weights; a uniform shift restores it without reordering anyone.
            shift = sum(fresh) / n
            fresh = [c - shift for c in fresh]
        groups: dict[float, _Group] = {}
        group_of: list[_Group] = []
        rotate = self._offset % n if n else 0
        for i, (w, c) in enumerate(zip(weights, fresh, strict=True)):
            group = groups.get(w)
            if group is None:
                group = groups[w] = _Group(w)
            group.heap.append((-c, (i - rotate) % n, i))
            group_of.append(group)
        for group in groups.values():
            heapq.heapify(group.heap)
        self._endpoints, self._groups, self._group_of = ready, list(groups.values()), group_of
        self._total = sum(weights)
        self._step = 0

    def pick(self) -> Endpoint:
        """The endpoint with the largest current weight after adding every weight once."""
        groups = self._groups
        if not groups:
            raise unavailable()
        step = self._step = self._step + 1
        if len(groups) == 1:
            best = groups[0]
        else:
            best = groups[0]
            neg, tie, _ = best.heap[0]
            score = step * best.weight - neg
            for group in groups[1:]:
                g_neg, g_tie, _ = group.heap[0]
                g_score = step * group.weight - g_neg
                if g_score > score or (g_score == score and g_tie < tie):
                    best, score, tie = group, g_score, g_tie
        heap = best.heap
        neg, tie, index = heap[0]
        heapq.heapreplace(heap, (neg + self._total, tie, index))
        if step >= _REBASE_EVERY:
            self._rebase()
        return self._endpoints[index]

    def _current_weights(self) -> dict[tuple[str, int], float]:
        """Each endpoint's current weight c_i as of the last pick, by address."""
        out: dict[tuple[str, int], float] = {}
        for group in self._groups:
            base = self._step * group.weight
            for neg, _, index in group.heap:
                ep = self._endpoints[index]
                out[ep.host, ep.port] = base - neg
        return out

    def _rebase(self) -> None:
        """Fold the step counter into the offsets; the same shift per group keeps each heap valid."""
        for group in self._groups:
            base = self._step * group.weight
            group.heap = [(neg - base, tie, index) for neg, tie, index in group.heap]
        self._step = 0

    def __repr__(self) -> str:
        return f"<SmoothWeighted [{len(self._endpoints)} ready, {len(self._groups)} weight classes]>"
