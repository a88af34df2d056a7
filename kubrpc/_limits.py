"""The limits a server holds its peers to: one frozen, validated value that every server transport reads."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ("DEFAULT_MAX_MESSAGE_SIZE", "ServerLimits")

DEFAULT_MAX_MESSAGE_SIZE = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What a Server allows a peer (the `Server(...)` options of the same names; README, "Limits and timeouts").

    Transports read these and nothing else of the server's configuration; a transport's own options (TCP's
    `preface_timeout`, say) live on the transport.
    """

    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    """Bytes of one request or result, both ways; larger is RESOURCE_EXHAUSTED."""
    max_concurrent_calls: int = 10_000
    """Calls running at once on one TCP connection."""
    max_connections: int = 10_000
    """TCP: connections at once. HTTP: requests in progress at once."""
    max_pending_bytes: int = 256 * 1024 * 1024
    """Request bytes held by running calls, all connections and transports together."""
    idle_timeout: float | None = 600.0
    """Seconds without a call before a TCP connection is sent away; None: never."""
    drain_timeout: float = 30.0
    """Seconds running calls may take to finish on shutdown."""
    header_timeout: float = 10.0
    """HTTP: seconds for a request's head (and a TLS handshake) to arrive."""
    body_timeout: float = 30.0
    """HTTP: seconds for a request's body to arrive after its head; and for an unread answer to move."""
    max_header_size: int = 16 * 1024
    """HTTP: bytes of request line and headers."""

    def __post_init__(self) -> None:
        if self.max_message_size < 1:
            raise ValueError("max_message_size must be positive")
        if self.max_connections < 1 or self.max_concurrent_calls < 1:
            raise ValueError("max_connections and max_concurrent_calls must be positive")
        if self.max_pending_bytes < self.max_message_size:
            raise ValueError("max_pending_bytes must be at least max_message_size")
        if self.idle_timeout is not None and not self.idle_timeout > 0:
            raise ValueError("idle_timeout must be > 0 or None")
        if not (self.header_timeout > 0 and self.body_timeout > 0):  # NaN fails too
            raise ValueError("header_timeout and body_timeout must be > 0")
        if not (self.drain_timeout >= 0 and math.isfinite(self.drain_timeout)):
            raise ValueError("drain_timeout must be finite and >= 0")
        if self.max_header_size < 1:
            raise ValueError("max_header_size must be positive")
