"""An attack on b7d88eb: a typed stub makes its unary call's first attempt itself, and Channel.call() (the untyped
API) goes through the retry loop. Every observable must stay as it was: errors, picks, retries, deadlines.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from services import Control, ControlImpl, make_server

import kubrpc
from kubrpc import Endpoint, RpcError, Status
from kubrpc.balancers.round_robin import RoundRobin

pytestmark = pytest.mark.anyio


class CountingRoundRobin(RoundRobin):
    """round_robin, counting its picks."""

    def __init__(self) -> None:
        super().__init__()
        self.picks = 0

    def pick(self) -> Endpoint:
        self.picks += 1
        return super().pick()


@asynccontextmanager
async def served_channel(
    scheme: str, **options: object
) -> AsyncIterator[tuple[kubrpc.Channel, CountingRoundRobin, ControlImpl]]:
    """A test server on 127.0.0.1 and a channel to it (with an open connection) through a counting balancer."""
    server, control = make_server()
    balancer = CountingRoundRobin()
    async with (
        server.serve(f"{scheme}://127.0.0.1:0") as listener,
        kubrpc.connect(listener.url, balancer=balancer, **options) as channel,  # type: ignore[arg-type]
    ):
        assert await channel.stub(Control, timeout=10).whoami() == "server"  # the connection is open
        yield channel, balancer, control


# ---- Channel.call(): the first attempt of a positive timeout picks before the deadline is looked at again ---------


async def test_channel_call_with_a_vanishing_timeout_picks_like_a_stub(scheme: str) -> None:
    """A timeout too small to move the clock (1e-300 s) is positive: Channel.call() picked an endpoint and made the
    attempt, as a stub does; going straight into the retry loop, it saw the deadline gone and picked nothing."""
    async with served_channel(scheme) as (channel, balancer, _):
        for call in (
            lambda: channel.stub(Control, timeout=1e-300).whoami(),
            lambda: channel.call("Control/whoami", b"{}", timeout=1e-300, idempotent=True),
        ):
            before = balancer.picks
            with pytest.raises(RpcError) as info:
                await call()
            assert info.value.code is Status.DEADLINE_EXCEEDED
            assert balancer.picks - before == 1
