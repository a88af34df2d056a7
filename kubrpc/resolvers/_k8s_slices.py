"""EndpointSlices to endpoints: port matching, conditions, and an incremental merge of all slices.

Pure data, no I/O: the watch in `_k8s_watch` feeds raw slice JSON into an `EndpointView`, which
keeps the merged endpoint set of one port up to date one slice at a time, so an event costs the
size of its slice, not the size of the service.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from ..endpoint import Endpoint

__all__ = (
    "ADDRESS_FAMILIES",
    "AddressFamily",
    "EndpointView",
    "PortSelector",
    "compact_slice",
    "endpoint_from",
    "match_port",
)

log = logging.getLogger("kubrpc.resolvers.k8s")

JsonObject = dict[str, Any]
#: A port number (the endpoints' own port) or the name of a Service port.
PortSelector = int | str
_Key = tuple[str, int]
#: Which address family a view yields: "auto" (one per Service: IPv4 if it has any IPv4 endpoint, else
#: IPv6), "IPv4", "IPv6", or "any" (both: a dual-stack pod is then two endpoints).
AddressFamily = Literal["auto", "IPv4", "IPv6", "any"]
ADDRESS_FAMILIES: tuple[AddressFamily, ...] = ("auto", "IPv4", "IPv6", "any")
#: The addressTypes whose addresses are IPs. FQDN slices have no defined semantics (the EndpointSlice
#: API reference: "The EndpointSlice controller only generates, and kube-proxy only processes, slices of
#: addressType IPv4 and IPv6. No semantics are defined for the FQDN type.") and are ignored.
IP_ADDRESS_TYPES = frozenset({"IPv4", "IPv6"})


def compact_slice(raw: JsonObject) -> JsonObject:
    """The parts of an EndpointSlice that matter here (the rest is dropped to save memory)."""
    return {
        "addressType": raw.get("addressType") or "IPv4",
        "ports": raw.get("ports") or [],
        "endpoints": raw.get("endpoints") or [],
    }


def _describe_ports(slices: Mapping[str, JsonObject]) -> str:
    seen: dict[str, None] = {}
    for raw in slices.values():
        for port in raw["ports"]:
            name, number = port.get("name") or "", port.get("port")
            label = f"{name} ({number})" if name else f"{number} (unnamed)"
            if (port.get("protocol") or "TCP") != "TCP":
                label += f" {port.get('protocol')}"
            seen[label] = None
    return ", ".join(seen) or "none"


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

    It is ready when `conditions.ready` is true or unset and it is not terminating. Its metadata
    carries `serving` and `terminating` ("true"/"false"; an unset `serving` defers to `ready`, an
    unset `terminating` is false, as the EndpointConditions reference says), and `for_zones` (the
    comma-separated `hints.forZones`) when the slice has topology hints. Only the first address
    counts (the API gives the others no meaning).
    """
    addresses = raw.get("addresses")
    if not addresses:
        return None
    conditions = raw.get("conditions") or {}
    terminating = conditions.get("terminating") is True
    ready = conditions.get("ready") is not False and not terminating
    serving = conditions.get("serving")
    if serving is None:
        serving = conditions.get("ready") is not False
    metadata = {"slice": slice_name, "serving": "true" if serving else "false"}
    metadata["terminating"] = "true" if terminating else "false"
    hints = raw.get("hints") or {}
    if zones := [z["name"] for z in hints.get("forZones") or () if isinstance(z, dict) and z.get("name")]:
        metadata["for_zones"] = ",".join(zones)
    if node := raw.get("nodeName"):
        metadata["node"] = node
    target = raw.get("targetRef") or {}
    if target.get("kind") == "Pod" and target.get("name"):
        metadata["pod"] = target["name"]
    if hostname := raw.get("hostname"):
        metadata["hostname"] = hostname
    try:
        # The API server admits only IPs in IPv4/IPv6 slices; anything else (a hand-made object, a fake) is skipped.
        address = str(ipaddress.ip_address(addresses[0]))
        return Endpoint(address, port, zone=raw.get("zone") or None, ready=ready, metadata=metadata)
    except ValueError as exc:
        log.debug("skipping endpoint %r of slice %s: %s", addresses[0], slice_name, exc)
        return None


def _same(a: Endpoint, b: Endpoint) -> bool:
    return a == b and a.metadata == b.metadata


def _serving_fallback(endpoints: list[Endpoint]) -> list[Endpoint]:
    """KEP-1669, as kube-proxy does it: when no endpoint is ready, those still serving (while
    terminating) take the traffic; they are yielded with ready=True (their metadata keeps
    `terminating: "true"`)."""
    if any(ep.ready for ep in endpoints):
        return endpoints
    if not any(ep.metadata.get("serving") == "true" for ep in endpoints):
        return endpoints
    return [dataclasses.replace(ep, ready=True) if ep.metadata.get("serving") == "true" else ep for ep in endpoints]


class EndpointView:
    """The merged endpoints of one port across every slice of a service, kept current slice by slice.

    An address listed by several slices (briefly, while the controller moves it) counts once, ready
    if any slice says so. `version` grows on every real change, and each listener is called then.
    Only slices of addressType IPv4 and IPv6 are read, and of those the `family` ones (see
    `AddressFamily`). When no endpoint is ready, the serving ones are used (KEP-1669).
    """

    def __init__(self, selector: PortSelector, *, family: AddressFamily = "auto", source: str = "") -> None:
        if family not in ADDRESS_FAMILIES:
            raise ValueError(f"bad address_family {family!r}: expected one of {', '.join(ADDRESS_FAMILIES)}")
        self.selector = selector
        self.family = family
        #: What the slices belong to, for explain(): e.g. "Service default/arith".
        self.source = source or "the Service"
        self.version = 0
        self.synced = False
        self._raw: dict[str, JsonObject] = {}
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
            endpoints = list(self._merged.values())
            if self.family == "auto" and any(":" in ep.host for ep in endpoints):
                ipv4 = [ep for ep in endpoints if ":" not in ep.host]
                endpoints = ipv4 or endpoints  # one family per Service: IPv4 when it has any
            self._snapshot = _serving_fallback(endpoints)
        return list(self._snapshot)

    def explain(self) -> str | None:
        """Why no endpoint is usable (no slices, no such port, none ready...), or None if one is."""
        if not self.synced:
            return None
        endpoints = self.snapshot()
        if any(ep.ready for ep in endpoints):
            return None
        where = self.source
        slices = self._raw
        if not slices:
            return (
                f"no EndpointSlice has the label of {where}"
                " (no such Service in that namespace, or a Service without a selector)"
            )
        usable = {name: raw for name, raw in slices.items() if self._accepts(raw)}
        if not usable:
            types = sorted({raw["addressType"] for raw in slices.values()})
            wanted = "IPv4 or IPv6" if self.family in ("auto", "any") else self.family
            return f"the EndpointSlices of {where} are of addressType {', '.join(types)}, none {wanted}"
        if not any(match_port(raw["ports"], self.selector) is not None for raw in usable.values()):
            ports = _describe_ports(usable)
            if isinstance(self.selector, int):
                return (
                    f"no EndpointSlice of {where} has TCP port {self.selector} (they have: {ports}); a number is the"
                    " endpoints' target port (the containerPort), not the Service port: use the port's name or number"
                    " from that list"
                )
            return f"no EndpointSlice of {where} has a TCP port named {self.selector!r} (they have: {ports})"
        if not endpoints:
            return f"{where} has no endpoints (no running pod matches its selector?)"
        return f"none of the {len(endpoints)} endpoints of {where} is ready or serving"

    def _accepts(self, raw: JsonObject) -> bool:
        kind = raw["addressType"]
        if kind not in IP_ADDRESS_TYPES:
            return False
        return self.family in ("auto", "any") or kind == self.family

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
        if raw is None:
            self._raw.pop(name, None)
        else:
            self._raw[name] = raw
            if not self._accepts(raw):
                raw = None
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
