"""Fixtures and helpers shared by the Kubernetes resolver tests (tests/test_k8s_*.py).

tests/conftest.py loads this file as a plugin, so that the fixtures `kube` and `no_service_account` reach every
test; each test module builds its own `make` fixture on `resolver_factory`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
from follower import Follower
from kubernetes_asyncio.client import Configuration

from kubrpc.resolvers._k8s_watch import active_watches
from kubrpc.resolvers.k8s import KubernetesResolver, ResolverOptions
from kubrpc.testing.kube import FakeKubeAPI

FAST: ResolverOptions = {"min_backoff": 0.02, "max_backoff": 0.2, "read_timeout": 10.0, "watch_timeout": 30.0}

F = TypeVar("F", bound=Follower)


@pytest.fixture
async def kube() -> AsyncIterator[FakeKubeAPI]:
    """A FakeKubeAPI on 127.0.0.1."""
    async with FakeKubeAPI() as api:
        yield api


@pytest.fixture
def no_service_account(tmp_path: Path) -> Path:
    """An empty service-account folder: no pod namespace, no in-cluster credentials."""
    path = tmp_path / "serviceaccount"
    path.mkdir()
    return path


@asynccontextmanager
async def resolver_factory(
    url: str | None, service_account_dir: Path, **defaults: Any
) -> AsyncIterator[Callable[..., KubernetesResolver]]:
    """Make KubernetesResolvers for the API server at `url` (or the call's `url=`) with FAST, then `defaults`,
    then the call's options. On the way out every one is closed, and no watch may be left behind."""
    made: list[KubernetesResolver] = []

    def factory(
        service: str = "arith",
        port: int | str = "rpc",
        namespace: str = "default",
        *,
        url: str | None = url,
        **options: Any,
    ) -> KubernetesResolver:
        options = {
            "configuration": Configuration(host=url),
            "service_account_dir": service_account_dir,
            **FAST,
            **defaults,
            **options,
        }
        resolver = KubernetesResolver(service, port, namespace, **options)
        made.append(resolver)
        return resolver

    yield factory
    for resolver in made:
        await resolver.aclose()
    assert active_watches() == []


@asynccontextmanager
async def following(
    resolver: KubernetesResolver, follower_type: Callable[[KubernetesResolver], F] = Follower, *, close: bool = True
) -> AsyncIterator[F]:
    """Follow `resolver` in a task. On the way out close the resolver, or (close=False) cancel the follower and
    leave the resolver open (the `make` fixture closes it at the end of the test)."""
    follower = follower_type(resolver)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(follower.run)
        try:
            yield follower
        finally:
            if close:
                await resolver.aclose()
            else:
                tasks.cancel_scope.cancel()
