"""Property-testing balancers: endpoint-list strategies, a distribution check and the Balancer contract.

- `endpoints()`: a hypothesis strategy for snapshots (lists of `Endpoint`).
- `assert_distribution(balancer, expected, picks=...)`: a chi-square goodness-of-fit test of pick shares.
- `assert_contract(factory)`: the `kubrpc.interfaces.Balancer` rules, against any balancer factory.
- `weighted_shares(snapshot)`: the shares that a balancer honouring weights owes each endpoint.

`endpoints()` and `assert_contract()` need hypothesis (the `[testing]` extra, or
`pip install hypothesis`); importing this module and `assert_distribution()` do not.
"""

from __future__ import annotations

import inspect
import math
import random
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from ..endpoint import Endpoint
from ..errors import RpcError
from ..interfaces import Balancer, CallFeedback, KeyedBalancer
from ..status import Status

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

__all__ = (
    "SIGNIFICANCE",
    "assert_contract",
    "assert_distribution",
    "chi2_sf",
    "endpoints",
    "goodness_of_fit",
    "weighted_shares",
)

_K = TypeVar("_K", bound=Hashable)

#: assert_distribution fails when the chi-square p-value is below this: a correct balancer fails
#: about once in a million runs, while a share that is 5 points off at 10,000 picks fails every time.
SIGNIFICANCE = 1e-6


def _no_hypothesis() -> ImportError:
    return ImportError(
        "kubrpc.testing.balancers needs hypothesis for endpoints() and assert_contract(): "
        "pip install hypothesis (the [testing] extra)"
    )


# --- strategies ----------------------------------------------------------------------------------


def endpoints(
    *,
    min_size: int = 0,
    max_size: int = 8,
    ready: bool | None = None,
    min_ready: int = 0,
    weights: SearchStrategy[float] | Sequence[float] | None = None,
    zones: Sequence[str | None] = (None, "a", "b"),
    unique: bool = True,
) -> SearchStrategy[list[Endpoint]]:
    """A hypothesis strategy for endpoint snapshots, as a resolver yields them.

    - `min_size`, `max_size`: bounds on the list's length.
    - `ready`: True makes every endpoint ready, False none; None (the default) mixes them, about
      three in four ready; `min_ready` guarantees at least that many ready ones (and raises
      `min_size` to match).
    - `weights`: a strategy or a list of weights to draw from; by default 0 (about one in six),
      whole numbers 1-10 and fractions in [0.01, 100].
    - `zones`: the zones to draw from (None is "no zone").
    - `unique`: every address (host:port) differs; with False, addresses come from a small pool so
      that the same address often appears twice, as it may while EndpointSlices change.
    """
    try:
        from hypothesis import strategies as st
    except ImportError as exc:
        raise _no_hypothesis() from exc
    min_size = max(min_size, min_ready)
    if not 0 <= min_size <= max_size or (ready is False and min_ready > 0):
        raise ValueError(
            f"no snapshot has min_size={min_size}, max_size={max_size}, ready={ready} and min_ready={min_ready}"
        )
    if not zones:
        raise ValueError("zones must name at least one zone (None for no zone)")
    if weights is None:
        weight_st = st.one_of(st.just(0.0), st.integers(1, 10).map(float), st.floats(0.01, 100.0))
    elif isinstance(weights, Sequence):
        weight_st = st.sampled_from([float(w) for w in weights])
    else:
        weight_st = weights
    ready_st = st.just(ready) if ready is not None else st.integers(0, 3).map(bool)
    pool = max_size * 2 if unique else max(2, (max_size + 1) // 2)

    @st.composite
    def snapshot(draw: st.DrawFn) -> list[Endpoint]:
        ids: list[int] = draw(st.lists(st.integers(1, pool), min_size=min_size, max_size=max_size, unique=unique))
        flags: list[bool] = [draw(ready_st) for _ in ids]
        for i in range(len(flags)):  # promote the first not-ready ones until min_ready hold
            if sum(flags) >= min_ready:
                break
            flags[i] = True
        return [
            Endpoint(_host(n), 9000, weight=draw(weight_st), zone=draw(st.sampled_from(zones)), ready=flag)
            for n, flag in zip(ids, flags, strict=True)
        ]

    strategy: SearchStrategy[list[Endpoint]] = snapshot()
    return strategy


def _host(n: int) -> str:
    return f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


def weighted_shares(snapshot: Iterable[Endpoint]) -> dict[Endpoint, float]:
    """The share of picks each endpoint should get from a balancer that honours weights.

    Over the ready endpoints (an address listed twice counts once, its first ready entry): weight
    divided by the total, with weight 0 left out; if every ready weight is 0, even shares. Empty
    when nothing is ready.
    """
    ready: dict[tuple[str, int], Endpoint] = {}
    for ep in snapshot:
        if ep.ready:
            ready.setdefault((ep.host, ep.port), ep)
    top = max((ep.weight for ep in ready.values()), default=0.0)
    if top <= 0:
        return {ep: 1 / len(ready) for ep in ready.values()}
    scaled = {ep: ep.weight / top for ep in ready.values()}  # scaled first: 1e308 + 1e308 overflows
    total = sum(scaled.values())
    return {ep: w / total for ep, w in scaled.items() if w > 0}


# --- the distribution check ----------------------------------------------------------------------


def chi2_sf(stat: float, df: int) -> float:
    """P(X >= stat) for X ~ chi-square(df): the regularized upper incomplete gamma Q(df/2, stat/2)."""
    a, x = df / 2, stat / 2
    if x <= 0:
        return 1.0
    log_prefix = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:  # series for the lower function
        term = total = 1.0 / a
        k = a
        while term > total * 1e-16:
            k += 1
            term *= x / k
            total += term
        return max(0.0, 1.0 - total * math.exp(log_prefix))
    tiny = 1e-300  # modified Lentz continued fraction for the upper function
    b = x + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 100_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1 / (d if abs(d) > tiny else tiny)
        c = b + an / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return math.exp(log_prefix) * h


def goodness_of_fit(observed: Mapping[_K, int], expected: Mapping[_K, float]) -> float:
    """The chi-square p-value of counts `observed` against shares `expected` (normalised here).

    Bins expecting fewer than 5 counts are pooled. A count where the expected share is 0 (or
    missing) is impossible: the p-value is 0.
    """
    norm = _normalised(expected)
    if any(n > 0 and norm.get(k, 0.0) <= 0 for k, n in observed.items()):
        return 0.0
    total = sum(observed.values())
    bins = [(total * p, observed.get(k, 0)) for k, p in norm.items() if p > 0]
    big = [b for b in bins if b[0] >= 5]
    small = [b for b in bins if b[0] < 5]
    pooled = (sum(e for e, _ in small), sum(o for _, o in small))
    if small and pooled[0] >= 5:
        big.append(pooled)
    elif small and big:
        big.sort()
        big[0] = (big[0][0] + pooled[0], big[0][1] + pooled[1])
    if len(big) < 2:
        return 1.0
    stat = sum((o - e) ** 2 / e for e, o in big)
    return chi2_sf(stat, len(big) - 1)


def _normalised(expected: Mapping[_K, float]) -> dict[_K, float]:
    values = list(expected.values())
    if any(not isinstance(v, int | float) or not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise ValueError(f"expected shares must be finite numbers >= 0 with a positive sum, got {values!r}")
    total = sum(values)
    return {k: v / total for k, v in expected.items()}


def assert_distribution(
    balancer: Balancer,
    expected: Mapping[Endpoint, float],
    *,
    picks: int = 10_000,
    significance: float = SIGNIFICANCE,
) -> float:
    """Pick `picks` times and check the shares against `expected` with a chi-square test; return the p-value.

    `expected` maps each endpoint to its probability, or to a weight (it is normalised); see
    `weighted_shares()`. Fails at once if an endpoint is picked whose expected share is 0 or that
    is not in `expected`, and otherwise when the p-value is below `significance` (1e-6: a correct
    balancer fails about once in a million runs; at 10,000 picks a share 5 points off always
    fails, one 2.5 points off half the time). The message is a table of expected and observed
    shares. The check itself draws nothing at random: with a seeded balancer it is deterministic.
    """
    if picks < 1:
        raise ValueError(f"picks must be >= 1, got {picks}")
    shares = _normalised(expected)
    observed: Counter[Endpoint] = Counter()
    for n in range(picks):
        try:
            got = balancer.pick()
        except RpcError as exc:
            raise AssertionError(f"pick() raised {exc!r} at pick {n + 1} of {picks}; balancer: {balancer!r}") from exc
        if not isinstance(got, Endpoint):  # before counting it: it may not even be hashable
            raise AssertionError(f"pick() returned {_not_an_endpoint(got)} at pick {n + 1}; balancer: {balancer!r}")
        observed[got] += 1
        if shares.get(got, 0.0) <= 0:
            table = _table(shares, observed, n + 1)
            raise AssertionError(
                f"pick() returned {got!r}, which should never be picked (expected share 0), at pick {n + 1}\n"
                f"{table}\nhint: is it ready=False, weight 0 while others are not, or gone from the last update?"
            )
    p = goodness_of_fit(observed, shares)
    if p < significance:
        raise AssertionError(
            f"pick shares differ from the expected ones: chi-square p-value {p:.3g} < {significance:g} "
            f"over {picks:,} picks\n{_table(shares, observed, picks)}\n"
            "hint: check how pick() turns weights into chances (weight / total over the ready endpoints), "
            "that update() kept every endpoint, and that the expected shares are right for this balancer"
        )
    return p


def _not_an_endpoint(got: object) -> str:
    """Says what a pick returned instead of an Endpoint (closing a coroutine, so that it does not warn)."""
    if inspect.iscoroutine(got):
        got.close()
        return f"{got!r}, not an Endpoint: pick() must be a plain method (`def`), not `async def`"
    return f"{got!r}, not an Endpoint"


def _table(shares: Mapping[Endpoint, float], observed: Counter[Endpoint], total: int) -> str:
    rows = [("endpoint", "expected", "observed", "picks", "deviation")]
    for ep in list(shares) + [ep for ep in observed if ep not in shares]:
        share, count = shares.get(ep, 0.0), observed[ep]
        mean = share * total
        sigma = (count - mean) / math.sqrt(mean) if mean > 0 else math.inf if count else 0.0
        mark = "  <<" if abs(sigma) > 4 else ""
        rows.append((_label(ep), f"{share:.2%}", f"{count / total:.2%}", f"{count:,}", f"{sigma:+.1f} σ{mark}"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = []
    for row in rows:
        numbers = "".join(cell.rjust(w + 3) for cell, w in zip(row[1:4], widths[1:4], strict=True))
        lines.append(f"  {row[0].ljust(widths[0])}{numbers}   {row[4]}")
    return "\n".join(lines)


def _label(ep: Endpoint) -> str:
    extra = "" if ep.weight == 1.0 else f" weight={ep.weight:g}"
    extra += f" zone={ep.zone}" if ep.zone else ""
    extra += "" if ep.ready else " ready=False"
    return ep.address + extra


# --- the contract --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    text: str
    hint: str


UNAVAILABLE = _Rule(
    "nothing eligible raises RpcError(UNAVAILABLE)",
    "raise kubrpc.RpcError(kubrpc.Status.UNAVAILABLE, ...) from pick() (and pick_for()) when no endpoint is ready: "
    "before the first update, after an empty one, and when every endpoint has ready=False",
)
SPURIOUS = _Rule(
    "RpcError(UNAVAILABLE) only when nothing is eligible",
    "the last update has a ready endpoint, so pick() must return one",
)
READY = _Rule(
    "never picks an endpoint with ready=False",
    "leave endpoints with ready=False out in update(), and pick only among what update() kept",
)
ABSENT = _Rule(
    "never picks an endpoint absent from the last update",
    "update() replaces the whole set: drop every endpoint the new snapshot lacks "
    "(what was learned about an endpoint may be kept by address)",
)
WEIGHT_0 = _Rule(
    "weight 0 takes no calls while a ready endpoint has weight > 0",
    "leave weight-0 endpoints out while any ready endpoint has weight > 0; a balancer that ignores weights by "
    "design (as round_robin does) passes assert_contract(factory, weighted=False)",
)
ALL_ZERO = _Rule(
    "when every ready endpoint has weight 0, they all take calls",
    "all-zero weights are not an empty set: then treat every ready endpoint as weight 1 (decide over the ready "
    "endpoints, not over the whole snapshot)",
)
DUPLICATE = _Rule(
    "an address listed twice is eligible if any of its entries is ready",
    "when you deduplicate by address, keep a ready entry, not just the first or the last one",
)
NO_RAISE = _Rule(
    "update(), pick() with ready endpoints, and the feedback methods do not raise",
    "feedback may name endpoints that are gone or were never picked: ignore them; "
    "any snapshot of valid Endpoints, of any length, with duplicates, is a valid update",
)


def _snapshot(endpoints: Iterable[Endpoint]) -> str:
    return "[" + ", ".join(repr(ep) for ep in endpoints) + "]"


class _Run:
    """One balancer under test and what it was fed: checks every pick against the last update."""

    def __init__(self, factory: Callable[..., Balancer], seed: int) -> None:
        self.balancer = _make(factory, seed)
        self.last: Sequence[Endpoint] | None = None
        self.steps: list[str] = []

    def fail(self, rule: _Rule, happened: str) -> AssertionError:
        last = "none yet" if self.last is None else _snapshot(self.last)
        steps = "; ".join(self.steps[-8:])
        steps = ("...; " if len(self.steps) > 8 else "") + steps
        return AssertionError(
            f"Balancer contract broken: {rule.text}\n  {happened}\n  last update: {last}\n"
            f"  balancer: {self.balancer!r}\n  steps: {steps}\n  hint: {rule.hint}"
        )

    def update(self, snapshot: Sequence[Endpoint]) -> None:
        self.steps.append(f"update({_snapshot(snapshot)})")
        try:
            self.balancer.update(snapshot)
        except Exception as exc:
            raise self.fail(NO_RAISE, f"update() raised {exc!r}") from exc
        self.last = snapshot

    def pick(self, key: str | None = None, *, spurious: _Rule = SPURIOUS) -> Endpoint | None:
        """One checked pick (pick_for(key) if a key is given and the balancer is keyed); None if UNAVAILABLE."""
        balancer = self.balancer
        keyed = balancer if isinstance(balancer, KeyedBalancer) else None
        call = "pick()" if key is None or keyed is None else f"pick_for({key!r})"
        ready = [ep for ep in self.last or () if ep.ready]
        try:
            got: object = balancer.pick() if key is None or keyed is None else keyed.pick_for(key)
        except RpcError as exc:
            if exc.code is not Status.UNAVAILABLE:
                raise self.fail(UNAVAILABLE, f"{call} raised {exc!r}, not UNAVAILABLE") from exc
            if ready:
                raise self.fail(spurious, f"{call} raised {exc!r} with {len(ready)} ready endpoint(s)") from exc
            self.steps.append(f"{call} -> UNAVAILABLE")
            return None
        except Exception as exc:
            raise self.fail(NO_RAISE if ready else UNAVAILABLE, f"{call} raised {exc!r}") from exc
        self.steps.append(f"{call} -> {got!r}")
        if not isinstance(got, Endpoint):
            rule = ABSENT if self.last is not None else UNAVAILABLE
            raise self.fail(rule, f"{call} returned {_not_an_endpoint(got)}")
        if self.last is None:
            raise self.fail(UNAVAILABLE, f"{call} returned {got!r} before any update")
        if got not in self.last:
            raise self.fail(ABSENT, f"{call} returned {got!r}")
        if not got.ready:
            raise self.fail(READY, f"{call} returned {got!r}")
        return got

    def picks(self, n: int, *, spurious: _Rule = SPURIOUS) -> Counter[Endpoint]:
        """`n` plain picks and, for a keyed balancer, `n // 4` keyed ones; the endpoints picked."""
        out: Counter[Endpoint] = Counter()
        for i in range(n + (n // 4 if isinstance(self.balancer, KeyedBalancer) else 0)):
            got = self.pick(None if i < n else f"key-{i}", spurious=spurious)
            if got is not None:
                out[got] += 1
        return out

    def expect_unavailable(self) -> None:
        """Nothing is eligible: pick() (and pick_for()) must raise UNAVAILABLE; returning anything fails in pick()."""
        self.pick()
        self.pick("key")

    def feedback(self, call: str, endpoint: Endpoint, status: Status = Status.OK, latency: float = 0.01) -> None:
        balancer = self.balancer
        if not isinstance(balancer, CallFeedback):
            return
        self.steps.append(f"{call}({endpoint!r})" if call == "on_start" else f"{call}({endpoint!r}, {status.name})")
        try:
            if call == "on_start":
                balancer.on_start(endpoint)
            else:
                balancer.on_finish(endpoint, status=status, latency=latency)
        except Exception as exc:
            raise self.fail(NO_RAISE, f"{call}() raised {exc!r}") from exc


def _make(factory: Callable[..., Balancer], seed: int) -> Balancer:
    """Call the factory, with rng=random.Random(seed) if it has an `rng` parameter."""
    try:
        parameter = inspect.signature(factory).parameters.get("rng")
    except (TypeError, ValueError):
        parameter = None
    if parameter is not None and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
        return factory(rng=random.Random(seed))
    return factory()


def _fixed_checks(factory: Callable[..., Balancer], *, weighted: bool, picks: int) -> None:
    """The contract on hand-made snapshots, each on a fresh balancer."""
    a, b, c, d = (Endpoint(_host(n), 9000) for n in (1, 2, 3, 4))

    def down(ep: Endpoint, weight: float = 1.0) -> Endpoint:
        return Endpoint(ep.host, ep.port, weight=weight, ready=False)

    def weight(ep: Endpoint, w: float) -> Endpoint:
        return Endpoint(ep.host, ep.port, weight=w)

    run = _Run(factory, 0)
    run.expect_unavailable()
    run.update([a])
    run.picks(3)
    run.update([])
    run.expect_unavailable()
    run.update([down(a), down(b), down(c, 0.0)])
    run.expect_unavailable()

    run = _Run(factory, 1)
    run.update([down(a), b, down(c), d])
    run.picks(picks)
    run.update([a, b, c])
    run.picks(10)
    run.update((c, d))  # any Sequence, and a new set: nothing from before
    run.picks(picks)
    run.update([weight(d, 2.0)])  # the same address with a new weight is a new endpoint
    run.picks(10)

    run = _Run(factory, 2)
    zero = weight(a, 0.0)
    run.update([zero, b, weight(c, 2.0), down(d, 5.0)])
    if weighted and run.picks(picks)[zero]:
        raise run.fail(WEIGHT_0, f"pick() returned {zero!r} while {b!r} was ready")
    for snapshot in ([zero, weight(b, 0.0), weight(c, 0.0)], [zero, weight(b, 0.0), down(c, 3.0)]):
        run.update(snapshot)
        picked = run.picks(picks, spurious=ALL_ZERO)
        missed = [ep for ep in snapshot if ep.ready and not picked[ep]]
        if missed:
            raise run.fail(ALL_ZERO, f"{picks} picks never returned {_snapshot(missed)}")

    run = _Run(factory, 3)
    run.update([down(a), weight(a, 2.0)])
    run.picks(10, spurious=DUPLICATE)
    run.update([a, down(a), b, b])
    run.picks(20, spurious=DUPLICATE)

    run = _Run(factory, 4)
    run.update([a, b])
    gone = run.pick()
    if gone is not None:
        run.feedback("on_start", gone)
    stranger = Endpoint("192.0.2.1", 9)
    run.feedback("on_start", stranger)
    run.update([c])
    if gone is not None:
        run.feedback("on_finish", gone, Status.UNAVAILABLE)
    run.feedback("on_finish", stranger, Status.INTERNAL)
    run.feedback("on_finish", c)  # never started
    run.picks(10)


@dataclass(frozen=True)
class _Step:
    """One step of a random workload; its repr is what hypothesis prints for a failing example."""

    kind: str
    snapshot: list[Endpoint] | tuple[Endpoint, ...] = ()
    count: int = 1
    key: str = ""
    status: Status = Status.OK
    amount: float = 0.0

    def __repr__(self) -> str:
        if self.kind == "update":
            return f"update({_snapshot(self.snapshot)})"
        if self.kind == "pick":
            return f"pick() x{self.count}"
        if self.kind == "pick_for":
            return f"pick_for({self.key!r})"
        if self.kind == "finish":
            return f"on_finish(in-flight #{self.count}, {self.status.name}, {self.amount:g}s)"
        return f"advance({self.amount:g}s)"


def _churn(run: _Run, steps: Sequence[_Step], advance: Callable[[float], object] | None) -> None:
    """Updates, picks and feedback interleaved; every pick is checked against the last update."""
    in_flight: list[Endpoint] = []
    for step in steps:
        if step.kind == "update":
            run.update(step.snapshot)
        elif step.kind == "advance" and advance is not None:
            run.steps.append(repr(step))
            advance(step.amount)
        elif step.kind == "finish" and in_flight:
            ep = in_flight.pop(step.count % len(in_flight))
            run.feedback("on_finish", ep, step.status, step.amount)
        elif step.kind in ("pick", "pick_for"):
            for _ in range(step.count):
                got = run.pick(step.key if step.kind == "pick_for" else None)
                if got is not None and isinstance(run.balancer, CallFeedback):
                    run.feedback("on_start", got)
                    in_flight.append(got)


def assert_contract(
    factory: Callable[..., Balancer],
    *,
    weighted: bool = True,
    advance: Callable[[float], object] | None = None,
    max_examples: int = 100,
    picks: int = 300,
) -> None:
    """Check the `kubrpc.interfaces.Balancer` contract against balancers made by `factory`.

    `factory` is called with no arguments (a class, a `functools.partial`, a lambda), or with
    `rng=random.Random(seed)` when it has an `rng` parameter, so that a failure replays exactly.
    First on hand-made snapshots, then on `max_examples` random workloads found with hypothesis
    (updates with duplicate addresses, picks, `pick_for` for a `KeyedBalancer`, `on_start`/`on_finish`
    for a `CallFeedback` balancer), it checks: nothing eligible raises RpcError(UNAVAILABLE), and
    only then; no pick is ready=False or absent from the last update; weight 0 takes no calls
    while a ready endpoint has weight > 0 (skipped with `weighted=False`, for balancers that
    ignore weights like round_robin); all-zero weights share the calls; a duplicate address with a
    ready entry stays eligible; feedback about unknown endpoints is ignored. `advance(seconds)`,
    if given, moves the balancer's clock forward between steps (for time-based balancers).

    It fails with an AssertionError that names the rule, the last snapshot, the steps before and
    a hint. It runs its own hypothesis search: call it from a plain test, not from a @given one.
    """
    try:
        from hypothesis import Phase, given, settings, strategies as st
    except ImportError as exc:
        raise _no_hypothesis() from exc
    _fixed_checks(factory, weighted=weighted, picks=picks)
    snapshots = endpoints(max_size=8, unique=False)
    kinds = [
        st.builds(_Step, st.just("update"), st.one_of(snapshots, snapshots.map(tuple))),
        st.builds(_Step, st.just("pick"), count=st.integers(1, 12)),
        st.builds(_Step, st.just("pick_for"), key=st.text(max_size=4)),
        st.builds(
            _Step, st.just("finish"), count=st.integers(0, 30), status=st.sampled_from(Status), amount=st.floats(0, 3)
        ),
    ]
    if advance is not None:
        kinds.append(st.builds(_Step, st.just("advance"), amount=st.floats(0, 30)))
    step = st.one_of(kinds)

    # One failure, the simplest found, with its steps; no example database left in the user's directory.
    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        report_multiple_bugs=False,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
    )
    @given(seed=st.integers(0, 2**32 - 1), steps=st.lists(step, max_size=40))
    def workload(seed: int, steps: list[_Step]) -> None:
        _churn(_Run(factory, seed), steps, advance)

    workload()
