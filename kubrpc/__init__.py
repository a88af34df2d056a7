"""kubrpc: typed asyncio RPC for Python services on Kubernetes."""

from __future__ import annotations

from pathlib import Path as _Path

# A source checkout keeps the plugin folders beside kubrpc/; installs put them inside it.
_root = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "transports").is_dir() and (_root / "transports" / "__init__.py").is_file():
    __path__.append(str(_root))

from .endpoint import Endpoint  # noqa: E402
from .errors import RpcError  # noqa: E402
from .status import Status  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Endpoint",
    "RpcError",
    "Status",
    "__version__",
]
