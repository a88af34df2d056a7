"""Cost of Balancer.pick() and update() for every built-in balancer, against random.choices.

Run `python benchmarks/bench_pick.py`; it takes well under a minute, prints a Markdown table and
writes it to benchmarks/results/pick.md. Each figure is the best of a few timed rounds, in µs per
operation. p2c is timed with its feedback (pick + on_start + on_finish), as a channel drives it.
"""

from __future__ import annotations

import itertools
import platform
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubrpc import Endpoint, Status, balancers
from kubrpc.interfaces import Balancer, CallFeedback, KeyedBalancer

SIZES = (10, 1_000, 10_000)
PICKS = 20_000
ROUNDS = 3
UPDATES = 5
OPTIONS: dict[str, dict[str, Any]] = {"zone_aware": {"zone": "a"}}
RESULT = Path(__file__).parent / "results" / "pick.md"


def endpoints(n: int, seed: int = 1) -> list[Endpoint]:
    """n ready endpoints in three zones, with weights 1 to 4."""
    rng = random.Random(seed)
    return [
        Endpoint(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", 9000, weight=rng.randint(1, 4), zone="abc"[i % 3])
        for i in range(n)
    ]


def per_op(run: Callable[[int], object], ops: int) -> float:
    """Best of ROUNDS timings of run(ops), in µs per op."""
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        run(ops)
        best = min(best, time.perf_counter() - start)
    return best / ops * 1e6


def pick_loop(balancer: Balancer) -> Callable[[int], object]:
    """A loop of picks; with CallFeedback, each pick also reports a started and finished call."""
    pick = balancer.pick
    if isinstance(balancer, CallFeedback):
        on_start, on_finish, ok = balancer.on_start, balancer.on_finish, Status.OK

        def with_feedback(ops: int) -> None:
            for _ in range(ops):
                endpoint = pick()
                on_start(endpoint)
                on_finish(endpoint, status=ok, latency=0.004)

        return with_feedback

    def plain(ops: int) -> None:
        for _ in range(ops):
            pick()

    return plain


def choices_loop(
    rng: random.Random, eps: list[Endpoint], weights: list[float] | None = None, cum_weights: list[float] | None = None
) -> Callable[[int], object]:
    """A loop of single random.choices() picks, the standard library's weighted pick."""
    choices = rng.choices

    def run(ops: int) -> None:
        for _ in range(ops):
            choices(eps, weights, cum_weights=cum_weights)

    return run


def keyed_loop(balancer: KeyedBalancer) -> Callable[[int], object]:
    """A loop of pick_for over distinct keys."""
    keys = [f"user-{i}" for i in range(PICKS)]
    pick_for = balancer.pick_for

    def run(ops: int) -> None:
        for key in itertools.islice(itertools.cycle(keys), ops):
            pick_for(key)

    return run


def update_cost(name: str) -> float:
    """Median µs of update() at the largest size, alternating with a set one endpoint smaller."""
    full = endpoints(SIZES[-1])
    sets = [full, full[:-1]]
    balancer = balancers.create(name, **OPTIONS.get(name, {}))
    balancer.update(full)  # the first update may fill caches (ring_hash hashes every address once)
    timings = []
    for i in range(UPDATES):
        start = time.perf_counter()
        balancer.update(sets[(i + 1) % 2])
        timings.append(time.perf_counter() - start)
    return sorted(timings)[len(timings) // 2] * 1e6


def cold_update_cost(name: str) -> float:
    """µs of the first update() of a new balancer at the largest size."""
    full = endpoints(SIZES[-1])
    balancer = balancers.create(name, **OPTIONS.get(name, {}))
    start = time.perf_counter()
    balancer.update(full)
    return (time.perf_counter() - start) * 1e6


def main() -> None:
    """Measure, print and save the table."""
    rows: list[tuple[str, list[float], str]] = []
    baseline: list[float] = []
    naive: list[float] = []
    rng = random.Random(3)
    for n in SIZES:
        eps = endpoints(n)
        cumulative = list(itertools.accumulate(ep.weight for ep in eps))
        weights = [ep.weight for ep in eps]
        baseline.append(per_op(choices_loop(rng, eps, cum_weights=cumulative), PICKS))
        naive.append(per_op(choices_loop(rng, eps, weights=weights), max(20, PICKS // n)))
    rows.append(("random.choices(cum_weights=…) [baseline]", baseline, "—"))
    rows.append(("random.choices(weights=…)[0], O(n) per op", naive, "—"))
    for name in balancers.names():
        figures = []
        for n in SIZES:
            balancer = balancers.create(name, **OPTIONS.get(name, {}))
            balancer.update(endpoints(n))
            figures.append(per_op(pick_loop(balancer), PICKS))
        label = f"{name} (pick + on_start + on_finish)" if isinstance(balancer, CallFeedback) else name
        rows.append((label, figures, f"{update_cost(name):,.0f}"))
        if name == "ring_hash":
            keyed: list[float] = []
            for n in SIZES:
                ring = balancers.create(name)
                ring.update(endpoints(n))
                assert isinstance(ring, KeyedBalancer)
                keyed.append(per_op(keyed_loop(ring), PICKS))
            rows.append(("ring_hash pick_for(key)", keyed, f"{cold_update_cost(name):,.0f} (cold)"))

    head = " | ".join(f"n={n:,} µs | ×base" for n in SIZES)
    lines = [
        f"| balancer | {head} | update n={SIZES[-1]:,} µs |",
        "|" + "---|" * (2 + 2 * len(SIZES)),
    ]
    for label, figures, update in rows:
        cells = " | ".join(f"{us:.2f} | {us / base:.2f}" for us, base in zip(figures, baseline, strict=True))
        lines.append(f"| {label} | {cells} | {update} |")
    table = "\n".join(lines)
    note = (
        f"Python {platform.python_version()} on {platform.machine()}, best of {ROUNDS} rounds of {PICKS:,} picks;"
        " ×base = time / random.choices(population, cum_weights=precomputed) per pick;"
        f" update = median of {UPDATES} updates alternating n and n-1 endpoints."
    )
    print(table)
    print()
    print(note)
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(f"# Balancer pick and update cost\n\n{table}\n\n{note}\n")
    print(f"\nwritten to {RESULT}", file=sys.stderr)


if __name__ == "__main__":
    main()
