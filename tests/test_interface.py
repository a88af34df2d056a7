"""Registering services: mismatches are TypeErrors at register(), not at call time."""

from __future__ import annotations

from typing import Protocol

import pytest
from services import Arith, ArithImpl

import kubrpc


class Missing:
    async def div(self, a: float, b: float) -> float:
        return a / b


class NotAsync:
    def add(self, a: int, b: int) -> int:
        return a + b

    async def div(self, a: float, b: float) -> float:
        return a / b


class Renamed:
    async def add(self, x: int, y: int) -> int:
        return x + y

    async def div(self, a: float, b: float) -> float:
        return a / b


class WrongType:
    async def add(self, a: str, b: int) -> int:
        return 0

    async def div(self, a: float, b: float) -> float:
        return a / b


class WrongReturn:
    async def add(self, a: int, b: int) -> str:
        return ""

    async def div(self, a: float, b: float) -> float:
        return a / b


@pytest.mark.parametrize(
    ("impl", "message"),
    [
        (Missing(), "does not implement Arith.add"),
        (NotAsync(), "must be `async def`"),
        (Renamed(), "does not match Arith.add"),
        (WrongType(), "parameter 'a' is <class 'str'>"),
        (WrongReturn(), "returns <class 'str'>"),
    ],
)
def test_register_rejects_a_mismatched_implementation(impl: object, message: str) -> None:
    server = kubrpc.Server()
    with pytest.raises(TypeError, match=message):
        server.register(Arith, impl)  # type: ignore[arg-type]
    assert server.services == {}


def test_register_twice_is_an_error() -> None:
    server = kubrpc.Server()
    server.register(Arith, ArithImpl())
    with pytest.raises(ValueError, match="already registered"):
        server.register(Arith, ArithImpl())


def test_protocols_that_cannot_be_served() -> None:
    class Sync(Protocol):
        def add(self, a: int) -> int: ...

    class VarArgs(Protocol):
        async def add(self, *a: int) -> int: ...

    class Unannotated(Protocol):
        async def add(self, a) -> int: ...  # type: ignore[no-untyped-def]

    class BadType(Protocol):
        async def add(self, a: complex) -> int: ...

    server = kubrpc.Server()
    for proto, message in [
        (Sync, "must be declared `async def`"),
        (VarArgs, r"\*args and \*\*kwargs"),
        (Unannotated, "has no annotation"),
        (BadType, "unsupported annotation"),
    ]:
        with pytest.raises(TypeError, match=message):
            server.register(proto, object())


def test_interface_and_method_decorators() -> None:
    @kubrpc.interface(name="pkg.Svc")
    class Svc(Protocol):
        @kubrpc.method(name="Get", idempotent=True, timeout=1.5)
        async def get(self, key: str, *, default: int = 0) -> int: ...

    class Impl:
        async def get(self, key: str, *, default: int = 0) -> int:
            return default

    server = kubrpc.Server()
    server.register(Svc, Impl())
    method = server.method("pkg.Svc/Get")
    assert method is not None
    assert (method.options.idempotent, method.options.timeout, method.attr) == (True, 1.5, "get")
    with pytest.raises(ValueError, match="bad service name"):
        kubrpc.interface(name="a/b")
    with pytest.raises(ValueError, match="timeout must be > 0"):
        kubrpc.method(timeout=0)
