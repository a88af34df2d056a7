"""Bearer-token auth, as an example of interceptors: `BearerAuth` on the server, `BearerToken` on the client.

    server = kubrpc.Server(interceptors=[BearerAuth({"s3cret": ["Arith/*"], "admin-token": ["*"]})])
    kubrpc.connect(url, interceptors=[BearerToken("s3cret")])    # or BearerToken(fetch_token), called per call

The token travels as the `authorization: Bearer <token>` header (HTTP) or frame metadata (TCP): use TLS.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping

from .errors import RpcError
from .interceptors import CallInfo, ClientCall, Proceed
from .status import Status

__all__ = ("BearerAuth", "BearerToken")

_SCHEME = "bearer "


def _digest(token: str) -> bytes:
    # Tokens are looked up by their hash, so that the lookup's timing tells nothing about a stored token.
    return hashlib.sha256(token.encode()).digest()


class BearerAuth:
    """Server interceptor: a call needs `authorization: Bearer <token>` with a token allowed to call its method.

    `tokens` maps each token to what it may call: `"*"` (everything), `"Service/*"` (every method of a
    service) or `"Service/method"`. No or an unknown token: UNAUTHENTICATED; a known token without the
    method: PERMISSION_DENIED. The error never contains the token.
    """

    def __init__(self, tokens: Mapping[str, Iterable[str]]) -> None:
        self._grants: dict[bytes, frozenset[str]] = {}
        for token, grants in tokens.items():
            if not token or token != token.strip():
                raise ValueError("a bearer token must be non-empty, without surrounding whitespace")
            if isinstance(grants, str):
                raise TypeError("give each token a list of grants, e.g. ['Arith/*'], not a string")
            self._grants[_digest(token)] = frozenset(grants)

    async def __call__(self, call: CallInfo, proceed: Proceed, /) -> bytes:
        """Check the call's token, then proceed; RpcError if it is missing, unknown or lacks the method."""
        header = call.metadata.get("authorization")
        if header is None:
            raise RpcError(Status.UNAUTHENTICATED, "missing bearer token")
        if header[: len(_SCHEME)].lower() != _SCHEME or not header[len(_SCHEME) :].strip():
            raise RpcError(Status.UNAUTHENTICATED, "the authorization is not a bearer token")
        grants = self._grants.get(_digest(header[len(_SCHEME) :].strip()))
        if grants is None:
            raise RpcError(Status.UNAUTHENTICATED, "invalid bearer token")
        if not ("*" in grants or call.path in grants or f"{call.service}/*" in grants):
            raise RpcError(Status.PERMISSION_DENIED, f"the token does not allow {call.path}")
        return await proceed()


class BearerToken:
    """Client interceptor: sends `authorization: Bearer <token>` with every call.

    `token` is the token, or a function (plain or async) that returns the current one: it is called for
    every call, so it can cache and refresh a short-lived token.
    """

    def __init__(self, token: str | Callable[[], str | Awaitable[str]]) -> None:
        self._token = token

    async def __call__(self, call: ClientCall, proceed: Proceed, /) -> bytes:
        """Add the authorization metadata, then send the call."""
        token = self._token
        if not isinstance(token, str):
            value = token()
            token = await value if inspect.isawaitable(value) else value
        call.metadata["authorization"] = f"Bearer {token}"
        return await proceed()
