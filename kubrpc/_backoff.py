"""Jittered exponential backoff, shared by the Kubernetes resolver and connection retries."""

from __future__ import annotations

import random

import anyio

__all__ = ("Backoff",)


class Backoff:
    """Delays that grow by `multiplier` from `initial` up to `maximum`, each spread by +/- `jitter`.

    This is gRPC's connection backoff: the n-th delay is `min(initial * multiplier**n, maximum)`
    scaled by a uniform factor in `[1 - jitter, 1 + jitter]`, so that many clients that lost the
    same server do not come back in lockstep. `reset()` after a success starts over.
    """

    def __init__(
        self,
        *,
        initial: float = 1.0,
        maximum: float = 120.0,
        multiplier: float = 1.6,
        jitter: float = 0.2,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < initial <= maximum:
            raise ValueError(f"backoff needs 0 < initial <= maximum, not initial={initial!r} maximum={maximum!r}")
        if multiplier < 1:
            raise ValueError(f"backoff multiplier must be >= 1, not {multiplier!r}")
        if not 0 <= jitter < 1:
            raise ValueError(f"backoff jitter must be in [0, 1), not {jitter!r}")
        self.initial = initial
        self.maximum = maximum
        self.multiplier = multiplier
        self.jitter = jitter
        self._rng = rng or random.Random()
        self._base = initial
        self.attempts = 0

    def next_delay(self) -> float:
        """The delay before the next attempt; advances the sequence."""
        base = self._base
        self._base = min(base * self.multiplier, self.maximum)
        self.attempts += 1
        return base * self._rng.uniform(1 - self.jitter, 1 + self.jitter)

    async def sleep(self) -> float:
        """Sleep for `next_delay()` seconds and return how long that was."""
        delay = self.next_delay()
        await anyio.sleep(delay)
        return delay

    def reset(self) -> None:
        """Start again from `initial` (call after a success)."""
        self._base = self.initial
        self.attempts = 0

    def __repr__(self) -> str:
        return (
            f"<Backoff {self.initial:g}s..{self.maximum:g}s x{self.multiplier:g} "
            f"+/-{self.jitter:.0%} attempts={self.attempts}>"
        )
