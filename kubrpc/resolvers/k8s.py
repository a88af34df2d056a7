"""The Kubernetes resolver: live EndpointSlices of a Service, from the API server's list+watch.

    k8s://SERVICE[.NAMESPACE][.svc[.DOMAIN]]:PORT

PORT is the name of a Service port (`rpc`) or the endpoints' own port number (the container port,
which is what EndpointSlices list). Without NAMESPACE the pod's own namespace is used (read from
the service account), else `default`. Access is configured as kubectl does it: the in-cluster
service account when KUBERNETES_SERVICE_HOST is set, else KUBECONFIG or ~/.kube/config. RBAC needs
get/list/watch on `endpointslices` in group `discovery.k8s.io` (see deploy/).

kubernetes-asyncio (about 60 MiB and 250 ms to import) is imported when the first watch starts.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Callable, Hashable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self, TypedDict

import anyio

from ..endpoint import Endpoint
from ._k8s_slices import EndpointView, PortSelector
from ._k8s_watch import SliceWatch, WatchOptions, WatchStats, acquire, release

if TYPE_CHECKING:
    from kubernetes_asyncio.client import ApiClient, Configuration
    from typing_extensions import Unpack

__all__ = ("SERVICE_ACCOUNT_DIR", "KubernetesResolver", "ResolverOptions", "parse_target")

#: Where a pod's service account token, CA certificate and namespace are mounted.
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_SERVICE_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


class ResolverOptions(TypedDict, total=False):
    """The keyword options of `KubernetesResolver`, for `from_target(**options)`."""

    api_client: ApiClient | None
    configuration: Configuration | None
    service_account_dir: str | os.PathLike[str]
    watch_timeout: float
    read_timeout: float
    connect_timeout: float
    min_backoff: float
    max_backoff: float


def _check_service(service: str) -> str:
    if not isinstance(service, str) or not _SERVICE_NAME.fullmatch(service):
        raise ValueError(f"bad Service name {service!r}: expected a DNS-1035 label such as 'arith'")
    return service


def _check_namespace(namespace: str) -> str:
    if not isinstance(namespace, str) or not _DNS_LABEL.fullmatch(namespace):
        raise ValueError(f"bad namespace {namespace!r}: expected a DNS-1123 label such as 'default'")
    return namespace


def _check_port(port: int | str) -> PortSelector:
    if isinstance(port, str) and port.isdigit():
        port = int(port)
    if isinstance(port, int) and not isinstance(port, bool):
        if not 0 < port < 65536:
            raise ValueError(f"bad port {port!r}: expected 1..65535")
        return port
    if not isinstance(port, str) or not _DNS_LABEL.fullmatch(port) or port.isdigit():
        raise ValueError(f"bad port {port!r}: expected a number or a Service port name such as 'rpc'")
    return port


def parse_target(target: str) -> tuple[str, str | None, PortSelector]:
    """Split `k8s://SERVICE[.NAMESPACE][.svc[.DOMAIN]]:PORT` into (service, namespace or None, port)."""
    scheme, sep, rest = target.partition("://")
    if scheme != "k8s" or not sep:
        raise ValueError(f"bad target {target!r}: expected k8s://SERVICE[.NAMESPACE]:PORT")
    host, sep, port = rest.lstrip("/").rpartition(":")
    if not sep or not host or not port:
        raise ValueError(f"bad target {target!r}: expected k8s://SERVICE[.NAMESPACE]:PORT (the port is required)")
    service, _, domain = host.partition(".")
    namespace, _, suffix = domain.partition(".")
    if suffix and suffix != "svc" and not suffix.startswith("svc."):
        raise ValueError(f"bad target {target!r}: expected k8s://SERVICE[.NAMESPACE][.svc[.DOMAIN]]:PORT")
    try:
        return _check_service(service), _check_namespace(namespace) if namespace else None, _check_port(port)
    except ValueError as exc:
        raise ValueError(f"bad target {target!r}: {exc}") from None


def _pod_namespace(service_account_dir: Path) -> str:
    try:
        return (service_account_dir / "namespace").read_text().strip() or "default"
    except OSError:
        return "default"


class KubernetesResolver:
    """Yields the endpoints of one port of a Kubernetes Service, following its EndpointSlices live.

    All resolvers of a process that watch the same Service through the same API server share one
    list+watch; the last `aclose()` stops it (the options of the resolver that started it apply).
    While the API server is unreachable the last endpoint list stays in force and nothing is yielded.
    Pass `api_client` (kept open; you close it) or `configuration` to skip the kubectl-style lookup.
    """

    def __init__(
        self,
        service: str,
        port: int | str,
        namespace: str | None = None,
        *,
        api_client: ApiClient | None = None,
        configuration: Configuration | None = None,
        service_account_dir: str | os.PathLike[str] = SERVICE_ACCOUNT_DIR,
        watch_timeout: float = 300.0,
        read_timeout: float = 120.0,
        connect_timeout: float = 10.0,
        min_backoff: float = 0.5,
        max_backoff: float = 30.0,
    ) -> None:
        self.service = _check_service(service)
        self.port = _check_port(port)
        self._service_account_dir = Path(service_account_dir)
        self.namespace = _check_namespace(namespace) if namespace else _pod_namespace(self._service_account_dir)
        if api_client is not None and configuration is not None:
            raise ValueError("pass api_client or configuration, not both")
        self._api_client = api_client
        self._configuration = configuration
        self._options = WatchOptions(
            watch_timeout=watch_timeout,
            read_timeout=read_timeout,
            connect_timeout=connect_timeout,
            min_backoff=min_backoff,
            max_backoff=max_backoff,
        )
        self._lock = anyio.Lock()
        self._closed = False
        self._wakeup: anyio.Event | None = None
        self._key: Hashable = None
        self._watch: SliceWatch | None = None
        self._view: EndpointView | None = None

    @classmethod
    def from_target(cls, target: str, **options: Unpack[ResolverOptions]) -> KubernetesResolver:
        """A resolver for `k8s://SERVICE[.NAMESPACE]:PORT`."""
        service, namespace, port = parse_target(target)
        return cls(service, port, namespace, **options)

    @property
    def target(self) -> str:
        """The canonical target, `k8s://SERVICE.NAMESPACE:PORT`."""
        return f"k8s://{self.service}.{self.namespace}:{self.port}"

    @property
    def stats(self) -> WatchStats | None:
        """Counters of the shared watch (lists, watches, events, errors...), once started."""
        return self._watch.stats if self._watch is not None else None

    async def watch(self) -> AsyncIterator[list[Endpoint]]:
        """Yield the endpoint list as soon as it is known, then again on every change, until aclose()."""
        view = await self._open()
        seen = 0
        while view is not None and not self._closed:
            if view.synced and view.version != seen:
                seen = view.version
                yield view.snapshot()
                continue
            if self._wakeup is None:
                self._wakeup = anyio.Event()
            await self._wakeup.wait()

    async def aclose(self) -> None:
        """End every watch() and release the shared Kubernetes watch."""
        self._closed = True
        self._wake()
        with anyio.CancelScope(shield=True):  # a cancelled caller must not leak the shared watch
            async with self._lock:
                watch, view, self._watch, self._view = self._watch, self._view, None, None
                if watch is not None and view is not None:
                    view.unsubscribe(self._wake)
                    watch.drop_view(view)
                    await release(self._key, watch)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    async def _open(self) -> EndpointView | None:
        async with self._lock:
            if self._view is None and not self._closed:
                key, create = await self._watch_factory()
                watch = acquire(key, create)
                view = watch.view(self.port)
                view.subscribe(self._wake)
                self._key, self._watch, self._view = key, watch, view
            return self._view

    async def _watch_factory(self) -> tuple[Hashable, Callable[[], SliceWatch]]:
        client = self._api_client
        if client is not None:
            key: Hashable = (client.configuration.host, id(client), self.namespace, self.service)
            return key, lambda: self._new_watch(client, owns_client=False)
        configuration = self._configuration or await self._load_configuration()

        def create() -> SliceWatch:
            from kubernetes_asyncio.client import ApiClient

            owned = ApiClient(configuration)
            owned.user_agent = "kubrpc"
            return self._new_watch(owned, owns_client=True)

        return (configuration.host, self.namespace, self.service), create

    def _new_watch(self, client: ApiClient, *, owns_client: bool) -> SliceWatch:
        return SliceWatch(
            client, owns_client=owns_client, namespace=self.namespace, service=self.service, options=self._options
        )

    async def _load_configuration(self) -> Configuration:
        from kubernetes_asyncio import config
        from kubernetes_asyncio.client import Configuration

        configuration = Configuration()
        try:
            if os.environ.get("KUBERNETES_SERVICE_HOST"):
                config.load_incluster_config(  # type: ignore[no-untyped-call]
                    client_configuration=configuration,
                    token_filename=str(self._service_account_dir / "token"),
                    cert_filename=str(self._service_account_dir / "ca.crt"),
                )
            else:
                path = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
                await config.load_kube_config(
                    config_file=path, client_configuration=configuration, persist_config=False
                )
        except (config.ConfigException, OSError) as exc:
            where = "in-cluster service account" if os.environ.get("KUBERNETES_SERVICE_HOST") else "kubeconfig"
            raise RuntimeError(f"{self.target}: cannot load the Kubernetes {where} configuration: {exc}") from exc
        return configuration

    def __repr__(self) -> str:
        if self._closed:
            state = "closed"
        elif self._view is None or self._watch is None:
            state = "not started"
        elif not self._view.synced:
            state = f"listing | {self._watch.stats.last_error or 'no answer yet'}"
        else:
            endpoints = self._view.snapshot()
            ready = sum(endpoint.ready for endpoint in endpoints)
            state = f"{len(endpoints)} endpoints, {ready} ready | rv={self._watch.resource_version}"
        return f"<{type(self).__name__} {self.target} [{state}]>"
