"""zone_aware: prefer endpoints in the client's zone while enough of them are ready."""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal

from kubrpc.endpoint import Endpoint
from kubrpc.interfaces import Balancer

from ._eligible import eligible
from ._wrapped import Wrapper

__all__ = ("FROM_ENV", "ZONE_ENV", "ZoneAware", "zone_from_env")

ZONE_ENV: Final = "KUBRPC_ZONE"
"""The environment variable that names the client's zone (deploy/ sets it from the downward API)."""


class _Zone(enum.Enum):
    FROM_ENV = "from the environment"


FROM_ENV: Final = _Zone.FROM_ENV
"""`ZoneAware(zone=FROM_ENV)`, the default: the zone is read from `$KUBRPC_ZONE`."""


def zone_from_env() -> str:
    """The client's zone from `$KUBRPC_ZONE`; ValueError that says how to set it if it is unset or empty."""
    zone = os.environ.get(ZONE_ENV, "").strip()
    if not zone:
        raise ValueError(
            f"zone_aware: the client's zone is unknown (${ZONE_ENV} is unset or empty). In a pod, set it from "
            "the downward API: env KUBRPC_ZONE, valueFrom.fieldRef.fieldPath "
            "\"metadata.labels['topology.kubernetes.io/zone']\" (Kubernetes 1.35+, or 1.33+ with the "
            "PodTopologyLabelsAdmission feature gate), as deploy/client.yaml does; or set the zone's name; "
            "or pass ZoneAware(zone='eu-west-1a') (zone=None: no zone preference)"
        )
    return zone


class ZoneAware(Wrapper):
    """Feeds the inner balancer only the endpoints of `zone` when enough are ready, else all.

    The zone is used when at least `min_ready` of its endpoints are ready and they are at least
    `min_fraction` of the zone's endpoints in the update (counted by address), so a zone that has
    lost most of its instances does not take all its clients' traffic on the few that remain.
    Endpoints without a zone are never local. `zone=None` disables the preference; by default (`FROM_ENV`,
    also what `balancer="zone_aware"` gets) the zone is read from `$KUBRPC_ZONE`, and a ValueError that says
    how to set it is raised if it is unset.

    A call's `key=` is passed through to the inner balancer (`ring_hash` hashes it; others ignore it).

    Topology hints (Topology Aware Routing): when every endpoint of the update carries a
    `for_zones` hint (the Kubernetes resolver copies EndpointSlice `hints.forZones` into the
    metadata, comma-separated), the local set is instead the endpoints hinted for `zone`,
    used whenever one of them is ready (the EndpointSlice controller has already balanced the
    zones, so `min_ready` and `min_fraction` do not apply). If any endpoint lacks a hint, hints
    are ignored for the whole update, as kube-proxy does.
    """

    def __init__(
        self,
        *,
        zone: str | None | Literal[_Zone.FROM_ENV] = FROM_ENV,
        inner: str | Balancer = "round_robin",
        inner_options: Mapping[str, Any] | None = None,
        min_ready: int = 1,
        min_fraction: float = 0.5,
    ) -> None:
        if min_ready < 1 or not 0.0 <= min_fraction <= 1.0:
            raise ValueError("min_ready must be >= 1 and min_fraction in [0, 1]")
        if zone is FROM_ENV:
            zone = zone_from_env()
        elif zone is not None and (not isinstance(zone, str) or not zone.strip()):
            raise ValueError(f"zone must be a zone's name, None (no preference) or FROM_ENV, not {zone!r}")
        super().__init__(inner, inner_options)
        self.zone: str | None = zone
        self._min_ready = min_ready
        self._min_fraction = min_fraction
        self._local_ready = 0
        self._ready = 0
        self.local = False
        #: True when the last update was routed by topology hints.
        self.hinted = False

    def update(self, endpoints: Sequence[Endpoint], /) -> None:
        """Pass the zone's endpoints (by hint, else by zone), or all of them, to the inner balancer."""
        zone = self.zone
        self.hinted = zone is not None and bool(endpoints) and all("for_zones" in ep.metadata for ep in endpoints)
        if self.hinted:
            local = [ep for ep in endpoints if zone in ep.metadata["for_zones"].split(",")]
            self._local_ready = len(eligible(local))
            self.local = self._local_ready > 0
        else:
            local = [ep for ep in endpoints if zone is not None and ep.zone == zone]
            in_zone = len({(ep.host, ep.port) for ep in local})
            self._local_ready = len(eligible(local))
            self.local = self._local_ready >= max(self._min_ready, self._min_fraction * in_zone)
        self._ready = len(eligible(endpoints))
        self.inner.update(local if self.local else endpoints)

    def pick(self) -> Endpoint:
        """The inner balancer's pick among the endpoints chosen at the last update."""
        return self.inner.pick()

    def __repr__(self) -> str:
        mode = ("hinted " if self.hinted else "") + ("local" if self.local else "all zones")
        return (
            f"<ZoneAware zone={self.zone!r} [{self._local_ready} of {self._ready} ready in zone | {mode}]"
            f" inner={self.inner!r}>"
        )
