"""Helpers for testing kubrpc services: real servers on loopback, hand-set resolvers, a fake Kubernetes API.

Submodules, imported on their own: `kubrpc.testing.balancers` (property tests for any balancer:
`endpoints()`, `assert_distribution()`, `assert_contract()`) and `kubrpc.testing.certs` (TLS material).
"""

from __future__ import annotations

from ..resolvers.static import ManualResolver
from .kube import FakeKubeAPI

__all__ = ("FakeKubeAPI", "ManualResolver")
