"""zone_aware: prefer endpoints in the client's zone while enough of them are ready."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kubrpc.endpoint import Endpoint
from kubrpc.interfaces import Balancer

from ._eligible import eligible
from ._wrapped import Wrapper

__all__ = ("ZoneAware",)


class ZoneAware(Wrapper):
    """Feeds the inner balancer only the endpoints of `zone` when enough are ready, else all.

    The zone is used when at least `min_ready` of its endpoints are ready and they are at least
    `min_fraction` of the zone's endpoints in the update (counted by address), so a zone that has
    lost most of its instances does not take all its clients' traffic on the few that remain.
    Endpoints without a zone are never local. `zone=None` disables the preference.
    """

    def __init__(
        self,
        *,
        zone: str | None,
        inner: str | Balancer = "round_robin",
        inner_options: Mapping[str, Any] | None = None,
        min_ready: int = 1,
        min_fraction: float = 0.5,
    ) -> None:
        if min_ready < 1 or not 0.0 <= min_fraction <= 1.0:
            raise ValueError("min_ready must be >= 1 and min_fraction in [0, 1]")
        super().__init__(inner, inner_options)
        self.zone = zone
        self._min_ready = min_ready
        self._min_fraction = min_fraction
        self._local_ready = 0
        self._ready = 0
        self.local = False

    def update(self, endpoints: Sequence[Endpoint], /) -> None:
        """Pass the zone's endpoints, or all of them, to the inner balancer."""
        local = [ep for ep in endpoints if self.zone is not None and ep.zone == self.zone]
        in_zone = len({(ep.host, ep.port) for ep in local})
        self._local_ready = len(eligible(local))
        self._ready = len(eligible(endpoints))
        self.local = self._local_ready >= max(self._min_ready, self._min_fraction * in_zone)
        self.inner.update(local if self.local else endpoints)

    def pick(self) -> Endpoint:
        """The inner balancer's pick among the endpoints chosen at the last update."""
        return self.inner.pick()

    def __repr__(self) -> str:
        mode = "local" if self.local else "all zones"
        return (
            f"<ZoneAware zone={self.zone!r} [{self._local_ready} of {self._ready} ready in zone | {mode}]"
            f" inner={self.inner!r}>"
        )
