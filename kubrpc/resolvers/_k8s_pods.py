"""Endpoint weights from a pod annotation: a shared list+watch of a namespace's Pods, and a weighted view.

Opt-in (`KubernetesResolver(..., weights_from_pods=True)`, or `?weights=pods` in the target). The
EndpointSlices name each endpoint's pod (`targetRef`); `PodWatch` keeps, for every pod of the
namespace (or of a label selector), the weight its `kubrpc.io/weight` annotation gives, and
`WeightedView` applies those weights to the endpoints of an `EndpointView`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

from ..endpoint import Endpoint
from ._k8s_slices import EndpointView
from ._k8s_watch import JsonObject, Lister, ListWatch, WatchOptions

if TYPE_CHECKING:
    from kubernetes_asyncio.client import ApiClient

__all__ = ("WEIGHT_ANNOTATION", "PodWatch", "WeightedView", "parse_weight")

log = logging.getLogger("kubrpc.resolvers.k8s")

#: The pod annotation that sets the weight of the pod's endpoints (a finite number >= 0; default 1).
WEIGHT_ANNOTATION = "kubrpc.io/weight"

#: Called with the names of the pods whose weight changed, or None when the watch's state changed.
WeightListener = Callable[[Collection[str] | None], None]


def parse_weight(value: object) -> float | None:
    """The weight an annotation value gives (a finite number >= 0), or None if it is malformed."""
    if not isinstance(value, str):
        return None
    try:
        weight = float(value.strip())
    except ValueError:
        return None
    if not math.isfinite(weight) or weight < 0:
        return None
    return weight + 0.0  # -0.0 becomes 0.0


def _annotation(obj: JsonObject) -> str | None:
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    value = annotations.get(WEIGHT_ANNOTATION)
    return value if isinstance(value, str) else None


class PodWatch(ListWatch):
    """Lists then watches the Pods of one namespace and keeps the weight of each that is not 1.0.

    Only the annotation is kept of each pod. A missing annotation means 1.0; a malformed or negative
    one means 1.0 too, with a warning logged once per pod and value.
    """

    noun = "pods"
    resource = "pods"
    rbac_hint = "deploy/optional/rbac-pod-weights.yaml (Role kubrpc-pod-weight-reader)"

    def __init__(
        self,
        client: ApiClient,
        *,
        owns_client: bool,
        namespace: str,
        label_selector: str | None,
        options: WatchOptions,
    ) -> None:
        super().__init__(
            client, owns_client=owns_client, namespace=namespace, label_selector=label_selector, options=options
        )
        #: The weight of every known pod whose weight is not 1.0, by pod name.
        self.weights: dict[str, float] = {}
        self.synced = False
        self.failed_before_sync = False
        self._pods = 0
        self._warned: dict[str, str] = {}
        self._listeners: list[WeightListener] = []

    def weight(self, pod: str | None) -> float:
        """The weight of a pod (1.0 when unknown or not annotated)."""
        return self.weights.get(pod, 1.0) if pod is not None else 1.0

    def subscribe(self, listener: WeightListener) -> None:
        """Call `listener(pods)` after weights change, and `listener(None)` on the first list or failure."""
        self._listeners.append(listener)

    def unsubscribe(self, listener: WeightListener) -> None:
        """Stop calling `listener`."""
        self._listeners.remove(listener)

    def _notify(self, pods: Collection[str] | None) -> None:
        for listener in list(self._listeners):
            listener(pods)

    def _weight_of(self, name: str, value: str | None) -> float:
        if value is None:
            self._warned.pop(name, None)
            return 1.0
        weight = parse_weight(value)
        if weight is not None:
            self._warned.pop(name, None)
            return weight
        if self._warned.get(name) != value:
            self._warned[name] = value
            log.warning(
                "pod %s/%s: annotation %s=%r is not a finite number >= 0; using weight 1",
                self.namespace,
                name,
                WEIGHT_ANNOTATION,
                value,
            )
        return 1.0

    def _lister(self) -> Lister:
        from kubernetes_asyncio.client import CoreV1Api

        return CoreV1Api(self._client).list_namespaced_pod

    def _compact(self, obj: JsonObject) -> str | None:
        return _annotation(obj)

    def _reset(self, objects: dict[str, Any]) -> None:
        for name in [name for name in self._warned if name not in objects]:
            del self._warned[name]
        weights = {}
        for name, value in objects.items():
            if (weight := self._weight_of(name, value)) != 1.0:
                weights[name] = weight
        old, self.weights = self.weights, weights
        self._pods = len(objects)
        changed = {name for name in old.keys() | weights.keys() if old.get(name, 1.0) != weights.get(name, 1.0)}
        if not self.synced:
            self.synced = True
            self._notify(None)
        elif changed:
            self._notify(changed)

    def _update(self, name: str, compacted: Any) -> None:
        weight = self._weight_of(name, compacted)
        old = self.weights.pop(name, 1.0)
        if weight != 1.0:
            self.weights[name] = weight
        if weight != old:
            self._notify((name,))

    def _known(self) -> int:
        return self._pods

    def _on_error(self, error: str) -> None:
        if error.startswith("HTTP 403") and self.stats.errors == 1:
            log.warning(
                "%s: forbidden to list pods; weights stay 1 until the client may get, list and watch pods "
                "(see deploy/optional/rbac-pod-weights.yaml)",
                self,
            )
        if not self.synced and not self.failed_before_sync:
            self.failed_before_sync = True
            self._notify(None)  # the endpoints need not wait for the pods any longer


class WeightedView:
    """The endpoints of an `EndpointView` with each one's weight taken from its pod's annotation.

    It is synced once the endpoints are and the pods have been listed (or listing them failed: then
    weights are 1.0 until it succeeds). `version` grows when the endpoints or their weights change.
    """

    def __init__(self, base: EndpointView, pods: PodWatch) -> None:
        self.base = base
        self.pods = pods
        self.version = 1  # not 0: over watches that are synced already, a new view has a snapshot to yield
        self._listeners: list[Callable[[], None]] = []
        self._snapshot: list[Endpoint] | None = None
        self._last: list[Endpoint] | None = None
        self._base_pods: frozenset[str] | None = None
        base.subscribe(self._base_changed)
        pods.subscribe(self._weights_changed)

    @property
    def synced(self) -> bool:
        """True once there is a snapshot to yield."""
        return self.base.synced and (self.pods.synced or self.pods.failed_before_sync)

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after every change."""
        self._listeners.append(listener)

    def unsubscribe(self, listener: Callable[[], None]) -> None:
        """Stop calling `listener`."""
        self._listeners.remove(listener)

    def close(self) -> None:
        """Stop following the endpoints and the pods."""
        self.base.unsubscribe(self._base_changed)
        self.pods.unsubscribe(self._weights_changed)

    def snapshot(self) -> list[Endpoint]:
        """The current endpoint list, weighted (a new list each call)."""
        if self._snapshot is None:
            self._snapshot = self._weighted()
        self._last = self._snapshot
        return list(self._snapshot)

    def _weighted(self) -> list[Endpoint]:
        weight = self.pods.weight
        out = []
        for endpoint in self.base.snapshot():
            w = weight(endpoint.metadata.get("pod"))
            out.append(endpoint if w == endpoint.weight else dataclasses.replace(endpoint, weight=w))
        return out

    def _base_changed(self) -> None:
        self._base_pods = None
        self._changed()

    def _weights_changed(self, pods: Collection[str] | None) -> None:
        if pods is None:
            # The pods were listed (or failed to be): yield unless that changes nothing already yielded.
            if self._last is not None and self._weighted() == self._last:
                return
        else:
            if self._base_pods is None:
                self._base_pods = frozenset(p for e in self.base.snapshot() if (p := e.metadata.get("pod")))
            if self._base_pods.isdisjoint(pods):
                return
        self._changed()

    def _changed(self) -> None:
        self.version += 1
        self._snapshot = None
        for listener in list(self._listeners):
            listener()

    def __repr__(self) -> str:
        return f"<WeightedView {self.base!r} {len(self.pods.weights)} weighted pods v{self.version}>"
