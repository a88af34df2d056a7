"""Annotation-driven validation: what passes, what fails, and the field each error names."""

from __future__ import annotations

import datetime
import enum
import math
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, NewType, Optional, Union

import orjson
import pytest
from hypothesis import given, strategies as st

from kubrpc import codec
from kubrpc.codec import DecodeError, decoder

UserId = NewType("UserId", int)


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclass
class Node:
    name: str
    children: list[Node] = field(default_factory=list)


@dataclass
class Point:
    x: float
    y: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.x):
            raise ValueError("x must be finite")


def roundtrip(tp: object, value: object) -> object:
    return decoder(tp)(orjson.loads(codec.dumps(value)), "v")


@pytest.mark.parametrize(
    ("tp", "value"),
    [
        (int, 5),
        (float, 2.5),
        (str, "héllo"),
        (bool, False),
        (None, None),
        (bytes, b"\x00\x01\xff"),
        (list[int], [1, 2, 3]),
        (set[str], {"a", "b"}),
        (frozenset[int], frozenset({1})),
        (tuple[int, str], (1, "a")),
        (tuple[int, ...], (1, 2, 3)),
        (dict[str, list[float]], {"a": [1.0, 2.5]}),
        (Optional[int], None),  # noqa: UP045
        (int | str, "x"),
        (Union[int, None, str], 3),  # noqa: UP007
        (Literal["a", 1], 1),
        (Level, Level.HIGH),
        (datetime.datetime, datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)),
        (datetime.datetime, datetime.datetime(2026, 1, 2, 3, 4, 5, 123456)),
        (datetime.date, datetime.date(2026, 11, 26)),
        (uuid.UUID, uuid.UUID("12345678-1234-5678-1234-567812345678")),
        (Node, Node("root", [Node("a"), Node("b", [Node("c")])])),
        (Annotated[int, "meta"], 4),
        (UserId, UserId(7)),
        (Any, {"anything": [1, None]}),
        (list, [1, "mixed"]),
        (dict, {"k": 1}),
        (tuple, (1, "x")),
    ],
)
def test_round_trip(tp: object, value: object) -> None:
    back = roundtrip(tp, value)
    assert back == value
    assert type(back) is type(value)


@pytest.mark.parametrize(
    ("tp", "value", "path", "reason"),
    [
        (int, "1", "v", "expected integer, got string"),
        (int, True, "v", "expected integer, got boolean"),
        (int, 1.5, "v", "expected integer, got number"),
        (float, "1", "v", "expected number, got string"),
        (float, None, "v", "expected number, got null"),
        (str, 1, "v", "expected string, got integer"),
        (bool, 0, "v", "expected boolean, got integer"),
        (bytes, "not base64!", "v", "expected base64 string, got 'not base64!'"),
        (list[int], [1, "2"], "v[1]", "expected integer, got string"),
        (list[int], {"a": 1}, "v", "expected array, got object"),
        (dict[str, int], {"a": 1, "b": "x"}, "v.b", "expected integer, got string"),
        (tuple[int, str], [1], "v", "expected array of 2 items, got array of 1"),
        (int | None, "x", "v", "expected integer, got string"),
        (int | str, 1.5, "v", "expected integer or string, got number"),
        (Literal["a", "b"], "c", "v", "expected one of 'a', 'b', got 'c'"),
        (Literal[1], True, "v", "expected one of 1, got True"),
        (Level, 3, "v", "expected one of 1, 2, got 3"),
        (datetime.datetime, "yesterday", "v", "expected ISO 8601 date-time string, got 'yesterday'"),
        (uuid.UUID, "xyz", "v", "expected UUID string, got 'xyz'"),
        (Node, {"children": []}, "v.name", "missing field"),
        (Node, {"name": "a", "children": [{"name": 5}]}, "v.children[0].name", "expected string, got integer"),
        (Node, [], "v", "expected object (Node), got array"),
        (Point, {"x": float("inf"), "y": 0}, "v", "invalid Point: x must be finite"),
    ],
)
def test_mismatch_names_the_field(tp: object, value: object, path: str, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        decoder(tp)(value, "v")
    assert (info.value.path, info.value.reason) == (path, reason)


@pytest.mark.parametrize("tp", [dict[int, str], complex, type, object.__new__])
def test_unsupported_annotations_fail_when_the_plan_is_built(tp: object) -> None:
    with pytest.raises(TypeError, match="unsupported annotation"):
        decoder(tp)


def test_plans_are_built_once() -> None:
    assert decoder(list[Node]) is decoder(list[Node])


def test_unknown_dataclass_fields_are_refused_like_unknown_arguments() -> None:
    with pytest.raises(DecodeError) as info:
        decoder(Node)({"name": "x", "children": [{"name": "y", "added_in_v2": 1}]}, "v")
    assert (info.value.path, info.value.reason) == ("v.children[0]", "unexpected field 'added_in_v2' in Node")


def test_result_plans_ignore_unknown_dataclass_fields_at_every_level() -> None:
    value = {"name": "x", "children": [{"name": "y", "added_in_v2": 1, "children": []}], "added_in_v2": 2}
    assert decoder(Node, ignore_unknown=True)(value, "v") == Node("x", [Node("y", [])])
    assert decoder(Node, ignore_unknown=True) is not decoder(Node)  # two plans, cached apart


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_any_json_value_either_decodes_or_raises_decode_error(value: object) -> None:
    for tp in (int, float, str, list[int], dict[str, str], Node, tuple[int, str], int | None, Level, bytes):
        try:
            decoder(tp)(value, "v")
        except DecodeError:
            pass


@given(st.lists(st.tuples(st.integers(-(2**63), 2**63 - 1), st.text(), st.binary(max_size=20))))
def test_round_trip_property(items: list[tuple[int, str, bytes]]) -> None:
    assert roundtrip(list[tuple[int, str, bytes]], items) == items
