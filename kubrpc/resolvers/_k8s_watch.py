"""One list+watch of a Service's EndpointSlices (or a namespace's Pods), shared by all resolvers of a process.

The loop, as client-go's reflector does it:

    list (paged) ──► watch from the list's resourceVersion ──► events update the slices
        ▲                 │ clean end, dropped connection, read timeout: watch again from the
        │                 │   last resourceVersion (bookmarks move it too), without a new list
        └── unavailable ◄─┤ 410 Expired/Gone, or 504 "Too large resource version" (HTTP status or
            resourceVersion│   ERROR event): list again with resourceVersion unset, as client-go's
                          │   reflector does for both (isExpiredError || isTooLargeResourceVersionError)
                          └ connection refused, 5xx, 429, other errors: jittered backoff, then retry;
                            the last known slices stay in force meanwhile

The backoff is reset only once a watch has made progress (an event or a bookmark that moves the
resourceVersion), not by a successful list nor by lines that move nothing (a repeated bookmark, a
bookmark without resourceVersion, a list body from a proxy that dropped `?watch=true`): a server that
answers every watch with 410, or with a bookmark and a close, is retried at a growing interval, not in a
hot loop. A 429 or 5xx's `Retry-After` (or its Status's `details.retryAfterSeconds`), as the apiserver
sends when API Priority and Fairness sheds load, is honoured: the next attempt waits at least that long
(capped at `MAX_RETRY_AFTER`). A TLS certificate that fails verification before the first list is
permanent, like 401/403/404: the configured CA does not match the server.
401, 403 and 404 before the first successful list are permanent (`permanent` is then True): callers
stop waiting, though the loop keeps retrying (slowly) so that a fixed RBAC rule is picked up.

kubernetes-asyncio is imported only here and only when a watch starts. Responses are read raw
(`_preload_content=False`) and parsed with orjson: model objects for thousands of endpoints per
event would cost more CPU than everything else together.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
import weakref
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import orjson

from .._backoff import Backoff
from ._k8s_slices import IP_ADDRESS_TYPES, AddressFamily, EndpointView, PortSelector, compact_slice

if TYPE_CHECKING:
    from aiohttp import ClientResponse
    from kubernetes_asyncio.client import ApiClient

__all__ = (
    "MAX_RETRY_AFTER",
    "ApiError",
    "Lister",
    "ListWatch",
    "SliceWatch",
    "WatchOptions",
    "WatchStats",
    "acquire",
    "active_watches",
    "release",
)

log = logging.getLogger("kubrpc.resolvers.k8s")

JsonObject = dict[str, Any]
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
#: A kubernetes-asyncio list function; with `_preload_content=False` it returns the aiohttp response.
Lister = Callable[..., Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class WatchOptions:
    """Timeouts (seconds) and retry pacing of a watch."""

    watch_timeout: float = 300.0
    read_timeout: float = 120.0
    connect_timeout: float = 10.0
    list_timeout: float = 30.0
    page_size: int = 500
    min_backoff: float = 0.5
    max_backoff: float = 30.0


@dataclass(slots=True)
class WatchStats:
    """Counters of what a watch has done, for reprs, logs and tests."""

    lists: int = 0
    watches: int = 0
    events: int = 0
    bookmarks: int = 0
    expired: int = 0
    dropped: int = 0
    errors: int = 0
    last_error: str | None = None


#: The longest `Retry-After` honoured (seconds); a larger one is taken as this.
MAX_RETRY_AFTER = 300.0


class ApiError(Exception):
    """A non-2xx answer of the API server: its status, a one-line reason, and its `Retry-After` (seconds) if any."""

    def __init__(self, status: int, reason: str, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status} {reason}")
        self.status = status
        self.reason = reason
        self.retry_after = retry_after


def _retry_after(header: str | None, status: JsonObject | None) -> float | None:
    """Seconds from a `Retry-After: N` header, else from a Status's `details.retryAfterSeconds`."""
    value: object = header.strip() if header else None
    if value is None and isinstance(status, dict):
        value = (status.get("details") or {}).get("retryAfterSeconds")
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None  # absent, or an HTTP date (the apiserver sends seconds)
    return min(seconds, MAX_RETRY_AFTER) if seconds > 0 else None


class ResourceVersionUnavailable(Exception):
    """The server cannot serve from our resourceVersion (410 Expired/Gone, or 504 Too large): list again."""


def _status_code(status: JsonObject) -> int:
    code = status.get("code")
    return code if isinstance(code, int) else 500


def is_resource_version_unavailable(status: JsonObject) -> bool:
    """True for a `v1 Status` that means "list again with resourceVersion unset".

    410 (reason Expired or Gone: "too old resource version"), and the watch cache's "Too large resource
    version": code 504, reason Timeout, cause ResourceVersionTooLarge (older servers: only the message).
    """
    code = _status_code(status)
    if code == 410:
        return True
    if code != 504:
        return False
    causes = (status.get("details") or {}).get("causes") or ()
    if any(isinstance(c, dict) and c.get("reason") == "ResourceVersionTooLarge" for c in causes):
        return True
    return "too large resource version" in str(status.get("message", "")).lower()


_USER = re.compile(r'User "([^"]*)"')


class ListWatch:
    """The list+watch loop over the objects of one namespace; subclasses say which objects and what to keep.

    A subclass provides `_lister()` (the kubernetes-asyncio list function), `_compact()` (what to keep of an
    object), `_reset()` (the state after a list) and `_update()` (one event); `label_selector` narrows both.
    """

    #: What the objects are called in logs.
    noun = "objects"
    #: The resource and API group listed (for error messages).
    resource = "objects"
    group = ""
    #: Where the Role that grants access is (for a 403).
    rbac_hint = "deploy/"

    def __init__(
        self, client: ApiClient, *, owns_client: bool, namespace: str, label_selector: str | None, options: WatchOptions
    ) -> None:
        self.namespace = namespace
        self.label_selector = label_selector
        self.options = options
        self.stats = WatchStats()
        self.resource_version: str | None = None
        self.users = 0
        #: True once a list has succeeded.
        self.listed = False
        #: True while the last error is one that retrying will not fix (401/403/404 before the first list).
        self.permanent = False
        self._verb = "list"
        self._backoff: Backoff | None = None
        self._expired_in_a_row = 0
        self._client = client
        self._owns_client = owns_client
        self._task: asyncio.Task[None] | None = None
        self._rng = random.Random()

    def start(self) -> None:
        """Start the background list+watch loop."""
        # The loop outlives any one resolver (it is shared and reference-counted), so no task group of
        # theirs can own it; `aclose()` cancels and awaits it when the last user releases it.
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"kubrpc k8s watch {self}")

    async def aclose(self) -> None:
        """Stop the loop and close the API client if this watch made it."""
        task, self._task = self._task, None
        with anyio.CancelScope(shield=True):
            if task is not None:
                task.cancel()
                await asyncio.wait([task])
            if self._owns_client:
                await self._client.close()

    def _lister(self) -> Lister:
        """The kubernetes-asyncio function that lists (and, with watch=True, watches) the objects."""
        raise NotImplementedError

    def _compact(self, obj: JsonObject) -> Any:
        """What to keep of one object."""
        raise NotImplementedError

    def _reset(self, objects: dict[str, Any]) -> None:
        """Replace the known objects (compacted, by name) after a list."""
        raise NotImplementedError

    def _update(self, name: str, compacted: Any) -> None:
        """Apply one watch event: the compacted object, or None when it was deleted."""
        raise NotImplementedError

    def _known(self) -> int:
        """How many objects are known (for logs)."""
        raise NotImplementedError

    def _on_error(self, error: str) -> None:
        """Called after each failed list or watch, before the backoff."""

    async def _run(self) -> None:
        from aiohttp import ClientConnectorCertificateError, ClientError
        from kubernetes_asyncio.config import ConfigException

        api = self._lister()
        backoff = self._backoff = Backoff(
            initial=self.options.min_backoff, maximum=self.options.max_backoff, rng=self._rng
        )
        while True:
            try:
                if self.resource_version is None:
                    await self._list(api)
                started = time.monotonic()
                if not await self._watch(api) and time.monotonic() - started < 1.0:
                    await backoff.sleep()  # a watch that ended at once: do not spin
            except ResourceVersionUnavailable as exc:
                self.stats.expired += 1
                self.resource_version = None
                self._expired_in_a_row += 1
                log.info("%s: resourceVersion unavailable (%s), listing again", self, exc)
                if self._expired_in_a_row > 1:
                    await backoff.sleep()
            except ApiError as exc:
                self.permanent = not self.listed and exc.status in (401, 403, 404)
                await self._failed(backoff, self._explain(exc.status, exc.reason), exc.retry_after)
            except ClientConnectorCertificateError as exc:
                # The configured CA did not sign the server's certificate: waiting will not fix that.
                self.permanent = not self.listed
                await self._failed(
                    backoff,
                    f"cannot {self._verb} {self.resource}: the API server's TLS certificate failed verification"
                    f" ({exc.certificate_error}); check certificate-authority(-data) in the kubeconfig, or the"
                    " ServiceAccount's ca.crt, and the server URL",
                )
            except orjson.JSONDecodeError as exc:
                # A first list answered 200 with something else than JSON: the URL is not an API server's.
                self.permanent = not self.listed and self._verb == "list"
                hint = " (is the server URL an API server's?)" if self.permanent else ""
                await self._failed(backoff, f"malformed JSON from the API server during {self._verb}{hint}: {exc}")
            except ConfigException as exc:  # an exec plugin or token file that fails on refresh
                self.permanent = False
                await self._failed(backoff, f"cannot {self._verb} {self.resource}: no credentials: {exc}")
            except (ClientError, OSError, TimeoutError) as exc:
                self.permanent = False
                what = f"{type(exc).__name__}: {exc}" if str(exc) else f"{type(exc).__name__} ({self._no_answer()})"
                await self._failed(backoff, f"cannot {self._verb} {self.resource}: {what}")
            except Exception as exc:  # the loop must survive anything the server sends
                log.exception("%s: unexpected error", self)
                await self._failed(backoff, f"{type(exc).__name__}: {exc}")

    def _no_answer(self) -> str:
        """Which timeout ran out, for a TimeoutError that says nothing."""
        options = self.options
        if self._verb == "list":
            read = min(options.read_timeout, options.list_timeout)
            return f"no complete answer within list_timeout {options.list_timeout:g} s or read_timeout {read:g} s"
        connect, read = options.connect_timeout, options.read_timeout
        return f"no answer within connect_timeout {connect:g} s or read_timeout {read:g} s"

    def _explain(self, status: int, reason: str) -> str:
        """An API error as one line that says what to do."""
        where = f"{self.resource}{'.' + self.group if self.group else ''} in namespace {self.namespace!r}"
        if status == 403:
            found = _USER.search(reason)
            user = found.group(1) if found else ""
            if user.startswith("system:serviceaccount:"):
                namespace, _, name = user.removeprefix("system:serviceaccount:").partition(":")
                who = f"ServiceAccount {namespace}/{name}"
            else:
                who = f"user {user!r}" if user else "this client's credentials"
            return (
                f"HTTP 403 Forbidden: {who} may not {self._verb} {where}; bind it to the Role in {self.rbac_hint}"
                f" (get, list, watch on {self.resource}) [{reason}]"
            )
        if status == 401:
            return (
                f"HTTP 401 Unauthorized: the API server rejected this client's credentials (expired or wrong token,"
                f" or a kubeconfig user of another cluster) [{reason}]"
            )
        if status == 404:
            return (
                f"HTTP 404 Not Found: the API server does not serve {where} (is the server URL an API server,"
                f" and is its Kubernetes version 1.21 or later?) [{reason}]"
            )
        return f"HTTP {status} {reason}".strip()

    async def _failed(self, backoff: Backoff, error: str, retry_after: float | None = None) -> None:
        error = " ".join(error.split())  # one line, whatever the server put in its Status message
        if len(error) > 1000:
            error = error[:1000] + "..."
        self.stats.errors += 1
        self.stats.last_error = error
        self._on_error(error)
        delay = backoff.next_delay()
        if retry_after is not None and retry_after > delay:
            delay = retry_after  # the server said when to come back (429 from API Priority and Fairness, 503...)
        log.warning("%s: %s; keeping %d known %s, retrying in %.2fs", self, error, self._known(), self.noun, delay)
        await anyio.sleep(delay)

    async def _list(self, api: Lister) -> None:
        from aiohttp import ClientTimeout

        # sock_read bounds each silent spell (a black-holed server), total bounds each page.
        timeout = ClientTimeout(
            total=self.options.list_timeout,
            sock_connect=self.options.connect_timeout,
            sock_read=min(self.options.read_timeout, self.options.list_timeout),
        )
        objects: dict[str, Any] = {}
        resource_version: str | None = None
        token: str | None = None
        self._verb = "list"
        while True:
            response = await api(
                self.namespace,
                label_selector=self.label_selector,
                limit=self.options.page_size,
                _continue=token,
                timeout_seconds=max(1, int(self.options.list_timeout)),
                _preload_content=False,
                _request_timeout=timeout,
            )
            page = await _read_json(response)
            meta = page.get("metadata") or {}
            resource_version = resource_version or meta.get("resourceVersion")
            for item in page.get("items") or ():
                objects[item["metadata"]["name"]] = self._compact(item)
            token = meta.get("continue")
            if not token:
                break
        self.stats.lists += 1
        self.resource_version = resource_version or ""
        self.listed = True
        self.permanent = False
        self._reset(objects)

    async def _watch(self, api: Lister) -> bool:
        """One watch request; returns whether it made progress (an event or a bookmark)."""
        from aiohttp import ClientError, ClientTimeout

        self._verb = "watch"
        # Spread the server-side timeouts, as client-go does, so that many clients do not re-watch together.
        timeout_seconds = max(1, int(self.options.watch_timeout * self._rng.uniform(1.0, 2.0)))
        # `total` ends a watch the server does not end in time (a proxy trickling bytes defeats sock_read).
        timeout = ClientTimeout(
            total=timeout_seconds + self.options.read_timeout,
            sock_connect=self.options.connect_timeout,
            sock_read=self.options.read_timeout,
        )
        response = await api(
            self.namespace,
            label_selector=self.label_selector,
            watch=True,
            allow_watch_bookmarks=True,
            resource_version=self.resource_version or None,
            timeout_seconds=timeout_seconds,
            _preload_content=False,
            _request_timeout=timeout,
        )
        self.stats.watches += 1
        progressed = False
        start_version = self.resource_version
        try:
            if response.status != 200:
                await _read_json(response)
            while True:
                try:
                    line = await response.content.readline()
                except (ClientError, OSError, TimeoutError) as exc:
                    # Dropped mid-stream (no final chunk) or silent past read_timeout: resume from the last RV.
                    self.stats.dropped += 1
                    log.debug("%s: watch dropped (%s: %s)", self, type(exc).__name__, exc)
                    break
                if not line:
                    break  # a clean end (timeoutSeconds): resume from the last RV
                if line.strip():
                    self._on_event(orjson.loads(line))
                    if not progressed and self.resource_version != start_version:
                        # Only a watch that made progress resets the backoff: a list alone proves nothing.
                        progressed = True
                        self._expired_in_a_row = 0
                        if self._backoff is not None:
                            self._backoff.reset()
        finally:
            response.close()
        return progressed

    def _on_event(self, event: JsonObject) -> None:
        if not isinstance(event, dict):
            raise ApiError(502, f"BadGateway: the watch stream carried {type(event).__name__} instead of an event")
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            reason = f"{obj.get('reason')}: {obj.get('message')}"
            if is_resource_version_unavailable(obj):
                raise ResourceVersionUnavailable(f"{_status_code(obj)} {reason}")
            raise ApiError(_status_code(obj), reason, _retry_after(None, obj))
        meta = obj.get("metadata") or {}
        if kind == "BOOKMARK":
            self.stats.bookmarks += 1
        elif kind in ("ADDED", "MODIFIED", "DELETED"):
            self.stats.events += 1
            self._update(meta["name"], None if kind == "DELETED" else self._compact(obj))
        else:
            log.debug("%s: ignoring watch event of type %r", self, kind)
        if rv := meta.get("resourceVersion"):
            self.resource_version = rv

    def __repr__(self) -> str:
        where = self.namespace + (f" {self.label_selector}" if self.label_selector else "")
        return f"<{type(self).__name__} {where} rv={self.resource_version} users={self.users}>"


class SliceWatch(ListWatch):
    """Lists then watches the EndpointSlices of one Service and feeds them to one view per port."""

    noun = "slices"
    resource = "endpointslices"
    group = "discovery.k8s.io"
    rbac_hint = "deploy/rbac.yaml (Role kubrpc-endpointslice-reader)"

    def __init__(
        self, client: ApiClient, *, owns_client: bool, namespace: str, service: str, options: WatchOptions
    ) -> None:
        super().__init__(
            client,
            owns_client=owns_client,
            namespace=namespace,
            label_selector=f"{SERVICE_NAME_LABEL}={service}",
            options=options,
        )
        self.service = service
        self._slices: dict[str, JsonObject] = {}
        self._synced = False
        self._views: dict[tuple[PortSelector, AddressFamily], EndpointView] = {}
        self._ignored: set[str] = set()

    def view(self, selector: PortSelector, family: AddressFamily = "auto") -> EndpointView:
        """The (shared) view of one port and address family, created and filled from the known slices if new."""
        view = self._views.get((selector, family))
        if view is None:
            source = f"Service {self.namespace}/{self.service} (label {self.label_selector})"
            view = self._views[selector, family] = EndpointView(selector, family=family, source=source)
            if self._synced:
                view.replace_all(self._slices)
        return view

    def drop_view(self, view: EndpointView) -> None:
        """Forget a view that has no listeners left."""
        key = (view.selector, view.family)
        if not view.listeners and self._views.get(key) is view:
            del self._views[key]

    def _lister(self) -> Lister:
        from kubernetes_asyncio.client import DiscoveryV1Api

        return DiscoveryV1Api(self._client).list_namespaced_endpoint_slice

    def _compact(self, obj: JsonObject) -> JsonObject:
        compacted = compact_slice(obj)
        kind = compacted["addressType"]
        if kind not in IP_ADDRESS_TYPES:
            name = (obj.get("metadata") or {}).get("name", "?")
            if name not in self._ignored:
                self._ignored.add(name)
                message = "%s: ignoring EndpointSlice %s of addressType %s (only IPv4 and IPv6 are read)"
                log.warning(message, self, name, kind)
            compacted["endpoints"] = []
        return compacted

    def _reset(self, objects: dict[str, Any]) -> None:
        self._slices = objects
        self._synced = True
        for view in list(self._views.values()):
            view.replace_all(objects)

    def _update(self, name: str, compacted: Any) -> None:
        if compacted is None:
            self._slices.pop(name, None)
        else:
            self._slices[name] = compacted
        for view in list(self._views.values()):
            view.apply(name, compacted)

    def _known(self) -> int:
        return len(self._slices)

    def __repr__(self) -> str:
        return f"<SliceWatch {self.namespace}/{self.service} rv={self.resource_version} users={self.users}>"


async def _read_json(response: ClientResponse) -> JsonObject:
    """The JSON body of a response; ApiError (with the Status message) unless it is a 2xx."""
    try:
        body = await response.read()
    finally:
        response.release()
    if not 200 <= response.status < 300:
        reason = response.reason or ""
        try:
            status = orjson.loads(body)
            reason = f"{status.get('reason') or reason}: {status.get('message', '')}"
        except (orjson.JSONDecodeError, AttributeError):
            status = None
        if response.status == 410 or (
            isinstance(status, dict) and is_resource_version_unavailable({**status, "code": response.status})
        ):
            raise ResourceVersionUnavailable(f"{response.status} {reason}")
        retry_after = _retry_after(response.headers.get("Retry-After"), status if isinstance(status, dict) else None)
        raise ApiError(response.status, reason, retry_after)
    page: JsonObject = orjson.loads(body)
    return page


_registry: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Hashable, ListWatch]] = weakref.WeakKeyDictionary()
W = TypeVar("W", bound=ListWatch)


def acquire(key: Hashable, create: Callable[[], W]) -> W:
    """The running watch for `key` in this event loop, or a new one made by `create()` and started."""
    watches = _registry.setdefault(asyncio.get_running_loop(), {})
    found = watches.get(key)
    if found is None:
        watch = create()
        watches[key] = watch
        watch.start()
    else:
        watch = found  # type: ignore[assignment]  # a key names one kind of watch
    watch.users += 1
    return watch


async def release(key: Hashable, watch: ListWatch) -> None:
    """Drop one use of a watch; the last one stops it."""
    watch.users -= 1
    if watch.users > 0:
        return
    watches = _registry.get(asyncio.get_running_loop(), {})
    if watches.get(key) is watch:
        del watches[key]
    await watch.aclose()


def active_watches() -> list[ListWatch]:
    """The watches running in this event loop (for tests and debugging)."""
    return list(_registry.get(asyncio.get_running_loop(), {}).values())
