"""Balancers: the shared contract for every registered name, then each balancer's own distribution."""

from __future__ import annotations

import importlib
import itertools
import math
import random
import tomllib
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from kubrpc import Endpoint, RpcError, Status, balancers
from kubrpc.balancers import smooth_weighted
from kubrpc.balancers.outlier import OutlierEjection
from kubrpc.balancers.p2c import PowerOfTwoChoices
from kubrpc.balancers.ring_hash import RingHash, key_hash
from kubrpc.balancers.round_robin import RoundRobin
from kubrpc.balancers.smooth_weighted import SmoothWeighted
from kubrpc.balancers.weighted_random import WeightedRandom
from kubrpc.balancers.zone_aware import ZoneAware
from kubrpc.interfaces import Balancer, CallFeedback, KeyedBalancer
from kubrpc.testing.balancers import SIGNIFICANCE, assert_contract, assert_distribution, chi2_sf, weighted_shares

NAMES = balancers.names()
BUILTINS = ["outlier", "p2c", "ring_hash", "round_robin", "smooth_weighted", "weighted_random", "zone_aware"]
# Options a balancer cannot do without; everything else is left at its default.
REQUIRED: dict[str, dict[str, Any]] = {"zone_aware": {"zone": "a"}}
FAST = settings(deadline=None, max_examples=50)


class FakeClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def ep(i: int, weight: float = 1.0, *, zone: str | None = None, ready: bool = True) -> Endpoint:
    return Endpoint(f"10.0.0.{i}", 9000, weight=weight, zone=zone, ready=ready)


def index(endpoint: Endpoint) -> int:
    return int(endpoint.host.rsplit(".", 1)[1])


def counts(pick: Callable[[], Endpoint], n: int) -> Counter[int]:
    return Counter(index(pick()) for _ in range(n))


# --- the shared contract -------------------------------------------------------------------------


def test_every_builtin_is_registered() -> None:
    assert set(BUILTINS) <= set(NAMES)


def test_entry_points_in_pyproject_match_the_builtins() -> None:
    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    table: dict[str, str] = pyproject["project"]["entry-points"]["kubrpc.balancers"]
    assert sorted(table) == BUILTINS
    for name, target in table.items():
        module, _, attr = target.partition(":")
        assert getattr(importlib.import_module(module), attr) is balancers.registry.get(name)
        assert Path(importlib.import_module(module).__file__ or "").stem == name


def test_unknown_name_lists_the_available_ones() -> None:
    with pytest.raises(ValueError, match="unknown") as info:
        balancers.create("no_such_balancer")
    for name in BUILTINS:
        assert name in str(info.value)


@pytest.mark.parametrize("weight", [math.nan, math.inf, -math.inf, -1, -1e-300, True, False, "1", None, 1j])
def test_endpoint_rejects_invalid_weights(weight: Any) -> None:
    with pytest.raises(ValueError, match="weight"):
        Endpoint("10.0.0.1", 9000, weight=weight)


@pytest.mark.parametrize("weight", [0, 0.0, 1, 2.5, 1e308, 5e-324])
def test_endpoint_accepts_finite_nonnegative_weights(weight: float) -> None:
    assert Endpoint("10.0.0.1", 9000, weight=weight).weight == weight


# Balancers that ignore weights by design: assert_contract(..., weighted=False).
UNWEIGHTED = {"round_robin", "zone_aware", "outlier"}  # the wrappers' default inner is round_robin


@pytest.mark.parametrize("name", NAMES)
def test_contract_with_default_options(name: str) -> None:
    assert_contract(lambda: balancers.create(name, **REQUIRED.get(name, {})), weighted=name not in UNWEIGHTED)


@pytest.mark.parametrize("name", NAMES)
def test_repr_names_the_class_and_counts(name: str) -> None:
    balancer = balancers.create(name, **REQUIRED.get(name, {}))
    balancer.update([ep(1), ep(2, zone="a"), ep(3, ready=False)])
    text = repr(balancer)
    assert text.startswith(f"<{type(balancer).__name__} ") and text.endswith(">")
    assert "2 " in text


def churn_factories() -> dict[str, Callable[[random.Random, FakeClock], Balancer]]:
    """Every registered name with options that exercise its machinery, plus nested wrappers."""

    def options(name: str, rng: random.Random, clock: FakeClock) -> dict[str, Any]:
        table: dict[str, dict[str, Any]] = {
            "round_robin": {"rng": rng},
            "weighted_random": {"rng": rng},
            "smooth_weighted": {"rng": rng},
            "ring_hash": {"rng": rng, "replicas": 10},
            "p2c": {"rng": rng, "clock": clock, "decay": 5.0},
            "zone_aware": {"zone": "a", "inner": "p2c", "inner_options": {"rng": rng, "clock": clock}},
            "outlier": {
                "clock": clock,
                "inner": "ring_hash",
                "inner_options": {"rng": rng},
                "consecutive_failures": 2,
                "base_ejection": 10.0,
                "max_ejection": 40.0,
                "max_ejected_fraction": 0.5,
            },
        }
        return table.get(name, {})

    def factory(name: str) -> Callable[[random.Random, FakeClock], Balancer]:
        return lambda rng, clock: balancers.create(name, **options(name, rng, clock))

    out = {name: factory(name) for name in NAMES}
    out["outlier(zone_aware(smooth_weighted))"] = lambda rng, clock: balancers.create(
        "outlier",
        clock=clock,
        consecutive_failures=1,
        max_ejected_fraction=1.0,
        inner=balancers.create("zone_aware", zone="b", inner="smooth_weighted", min_ready=2),
    )
    out["zone_aware(outlier(weighted_random))"] = lambda rng, clock: balancers.create(
        "zone_aware",
        zone="a",
        min_fraction=0.0,
        inner="outlier",
        inner_options={"clock": clock, "consecutive_failures": 1, "inner": "weighted_random"},
    )
    return out


CHURN = churn_factories()


@pytest.mark.parametrize("name", list(CHURN))
def test_contract_under_churn(name: str) -> None:
    """Updates, picks and feedback interleaved with a clock that moves: every pick is from the last update."""
    clock = FakeClock()
    assert_contract(lambda rng: CHURN[name](rng, clock), advance=clock.advance, weighted=name != "round_robin")


# --- round_robin ---------------------------------------------------------------------------------


@FAST
@given(n=st.integers(1, 12), k=st.integers(1, 4), skip=st.integers(0, 30), seed=st.integers(0, 2**32))
def test_round_robin_exact_rotation(n: int, k: int, skip: int, seed: int) -> None:
    balancer = RoundRobin(rng=random.Random(seed))
    balancer.update([ep(i, weight=i) for i in range(1, n + 1)])  # weights are ignored
    for _ in range(skip):
        balancer.pick()
    assert counts(balancer.pick, n * k) == dict.fromkeys(range(1, n + 1), k)


def test_round_robin_starts_at_a_random_offset_per_client() -> None:
    firsts = set()
    for seed in range(40):
        balancer = RoundRobin(rng=random.Random(seed))
        balancer.update([ep(i) for i in range(1, 6)])
        firsts.add(index(balancer.pick()))
    assert len(firsts) >= 3


@FAST
@given(
    before=st.sets(st.integers(1, 10), min_size=1),
    after=st.sets(st.integers(1, 10), min_size=1),
    picks=st.integers(1, 20),
    seed=st.integers(0, 2**32),
)
def test_round_robin_update_continues_the_rotation(before: set[int], after: set[int], picks: int, seed: int) -> None:
    balancer = RoundRobin(rng=random.Random(seed))
    balancer.update([ep(i) for i in sorted(before)])
    for _ in range(picks):
        last = index(balancer.pick())
    new = sorted(after)
    balancer.update([ep(i) for i in new])
    following = index(balancer.pick())
    if last in after:
        assert following == new[(new.index(last) + 1) % len(new)]
    assert counts(balancer.pick, len(new) * 2) == dict.fromkeys(new, 2)


def test_round_robin_repr() -> None:
    balancer = RoundRobin()
    balancer.update([ep(1), ep(2), ep(3, ready=False), ep(1)])
    assert repr(balancer) == "<RoundRobin [2 ready]>"


# --- weighted_random -----------------------------------------------------------------------------

weights_st = st.lists(
    st.one_of(st.just(0.0), st.floats(0.01, 100.0), st.integers(1, 10).map(float)), min_size=1, max_size=12
)


@FAST
@given(weights=weights_st, seed=st.integers(0, 2**32))
def test_weighted_random_matches_the_weights(weights: list[float], seed: int) -> None:
    balancer = WeightedRandom(rng=random.Random(seed))
    snapshot = [ep(i + 1, w) for i, w in enumerate(weights)] + [ep(50, 5.0, ready=False)]
    balancer.update(snapshot)
    assert_distribution(balancer, weighted_shares(snapshot), picks=3000)


@pytest.mark.parametrize("weights", [[1e308, 1e308, 5e307], [5e-324, 5e-324, 1e-323], [1e300, 1e-300, 0.0]])
def test_weighted_random_extreme_magnitudes(weights: list[float]) -> None:
    balancer = WeightedRandom(rng=random.Random(1))
    snapshot = [ep(i + 1, w) for i, w in enumerate(weights)]
    balancer.update(snapshot)
    assert_distribution(balancer, weighted_shares(snapshot), picks=3000)


def test_weighted_random_repr() -> None:
    balancer = WeightedRandom()
    balancer.update([ep(1, 2), ep(2, 0), ep(3, ready=False)])
    assert repr(balancer) == "<WeightedRandom [1 ready]>"


def test_weighted_random_is_reproducible_with_a_seeded_rng() -> None:
    picks = []
    for _ in range(2):
        balancer = WeightedRandom(rng=random.Random(42))
        balancer.update([ep(1, 1), ep(2, 2), ep(3, 3)])
        picks.append([balancer.pick() for _ in range(50)])
    assert picks[0] == picks[1] and len(set(picks[0])) == 3


# --- smooth_weighted -----------------------------------------------------------------------------


def nginx(weights: Sequence[float], picks: int) -> list[int]:
    """nginx's ngx_http_upstream_get_peer, verbatim: the reference schedule (indices)."""
    current = [0.0] * len(weights)
    total = sum(weights)
    out = []
    for _ in range(picks):
        best = -1
        for i, w in enumerate(weights):
            current[i] += w
            if best < 0 or current[i] > current[best]:
                best = i
        current[best] -= total
        out.append(best)
    return out


def assert_nginx_schedule(sequence: list[int], weights: list[float]) -> None:
    """`sequence` (endpoint numbers) is nginx's schedule over the endpoints in some rotated order."""
    live = [i + 1 for i, w in enumerate(weights) if w > 0] or [i + 1 for i in range(len(weights))]
    weight = {i + 1: (w if any(weights) else 1.0) for i, w in enumerate(weights)}
    for r in range(len(live)):
        order = live[r:] + live[:r]
        if [order[j] for j in nginx([weight[i] for i in order], len(sequence))] == sequence:
            return
    pytest.fail(f"{sequence} is not nginx's schedule for {weights}")


# Integers and multiples of 1/8: exact in binary, so the reference's ties are the real ties.
smooth_weights_st = st.lists(
    st.one_of(st.just(0.0), st.integers(1, 12).map(float), st.integers(1, 40).map(lambda k: k / 8)),
    min_size=1,
    max_size=8,
)


@FAST
@given(weights=smooth_weights_st, seed=st.integers(0, 2**32))
def test_smooth_weighted_is_nginx_schedule(weights: list[float], seed: int) -> None:
    balancer = SmoothWeighted(rng=random.Random(seed))
    balancer.update([ep(i + 1, w) for i, w in enumerate(weights)])
    assert_nginx_schedule([index(balancer.pick()) for _ in range(60)], weights)


@FAST
@given(
    weights=st.lists(st.integers(0, 9), min_size=1, max_size=8), start=st.integers(0, 50), seed=st.integers(0, 2**32)
)
def test_smooth_weighted_exact_counts_in_every_window(weights: list[int], start: int, seed: int) -> None:
    live = weights if any(weights) else [1] * len(weights)
    balancer = SmoothWeighted(rng=random.Random(seed))
    balancer.update([ep(i + 1, w) for i, w in enumerate(weights)])
    for _ in range(start):
        balancer.pick()
    observed = counts(balancer.pick, sum(live))
    assert observed == {i + 1: w for i, w in enumerate(live) if w}


def test_smooth_weighted_interleaves_like_nginx() -> None:
    balancer = SmoothWeighted(rng=random.Random(0))
    balancer.update([ep(1, 5), ep(2, 1), ep(3, 1)])
    sequence = "".join("_abc"[index(balancer.pick())] for _ in range(7))
    assert sequence in {"aabacaa", "aacabaa"}


def test_smooth_weighted_same_update_does_not_disturb_the_schedule() -> None:
    endpoints = [ep(1, 3), ep(2, 1), ep(3, 2), ep(4, 0), ep(5, 2)]
    steady, churned = SmoothWeighted(rng=random.Random(5)), SmoothWeighted(rng=random.Random(5))
    steady.update(endpoints)
    churned.update(endpoints)
    for _ in range(40):
        churned.update([Endpoint(e.host, e.port, weight=e.weight) for e in endpoints])
        assert steady.pick() == churned.pick()


@FAST
@given(
    first=st.lists(st.integers(1, 5), min_size=1, max_size=6),
    second=st.lists(st.integers(1, 5), min_size=1, max_size=6),
    picks=st.integers(0, 20),
    seed=st.integers(0, 2**32),
)
def test_smooth_weighted_shares_after_churn(first: list[int], second: list[int], picks: int, seed: int) -> None:
    balancer = SmoothWeighted(rng=random.Random(seed))
    balancer.update([ep(i + 1, w) for i, w in enumerate(first)])
    for _ in range(picks):
        balancer.pick()
    balancer.update([ep(i + 1, w) for i, w in enumerate(second)])
    rounds = 40
    observed = counts(balancer.pick, sum(second) * rounds)
    # Carried-over current weights sum to 0 and are below the old total, so they shift each
    # endpoint's count by a bounded amount, not a growing one.
    slack = sum(first) + sum(second)
    for i, w in enumerate(second):
        assert abs(observed[i + 1] - w * rounds) <= slack


def test_smooth_weighted_rebase_keeps_the_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smooth_weighted, "_REBASE_EVERY", 7)
    weights = [5.0, 1.0, 3.0, 3.0, 0.5]
    balancer = SmoothWeighted(rng=random.Random(3))
    balancer.update([ep(i + 1, w) for i, w in enumerate(weights)])
    assert_nginx_schedule([index(balancer.pick()) for _ in range(100)], weights)


def test_smooth_weighted_repr() -> None:
    balancer = SmoothWeighted()
    balancer.update([ep(1, 2), ep(2, 1), ep(3, 1), ep(4, 0)])
    assert repr(balancer) == "<SmoothWeighted [3 ready, 2 weight classes]>"


# --- p2c -----------------------------------------------------------------------------------------


def p2c_shares(snapshot: Sequence[Endpoint]) -> dict[Endpoint, float]:
    """Without feedback the lower cost is the higher weight: P(i) over uniformly drawn distinct pairs."""
    live = [e for e in snapshot if e.weight > 0] or list(snapshot)
    n = len(live)
    if n == 1:
        return dict.fromkeys(live, 1.0)
    pair = 1 / (n * (n - 1) / 2)
    out = dict.fromkeys(live, 0.0)
    for a, b in itertools.combinations(live, 2):
        if a.weight == b.weight:
            out[a] += pair / 2
            out[b] += pair / 2
        else:
            out[a if a.weight > b.weight else b] += pair
    return out


@FAST
@given(weights=st.lists(st.sampled_from([0.0, 1.0, 2.0, 3.5]), min_size=1, max_size=10), seed=st.integers(0, 2**32))
def test_p2c_without_feedback_picks_the_heavier_of_two(weights: list[float], seed: int) -> None:
    balancer = PowerOfTwoChoices(rng=random.Random(seed), clock=FakeClock())
    snapshot = [ep(i + 1, w) for i, w in enumerate(weights)]
    balancer.update(snapshot)
    assert_distribution(balancer, p2c_shares(snapshot), picks=3000)


@FAST
@given(n=st.integers(5, 30), seed=st.integers(0, 2**32))
def test_p2c_balances_in_flight_calls(n: int, seed: int) -> None:
    balancer = PowerOfTwoChoices(rng=random.Random(seed), clock=FakeClock())
    endpoints = [ep(i) for i in range(1, n + 1)]
    balancer.update(endpoints)
    in_flight: Counter[Endpoint] = Counter()
    for _ in range(20 * n):
        picked = balancer.pick()
        balancer.on_start(picked)
        in_flight[picked] += 1
    # Two choices keep the busiest endpoint within O(log log n) of the mean (<= 3 here); one
    # random choice leaves it about sqrt(2 * 20 * ln n) above, 5 to 13 for these n.
    assert max(in_flight.values()) - 20 <= 4
    assert repr(balancer) == f"<PowerOfTwoChoices [{n} ready, {20 * n} in flight]>"


def test_p2c_prefers_lower_latency_then_fewer_in_flight() -> None:
    clock = FakeClock()
    balancer = PowerOfTwoChoices(rng=random.Random(1), clock=clock)
    slow, fast = ep(1), ep(2)
    balancer.update([slow, fast])
    balancer.on_start(slow)
    balancer.on_finish(slow, status=Status.OK, latency=1.0)
    balancer.on_start(fast)
    balancer.on_finish(fast, status=Status.OK, latency=0.01)
    assert {balancer.pick() for _ in range(50)} == {fast}
    for _ in range(150):  # 0.01 * 151 > 1.0
        balancer.on_start(fast)
    assert {balancer.pick() for _ in range(50)} == {slow}
    assert repr(balancer) == "<PowerOfTwoChoices [2 ready, 150 in flight]>"


def test_p2c_peak_ewma_rises_at_once_and_falls_gradually() -> None:
    clock = FakeClock()
    balancer = PowerOfTwoChoices(rng=random.Random(1), clock=clock, decay=10.0, default_latency=0.5)
    a, b = ep(1), ep(2)
    balancer.update([a, b])
    balancer.on_finish(a, status=Status.OK, latency=2.0)  # peak: a now costs 2.0 > b's 0.5
    assert balancer.pick() == b
    clock.now += 1.0
    balancer.on_finish(a, status=Status.OK, latency=0.0)  # 2.0 * e^-0.1 ≈ 1.81, still above b's
    assert balancer.pick() == b
    clock.now += 30.0  # a decays by e^-3; b, which never answered, is priced no higher than a's estimate
    assert balancer._unsampled(clock.now) <= 1.81 * math.exp(-3)
    balancer.on_finish(b, status=Status.OK, latency=1.0)  # b jumps to 1.0, a is at ≈ 0.09
    assert balancer.pick() == a


def test_p2c_fast_failures_do_not_attract_traffic() -> None:
    balancer = PowerOfTwoChoices(rng=random.Random(1), clock=FakeClock(), failure_penalty=1.0)
    failing, healthy = ep(1), ep(2)
    balancer.update([failing, healthy])
    balancer.on_finish(failing, status=Status.UNAVAILABLE, latency=0.001)
    balancer.on_finish(healthy, status=Status.OK, latency=0.2)
    assert {balancer.pick() for _ in range(20)} == {healthy}


def test_p2c_cancelled_calls_end_in_flight_without_a_sample() -> None:
    balancer = PowerOfTwoChoices(rng=random.Random(1), clock=FakeClock(), default_latency=0.1)
    a, b = ep(1), ep(2)
    balancer.update([a, b])
    balancer.on_start(a)
    balancer.on_finish(a, status=Status.CANCELLED, latency=50.0)
    balancer.on_finish(b, status=Status.OK, latency=0.2)
    assert {balancer.pick() for _ in range(20)} == {a}
    assert repr(balancer) == "<PowerOfTwoChoices [2 ready, 0 in flight]>"


def test_p2c_keeps_state_across_updates_and_ignores_bad_latencies() -> None:
    balancer = PowerOfTwoChoices(rng=random.Random(1), clock=FakeClock())
    balancer.update([ep(1), ep(2)])
    balancer.on_start(ep(1))
    balancer.on_start(ep(2))
    balancer.update([ep(1, 2.0), ep(3)])
    assert repr(balancer) == "<PowerOfTwoChoices [2 ready, 1 in flight]>"
    for latency in (math.nan, math.inf, -1.0):
        balancer.on_finish(ep(3), status=Status.OK, latency=latency)
    assert {index(balancer.pick()) for _ in range(200)} <= {1, 3}


@pytest.mark.parametrize("options", [{"decay": 0}, {"default_latency": -1}, {"failure_penalty": math.nan}])
def test_p2c_rejects_bad_options(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        PowerOfTwoChoices(**options)


# --- ring_hash -----------------------------------------------------------------------------------

addresses_st = st.sets(st.integers(1, 250), min_size=1, max_size=15)


def key_owners(balancer: RingHash, keys: Sequence[str]) -> list[int]:
    return [index(balancer.pick_for(k)) for k in keys]


def test_ring_hash_key_hash_is_stable_across_processes() -> None:
    # Python's hash() is salted per process; this value must never change.
    assert key_hash("user-42") == 12029086546977095680


def test_ring_hash_placement_is_stable_across_versions() -> None:
    # Clients of different versions must agree on owners: the ring layout is part of the contract.
    balancer = RingHash()
    balancer.update([ep(i) for i in range(1, 6)])
    assert [index(balancer.pick_for(f"user-{k}")) for k in range(8)] == [5, 3, 2, 5, 4, 5, 3, 2]


@FAST
@given(addresses=addresses_st, seed=st.integers(0, 2**32))
def test_ring_hash_is_independent_of_update_order(addresses: set[int], seed: int) -> None:
    keys = [str(k) for k in range(300)]
    ordered = sorted(addresses)
    shuffled = ordered[:]
    random.Random(seed).shuffle(shuffled)
    a, b = RingHash(), RingHash()
    a.update([ep(i) for i in ordered])
    b.update([ep(i) for i in shuffled] + [ep(251, ready=False)])
    assert key_owners(a, keys) == key_owners(b, keys)


@FAST
@given(addresses=addresses_st, new=st.integers(251, 254), seed=st.integers(0, 2**32))
def test_ring_hash_adding_an_endpoint_moves_only_its_share(addresses: set[int], new: int, seed: int) -> None:
    rng = random.Random(seed)
    keys = [str(rng.getrandbits(64)) for _ in range(4000)]
    balancer = RingHash()
    balancer.update([ep(i) for i in sorted(addresses)])
    before = key_owners(balancer, keys)
    balancer.update([ep(i) for i in sorted(addresses | {new})])
    after = key_owners(balancer, keys)
    moved = [(old, now) for old, now in zip(before, after, strict=True) if old != now]
    assert all(now == new for _, now in moved)
    expected = len(keys) / (len(addresses) + 1)
    assert 0.5 * expected <= len(moved) <= 1.6 * expected
    balancer.update([ep(i) for i in sorted(addresses)])  # and removing it moves exactly those back
    assert key_owners(balancer, keys) == before


@FAST
@given(addresses=st.sets(st.integers(1, 250), min_size=2, max_size=15), seed=st.integers(0, 2**32))
def test_ring_hash_removing_an_endpoint_moves_only_its_keys(addresses: set[int], seed: int) -> None:
    rng = random.Random(seed)
    keys = [str(rng.getrandbits(64)) for _ in range(1000)]
    gone = rng.choice(sorted(addresses))
    balancer = RingHash()
    balancer.update([ep(i) for i in sorted(addresses)])
    before = key_owners(balancer, keys)
    balancer.update([ep(i, ready=i != gone) for i in sorted(addresses)])
    after = key_owners(balancer, keys)
    assert all(old == now for old, now in zip(before, after, strict=True) if old != gone)
    assert gone not in after


@FAST
@given(weights=st.lists(st.sampled_from([0, 1, 2, 3, 4]), min_size=1, max_size=8), seed=st.integers(0, 2**32))
def test_ring_hash_shares_follow_weights(weights: list[int], seed: int) -> None:
    rng = random.Random(seed)
    balancer = RingHash(replicas=400, rng=random.Random(seed))
    snapshot = [ep(i + 1, w) for i, w in enumerate(weights)]
    balancer.update(snapshot)
    keyed = Counter(balancer.pick_for(str(rng.getrandbits(64))) for _ in range(3000))
    unkeyed = Counter(balancer.pick() for _ in range(3000))
    expected = weighted_shares(snapshot)
    assert set(keyed) | set(unkeyed) <= set(expected)  # weight 0 is never picked
    for e, share in expected.items():  # 100+ points per endpoint put each arc share within ~±30 % of the weight share
        assert 0.55 * share * 3000 - 40 <= keyed[e] <= 1.5 * share * 3000 + 40
    # pick() without a key must follow the ring exactly as keyed picks do: a two-sample test.
    table = [(keyed[e], unkeyed[e]) for e in expected if keyed[e] + unkeyed[e] >= 10]
    if len(table) >= 2:
        stat = sum((a - b) ** 2 / (a + b) for a, b in table)
        assert chi2_sf(stat, len(table) - 1) > SIGNIFICANCE


def test_ring_hash_caps_the_ring() -> None:
    balancer = RingHash(replicas=100, max_ring_size=1000)
    balancer.update([ep(i) for i in range(1, 21)])
    assert repr(balancer) == "<RingHash [20 ready, 1000 points]>"
    balancer.update([ep(i, 1.0 if i > 1 else 0.01) for i in range(1, 3)])
    assert repr(balancer) == "<RingHash [2 ready, 101 points]>"  # the light one keeps 1 point
    with pytest.raises(ValueError):
        RingHash(replicas=0)


# --- zone_aware ----------------------------------------------------------------------------------


class Recorder:
    """An inner balancer that records the sets and feedback it receives."""

    def __init__(self) -> None:
        self.endpoints: list[Endpoint] = []
        self.feedback: list[tuple[str, Endpoint, Status | None]] = []

    def update(self, endpoints: Sequence[Endpoint], /) -> None:
        self.endpoints = [e for e in endpoints if e.ready]

    def pick(self) -> Endpoint:
        if not self.endpoints:
            raise RpcError(Status.UNAVAILABLE, "none")
        return self.endpoints[0]

    def on_start(self, endpoint: Endpoint, /) -> None:
        self.feedback.append(("start", endpoint, None))

    def on_finish(self, endpoint: Endpoint, /, *, status: Status, latency: float) -> None:
        self.feedback.append(("finish", endpoint, status))


def zone_set(local_ready: int, local_down: int, remote: int) -> list[Endpoint]:
    local = [ep(i, zone="a", ready=i <= local_ready) for i in range(1, local_ready + local_down + 1)]
    return local + [ep(100 + i, zone="b") for i in range(remote)] + [ep(200)]


@pytest.mark.parametrize(
    ("local_ready", "local_down", "options", "local"),
    [
        (2, 0, {}, True),
        (1, 1, {}, True),  # exactly half of the zone is ready
        (1, 2, {}, False),  # most of the zone is gone: spread the load
        (0, 3, {"min_fraction": 0.0}, False),  # nothing local is ready
        (1, 0, {"min_ready": 2}, False),
        (2, 0, {"min_ready": 2}, True),
        (1, 3, {"min_fraction": 0.25}, True),
    ],
)
def test_zone_aware_prefers_the_zone_while_enough_is_ready(
    local_ready: int, local_down: int, options: dict[str, Any], local: bool
) -> None:
    balancer = balancers.create("zone_aware", zone="a", inner="round_robin", **options)
    balancer.update(zone_set(local_ready, local_down, remote=3))
    picked = {index(balancer.pick()) for _ in range(40)}
    if local:
        assert picked == set(range(1, local_ready + 1))
    else:
        assert picked == set(range(1, local_ready + 1)) | {100, 101, 102, 200}


def test_zone_aware_rotation_over_the_zone_and_repr() -> None:
    balancer = balancers.create("zone_aware", zone="a", inner="round_robin", inner_options={"rng": random.Random(2)})
    balancer.update(zone_set(3, 1, remote=2))
    assert counts(balancer.pick, 9) == {1: 3, 2: 3, 3: 3}
    assert repr(balancer) == "<ZoneAware zone='a' [3 of 6 ready in zone | local] inner=<RoundRobin [3 ready]>>"
    balancer.update(zone_set(0, 1, remote=2))
    assert repr(balancer) == "<ZoneAware zone='a' [0 of 3 ready in zone | all zones] inner=<RoundRobin [3 ready]>>"


def test_zone_aware_without_a_zone_uses_everything() -> None:
    balancer = balancers.create("zone_aware", zone=None)
    balancer.update(zone_set(2, 0, remote=1))
    assert {index(balancer.pick()) for _ in range(20)} == {1, 2, 100, 200}


def test_zone_aware_forwards_feedback_and_keys() -> None:
    inner = Recorder()
    balancer = ZoneAware(zone="a", inner=inner)
    assert all(isinstance(balancer, cap) for cap in (CallFeedback, KeyedBalancer))
    balancer.update(zone_set(2, 0, remote=1))
    assert inner.endpoints == [ep(1, zone="a"), ep(2, zone="a")]
    balancer.on_start(ep(1, zone="a"))
    balancer.on_finish(ep(1, zone="a"), status=Status.INTERNAL, latency=0.5)
    assert inner.feedback == [("start", ep(1, zone="a"), None), ("finish", ep(1, zone="a"), Status.INTERNAL)]
    assert balancer.pick_for("k") == ep(1, zone="a")  # inner has no pick_for: plain pick
    ring = ZoneAware(zone="a", inner="ring_hash")
    plain = RingHash()
    ring.update(zone_set(3, 0, remote=2))
    plain.update(zone_set(3, 0, remote=0)[:-1])
    assert all(ring.pick_for(str(k)) == plain.pick_for(str(k)) for k in range(100))


def test_zone_aware_rejects_bad_options() -> None:
    with pytest.raises(ValueError):
        balancers.create("zone_aware", zone="a", min_ready=0)
    with pytest.raises(ValueError):
        balancers.create("zone_aware", zone="a", min_fraction=1.5)
    with pytest.raises(ValueError):
        balancers.create("zone_aware", zone="a", inner=Recorder(), inner_options={"rng": None})


# --- outlier -------------------------------------------------------------------------------------


def outlier(clock: FakeClock, **options: Any) -> OutlierEjection:
    defaults: dict[str, Any] = {
        "clock": clock,
        "consecutive_failures": 3,
        "base_ejection": 10.0,
        "max_ejection": 35.0,
        "max_ejected_fraction": 0.5,
        "inner": "round_robin",
    }
    return OutlierEjection(**(defaults | options))


def fail(balancer: OutlierEjection, endpoint: Endpoint, times: int, status: Status = Status.UNAVAILABLE) -> None:
    for _ in range(times):
        balancer.on_start(endpoint)
        balancer.on_finish(endpoint, status=status, latency=0.01)


def test_outlier_ejects_after_consecutive_failures_and_readmits() -> None:
    clock = FakeClock()
    balancer = outlier(clock)
    balancer.update([ep(1), ep(2), ep(3), ep(4)])
    fail(balancer, ep(1), 2)
    fail(balancer, ep(1), 1, Status.OK)  # a success resets the streak
    fail(balancer, ep(1), 2)
    assert balancer.ejected == frozenset()
    fail(balancer, ep(1), 1, Status.CANCELLED)  # the caller gave up: says nothing
    fail(balancer, ep(1), 1, Status.DEADLINE_EXCEEDED)
    fail(balancer, ep(1), 1)
    assert balancer.ejected == {("10.0.0.1", 9000)}
    assert repr(balancer) == "<OutlierEjection [1 of 4 ejected] inner=<RoundRobin [3 ready]>>"
    assert 1 not in {index(balancer.pick()) for _ in range(30)}
    clock.now += 9.99
    assert 1 not in {index(balancer.pick()) for _ in range(30)}
    clock.now += 0.01
    assert 1 in {index(balancer.pick()) for _ in range(4)}
    assert balancer.ejected == frozenset()


def ejection_length(balancer: OutlierEjection, clock: FakeClock, endpoint: Endpoint) -> float:
    """Eject `endpoint` now and measure, in 0.5 s steps, how long until a pick readmits it."""
    fail(balancer, endpoint, 3)
    assert (endpoint.host, endpoint.port) in balancer.ejected
    start = clock.now
    while (endpoint.host, endpoint.port) in balancer.ejected:
        clock.now += 0.5
        balancer.pick()
    return clock.now - start


def test_outlier_interval_doubles_then_caps_then_is_forgotten() -> None:
    clock = FakeClock()
    balancer = outlier(clock)
    balancer.update([ep(1), ep(2), ep(3)])
    assert [ejection_length(balancer, clock, ep(1)) for _ in range(4)] == [10.0, 20.0, 35.0, 35.0]
    clock.now += 34.0  # back for less than max_ejection: still a repeat offender
    assert ejection_length(balancer, clock, ep(1)) == 35.0
    clock.now += 35.0
    assert ejection_length(balancer, clock, ep(1)) == 10.0


@FAST
@given(n=st.integers(1, 12), fraction=st.sampled_from([0.0, 0.1, 0.3, 0.5, 1.0]), seed=st.integers(0, 2**32))
def test_outlier_never_ejects_everything(n: int, fraction: float, seed: int) -> None:
    clock = FakeClock()
    balancer = outlier(clock, max_ejected_fraction=fraction, inner="weighted_random", inner_options={"rng": None})
    endpoints = [ep(i) for i in range(1, n + 1)]
    balancer.update(endpoints)
    order = endpoints * 3
    random.Random(seed).shuffle(order)
    for e in order:
        fail(balancer, e, 1)
    limit = 0 if n == 1 else min(n - 1, max(1, math.floor(fraction * n)))
    assert len(balancer.ejected) == limit
    assert {index(balancer.pick()) for _ in range(100)} <= set(range(1, n + 1)) - {
        int(host.rsplit(".", 1)[1]) for host, _ in balancer.ejected
    }


def test_outlier_shrinking_set_returns_ejected_endpoints_early() -> None:
    clock = FakeClock()
    balancer = outlier(clock, max_ejected_fraction=0.5)
    balancer.update([ep(i) for i in range(1, 7)])
    fail(balancer, ep(1), 3)
    clock.now += 1
    fail(balancer, ep(2), 3)
    clock.now += 1
    fail(balancer, ep(3), 3)
    assert len(balancer.ejected) == 3
    balancer.update([ep(1), ep(2), ep(3), ep(4)])  # limit now 2: the one due back first returns
    assert balancer.ejected == {("10.0.0.2", 9000), ("10.0.0.3", 9000)}
    balancer.update([ep(2), ep(5)])  # ep(3) gone, its history with it
    assert balancer.ejected == {("10.0.0.2", 9000)}
    assert {index(balancer.pick()) for _ in range(10)} == {5}


def test_outlier_forwards_feedback_and_keys() -> None:
    inner = Recorder()
    balancer = OutlierEjection(inner=inner, consecutive_failures=1, clock=FakeClock())
    assert all(isinstance(balancer, cap) for cap in (CallFeedback, KeyedBalancer))
    balancer.update([ep(1), ep(2)])
    fail(balancer, ep(1), 1)
    assert inner.feedback == [("start", ep(1), None), ("finish", ep(1), Status.UNAVAILABLE)]
    assert inner.endpoints == [ep(2)]
    assert balancer.pick_for("k") == ep(2)
    keyed = OutlierEjection(inner="ring_hash", consecutive_failures=1, clock=FakeClock())
    keyed.update([ep(1), ep(2), ep(3)])
    owner = keyed.pick_for("user-1")
    fail(keyed, owner, 1)
    assert keyed.pick_for("user-1") != owner


@pytest.mark.parametrize(
    "options",
    [
        {"consecutive_failures": 0},
        {"base_ejection": 0},
        {"base_ejection": 20, "max_ejection": 10},
        {"max_ejection": math.inf},
        {"max_ejected_fraction": 1.5},
    ],
)
def test_outlier_rejects_bad_options(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        balancers.create("outlier", **options)


@pytest.mark.parametrize("late", [False, True])
def test_p2c_starves_no_endpoint_of_a_sequential_caller(late: bool) -> None:
    # One caller, one call at a time, three equal servers answering in 0.1 ms: the new endpoint's first
    # guess (100 ms) must not keep it out against the measured ones (it got 9 of 44,000 calls before).
    clock = FakeClock()
    balancer = PowerOfTwoChoices(rng=random.Random(3), clock=clock)
    endpoints = [ep(1), ep(2), ep(3)]
    balancer.update(endpoints[:2] if late else endpoints)
    counts: Counter[Endpoint] = Counter()
    for call in range(6000):
        if late and call == 3000:  # scaled out: a third pod joins a client that has measured two
            balancer.update(endpoints)
            counts.clear()
        picked = balancer.pick()
        balancer.on_start(picked)
        clock.now += 0.0001
        balancer.on_finish(picked, status=Status.OK, latency=0.0001)
        counts[picked] += 1
    assert min(counts[e] for e in endpoints) > 600, counts  # each about 1,000 of the 3,000 calls
