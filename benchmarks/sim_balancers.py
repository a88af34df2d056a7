"""Balancing at scale, by simulation: 1,000 clients × 100 servers, each client with its own real balancer.

Run `python benchmarks/sim_balancers.py` (a few minutes) to write benchmarks/results/sim.md, or
`--quick` (100 clients × 20 servers, seconds; prints only unless --output FILE). The simulation
itself is in `_sim.py`: a discrete-event loop (heapq) with a simulated clock that drives the
built-in balancer classes made by `kubrpc.balancers.create`, not re-implementations of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import sys
import time
from pathlib import Path

from _sim import BALANCERS, Result, Scenario, run

RESULT = Path(__file__).parent / "results" / "sim.md"

QUICK = Scenario(clients=100, servers=20, duration=4.0, churn=2)


def _ms(seconds: float) -> str:
    return "—" if math.isnan(seconds) else f"{seconds * 1e3:.1f}"


def report(scenario: Scenario, results: list[Result], wall: dict[str, float]) -> str:
    """The Markdown report: the scenario, then one row per balancer."""
    lines = [
        "# Balancers at scale, simulated",
        "",
        "Written by `python benchmarks/sim_balancers.py` on "
        f"{time.strftime('%Y-%m-%d', time.gmtime())} (Python {platform.python_version()}). Every client "
        "owns one instance of the real balancer class (`kubrpc.balancers.create`), fed the same resolver "
        "snapshots, with call feedback (`on_start` / `on_finish`) where the balancer takes it and a simulated "
        "clock. Seeded: a rerun gives the same table.",
        "",
        "| parameter | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in scenario.describe()),
        "",
        "Latencies are of successful calls (queueing + service + round trip), in ms. *slow* and *failing* "
        "are the shares of all calls sent to server 0 (10× slower) and server 1 (fails fast); a fair share "
        f"is {1 / scenario.servers:.1%}, and server 0 can only serve about a tenth of that. *slow, last ⅓* is "
        "server 0's share in the last third of the run, once the balancers have had time to learn. "
        f"*imbalance* is the mean over samples every {scenario.sample_every * 1e3:g} ms of max/mean in-flight "
        "calls (queued + in service) over the live servers; *w/o slow* is the same without server 0, whose "
        "queue otherwise sets the maximum; *in flight* is the mean in-flight per server (queueing shows here: "
        f"{scenario.workers} would be every worker busy). *new: 1st s* is the added servers' share of calls "
        "in their first second, as a fraction of a fair share; *new: ½ share* is how long until a 100 ms "
        "window first gave them half a fair share.",
        "",
        "| balancer | calls | mean | p50 | p99 | p999 | errors | slow | slow, last ⅓ | failing | in flight "
        "| imbalance | w/o slow | new: 1st s | new: ½ share | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    end = math.ceil(scenario.duration)
    for r in results:
        mean = sum(r.latencies) / len(r.latencies) if r.latencies else math.nan
        half = "never" if math.isinf(r.new_time_to_half) else f"{r.new_time_to_half:.1f} s"
        name = {"outlier": "outlier (round_robin)", "zone_aware": "zone_aware (round_robin)"}.get(
            r.balancer, r.balancer
        )
        if r.balancer == "ring_hash":
            name = "ring_hash (random keys)"
        lines.append(
            f"| {name} | {r.calls:,} | {_ms(mean)} | {_ms(r.percentile(0.5))} | {_ms(r.percentile(0.99))} "
            f"| {_ms(r.percentile(0.999))} | {r.errors / r.calls:.2%} | {r.share(0):.2%} "
            f"| {r.share_during(0, 2 * end // 3, end):.2%} | {r.share(1):.2%} "
            f"| {r.mean_in_flight:.1f} | {r.imbalance:.1f} | {r.imbalance_rest:.1f} "
            f"| {r.new_share_first_second:.2f} | {half} | {wall[r.balancer]:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run every balancer through the scenario and print (and write) the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="100 clients × 20 servers, 4 s simulated")
    parser.add_argument("--balancers", default=",".join(BALANCERS), help="comma-separated registry names")
    parser.add_argument("--clients", type=int)
    parser.add_argument("--servers", type=int)
    parser.add_argument("--duration", type=float, help="simulated seconds")
    parser.add_argument("--utilisation", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--output", type=Path, help=f"write the table here (default for a full run: {RESULT})")
    args = parser.parse_args(argv)
    scenario = QUICK if args.quick else Scenario()
    overrides = {
        k: getattr(args, k)
        for k in ("clients", "servers", "duration", "utilisation", "seed")
        if getattr(args, k) is not None
    }
    scenario = dataclasses.replace(scenario, **overrides)
    results: list[Result] = []
    wall: dict[str, float] = {}
    for name in args.balancers.split(","):
        started = time.perf_counter()
        results.append(run(scenario, name))
        wall[name] = time.perf_counter() - started
        print(f"{name}: {wall[name]:.1f} s", file=sys.stderr)
    text = report(scenario, results, wall)
    print(text)
    output = args.output or (None if args.quick else RESULT)
    if output is not None:
        output.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
