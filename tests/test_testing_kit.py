"""kubrpc.testing.balancers: the README's example runs, and the checks fail, readably, on broken balancers."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hypothesis import find, given, settings, strategies as st

from kubrpc import Endpoint, RpcError, Status, balancers
from kubrpc.balancers.round_robin import RoundRobin
from kubrpc.balancers.smooth_weighted import SmoothWeighted
from kubrpc.balancers.weighted_random import WeightedRandom
from kubrpc.interfaces import Balancer
from kubrpc.testing.balancers import (
    assert_contract,
    assert_distribution,
    chi2_sf,
    endpoints,
    goodness_of_fit,
    weighted_shares,
)

README = Path(__file__).parent.parent / "README.md"


def readme_example() -> str:
    """The first python block of the README's "Property-testing a balancer" section."""
    section = README.read_text().split("## Property-testing a balancer\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README section has no python example"
    return match.group(1)


def test_readme_example_runs() -> None:
    source = readme_example()
    assert len(source.splitlines()) <= 45
    namespace: dict[str, object] = {"__name__": "readme_example"}
    exec(compile(source, f"{README}:Property-testing a balancer", "exec"), namespace)
    tests = {name: fn for name, fn in namespace.items() if name.startswith("test_") and callable(fn)}
    assert {"test_weighted_keeps_the_balancer_contract", "test_weighted_follows_the_weights"} <= set(tests)
    for test in tests.values():
        test()


# --- broken balancers, each wrong in one way ----------------------------------------------------


class Weighted:
    """A correct weighted random balancer; the broken ones below override one thing."""

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()
        self.ready: list[Endpoint] = []

    def update(self, snapshot: Sequence[Endpoint], /) -> None:
        ready = [ep for ep in snapshot if ep.ready]
        self.ready = [ep for ep in ready if ep.weight > 0] or ready

    def weights(self) -> list[float]:
        return [ep.weight or 1.0 for ep in self.ready]

    def pick(self) -> Endpoint:
        if not self.ready:
            raise RpcError(Status.UNAVAILABLE, "no ready endpoint")
        return self.rng.choices(self.ready, self.weights())[0]


class PicksNotReady(Weighted):
    def update(self, snapshot: Sequence[Endpoint], /) -> None:
        self.ready = [ep for ep in snapshot if ep.weight > 0] or list(snapshot)


class Biased(Weighted):
    def weights(self) -> list[float]:
        return [(ep.weight or 1.0) ** 1.5 for ep in self.ready]


class Stale(Weighted):
    """Adds what is new but never forgets what is gone."""

    def update(self, snapshot: Sequence[Endpoint], /) -> None:
        self.ready += [ep for ep in snapshot if ep.ready and ep not in self.ready]


class IgnoresWeightZero(Weighted):
    def update(self, snapshot: Sequence[Endpoint], /) -> None:
        self.ready = [ep for ep in snapshot if ep.ready]


class ZeroIsEmpty(Weighted):
    """Drops weight 0 before asking whether anything is left: all-zero becomes UNAVAILABLE."""

    def update(self, snapshot: Sequence[Endpoint], /) -> None:
        self.ready = [ep for ep in snapshot if ep.ready and ep.weight > 0]


class Crashes(Weighted):
    def pick(self) -> Endpoint:
        return self.rng.choice(self.ready)  # IndexError instead of UNAVAILABLE


class IgnoresLargeUpdates(Weighted):
    """Right on the hand-made snapshots (at most 4 endpoints); only random workloads find the bug."""

    def update(self, snapshot: Sequence[Endpoint], /) -> None:
        if len(snapshot) <= 4:
            super().update(snapshot)


@pytest.mark.parametrize(
    ("broken", "rule", "fragments"),
    [
        (PicksNotReady, "never picks an endpoint with ready=False", ["ready=False)\n  last update: [Endpoint("]),
        (
            Stale,
            "never picks an endpoint absent from the last update",
            ["pick() returned Endpoint('10.0.0.1', 9000)\n  last update: []\n", "update() replaces the whole set"],
        ),
        (
            IgnoresWeightZero,
            "weight 0 takes no calls while a ready endpoint has weight > 0",
            [
                "returned Endpoint('10.0.0.1', 9000, weight=0) while Endpoint('10.0.0.2', 9000) was ready",
                "weighted=False",
            ],
        ),
        (
            ZeroIsEmpty,
            "when every ready endpoint has weight 0, they all take calls",
            ["pick() raised RpcError(UNAVAILABLE"],
        ),
        (
            Crashes,
            "nothing eligible raises RpcError(UNAVAILABLE)",
            ["pick() raised IndexError", "last update: none yet"],
        ),
        (IgnoresLargeUpdates, "", ["update([Endpoint("]),  # whichever rule the random workload breaks first
    ],
)
def test_contract_fails_readably_on_a_broken_balancer(broken: type[Weighted], rule: str, fragments: list[str]) -> None:
    with pytest.raises(AssertionError) as info:
        assert_contract(broken, max_examples=200)
    message = str(info.value)
    assert message.startswith(f"Balancer contract broken: {rule}"), message
    for part in ("\n  last update: ", "\n  balancer: <", "\n  steps: ", "\n  hint: ", *fragments):
        assert part in message, (part, message)


def test_contract_without_the_weight_rule_for_balancers_that_ignore_weights() -> None:
    assert_contract(IgnoresWeightZero, weighted=False)


def test_contract_passes_a_correct_balancer_and_seeds_factories_that_take_rng() -> None:
    seeded: list[random.Random | None] = []

    def factory(rng: random.Random | None = None) -> Balancer:
        seeded.append(rng)
        return Weighted(rng=rng)

    assert_contract(factory, max_examples=20)
    assert seeded and all(isinstance(rng, random.Random) for rng in seeded)
    made: list[Weighted] = []

    def plain() -> Balancer:
        made.append(Weighted())
        return made[-1]

    assert_contract(plain, max_examples=5)
    assert made


def test_distribution_fails_on_a_biased_balancer_with_a_table() -> None:
    snapshot = [
        Endpoint("10.0.0.1", 9000),
        Endpoint("10.0.0.2", 9000, weight=3),
        Endpoint("10.0.0.3", 9000, ready=False),
    ]
    balancer = Biased(rng=random.Random(7))
    balancer.update(snapshot)
    assert_contract(Biased, max_examples=20)  # the contract says nothing about shares
    with pytest.raises(AssertionError) as info:
        assert_distribution(balancer, weighted_shares(snapshot))
    lines = str(info.value).splitlines()
    assert re.fullmatch(
        r"pick shares differ from the expected ones: chi-square p-value \S+e-\d+ < 1e-06 over 10,000 picks", lines[0]
    ), lines[0]
    assert lines[1].split() == ["endpoint", "expected", "observed", "picks", "deviation"]
    assert lines[2].split()[:2] == ["10.0.0.1:9000", "25.00%"] and lines[2].endswith("<<")
    assert lines[3].split()[:3] == ["10.0.0.2:9000", "weight=3", "75.00%"] and lines[3].endswith("<<")
    assert lines[4].startswith("hint: ")


@pytest.mark.parametrize("broken", [PicksNotReady, IgnoresWeightZero, Stale])
def test_distribution_fails_at_once_on_an_endpoint_that_should_never_be_picked(broken: type[Weighted]) -> None:
    balancer = broken(rng=random.Random(3))
    balancer.update([Endpoint("10.0.0.9", 9000)])
    snapshot = [
        Endpoint("10.0.0.1", 9000, weight=0),
        Endpoint("10.0.0.2", 9000),
        Endpoint("10.0.0.3", 9000, ready=False),
    ]
    balancer.update(snapshot)
    with pytest.raises(
        AssertionError, match=r"which should never be picked \(expected share 0\), at pick \d+\n"
    ) as info:
        assert_distribution(balancer, weighted_shares(snapshot))
    assert "  endpoint " in str(info.value) and "+inf σ  <<" in str(info.value)


def test_distribution_is_deterministic_with_a_seeded_balancer_and_normalises_weights() -> None:
    snapshot = [Endpoint("10.0.0.1", 9000), Endpoint("10.0.0.2", 9000, weight=2.5)]
    p_values = []
    for expected in ({snapshot[0]: 1.0, snapshot[1]: 2.5}, {snapshot[0]: 1 / 3.5, snapshot[1]: 2.5 / 3.5}):
        balancer = WeightedRandom(rng=random.Random(11))
        balancer.update(snapshot)
        p_values.append(assert_distribution(balancer, expected, picks=5000))
    assert p_values[0] == pytest.approx(p_values[1]) and p_values[0] > 1e-6
    with pytest.raises(ValueError, match="finite numbers >= 0"):
        assert_distribution(balancer, {snapshot[0]: -1.0, snapshot[1]: 2.0})
    with pytest.raises(ValueError, match="picks"):
        assert_distribution(balancer, {snapshot[0]: 1.0}, picks=0)


def test_distribution_reports_unavailable_picks() -> None:
    with pytest.raises(AssertionError, match=r"pick\(\) raised RpcError\(UNAVAILABLE, .*\) at pick 1 of 100"):
        assert_distribution(RoundRobin(), {Endpoint("10.0.0.1", 9000): 1.0}, picks=100)


# --- every built-in follows its distribution ------------------------------------------------------


def snapshot_mix() -> list[Endpoint]:
    return [
        Endpoint("10.0.0.1", 9000, weight=1, zone="a"),
        Endpoint("10.0.0.2", 9000, weight=3, zone="a"),
        Endpoint("10.0.0.3", 9000, weight=0, zone="a"),
        Endpoint("10.0.0.4", 9000, weight=5, zone="a", ready=False),
        Endpoint("10.0.0.5", 9000, weight=2, zone="b"),
    ]


def uniform(snapshot: Sequence[Endpoint]) -> dict[Endpoint, float]:
    return dict.fromkeys((ep for ep in snapshot if ep.ready), 1.0)


BUILTIN_DISTRIBUTIONS: dict[
    str, tuple[Callable[[], Balancer], Callable[[Sequence[Endpoint]], dict[Endpoint, float]]]
] = {
    "round_robin": (lambda: RoundRobin(rng=random.Random(1)), uniform),
    "weighted_random": (lambda: WeightedRandom(rng=random.Random(1)), weighted_shares),
    "smooth_weighted": (lambda: SmoothWeighted(rng=random.Random(1)), weighted_shares),
    "p2c": (  # equal weights and no feedback: every pair is a tie, so the pick is uniform
        lambda: balancers.create("p2c", rng=random.Random(1)),
        lambda snapshot: uniform([Endpoint(ep.host, ep.port, ready=ep.ready) for ep in snapshot]),
    ),
    "ring_hash": (  # many points per endpoint: the arcs come within a few percent of the weights
        lambda: balancers.create("ring_hash", rng=random.Random(1), replicas=2000),
        weighted_shares,
    ),
    "zone_aware": (
        lambda: balancers.create(
            "zone_aware", zone="a", inner="weighted_random", inner_options={"rng": random.Random(1)}
        ),
        lambda snapshot: weighted_shares([ep for ep in snapshot if ep.zone == "a"]),
    ),
    "outlier": (
        lambda: balancers.create("outlier", inner="smooth_weighted", inner_options={"rng": random.Random(1)}),
        weighted_shares,
    ),
}


def test_every_builtin_has_a_distribution_check() -> None:
    assert set(BUILTIN_DISTRIBUTIONS) == set(balancers.names())


@pytest.mark.parametrize("name", sorted(BUILTIN_DISTRIBUTIONS))
def test_every_builtin_passes_its_distribution(name: str) -> None:
    factory, shares = BUILTIN_DISTRIBUTIONS[name]
    snapshot = snapshot_mix()
    if name == "p2c":
        snapshot = [Endpoint(ep.host, ep.port, ready=ep.ready) for ep in snapshot]
    balancer = factory()
    balancer.update(snapshot)
    assert assert_distribution(balancer, shares(snapshot), picks=12_000) > 1e-6


# --- the pieces ----------------------------------------------------------------------------------


def test_chi2_sf_matches_tables() -> None:
    assert chi2_sf(3.841, 1) == pytest.approx(0.05, rel=1e-3)
    assert chi2_sf(18.307, 10) == pytest.approx(0.05, rel=1e-3)
    assert chi2_sf(23.928, 1) == pytest.approx(1e-6, rel=1e-2)
    assert chi2_sf(2.0, 30) == pytest.approx(1.0)


def test_goodness_of_fit_pools_small_bins_and_rejects_the_impossible() -> None:
    assert goodness_of_fit({"a": 50, "b": 50}, {"a": 1, "b": 1}) == pytest.approx(1.0)
    assert goodness_of_fit({"a": 50, "b": 49, "c": 1}, {"a": 1, "b": 1, "c": 0.001}) > 0.5
    assert goodness_of_fit({"a": 50, "z": 1}, {"a": 1}) == 0.0
    assert goodness_of_fit({"a": 90, "b": 10}, {"a": 1, "b": 1}) < 1e-6


def test_weighted_shares_follow_the_weight_rule() -> None:
    a, b = Endpoint("10.0.0.1", 9000, weight=1e308), Endpoint("10.0.0.2", 9000, weight=1e308)
    assert weighted_shares([a, b]) == {a: 0.5, b: 0.5}
    zero, down = Endpoint("10.0.0.3", 9000, weight=0), Endpoint("10.0.0.4", 9000, ready=False)
    assert weighted_shares([zero, a, down]) == {a: 1.0}
    assert weighted_shares([zero, down, Endpoint("10.0.0.5", 9000, weight=0)]) == {
        zero: 0.5,
        Endpoint("10.0.0.5", 9000, weight=0): 0.5,
    }
    twice = Endpoint("10.0.0.3", 9000, weight=3)  # the same address: its first ready entry counts
    assert weighted_shares([Endpoint("10.0.0.3", 9000, ready=False), zero, twice, a]) == {a: 1.0}
    assert weighted_shares([down]) == {}


@settings(max_examples=200, deadline=None)
@given(
    snapshot=endpoints(min_size=2, max_size=6, min_ready=2, weights=[0.0, 2.5], zones=["x", None]),
    everyone=endpoints(max_size=5, ready=True),
    no_one=endpoints(max_size=5, ready=False),
)
def test_endpoints_strategy_honours_its_options(
    snapshot: list[Endpoint], everyone: list[Endpoint], no_one: list[Endpoint]
) -> None:
    assert 2 <= len(snapshot) <= 6 and sum(ep.ready for ep in snapshot) >= 2
    assert {ep.weight for ep in snapshot} <= {0.0, 2.5} and {ep.zone for ep in snapshot} <= {"x", None}
    assert len({ep.address for ep in snapshot}) == len(snapshot)
    assert all(ep.ready for ep in everyone) and not any(ep.ready for ep in no_one)


def test_endpoints_strategy_varies_what_matters() -> None:
    settings_ = settings(database=None, max_examples=2000)
    find(endpoints(unique=False), lambda s: len({ep.address for ep in s}) < len(s), settings=settings_)
    find(endpoints(), lambda s: {ep.ready for ep in s} == {True, False}, settings=settings_)
    find(endpoints(), lambda s: len({ep.zone for ep in s}) == 3, settings=settings_)
    find(
        endpoints(), lambda s: 0.0 in {ep.weight for ep in s} and len({ep.weight for ep in s}) >= 3, settings=settings_
    )
    find(endpoints(weights=st.just(7.0)), lambda s: len(s) > 0 and {ep.weight for ep in s} == {7.0}, settings=settings_)


@pytest.mark.parametrize(
    "options",
    [{"min_size": 3, "max_size": 2}, {"min_ready": 1, "ready": False}, {"min_ready": 9}, {"zones": []}],
)
def test_endpoints_strategy_rejects_impossible_options(options: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        endpoints(**options)  # type: ignore[arg-type]


def test_hypothesis_is_needed_only_for_strategies_and_the_contract(tmp_path: Path) -> None:
    script = """
import sys
sys.modules["hypothesis"] = None  # as if it were not installed
from kubrpc import Endpoint
from kubrpc.balancers.round_robin import RoundRobin
from kubrpc.testing import balancers as kit
b = RoundRobin()
b.update([Endpoint("10.0.0.1", 9000), Endpoint("10.0.0.2", 9000)])
kit.assert_distribution(b, {Endpoint("10.0.0.1", 9000): 1, Endpoint("10.0.0.2", 9000): 1}, picks=100)
for call in (kit.endpoints, lambda: kit.assert_contract(RoundRobin)):
    try:
        call()
    except ImportError as exc:
        print(exc)
"""
    # From a neutral directory: the installed package, not ./kubrpc (whose plugin folders sit beside it).
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True, cwd=tmp_path
    )
    assert (
        out.stdout.splitlines()
        == [
            "kubrpc.testing.balancers needs hypothesis for endpoints() and assert_contract(): "
            "pip install hypothesis (the [testing] extra)"
        ]
        * 2
    )
