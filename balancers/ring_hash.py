"""ring_hash: consistent hashing of a per-call key onto a ring of virtual nodes (Ketama)."""

from __future__ import annotations

import bisect
import hashlib
import random
import struct
from collections.abc import Sequence

from kubrpc.endpoint import Endpoint

from ._eligible import unavailable, weighted

__all__ = ("RingHash",)

# A ring entry is a 64-bit hash with its low bits replaced by the owner's index, so the ring is
# one flat sorted list of ints: one bisect per pick, and one C-level sort per update.
_INDEX_BITS = 24
_INDEX_MASK = (1 << _INDEX_BITS) - 1
_POSITION_MASK = ((1 << 64) - 1) ^ _INDEX_MASK
_POINTS_PER_DIGEST = 8
_UNPACK = struct.Struct(f"<{_POINTS_PER_DIGEST}Q").unpack


def key_hash(key: str | bytes) -> int:
    """The ring position of a key: 64 bits of BLAKE2b, stable across processes and versions."""
    data = key.encode() if isinstance(key, str) else key
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & _POSITION_MASK


class RingHash:
    """Consistent hashing: `pick_for(key)` sends a key to the same endpoint while it stays.

    Each endpoint owns `replicas` points on a 64-bit ring (scaled by weight relative to the
    heaviest, at least 1), at positions hashed from its address alone; a key goes to the first
    point at or after its hash. Adding an endpoint therefore moves only the keys it takes over
    (about 1/(n+1) of them), and removing one moves only its own keys. The ring is capped at
    `max_ring_size` points: above `max_ring_size // replicas` endpoints, each gets fewer points,
    which costs balance and, when the per-endpoint count changes, some extra remapping. `pick()`
    without a key hashes a random position, so it follows the same shares. Weight 0 is never
    picked unless every eligible weight is 0. Every client with the same endpoint set builds the
    same ring, whatever the order of the update.
    """

    def __init__(self, *, replicas: int = 100, max_ring_size: int = 1 << 17, rng: random.Random | None = None) -> None:
        if replicas < 1 or max_ring_size < 1:
            raise ValueError("replicas and max_ring_size must be >= 1")
        self._replicas = replicas
        self._max_ring_size = max_ring_size
        self._getrandbits = (rng or random.Random()).getrandbits
        self._endpoints: tuple[Endpoint, ...] = ()
        self._ring: list[int] = []
        self._points: dict[tuple[str, int], list[int]] = {}

    def update(self, endpoints: Sequence[Endpoint], /) -> None:
        """Replace the endpoint set and rebuild the ring (points of known addresses are reused)."""
        ready, weights = weighted(endpoints)
        if len(ready) > _INDEX_MASK + 1:
            raise ValueError(f"ring_hash supports at most {_INDEX_MASK + 1} endpoints")
        order = sorted(range(len(ready)), key=lambda i: (ready[i].host, ready[i].port))
        ready = tuple(ready[i] for i in order)
        weights = [weights[i] for i in order]
        top = max(weights, default=1.0)
        per = max(1, min(self._replicas, self._max_ring_size // max(len(ready), 1)))
        cache, points = self._points, {}
        ring: list[int] = []
        for index, (ep, w) in enumerate(zip(ready, weights, strict=True)):
            address = (ep.host, ep.port)
            count = max(1, round(per * w / top))
            mine = cache.get(address) or []
            if len(mine) < count:
                mine = mine + _vnode_hashes(ep.address, len(mine), count)
            points[address] = mine
            ring.extend([(h & _POSITION_MASK) | index for h in mine[:count]])
        ring.sort()
        self._endpoints, self._ring, self._points = ready, ring, points

    def pick_for(self, key: str, /) -> Endpoint:
        """The endpoint that owns `key`: the same one for as long as it stays in the set."""
        return self._at(key_hash(key))

    def pick(self) -> Endpoint:
        """An endpoint for a call without a key: a random ring position, so shares follow the ring."""
        return self._at(self._getrandbits(64) & _POSITION_MASK)

    def _at(self, position: int) -> Endpoint:
        ring = self._ring
        if not ring:
            raise unavailable()
        i = bisect.bisect_left(ring, position)
        entry = ring[i] if i < len(ring) else ring[0]
        return self._endpoints[entry & _INDEX_MASK]

    def __repr__(self) -> str:
        return f"<RingHash [{len(self._endpoints)} ready, {len(self._ring)} points]>"


def _vnode_hashes(address: str, start: int, stop: int) -> list[int]:
    """Hashes start..stop-1 of an address's virtual nodes; hash i never depends on the count."""
    out: list[int] = []
    seed = address.encode() + b"#"
    first = start // _POINTS_PER_DIGEST
    for block in range(first, (stop + _POINTS_PER_DIGEST - 1) // _POINTS_PER_DIGEST):
        out.extend(_UNPACK(hashlib.blake2b(seed + str(block).encode(), digest_size=64).digest()))
    return out[start - first * _POINTS_PER_DIGEST : stop - first * _POINTS_PER_DIGEST]
