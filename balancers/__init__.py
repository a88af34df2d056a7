"""Load balancers: pick the endpoint for each call from the resolver's latest snapshot.

Built-ins are found by name; third parties register through the `kubrpc.balancers` entry-point
group. Every balancer honours the `kubrpc.interfaces.Balancer` contract.
"""

from __future__ import annotations

from kubrpc._plugins import Registry
from kubrpc.interfaces import Balancer

__all__ = ("Balancer", "create", "names", "registry")

registry: Registry[Balancer] = Registry(
    "kubrpc.balancers",
    {
        "outlier": "kubrpc.balancers.outlier:OutlierEjection",
        "p2c": "kubrpc.balancers.p2c:PowerOfTwoChoices",
        "ring_hash": "kubrpc.balancers.ring_hash:RingHash",
        "round_robin": "kubrpc.balancers.round_robin:RoundRobin",
        "smooth_weighted": "kubrpc.balancers.smooth_weighted:SmoothWeighted",
        "weighted_random": "kubrpc.balancers.weighted_random:WeightedRandom",
        "zone_aware": "kubrpc.balancers.zone_aware:ZoneAware",
    },
)


create = registry.create
names = registry.names
