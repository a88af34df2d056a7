"""A service for the Connect tests: nested messages, enums, optional, repeated and map fields, int64, bytes,
Timestamps, dates, UUIDs, unions (oneof) and Any, and failures that carry details."""

from __future__ import annotations

import asyncio
import datetime
import enum
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import kubrpc
from kubrpc.errors import RpcError
from kubrpc.status import Status


class OrderState(enum.Enum):
    """Where an order is."""

    NEW = "new"
    PAID = "paid"
    ShippedOut = 3


@dataclass
class Money:
    units: int
    currency: str = "EUR"


@dataclass
class Line:
    sku: str
    quantity: int
    unit_price: Money


@dataclass
class Order:
    order_id: uuid.UUID
    customer_name: str
    lines: list[Line]
    state: OrderState
    placed_at: datetime.datetime
    note: str | None = None
    attachment: bytes = b""
    labels: dict[str, str] = field(default_factory=dict)
    big_number: int = 0
    discount: float | None = None
    matrix: list[list[int]] = field(default_factory=list)
    due: datetime.date | None = None
    extra: Any = None


@kubrpc.interface(name="shop.v1.Shop")
class Shop(Protocol):
    """Orders."""

    async def place_order(self, order: Order, dry_run: bool = False) -> Order:
        """Place an order: it comes back PAID, with its total in labels["total"]."""
        ...

    async def total(self, lines: list[Line], currency: str = "EUR") -> int:
        """The sum of the lines in units."""
        ...

    async def find(self, order_id: uuid.UUID) -> Order:
        """Never found."""
        ...

    async def ping(self) -> None:
        """Nothing."""
        ...

    async def describe(self, value: int | str | None) -> str:
        """What the value is."""
        ...

    async def shift(self, when: datetime.datetime, seconds: int) -> datetime.datetime:
        """`when` plus `seconds`."""
        ...

    async def count(self, words: list[str], mode: Literal["upper", "lower"] = "lower") -> dict[str, int]:
        """How often each word occurs."""
        ...

    async def echo_any(self, value: Any, blob: bytes, states: list[OrderState]) -> Any:
        """The value back, with the blob's length and the states."""
        ...

    async def wait(self, seconds: float) -> float:
        """Sleep, then say how long."""
        ...


class ShopImpl:
    async def place_order(self, order: Order, dry_run: bool = False) -> Order:
        if not order.lines:
            raise RpcError(Status.FAILED_PRECONDITION, "an order needs at least one line")
        total = sum(line.quantity * line.unit_price.units for line in order.lines)
        return replace(order, state=OrderState.PAID, labels={**order.labels, "total": str(total)})

    async def total(self, lines: list[Line], currency: str = "EUR") -> int:
        return sum(line.quantity * line.unit_price.units for line in lines)

    async def find(self, order_id: uuid.UUID) -> Order:
        raise RpcError(Status.NOT_FOUND, f"no order {order_id}")

    async def ping(self) -> None:
        return None

    async def describe(self, value: int | str | None) -> str:
        return f"{type(value).__name__}:{value}"

    async def shift(self, when: datetime.datetime, seconds: int) -> datetime.datetime:
        return when + datetime.timedelta(seconds=seconds)

    async def count(self, words: list[str], mode: Literal["upper", "lower"] = "lower") -> dict[str, int]:
        out: dict[str, int] = {}
        for word in words:
            key = word.upper() if mode == "upper" else word.lower()
            out[key] = out.get(key, 0) + 1
        return out

    async def echo_any(self, value: Any, blob: bytes, states: list[OrderState]) -> Any:
        return {"value": value, "blob": len(blob), "states": [s.name for s in states]}

    async def wait(self, seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds


def make_shop_server(**options: Any) -> kubrpc.Server:
    """A Server with the Shop service."""
    server = kubrpc.Server(**options)
    server.register(Shop, ShopImpl())
    return server
