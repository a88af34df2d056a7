"""kubrpc: typed asyncio RPC for Python services on Kubernetes."""

from __future__ import annotations

from pathlib import Path as _Path

# A source checkout keeps the plugin folders beside kubrpc/; installs put them inside it.
_root = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "transports").is_dir() and (_root / "transports" / "__init__.py").is_file():
    __path__.append(str(_root))

__version__ = "0.1.0"

from .client import Channel, RetryBudget, connect  # noqa: E402
from .endpoint import Endpoint  # noqa: E402
from .errors import NotDeliveredError, RpcError  # noqa: E402
from .interceptors import CallInfo, ClientCall, ClientInterceptor, ServerInterceptor, current_call  # noqa: E402
from .interface import interface, method  # noqa: E402
from .server import Server  # noqa: E402
from .status import Status  # noqa: E402

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
