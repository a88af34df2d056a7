"""EndpointSlices to endpoints: port matching, conditions, and an incremental merge of all slices.

Pure data, no I/O: the watch in `_k8s_watch` feeds raw slice JSON into an `EndpointView`, which
keeps the merged endpoint set of one port up to date one slice at a time, so an event costs the
size of its slice, not the size of the service.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..endpoint import Endpoint

__all__ = ("EndpointView", "PortSelector", "compact_slice", "endpoint_from", "match_port")

log = logging.getLogger("kubrpc.resolvers.k8s")

JsonObject = dict[str, Any]
#: A port number (the endpoints' own port) or the name of a Service port.
PortSelector = int | str
_Key = tuple[str, int]


def compact_slice(raw: JsonObject) -> JsonObject:
    """The parts of an EndpointSlice that matter here (the rest is dropped to save memory)."""
    return {"ports": raw.get("ports") or [], "endpoints": raw.get("endpoints") or []}


def match_port(ports: Sequence[JsonObject], selector: PortSelector) -> int | None:
    """The TCP port number of a slice that `selector` names (by number or by name), or None."""
    for port in ports:
        number = port.get("port")
        if number is None or (port.get("protocol") or "TCP") != "TCP":
            continue
        if (number == selector) if isinstance(selector, int) else ((port.get("name") or "") == selector):
            return int(number)
    return None


def endpoint_from(raw: JsonObject, port: int, slice_name: str) -> Endpoint | None:
    """One slice endpoint as an Endpoint, or None if it has no usable address.

    It is ready when `conditions.ready` is true or unset and it is not terminating. Only the first
    address counts (the API gives the others no meaning).
    """
    addresses = raw.get("addresses")
    if not addresses:
        return None
    conditions = raw.get("conditions") or {}
    ready = conditions.get("ready") is not False and conditions.get("terminating") is not True
    metadata = {"slice": slice_name}
    if node := raw.get("nodeName"):
        metadata["node"] = node
    target = raw.get("targetRef") or {}
    if target.get("kind") == "Pod" and target.get("name"):
        metadata["pod"] = target["name"]
    if hostname := raw.get("hostname"):
        metadata["hostname"] = hostname
    try:
        return Endpoint(str(addresses[0]), port, zone=raw.get("zone") or None, ready=ready, metadata=metadata)
    except ValueError as exc:
        log.debug("skipping endpoint %r of slice %s: %s", addresses[0], slice_name, exc)
        return None


def _same(a: Endpoint, b: Endpoint) -> bool:
    return a == b and a.metadata == b.metadata


class EndpointView:
    """The merged endpoints of one port across every slice of a service, kept current slice by slice.

    An address listed by several slices (briefly, while the controller moves it) counts once, ready
    if any slice says so. `version` grows on every real change, and each listener is called then.
    """

    def __init__(self, selector: PortSelector) -> None:
        self.selector = selector
        self.version = 0
        self.synced = False
        self._slices: dict[str, dict[_Key, tuple[JsonObject, Endpoint]]] = {}
        self._sources: dict[_Key, dict[str, Endpoint]] = {}
        self._merged: dict[_Key, Endpoint] = {}
        self._snapshot: list[Endpoint] | None = None
        self._listeners: list[Callable[[], None]] = []

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after every change."""
        self._listeners.append(listener)

    def unsubscribe(self, listener: Callable[[], None]) -> None:
        """Stop calling `listener`."""
        self._listeners.remove(listener)

    @property
    def listeners(self) -> int:
        """How many listeners are subscribed."""
        return len(self._listeners)

    def snapshot(self) -> list[Endpoint]:
        """The current endpoint list (a new list each call)."""
        if self._snapshot is None:
            self._snapshot = list(self._merged.values())
        return list(self._snapshot)

    def apply(self, name: str, raw: JsonObject | None) -> bool:
        """Add, replace or (with None) remove one slice; True if the endpoint set changed."""
        changed = self._apply(name, raw)
        if changed:
            self._changed()
        return changed

    def replace_all(self, slices: Mapping[str, JsonObject]) -> bool:
        """Replace every slice (after a list); True if the endpoint set changed or this is the first sync."""
        changed = False
        for name in [name for name in self._slices if name not in slices]:
            changed |= self._apply(name, None)
        for name, raw in slices.items():
            changed |= self._apply(name, raw)
        changed |= not self.synced
        self.synced = True
        if changed:
            self._changed()
        return changed

    def _changed(self) -> None:
        self.version += 1
        self._snapshot = None
        for listener in list(self._listeners):
            listener()

    def _apply(self, name: str, raw: JsonObject | None) -> bool:
        old = self._slices.pop(name, {})
        new: dict[_Key, tuple[JsonObject, Endpoint]] = {}
        port = match_port(raw["ports"], self.selector) if raw is not None else None
        if raw is not None and port is not None:
            for item in raw["endpoints"]:
                addresses = item.get("addresses")
                if not addresses:
                    continue
                key = (str(addresses[0]), port)
                previous = old.get(key)
                if previous is not None and previous[0] == item:
                    new[key] = previous
                elif (endpoint := endpoint_from(item, port, name)) is not None:
                    new[key] = (item, endpoint)
        if new:
            self._slices[name] = new
        changed = False
        for key in old.keys() - new.keys():
            sources = self._sources[key]
            del sources[name]
            if not sources:
                del self._sources[key]
            changed |= self._merge(key)
        for key, (_, endpoint) in new.items():
            previous = old.get(key)
            if previous is None or previous[1] is not endpoint:
                self._sources.setdefault(key, {})[name] = endpoint
                changed |= self._merge(key)
        return changed

    def _merge(self, key: _Key) -> bool:
        sources = self._sources.get(key)
        current = self._merged.get(key)
        if not sources:
            if current is None:
                return False
            del self._merged[key]
            return True
        # Prefer a ready copy, then the first slice by name: the choice must not depend on event order.
        best = min(sources.items(), key=lambda item: (not item[1].ready, item[0]))[1]
        if current is not None and _same(current, best):
            return False
        self._merged[key] = best
        return True

    def __repr__(self) -> str:
        ready = sum(endpoint.ready for endpoint in self._merged.values())
        return f"<EndpointView port={self.selector!r} [{len(self._merged)} endpoints, {ready} ready] v{self.version}>"
