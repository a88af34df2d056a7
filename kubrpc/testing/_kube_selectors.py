"""Kubernetes label and field selectors, parsed as the apiserver parses them (for FakeKubeAPI)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ("Requirement", "parse_field_selector", "parse_label_selector")

_KEY = r"[A-Za-z0-9][A-Za-z0-9._/-]*"
_SET_TERM = re.compile(rf"\s*(?P<key>{_KEY})\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)\s*")
_NOT_EXISTS_TERM = re.compile(rf"\s*!\s*(?P<key>{_KEY})\s*")
_EQUALITY_TERM = re.compile(rf"\s*(?P<key>{_KEY})\s*(?:(?P<op>==|=|!=)\s*(?P<value>[A-Za-z0-9._-]*))?\s*")
_FIELD_TERM = re.compile(r"\s*(?P<field>metadata\.name|metadata\.namespace)\s*(?P<op>==|=|!=)\s*(?P<value>[^,]*?)\s*")


@dataclass(frozen=True, slots=True)
class Requirement:
    """One term of a label selector: `key op values`."""

    key: str
    op: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Does an object with these labels satisfy the term?"""
        value = labels.get(self.key)
        if self.op == "exists":
            return value is not None
        if self.op == "!exists":
            return value is None
        if self.op in ("=", "==", "in"):
            return value in self.values
        return value not in self.values  # "!=" and "notin" also match a missing label


def parse_label_selector(text: str) -> tuple[Requirement, ...]:
    """The terms of `?labelSelector=`; ValueError if one cannot be parsed."""
    requirements = []
    for term in re.split(r",(?![^()]*\))", text):
        if not term.strip():
            continue
        if m := _SET_TERM.fullmatch(term):
            values = frozenset(v.strip() for v in m["values"].split(","))
            requirements.append(Requirement(m["key"], m["op"], values))
        elif m := _NOT_EXISTS_TERM.fullmatch(term):
            requirements.append(Requirement(m["key"], "!exists"))
        elif m := _EQUALITY_TERM.fullmatch(term):
            op = m["op"] or "exists"
            requirements.append(Requirement(m["key"], op, frozenset([m["value"] or ""])))
        else:
            raise ValueError(f"unable to parse requirement: {term.strip()!r}")
    return tuple(requirements)


def parse_field_selector(text: str) -> tuple[tuple[str, str, bool], ...]:
    """(field, value, negated) terms of `?fieldSelector=` (metadata.name and metadata.namespace only)."""
    terms = []
    for term in text.split(","):
        if not term.strip():
            continue
        m = _FIELD_TERM.fullmatch(term)
        if m is None:
            raise ValueError(f'field label not supported: "{term.partition("=")[0].strip()}"')
        terms.append((m["field"].removeprefix("metadata."), m["value"], m["op"] == "!="))
    return tuple(terms)
