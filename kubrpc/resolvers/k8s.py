"""The Kubernetes resolver: live EndpointSlices of a Service, from the API server's list+watch.

    k8s://SERVICE[.NAMESPACE][.svc[.DOMAIN]]:PORT[?weights=pods[&pod_selector=LABEL_SELECTOR]]

PORT is the name of a Service port (`rpc`) or the endpoints' own port number (the container port,
which is what EndpointSlices list). Without NAMESPACE the pod's own namespace is used (read from
the service account), else `default`. Access is configured as kubectl does it: the in-cluster
service account when KUBERNETES_SERVICE_HOST is set, else KUBECONFIG or ~/.kube/config. RBAC needs
get/list/watch on `endpointslices` in group `discovery.k8s.io` (see deploy/).

`weights=pods` (the keyword `weights_from_pods=True`) also lists and watches the namespace's Pods
(only those matching `pod_selector`, if given) and takes each endpoint's weight from its pod's
annotation `kubrpc.io/weight`; that needs get/list/watch on `pods` too
(deploy/optional/rbac-pod-weights.yaml).

PORT as a number is the endpoints' own port (the Pod's containerPort, the Service's targetPort), never
the Service's `port`: EndpointSlices do not carry the Service port, and reading the Service object
would need one more RBAC rule. A name is the Service port's name, which the slices do carry.

Errors say why: `problem` is the last error while no snapshot was ever produced (a 403 names the verb,
resource, namespace and ServiceAccount, and the Role in deploy/ that grants it), or why the endpoint set
is empty (no slices with the Service's label, no port of that name...). `problem_is_permanent` is True
for a missing or invalid kubeconfig and for 401/403/404 before the first list, and channels then fail
their waiting calls at once (see `kubrpc.interfaces.ResolverDiagnostics`).

kubernetes-asyncio (about 60 MiB and 250 ms to import) is imported when the first watch starts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypedDict, TypeVar

import anyio

from ..endpoint import Endpoint
from ._k8s_pods import PodWatch, WeightedView
from ._k8s_slices import ADDRESS_FAMILIES, AddressFamily, EndpointView, PortSelector
from ._k8s_watch import SliceWatch, WatchOptions, WatchStats, acquire, release

if TYPE_CHECKING:
    from kubernetes_asyncio.client import ApiClient, Configuration
    from typing_extensions import Unpack

__all__ = (
    "SERVICE_ACCOUNT_DIR",
    "ConfigurationError",
    "KubernetesResolver",
    "ResolverOptions",
    "parse_target",
    "target_options",
)

log = logging.getLogger("kubrpc.resolvers.k8s")

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
    list_timeout: float
    address_family: AddressFamily
    min_backoff: float
    max_backoff: float
    weights_from_pods: bool
    pod_selector: str | None


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
    """Split `k8s://SERVICE[.NAMESPACE][.svc[.DOMAIN]]:PORT` into (service, namespace or None, port).

    A `?query` is left to `target_options()`.
    """
    scheme, sep, rest = target.partition("?")[0].partition("://")
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


def target_options(target: str) -> ResolverOptions:
    """The resolver options in a target's query: `weights=pods` and `pod_selector=LABEL_SELECTOR` (URL-encoded)."""
    options: ResolverOptions = {}
    query = target.partition("?")[2]
    if not query:
        return options
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise ValueError(f"bad target {target!r}: malformed query {query!r}") from None
    seen: set[str] = set()
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"bad target {target!r}: {key!r} is given twice")
        seen.add(key)
        if key == "weights":
            if value != "pods":
                raise ValueError(f"bad target {target!r}: weights={value!r}; the only source is weights=pods")
            options["weights_from_pods"] = True
        elif key == "pod_selector":
            options["pod_selector"] = value
        elif key == "address_family":
            options["address_family"] = _check_family(value)
        else:
            raise ValueError(
                f"bad target {target!r}: unknown option {key!r};"
                " expected weights=pods, pod_selector= or address_family="
            )
    return options


def _check_family(family: str) -> AddressFamily:
    if family not in ADDRESS_FAMILIES:
        raise ValueError(f"bad address_family {family!r}: expected one of {', '.join(ADDRESS_FAMILIES)}")
    return family


class ConfigurationError(RuntimeError):
    """The kubeconfig or in-cluster configuration is missing or invalid (a permanent error)."""


def _check_pod_selector(selector: str | None, weights_from_pods: bool) -> str | None:
    if selector is None:
        return None
    if not weights_from_pods:
        raise ValueError("pod_selector needs weights_from_pods=True (or weights=pods in the target)")
    if not isinstance(selector, str) or not selector.strip():
        raise ValueError(f"bad pod_selector {selector!r}: expected a label selector such as 'app=arith'")
    return selector.strip()


def _pod_namespace(service_account_dir: Path) -> str:
    try:
        return (service_account_dir / "namespace").read_text().strip() or "default"
    except OSError:
        return "default"


T = TypeVar("T")


async def _not_cancelled_midway(awaitable: Awaitable[T]) -> T:
    """Await `awaitable` to its end even if cancelled meanwhile (then re-raise the cancellation).

    kubernetes-asyncio leaves an exec plugin's process running, unreaped, when cancelled while it runs;
    the plugin is waited for (at most `_EXEC_GRACE` seconds) instead.
    """
    task = asyncio.ensure_future(awaitable)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task], timeout=_EXEC_GRACE)
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: the caller is cancelled and will not see it
        raise


_EXEC_GRACE = 60.0


def _refresh_exec_credentials(configuration: Configuration, loader: Any) -> None:
    """Run a kubeconfig's exec plugin again when its credential expires, as kubectl does.

    kubernetes-asyncio runs it once, at load: an expiring token (EKS, GKE and AKS plugins give ones
    of 15 to 60 minutes) would then be refused with 401 for the rest of the process's life.
    """
    user = getattr(loader, "_user", None)
    if not user or "exec" not in user:
        return

    async def refresh(configuration: Configuration, *args: object) -> None:
        if getattr(loader, "exec_plugin_expiry", None) is None:
            return  # no expirationTimestamp: the credential is valid for the life of the process
        await _not_cancelled_midway(loader.load_from_exec_plugin())  # runs it only if the credential expired
        if loader.token:
            configuration.api_key["BearerToken"] = loader.token

    configuration.refresh_api_key_hook = refresh


class KubernetesResolver:
    """Yields the endpoints of one port of a Kubernetes Service, following its EndpointSlices live.

    All resolvers of a process that watch the same Service through the same API server share one
    list+watch; the last `aclose()` stops it (the options of the resolver that started it apply).
    While the API server is unreachable the last endpoint list stays in force and nothing is yielded.
    Pass `api_client` (kept open; you close it) or `configuration` to skip the kubectl-style lookup.

    `weights_from_pods=True` sets each endpoint's weight from the annotation `kubrpc.io/weight` of its
    pod (a finite number >= 0; missing, malformed or negative: 1.0, the last two with a warning). It
    adds one list+watch of the namespace's Pods, shared by all such resolvers of the namespace, or of
    the pods matching `pod_selector` (a label selector such as `app=arith`; pods outside it weigh 1.0).
    The first snapshot waits for the pods to be listed, unless that fails (then weights are 1.0 until
    it succeeds). Without it no pod is ever read.

    Only slices of addressType IPv4 and IPv6 are read (FQDN ones are ignored with one warning).
    `address_family` picks the family of a dual-stack Service: "auto" (default: IPv4 if the Service has
    any IPv4 endpoint, else IPv6), "IPv4", "IPv6" or "any" (both, so each pod is two endpoints).
    When no endpoint is ready, those still `serving` while terminating are yielded as ready (KEP-1669);
    each endpoint's metadata has `serving` and `terminating` ("true"/"false"), and `for_zones` when its
    slice has topology hints. `list_timeout` bounds each list page; `read_timeout` (for a list, at most
    `list_timeout`) bounds each silence of the server.
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
        list_timeout: float = 30.0,
        min_backoff: float = 0.5,
        max_backoff: float = 30.0,
        weights_from_pods: bool = False,
        pod_selector: str | None = None,
        address_family: AddressFamily = "auto",
    ) -> None:
        self.service = _check_service(service)
        self.port = _check_port(port)
        self.weights_from_pods = bool(weights_from_pods)
        self.pod_selector = _check_pod_selector(pod_selector, self.weights_from_pods)
        self._service_account_dir = Path(service_account_dir)
        self.namespace = _check_namespace(namespace) if namespace else _pod_namespace(self._service_account_dir)
        if api_client is not None and configuration is not None:
            raise ValueError("pass api_client or configuration, not both")
        self._api_client = api_client
        self._configuration = configuration
        self.address_family = _check_family(address_family)
        for name, value in (("read_timeout", read_timeout), ("list_timeout", list_timeout)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, not {value!r}")
        self._options = WatchOptions(
            watch_timeout=watch_timeout,
            read_timeout=read_timeout,
            connect_timeout=connect_timeout,
            list_timeout=list_timeout,
            min_backoff=min_backoff,
            max_backoff=max_backoff,
        )
        self._lock = anyio.Lock()
        self._closed = False
        self._wakeup: anyio.Event | None = None
        self._key: Hashable = None
        self._watch: SliceWatch | None = None
        self._view: EndpointView | None = None
        self._pods_key: Hashable = None
        self._pods: PodWatch | None = None
        self._weighted: WeightedView | None = None
        self._config_error: str | None = None

    @classmethod
    def from_target(cls, target: str, **options: Unpack[ResolverOptions]) -> KubernetesResolver:
        """A resolver for `k8s://SERVICE[.NAMESPACE]:PORT[?weights=pods...]`; keywords override the query."""
        service, namespace, port = parse_target(target)
        merged = target_options(target)
        merged.update(options)
        return cls(service, port, namespace, **merged)

    @property
    def target(self) -> str:
        """The canonical target, `k8s://SERVICE.NAMESPACE:PORT` (with its `?weights=pods...` query)."""
        query: dict[str, str] = {}
        if self.weights_from_pods:
            query["weights"] = "pods"
        if self.pod_selector is not None:
            query["pod_selector"] = self.pod_selector
        if self.address_family != "auto":
            query["address_family"] = self.address_family
        suffix = f"?{urllib.parse.urlencode(query, safe='=,!()')}" if query else ""
        return f"k8s://{self.service}.{self.namespace}:{self.port}{suffix}"

    @property
    def stats(self) -> WatchStats | None:
        """Counters of the shared watch (lists, watches, events, errors...), once started."""
        return self._watch.stats if self._watch is not None else None

    @property
    def pod_stats(self) -> WatchStats | None:
        """Counters of the shared pod watch, once started with `weights_from_pods`."""
        return self._pods.stats if self._pods is not None else None

    @property
    def problem(self) -> str | None:
        """Why there is no usable endpoint (the last error before the first snapshot, or why it is empty), or None."""
        if self._config_error is not None:
            return self._config_error
        view, watch = self._view, self._watch
        if view is None or watch is None:
            return None
        if not view.synced:
            error = watch.stats.last_error
            return f"{self.target}: {error}" if error else None
        explanation = view.explain()
        return f"{self.target}: {explanation}" if explanation else None

    @property
    def problem_is_permanent(self) -> bool:
        """True while `problem` is a misconfiguration that waiting will not fix (kubeconfig, 401/403/404)."""
        if self._config_error is not None:
            return True
        view, watch = self._view, self._watch
        return view is not None and watch is not None and not view.synced and watch.permanent

    async def watch(self) -> AsyncIterator[list[Endpoint]]:
        """Yield the endpoint list as soon as it is known, then again on every change, until aclose().

        A missing or invalid configuration raises `ConfigurationError` (a RuntimeError), and `problem` says it too.
        """
        try:
            view = await self._open()
        except ConfigurationError as exc:
            self._config_error = " ".join(str(exc).split())  # YAML errors span lines
            raise
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
                pods, weighted, self._pods, self._weighted = self._pods, self._weighted, None, None
                if weighted is not None:
                    weighted.unsubscribe(self._wake)
                    weighted.close()
                elif view is not None:
                    view.unsubscribe(self._wake)
                if watch is not None and view is not None:
                    watch.drop_view(view)
                    await release(self._key, watch)
                if pods is not None:
                    await release(self._pods_key, pods)

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

    async def _open(self) -> EndpointView | WeightedView | None:
        async with self._lock:
            if self._view is None and not self._closed:
                server, make_client = await self._api_server()

                def new_slice_watch() -> SliceWatch:
                    client, owns_client = make_client()
                    return SliceWatch(
                        client,
                        owns_client=owns_client,
                        namespace=self.namespace,
                        service=self.service,
                        options=self._options,
                    )

                key = (*server, self.namespace, self.service)
                watch = acquire(key, new_slice_watch)
                view = watch.view(self.port, self.address_family)
                self._key, self._watch, self._view = key, watch, view
                if not self.weights_from_pods:
                    view.subscribe(self._wake)
                else:

                    def new_pod_watch() -> PodWatch:
                        client, owns_client = make_client()
                        return PodWatch(
                            client,
                            owns_client=owns_client,
                            namespace=self.namespace,
                            label_selector=self.pod_selector,
                            options=self._options,
                        )

                    # The class in the key keeps pod watches apart from the slice watch of a Service named "pods".
                    pods_key = (PodWatch, *server, self.namespace, self.pod_selector)
                    pods = acquire(pods_key, new_pod_watch)
                    weighted = WeightedView(view, pods)
                    weighted.subscribe(self._wake)
                    self._pods_key, self._pods, self._weighted = pods_key, pods, weighted
            return self._weighted or self._view

    async def _api_server(self) -> tuple[tuple[Hashable, ...], Callable[[], tuple[ApiClient, bool]]]:
        """A key naming the API server (and the client, if given), and a factory of (client, owns_client)."""
        client = self._api_client
        if client is not None:
            given = client
            return (given.configuration.host, id(given)), lambda: (given, False)
        configuration = self._configuration
        if configuration is None:
            configuration = await _not_cancelled_midway(self._load_configuration())

        def create() -> tuple[ApiClient, bool]:
            from kubernetes_asyncio.client import ApiClient

            owned = ApiClient(configuration)
            owned.user_agent = "kubrpc"
            return owned, True

        return (configuration.host,), create

    def _config_source(self) -> tuple[bool, str, str | None]:
        """(in cluster?, what to call the configuration, the kubeconfig file); ConfigurationError if missing."""
        in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
        if in_cluster:
            token = self._service_account_dir / "token"
            where = f"in-cluster service account ({self._service_account_dir})"
            if not token.is_file():
                raise ConfigurationError(
                    f"{self.target}: the {where} is missing: {token} does not exist;"
                    " is the ServiceAccount token mounted (automountServiceAccountToken)?"
                )
            return True, where, None
        # KUBECONFIG may list several files (':'-separated); kubectl reads the first that exists.
        paths = [p for p in (os.environ.get("KUBECONFIG") or "").split(os.pathsep) if p]
        paths = paths or [str(Path.home() / ".kube" / "config")]
        found = next((p for p in paths if Path(p).is_file()), None)
        if found is None:
            raise ConfigurationError(
                f"{self.target}: the kubeconfig is missing: {' nor '.join(paths)} does not exist;"
                " set KUBECONFIG to your kubeconfig file, or run inside a pod with a ServiceAccount"
            )
        return False, f"kubeconfig {found}", found

    async def _load_configuration(self) -> Configuration:
        from kubernetes_asyncio import config
        from kubernetes_asyncio.client import Configuration

        configuration = Configuration()
        in_cluster, where, found = self._config_source()
        try:
            if in_cluster:
                config.load_incluster_config(  # type: ignore[no-untyped-call]
                    client_configuration=configuration,
                    token_filename=str(self._service_account_dir / "token"),
                    cert_filename=str(self._service_account_dir / "ca.crt"),
                )
            else:
                loader = await config.load_kube_config(
                    config_file=found, client_configuration=configuration, persist_config=False
                )
                _refresh_exec_credentials(configuration, loader)
        except Exception as exc:  # ConfigException, OSError, YAML errors, KeyError...: all mean "invalid"
            detail = f"{type(exc).__name__}: {exc}" if not isinstance(exc, config.ConfigException) else str(exc)
            raise ConfigurationError(f"{self.target}: the {where} is invalid: {detail}") from exc
        return configuration

    def __repr__(self) -> str:
        if self._closed:
            state = "closed"
        elif self._view is None or self._watch is None:
            state = "not started"
        elif not self._view.synced:
            state = f"listing | {self._watch.stats.last_error or 'no answer yet'}"
        else:
            endpoints = (self._weighted or self._view).snapshot()
            ready = sum(endpoint.ready for endpoint in endpoints)
            state = f"{len(endpoints)} endpoints, {ready} ready | rv={self._watch.resource_version}"
            if self._pods is not None:
                pods = self._pods
                state += f" | pod weights {'rv=' + str(pods.resource_version) if pods.synced else 'listing'}"
        return f"<{type(self).__name__} {self.target} [{state}]>"
