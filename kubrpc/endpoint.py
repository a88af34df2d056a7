"""Endpoint: one server instance that a balancer can pick."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ("Endpoint",)

_EMPTY: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One server instance: where it is, how much traffic it takes, and whether it may take any."""

    host: str
    port: int
    weight: float = 1.0
    zone: str | None = None
    ready: bool = True
    metadata: Mapping[str, str] = field(default_factory=lambda: _EMPTY, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"endpoint host must be a non-empty string, not {self.host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ValueError(f"endpoint port must be an integer in 1..65535, not {self.port!r}")
        weight: Any = self.weight
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"endpoint weight must be a finite number >= 0, not {weight!r}")
        object.__setattr__(self, "weight", float(weight))
        if not isinstance(self.metadata, MappingProxyType):
            object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))

    @property
    def address(self) -> str:
        """`host:port`, with IPv6 hosts in brackets."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        extra = "" if self.weight == 1.0 else f", weight={self.weight:g}"
        extra += f", zone={self.zone!r}" if self.zone else ""
        extra += "" if self.ready else ", ready=False"
        return f"Endpoint({self.host!r}, {self.port}{extra})"
