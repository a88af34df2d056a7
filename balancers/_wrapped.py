"""Shared by the wrapping balancers: build the inner balancer and forward what it supports."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubrpc.endpoint import Endpoint
from kubrpc.interfaces import Balancer, CallFeedback, KeyedBalancer
from kubrpc.status import Status


class Wrapper:
    """A balancer that delegates picks to an inner one, given by name (with options) or instance.

    It always offers `pick_for` and the CallFeedback methods: `pick_for` uses the inner
    balancer's when it has one and its `pick()` otherwise, and feedback is forwarded only to an
    inner balancer that implements CallFeedback.
    """

    def __init__(self, inner: str | Balancer, inner_options: Mapping[str, Any] | None) -> None:
        if isinstance(inner, str):
            from . import create  # the package imports this module lazily, so no cycle at import

            inner = create(inner, **dict(inner_options or {}))
        elif inner_options:
            raise ValueError("inner_options only apply when inner is a balancer name")
        self.inner = inner
        self._feedback = inner if isinstance(inner, CallFeedback) else None
        self._keyed = inner if isinstance(inner, KeyedBalancer) else None

    def pick_for(self, key: str, /) -> Endpoint:
        """The inner balancer's pick for `key`, or its plain pick if it does not hash keys."""
        keyed = self._keyed
        return keyed.pick_for(key) if keyed is not None else self.inner.pick()

    def on_start(self, endpoint: Endpoint, /) -> None:
        """Forward the start of a call to the inner balancer."""
        if self._feedback is not None:
            self._feedback.on_start(endpoint)

    def on_finish(self, endpoint: Endpoint, /, *, status: Status, latency: float) -> None:
        """Forward the end of a call to the inner balancer."""
        if self._feedback is not None:
            self._feedback.on_finish(endpoint, status=status, latency=latency)
