"""kubrpc: typed asyncio RPC for Python services on Kubernetes."""

from __future__ import annotations

from ._version import __version__
from .client import Channel, RetryBudget, connect
from .endpoint import Endpoint
from .errors import NotDeliveredError, RpcError
from .interceptors import CallInfo, ClientCall, ClientInterceptor, ServerInterceptor, current_call
from .interface import interface, method
from .server import Server
from .status import Status

__all__ = [
    "CallInfo",
    "Channel",
    "ClientCall",
    "ClientInterceptor",
    "Endpoint",
    "NotDeliveredError",
    "RetryBudget",
    "RpcError",
    "Server",
    "ServerInterceptor",
    "Status",
    "__version__",
    "connect",
    "current_call",
    "interface",
    "method",
]
