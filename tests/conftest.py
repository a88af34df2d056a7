from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack

import pytest
from services import make_server

import kubrpc

# The Kubernetes resolver tests' fixtures (kube, no_service_account).
pytest_plugins = ["kube_fixtures"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["tcp", "http"])
def scheme(request: pytest.FixtureRequest) -> str:
    """Each test using it runs over both transports."""
    return str(request.param)


@pytest.fixture
async def start_server() -> AsyncIterator[Callable[..., object]]:
    """Factory: start a test server on a loopback address; everything started is closed at the end."""
    async with AsyncExitStack() as stack:

        async def start(
            scheme: str = "tcp",
            host: str = "127.0.0.1",
            name: str = "server",
            *,
            listen: Mapping[str, object] | None = None,
            **options: object,
        ):
            """Server options as keywords; `listen` holds the options of server.serve() (e.g. ssl)."""
            server, control = make_server(name, **options)
            listener = await stack.enter_async_context(server.serve(f"{scheme}://{host}:0", **(listen or {})))
            return listener.url, server, control

        yield start


@pytest.fixture
async def served(scheme: str, start_server: Callable[..., object]) -> tuple[str, kubrpc.Server, object]:
    """One test server over the parametrised transport: (url, server, control)."""
    return await start_server(scheme)  # type: ignore[no-any-return,operator]
