"""Helpers for testing kubrpc services: real servers on loopback, hand-set resolvers, a fake Kubernetes API."""

from __future__ import annotations

from ..resolvers.static import ManualResolver
from .kube import FakeKubeAPI

__all__ = ("FakeKubeAPI", "ManualResolver")
