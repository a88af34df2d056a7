"""What mypy checks of `Server.register`: tests/test_typecheck.py runs `mypy --strict` on this file.

A line that ends in `# E: CODE` must get exactly that mypy error; every other line must pass. The file is
only type-checked, never run.
"""

from __future__ import annotations

from typing import Protocol

import kubrpc


class Arith(Protocol):
    async def add(self, a: int, b: int) -> int: ...


class Good:
    async def add(self, a: int, b: int) -> int:
        return a + b


class WrongType:
    async def add(self, a: int, b: str) -> int:
        return a


class NotAsync:
    def add(self, a: int, b: int) -> int:
        return a + b


class Missing:
    async def sub(self, a: int, b: int) -> int:
        return a - b


def serve() -> kubrpc.Server:
    server = kubrpc.Server()
    server.register(Arith, Good())  # a Protocol class is accepted (no type-abstract error)
    # The static check: annotate the implementation with its Protocol; mypy compares them structurally.
    good: Arith = Good()
    server.register(Arith, good)
    return server


def mistakes() -> None:
    wrong: Arith = WrongType()  # E: assignment
    not_async: Arith = NotAsync()  # E: assignment
    missing: Arith = Missing()  # E: assignment
    del wrong, not_async, missing


def unchecked(server: kubrpc.Server) -> None:
    # What register() itself cannot check (see its docstring): mypy passes this, register raises TypeError.
    server.register(Arith, WrongType())
