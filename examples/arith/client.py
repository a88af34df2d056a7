"""Call the example service: `python -m examples.arith.client static://127.0.0.1:9000`."""

from __future__ import annotations

import sys

import anyio

import kubrpc

from .service import Arith


async def main(target: str) -> None:
    """Make a few calls and print the answers."""
    async with kubrpc.connect(target, balancer="round_robin") as channel:
        arith = channel.stub(Arith, timeout=2.0)
        print("1 + 2 =", await arith.add(1, 2))
        print("stats:", await arith.stats([1.0, 2.0, 4.5]))
        print("served by:", await arith.whoami())


if __name__ == "__main__":
    anyio.run(main, sys.argv[1] if len(sys.argv) > 1 else "static://127.0.0.1:9000")
