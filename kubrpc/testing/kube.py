"""A fake Kubernetes API server that the real kubernetes-asyncio client talks to over loopback.

It serves list and watch for any resource path, as the apiserver's watch cache does:

    GET /api/v1/[namespaces/NS/]PLURAL[/NAME]
    GET /apis/GROUP/VERSION/[namespaces/NS/]PLURAL[/NAME]
        ?labelSelector=  (=, ==, !=, in, notin, exists, !exists)   ?fieldSelector=  (metadata.name|namespace)
        ?limit= &continue=                                         a paged list, consistent at the first
                                                                   page's resourceVersion; 410 once compacted
        ?watch=true &resourceVersion=N                             replay after N, then live; "" or "0" starts
                                                                   with the current objects; N older than the
                                                                   last compaction gets an ERROR event (410)
        &allowWatchBookmarks=true &timeoutSeconds=T &sendInitialEvents=true&resourceVersionMatch=NotOlderThan

An object that stops or starts matching a watch's selector reaches it as DELETED or ADDED. Errors
are `v1 Status` objects. Test hooks: `upsert()`/`delete()`, `compact()`, `send_bookmarks()`,
`end_watches()` (clean end of stream), `abort_watches()` (connection dropped mid-stream),
`unavailable = 503` (or 429 with `retry_after`), `stop()`/`start()` (connection refused, then back on the same port),
`token=` (bearer auth), `ssl_context=` (HTTPS), `deny()` (RBAC: 403 Forbidden naming the user, verb,
resource and namespace), `rewind()` (an etcd restore: "Too large resource version"), `stall = True`
(a black-holed server: requests are read and never answered), and the `requests` log.

Sources, which the behaviours follow:
- Kubernetes API concepts, "Efficient detection of changes" and "Resource versions"
  (https://kubernetes.io/docs/reference/using-api/api-concepts/): a watch from a resourceVersion that
  is no longer in the history answers 200 and then an ERROR event carrying a 410 Status ("too old
  resource version"); clients relist. Bookmarks carry only a resourceVersion.
- The apiserver's watch cache (k8s.io/apiserver/pkg/storage/cacher, watch_cache.go
  waitUntilFreshAndBlock, and storage.NewTooLargeResourceVersionError): a resourceVersion newer than the
  cache's, still not reached after 3 s, fails with code 504, reason Timeout, message "Too large resource
  version: N, current: M", a cause of type ResourceVersionTooLarge and retryAfterSeconds 1; a watch gets
  it in-stream (200, then ERROR). It happens after an etcd restore and when an HA apiserver's cache lags.
  client-go's reflector relists with resourceVersion unset on it, as on "expired".
- Kubernetes API concepts, "Retrieving large results sets in chunks", and the `continue` list option
  (ListOptions in the API reference): every page of a chunked list is served from the first page's
  resourceVersion; once that is compacted the server answers 410, reason Expired, "The provided continue
  parameter is too old to display a consistent list result...", and a client that needs a consistent
  list restarts it without `continue`.
- API Priority and Fairness (https://kubernetes.io/docs/concepts/cluster-administration/flow-control/)
  and the apiserver's max-in-flight filter (k8s.io/apiserver/pkg/server/filters, tooManyRequests): a
  shed request is answered 429, reason TooManyRequests, "Too many requests, please try again later.",
  with a `Retry-After` header (seconds) and the same in `details.retryAfterSeconds`.
- RBAC (https://kubernetes.io/docs/reference/access-authn-authz/rbac/): a denied request is 403, reason
  Forbidden, message `PLURAL.GROUP is forbidden: User "USER" cannot VERB resource "PLURAL" in API group
  "GROUP" in the namespace "NS"`.
- The EndpointSlice API reference and docs (https://kubernetes.io/docs/concepts/services-networking/
  endpoint-slices/): addressType IPv4, IPv6 or FQDN ("No semantics are defined for the FQDN type");
  conditions ready, serving (nil: defer to ready), terminating (nil: false); hints.forZones
  (Topology Aware Routing); at most 100 endpoints per slice from the controller, so a large Service
  has many slices that must be joined. `slice_endpoint()` and `endpoint_slice()` build them.
- KEP-1669 (Proxy Terminating Endpoints, GA in 1.28): serving-but-terminating endpoints are what
  kube-proxy falls back to when no endpoint is ready; `slice_endpoint(ready=False, serving=True,
  terminating=True)` is such an endpoint.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self

import anyio
import anyio.lowlevel
import orjson
from aiohttp import web

from ._kube_selectors import Requirement, parse_field_selector, parse_label_selector
from .certs import issue_certificate, self_signed_certificate, server_ssl_context

__all__ = (
    "ENDPOINTSLICES",
    "SERVICE_NAME_LABEL",
    "FakeKubeAPI",
    "JsonObject",
    "LoggedRequest",
    "endpoint_slice",
    "issue_certificate",
    "self_signed_certificate",
    "server_ssl_context",
    "slice_endpoint",
    "status_object",
    "too_large_status",
)

JsonObject = dict[str, Any]

#: The resource path of discovery.k8s.io/v1 EndpointSlices, as `upsert()` and `delete()` take it.
ENDPOINTSLICES = "discovery.k8s.io/v1/endpointslices"
#: The label that ties an EndpointSlice to its Service.
SERVICE_NAME_LABEL = "kubernetes.io/service-name"

_KINDS = {
    "configmaps": "ConfigMap",
    "endpoints": "Endpoints",
    "endpointslices": "EndpointSlice",
    "namespaces": "Namespace",
    "pods": "Pod",
    "services": "Service",
}
_PATH = re.compile(
    r"/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"(?:/namespaces/(?P<namespace>[^/]+))?/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?"
)


def status_object(code: int, reason: str, message: str) -> JsonObject:
    """A `v1 Status` failure, the body of every API error."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def too_large_status(requested: int, current: int) -> JsonObject:
    """The watch cache's 504 for a resourceVersion it has not reached (storage.NewTooLargeResourceVersionError)."""
    status = status_object(504, "Timeout", f"Too large resource version: {requested}, current: {current}")
    status["details"] = {
        "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
        "retryAfterSeconds": 1,
    }
    return status


def _copy(obj: JsonObject) -> JsonObject:
    copied: JsonObject = orjson.loads(orjson.dumps(obj))
    return copied


def _parse_bool(value: str | None) -> bool:
    return value in ("1", "t", "T", "true", "TRUE", "True")


@dataclass(frozen=True, slots=True)
class _Query:
    """What one request selects: a resource, optionally one namespace or name, and selectors."""

    resource: str
    api_version: str
    kind: str
    namespace: str | None
    name: str | None
    labels: tuple[Requirement, ...]
    fields: tuple[tuple[str, str, bool], ...]

    def matches(self, obj: JsonObject | None) -> bool:
        if obj is None:
            return False
        meta = obj["metadata"]
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        if self.name is not None and meta["name"] != self.name:
            return False
        labels = meta.get("labels") or {}
        return all(r.matches(labels) for r in self.labels) and all(
            (meta.get(key) == value) != negate for key, value, negate in self.fields
        )


@dataclass(frozen=True, slots=True)
class _Change:
    rv: int
    resource: str
    before: JsonObject | None
    after: JsonObject | None  # None for a deletion; `tombstone` then carries the final state
    tombstone: JsonObject | None = None

    def events_for(self, query: _Query) -> list[JsonObject]:
        if self.resource != query.resource:
            return []
        was, now = query.matches(self.before), query.matches(self.after)
        if now:
            return [{"type": "MODIFIED" if was else "ADDED", "object": self.after}]
        if was:  # deleted, or no longer matches the selector
            return [{"type": "DELETED", "object": self.after or self.tombstone}]
        return []


class _Signal(Enum):
    EVENT = "event"
    BOOKMARK = "bookmark"
    END = "end"
    ABORT = "abort"


@dataclass(eq=False)
class _Watcher:
    query: _Query
    queue: asyncio.Queue[tuple[_Signal, JsonObject | None]] = field(default_factory=asyncio.Queue)


class LoggedRequest(NamedTuple):
    """One request the fake answered: method, path and query parameters."""

    method: str
    path: str
    query: dict[str, str]

    @property
    def is_watch(self) -> bool:
        """True for a watch request."""
        return _parse_bool(self.query.get("watch"))


class FakeKubeAPI:
    """A Kubernetes API server on loopback that serves list and watch from in-memory objects."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        bookmark_interval: float | None = None,
        history_limit: int | None = None,
        start_rv: int = 1000,
    ) -> None:
        self.host = host
        self.port = port
        self.token = token
        self.ssl_context = ssl_context
        self.bookmark_interval = bookmark_interval
        self.history_limit = history_limit
        #: When set (e.g. 503, or 429 for API Priority and Fairness), every request is answered with this status.
        self.unavailable: int | None = None
        #: Seconds sent with `unavailable` as `Retry-After` and `details.retryAfterSeconds` (None: not sent).
        self.retry_after: int | None = None
        #: When True, requests are accepted and never answered (a black-holed server), until stop().
        self.stall = False
        #: The user the requests authenticate as (named in 403 messages).
        self.user = "system:serviceaccount:default:default"
        #: How long a watch from a too-new resourceVersion waits before its 504 (the real cache waits 3 s).
        self.too_large_wait = 0.0
        #: When set (a Status, e.g. `status_object(410, "Expired", ...)`), every watch answers 200 and then
        #: this ERROR event: a condition that lasts (an HA apiserver whose cache keeps lagging, say).
        self.watch_error: JsonObject | None = None
        self._denied: set[tuple[str, str]] = set()
        #: Every request answered, in order.
        self.requests: list[LoggedRequest] = []
        #: Called with each watch event just after it is written to a client.
        self.on_event_sent: Callable[[JsonObject], None] | None = None
        self._rv = start_rv
        self._compacted = start_rv
        self._objects: dict[tuple[str, str | None, str], JsonObject] = {}
        self._history: list[_Change] = []
        self._watchers: set[_Watcher] = set()
        self._runner: web.AppRunner | None = None
        self._watchers_changed: anyio.Event | None = None

    @property
    def url(self) -> str:
        """The base URL clients connect to."""
        return f"{'https' if self.ssl_context else 'http'}://{self.host}:{self.port}"

    @property
    def resource_version(self) -> str:
        """The current resourceVersion (bumped by every change)."""
        return str(self._rv)

    @property
    def watch_count(self) -> int:
        """How many watches are open now."""
        return len(self._watchers)

    @property
    def running(self) -> bool:
        """True between start() and stop()."""
        return self._runner is not None

    async def start(self) -> Self:
        """Listen (again, on the same port after a stop())."""
        if self._runner is not None:
            raise RuntimeError("FakeKubeAPI is already running")
        app = web.Application()
        app.router.add_route("GET", "/{path:.*}", self._handle)
        runner = web.AppRunner(
            app, handle_signals=False, shutdown_timeout=0.1, access_log=None, handler_cancellation=True
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port, ssl_context=self.ssl_context, reuse_address=True)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self.port = runner.addresses[0][1]
        self._runner = runner
        return self

    async def stop(self) -> None:
        """Drop every watch and stop listening: clients get connection refused until start()."""
        self.abort_watches()
        runner, self._runner = self._runner, None
        if runner is not None:
            await anyio.lowlevel.checkpoint()  # let watch handlers act on the abort before they are cancelled
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def kubeconfig(self, *, namespace: str = "default", certificate_authority: str | None = None) -> JsonObject:
        """A kubeconfig document whose current context points at this server."""
        cluster: JsonObject = {"server": self.url}
        if certificate_authority:
            cluster["certificate-authority"] = certificate_authority
        user: JsonObject = {"token": self.token} if self.token else {}
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": cluster}],
            "users": [{"name": "fake", "user": user}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}],
        }

    def write_kubeconfig(
        self, path: str | PathLike[str], *, namespace: str = "default", certificate_authority: str | None = None
    ) -> Path:
        """Write `kubeconfig()` to `path` (as JSON, which is valid YAML) and return the path."""
        path = Path(path)
        document = self.kubeconfig(namespace=namespace, certificate_authority=certificate_authority)
        path.write_text(json.dumps(document, indent=2))
        return path

    def get(self, resource: str, namespace: str | None, name: str) -> JsonObject | None:
        """The stored object, or None."""
        obj = self._objects.get((resource, namespace, name))
        return _copy(obj) if obj is not None else None

    def upsert(self, resource: str, obj: JsonObject) -> JsonObject:
        """Create or replace an object, emitting ADDED or MODIFIED; returns the stored version."""
        obj = _copy(obj)
        meta = obj.setdefault("metadata", {})
        key = (resource, meta.get("namespace"), meta["name"])
        before = self._objects.get(key)
        self._rv += 1
        group_version, plural = resource.rsplit("/", 1)
        obj.setdefault("apiVersion", group_version)
        obj.setdefault("kind", _KINDS.get(plural, plural.capitalize()))
        meta["resourceVersion"] = str(self._rv)
        if before is None:
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            meta["generation"] = 1
        else:
            meta["uid"] = before["metadata"]["uid"]
            meta["creationTimestamp"] = before["metadata"]["creationTimestamp"]
            meta["generation"] = before["metadata"].get("generation", 1) + 1
        self._objects[key] = obj
        self._record(_Change(self._rv, resource, before, obj))
        return _copy(obj)

    def delete(self, resource: str, namespace: str | None, name: str) -> None:
        """Delete an object, emitting DELETED; KeyError if absent."""
        before = self._objects.pop((resource, namespace, name))
        self._rv += 1
        tombstone = {**before, "metadata": {**before["metadata"], "resourceVersion": str(self._rv)}}
        self._record(_Change(self._rv, resource, before, None, tombstone))

    def upsert_slice(self, endpoint_slice: JsonObject) -> JsonObject:
        """`upsert()` an EndpointSlice (see `endpoint_slice()`)."""
        return self.upsert(ENDPOINTSLICES, endpoint_slice)

    def delete_slice(self, namespace: str, name: str) -> None:
        """`delete()` an EndpointSlice."""
        self.delete(ENDPOINTSLICES, namespace, name)

    def deny(self, verb: str, resource: str) -> None:
        """Make RBAC refuse `verb` (get, list, watch) on `resource` (e.g. ENDPOINTSLICES): 403 Forbidden."""
        self._denied.add((verb, resource))

    def allow(self, verb: str, resource: str) -> None:
        """Undo `deny()`."""
        self._denied.discard((verb, resource))

    def rewind(self, resource_version: int) -> None:
        """An etcd restore from a backup: the current resourceVersion goes back to `resource_version`.

        Objects stay; history is forgotten. A watch from a resourceVersion newer than the current one then
        gets 200 and an in-stream ERROR 504 "Too large resource version" (after `too_large_wait`), as the
        watch cache answers; a list with resourceVersion unset answers at the current one.
        """
        self._rv = resource_version
        self._history.clear()
        self._compacted = resource_version

    def compact(self) -> None:
        """Forget the change history: a watch from any older resourceVersion now gets 410 Gone."""
        self._history.clear()
        self._compacted = self._rv

    def send_bookmarks(self) -> None:
        """Send a BOOKMARK now on every watch that allows them."""
        self._signal(_Signal.BOOKMARK)

    def end_watches(self) -> None:
        """End every open watch cleanly, as the apiserver does when timeoutSeconds runs out."""
        self._signal(_Signal.END)

    def abort_watches(self) -> None:
        """Drop the connection of every open watch mid-stream, with no terminating chunk."""
        self._signal(_Signal.ABORT)

    async def wait_for_watches(self, count: int = 1) -> None:
        """Wait until at least `count` watches are open (bound it with `anyio.fail_after`)."""
        while len(self._watchers) < count:
            if self._watchers_changed is None:
                self._watchers_changed = anyio.Event()
            await self._watchers_changed.wait()

    def _signal(self, signal: _Signal) -> None:
        for watcher in self._watchers:
            watcher.queue.put_nowait((signal, None))

    def _record(self, change: _Change) -> None:
        self._history.append(change)
        if self.history_limit is not None and len(self._history) > self.history_limit:
            dropped = len(self._history) - self.history_limit
            self._compacted = self._history[dropped - 1].rv
            del self._history[:dropped]
        for watcher in self._watchers:
            for event in change.events_for(watcher.query):
                watcher.queue.put_nowait((_Signal.EVENT, event))

    def _error(self, code: int, reason: str, message: str) -> web.Response:
        return web.json_response(status_object(code, reason, message), status=code)

    def _unavailable(self, code: int) -> web.Response:
        """`unavailable`'s answer: 429 as API Priority and Fairness words it, else 503-style."""
        if code == 429:
            status = status_object(429, "TooManyRequests", "Too many requests, please try again later.")
        else:
            status = status_object(code, "ServiceUnavailable", "the server is currently unable to handle the request")
        headers = {}
        if self.retry_after is not None:
            status["details"] = {"retryAfterSeconds": self.retry_after}
            headers["Retry-After"] = str(self.retry_after)
        return web.json_response(status, status=code, headers=headers)

    def _objects_at(self, rv: int) -> dict[tuple[str, str | None, str], JsonObject]:
        """The objects as they were at `rv` (>= the last compaction), undoing the history after it."""
        objects = dict(self._objects)
        for change in reversed(self._history):
            if change.rv <= rv:
                break
            meta = (change.before or change.after or change.tombstone or {})["metadata"]
            key = (change.resource, meta.get("namespace"), meta["name"])
            if change.before is None:
                objects.pop(key, None)
            else:
                objects[key] = change.before
        return objects

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        self.requests.append(LoggedRequest(request.method, request.path, query))
        if self.unavailable:
            return self._unavailable(self.unavailable)
        if self.stall:
            await asyncio.Event().wait()  # never answered; stop() cancels the handler
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            return self._error(401, "Unauthorized", "Unauthorized")
        if request.path == "/version":
            return web.json_response({"major": "1", "minor": "33", "gitVersion": "v1.33.0-fake"})
        m = _PATH.fullmatch(request.path)
        if m is None:
            return self._error(404, "NotFound", "the server could not find the requested resource")
        api_version = m["core"] or f"{m['group']}/{m['version']}"
        try:
            selected = _Query(
                resource=f"{api_version}/{m['plural']}",
                api_version=api_version,
                kind=_KINDS.get(m["plural"], m["plural"].capitalize()),
                namespace=m["namespace"],
                name=m["name"],
                labels=parse_label_selector(query.get("labelSelector", "")),
                fields=parse_field_selector(query.get("fieldSelector", "")),
            )
        except ValueError as exc:
            return self._error(400, "BadRequest", str(exc))
        verb = "watch" if _parse_bool(query.get("watch")) else "get" if selected.name else "list"
        if (verb, selected.resource) in self._denied:
            return self._forbidden(verb, selected, m["plural"], m["group"] or "")
        if _parse_bool(query.get("watch")):
            return await self._watch(request, selected, query)
        if selected.name is not None:
            obj = self._objects.get((selected.resource, selected.namespace, selected.name))
            if obj is None:
                return self._error(404, "NotFound", f'{m["plural"]} "{selected.name}" not found')
            return web.Response(body=orjson.dumps(obj), content_type="application/json")
        return self._list(selected, query)

    def _forbidden(self, verb: str, selected: _Query, plural: str, group: str) -> web.Response:
        """A 403 as the RBAC authorizer words it."""
        qualified = f"{plural}.{group}" if group else plural
        message = f'{qualified} is forbidden: User "{self.user}" cannot {verb} resource "{plural}"'
        message += f' in API group "{group}"'
        message += f' in the namespace "{selected.namespace}"' if selected.namespace else " at the cluster scope"
        status = status_object(403, "Forbidden", message)
        status["details"] = {"group": group, "kind": plural}
        return web.json_response(status, status=403)

    def _list(self, selected: _Query, query: Mapping[str, str]) -> web.Response:
        # A continue token is "RV/OFFSET": later pages are served from the first page's resourceVersion.
        rv, start = self._rv, 0
        if token := query.get("continue"):
            rv_text, _, offset = token.partition("/")
            if not (rv_text.isdigit() and offset.isdigit()):
                return self._error(400, "BadRequest", f"continue key is not valid: {token!r}")
            rv, start = int(rv_text), int(offset)
            if rv < self._compacted:
                message = (
                    "The provided continue parameter is too old to display a consistent list result. You can"
                    " start a new list without the continue parameter, or use the continue token in this"
                    " response to retrieve the remainder of the results. Continuing with the provided token"
                    " results in an inconsistent list - objects that were created, modified, or deleted"
                    " between the time the first chunk was returned and now may show up in the list."
                )
                status = status_object(410, "Expired", message)
                status["metadata"] = {"continue": f"{self._rv}/{start}"}
                return web.json_response(status, status=410)
        objects = self._objects if rv == self._rv else self._objects_at(rv)
        items = sorted(
            (obj for (resource, _, _), obj in objects.items() if resource == selected.resource),
            key=lambda obj: (obj["metadata"].get("namespace") or "", obj["metadata"]["name"]),
        )
        items = [obj for obj in items if selected.matches(obj)]
        meta: JsonObject = {"resourceVersion": str(rv)}
        end = len(items)
        if query.get("limit", "").isdigit() and int(query["limit"]) > 0:
            end = min(start + int(query["limit"]), len(items))
            if end < len(items):
                meta["continue"] = f"{rv}/{end}"
                meta["remainingItemCount"] = len(items) - end
        # Items of a list carry no kind or apiVersion, as in real responses.
        page = [{k: v for k, v in obj.items() if k not in ("kind", "apiVersion")} for obj in items[start:end]]
        body = {"kind": f"{selected.kind}List", "apiVersion": selected.api_version, "metadata": meta, "items": page}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    def _bookmark(self, selected: _Query, annotations: Mapping[str, str] | None = None) -> JsonObject:
        meta: JsonObject = {"resourceVersion": str(self._rv), "creationTimestamp": None}
        if annotations:
            meta["annotations"] = dict(annotations)
        return {
            "type": "BOOKMARK",
            "object": {"kind": selected.kind, "apiVersion": selected.api_version, "metadata": meta},
        }

    def _backlog(self, selected: _Query, query: Mapping[str, str]) -> list[JsonObject]:
        """The events a new watch starts with; a list ending in an ERROR event ends the watch."""
        rv = query.get("resourceVersion", "")
        if self.watch_error is not None:
            return [{"type": "ERROR", "object": _copy(self.watch_error)}]
        initial_events = _parse_bool(query.get("sendInitialEvents"))
        if rv in ("", "0") or initial_events:
            current = sorted(
                (obj for (resource, _, _), obj in self._objects.items() if resource == selected.resource),
                key=lambda obj: int(obj["metadata"]["resourceVersion"]),
            )
            backlog = [{"type": "ADDED", "object": obj} for obj in current if selected.matches(obj)]
            if initial_events:
                backlog.append(self._bookmark(selected, {"k8s.io/initial-events-end": "true"}))
            return backlog
        if not rv.isdigit():
            return [{"type": "ERROR", "object": status_object(400, "BadRequest", f"invalid resource version: {rv}")}]
        if int(rv) > self._rv:
            return [{"type": "ERROR", "object": too_large_status(int(rv), self._rv)}]
        if int(rv) < self._compacted:
            message = f"too old resource version: {rv} ({self._compacted})"
            return [{"type": "ERROR", "object": status_object(410, "Expired", message)}]
        return [event for change in self._history if change.rv > int(rv) for event in change.events_for(selected)]

    async def _watch(self, request: web.Request, selected: _Query, query: Mapping[str, str]) -> web.StreamResponse:
        if "sendInitialEvents" in query and query.get("resourceVersionMatch") != "NotOlderThan":
            message = "sendInitialEvents requires resourceVersionMatch=NotOlderThan"
            return self._error(422, "Invalid", message)
        bookmarks = _parse_bool(query.get("allowWatchBookmarks"))
        timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)

        async def send(event: JsonObject) -> None:
            await response.write(orjson.dumps(event) + b"\n")
            if self.on_event_sent is not None and event["type"] != "ERROR":
                self.on_event_sent(event)

        # Take the backlog and register in one step, with no await between: no change is lost.
        backlog = self._backlog(selected, query)
        fatal = bool(backlog) and backlog[-1]["type"] == "ERROR"
        watcher = _Watcher(selected)
        if not fatal:
            self._watchers.add(watcher)
            if self._watchers_changed is not None:
                self._watchers_changed.set()
                self._watchers_changed = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        try:
            if fatal and backlog[-1]["object"]["code"] == 504 and self.too_large_wait > 0:
                await asyncio.sleep(self.too_large_wait)  # the cache waits for itself to catch up first
            for initial in backlog:
                await send(initial)
            while not fatal:
                waits = [self.bookmark_interval if bookmarks else None, deadline - loop.time() if deadline else None]
                wait = min((w for w in waits if w is not None), default=None)
                signal: _Signal = _Signal.BOOKMARK
                event: JsonObject | None = None
                with anyio.move_on_after(wait):
                    signal, event = await watcher.queue.get()
                if deadline is not None and loop.time() >= deadline and signal is _Signal.BOOKMARK:
                    break
                if signal is _Signal.EVENT and event is not None:
                    await send(event)
                elif signal is _Signal.BOOKMARK and bookmarks:
                    await send(self._bookmark(selected))
                elif signal is _Signal.END:
                    break
                elif signal is _Signal.ABORT:
                    if request.transport is not None:
                        request.transport.abort()
                    return response
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client went away, which ends a watch
        finally:
            self._watchers.discard(watcher)
        return response

    def __repr__(self) -> str:
        state = self.url if self.running else "stopped"
        return f"<FakeKubeAPI {state} rv={self._rv} objects={len(self._objects)} watches={len(self._watchers)}>"


def slice_endpoint(
    address: str,
    *,
    ready: bool | None = True,
    serving: bool | None = None,
    terminating: bool | None = None,
    zone: str | None = None,
    node_name: str | None = None,
    pod: str | None = None,
    hostname: str | None = None,
    for_zones: Sequence[str] | None = None,
) -> JsonObject:
    """One endpoint of an EndpointSlice; `serving` defaults to `ready`, None leaves a condition unset.

    `for_zones` sets the topology hint `hints.forZones` (the zones this endpoint should serve).
    """
    conditions: JsonObject = {}
    for key, value in (("ready", ready), ("serving", ready if serving is None else serving)):
        if value is not None:
            conditions[key] = value
    if terminating is not None:
        conditions["terminating"] = terminating
    endpoint: JsonObject = {"addresses": [address], "conditions": conditions}
    optional = {"zone": zone, "nodeName": node_name, "hostname": hostname}
    endpoint.update({key: value for key, value in optional.items() if value is not None})
    if pod is not None:
        endpoint["targetRef"] = {"kind": "Pod", "name": pod}
    if for_zones is not None:
        endpoint["hints"] = {"forZones": [{"name": zone} for zone in for_zones]}
    return endpoint


def endpoint_slice(
    service: str,
    namespace: str,
    name: str,
    *endpoints: str | JsonObject,
    port: int | None = 9000,
    port_name: str = "rpc",
    protocol: str = "TCP",
    ports: Sequence[tuple[str, int]] | None = None,
    address_type: str = "IPv4",
    ready: bool | None = True,
    serving: bool | None = None,
    terminating: bool | None = None,
    zone: str | None = None,
    node_name: str | None = None,
    labels: Mapping[str, str] | None = None,
) -> JsonObject:
    """A discovery.k8s.io/v1 EndpointSlice of `service`; string endpoints get the condition keywords.

    `ports` (name, number) pairs replace the single `port`/`port_name`.
    """
    built: list[JsonObject] = []
    for item in endpoints:
        if isinstance(item, str):
            endpoint = slice_endpoint(
                item, ready=ready, serving=serving, terminating=terminating, zone=zone, node_name=node_name
            )
        else:
            endpoint = _copy(item)
        if "targetRef" in endpoint:
            endpoint["targetRef"].setdefault("namespace", namespace)
        built.append(endpoint)
    port_list: Iterable[tuple[str, int | None]] = ports if ports is not None else [(port_name, port)]
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                SERVICE_NAME_LABEL: service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                **(labels or {}),
            },
        },
        "addressType": address_type,
        "endpoints": built,
        "ports": [{"name": n, "port": p, "protocol": protocol} for n, p in port_list],
    }
