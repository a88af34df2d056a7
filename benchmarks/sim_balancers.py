"""Balancing at scale, by simulation: 1,000 clients × 100 servers, each client with its own real balancer.

Run `python benchmarks/sim_balancers.py` (a few minutes) to write benchmarks/results/sim.md and its
plots (PNG, with matplotlib: `pip install -e ".[plots]"`; without it the Markdown says the plots were
skipped), or `--quick` (100 clients × 20 servers, seconds; prints only unless --output FILE and
--plots DIR). The simulation itself is in `_sim.py`: a discrete-event loop (heapq) with a simulated
clock that drives the built-in balancer classes made by `kubrpc.balancers.create`, not
re-implementations of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from _sim import BALANCERS, LABELS, VARIANTS, Result, Scenario, run

RESULTS = Path(__file__).parent / "results"
RESULT = RESULTS / "sim.md"

QUICK = Scenario(clients=100, servers=20, duration=4.0, churn=2)

SWEEP_CLIENTS = (10, 100, 1000)
"""The same load from fewer clients: each one then sees more calls per server, and learns faster."""
SWEEP_BALANCERS = ("p2c", "p2c-slow-fade", "outlier")

_STYLES: dict[str, dict[str, Any]] = {
    "p2c": {"color": "tab:blue", "linewidth": 2.0},
    "p2c-no-penalty": {"color": "tab:blue", "linewidth": 1.2, "linestyle": ":"},
    "p2c-slow-fade": {"color": "tab:green", "linewidth": 1.2, "linestyle": "--"},
    "p2c-failures-timed": {"color": "tab:purple", "linewidth": 1.2, "linestyle": "-."},
    "outlier": {"color": "tab:orange", "linewidth": 2.0},
    "ring_hash": {"color": "tab:brown", "linewidth": 1.0},
}
"""Line styles in the learning plot; the latency-blind balancers are thin grey lines."""

PLOTS = {
    "latency": "sim_latency.png",
    "share": "sim_load_share.png",
    "learning": "sim_learning.png",
}


def _ms(seconds: float) -> str:
    return "—" if math.isnan(seconds) else f"{seconds * 1e3:.1f}"


def _label(name: str) -> str:
    return LABELS.get(name, name)


def _per_client_server(r: Result) -> float:
    """Calls each client sends each server over the run, on average."""
    return r.calls / (r.clients * r.servers) if r.clients and r.servers else math.nan


def _ejected_by(r: Result, fraction: float) -> str:
    """The simulated second by which `fraction` of the clients had the failing server ejected."""
    for second, share in enumerate(r.ejecting, 1):
        if share >= fraction:
            return f"{second} s"
    return "never"


def _fair(r: Result, server: int) -> float:
    """Server 0's or 1's calls over what a fair balancer would have sent it (1.0 is fair)."""
    fair = r.fair.get(server, 0.0)
    return r.picks.get(server, 0) / fair if fair else math.nan


def _sweep_figures(sweep: Sequence[Result], name: str, figure: Callable[[Result], str]) -> str:
    """`figure` of each sweep run of `name`, as "A with 10 clients, B with 100, C with 1,000"."""
    runs = sorted((r for r in sweep if r.balancer == name), key=lambda r: r.clients)
    parts = [
        f"{figure(r)} with {r.clients:,} clients" if i == 0 else f"{figure(r)} with {r.clients:,}"
        for i, r in enumerate(runs)
    ]
    return ", ".join(parts) or "—"


def _capacity(r: Result, scenario: Scenario) -> float:
    """What the slow server can complete, over a fair share of the offered calls."""
    return r.slow_capacity / (r.calls / scenario.duration / scenario.servers) if r.calls else math.nan


def main_table(scenario: Scenario, results: Sequence[Result], wall: dict[str, float]) -> list[str]:
    """One row per balancer."""
    lines = [
        "| balancer | calls | mean | p50 | p99 | p999 | errors | slow | slow, last ⅓ | failing | in flight "
        "| imbalance | w/o slow | new: 1st s | new: ½ share | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    end = math.ceil(scenario.duration)
    for r in results:
        mean = sum(r.latencies) / len(r.latencies) if r.latencies else math.nan
        half = "never" if math.isinf(r.new_time_to_half) else f"{r.new_time_to_half:.1f} s"
        lines.append(
            f"| {_label(r.balancer)} | {r.calls:,} | {_ms(mean)} | {_ms(r.percentile(0.5))} "
            f"| {_ms(r.percentile(0.99))} | {_ms(r.percentile(0.999))} | {r.errors / r.calls:.2%} "
            f"| {r.share(0):.2%} | {r.share_during(0, 2 * end // 3, end):.2%} | {r.share(1):.2%} "
            f"| {r.mean_in_flight:.1f} | {r.imbalance:.1f} | {r.imbalance_rest:.1f} "
            f"| {r.new_share_first_second:.2f} | {half} | {wall.get(r.balancer, math.nan):.0f} |"
        )
    return lines


def sweep_table(sweep: Sequence[Result]) -> list[str]:
    """The clients sweep: the same load and servers, from fewer or more clients."""
    lines = [
        "| balancer | clients | calls per client per server | p99 | p999 | slow (× fair) | failing (× fair) "
        "| clients ejecting the failing server: ½ by, all by |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in sweep:
        ejecting = f"{_ejected_by(r, 0.5)}, {_ejected_by(r, 1.0)}" if r.ejecting else "—"
        lines.append(
            f"| {_label(r.balancer)} | {r.clients:,} | {_per_client_server(r):.1f} | {_ms(r.percentile(0.99))} "
            f"| {_ms(r.percentile(0.999))} | {_fair(r, 0):.2f} | {_fair(r, 1):.2f} | {ejecting} |"
        )
    return lines


def findings(scenario: Scenario, results: Sequence[Result], sweep: Sequence[Result]) -> list[str]:
    """What the tables show, with the figures of this run (a balancer left out is skipped)."""
    by = {r.balancer: r for r in results}
    out: list[str] = []
    rr, p2c = by.get("round_robin"), by.get("p2c")
    first = next(iter(results), None)
    if first is None:
        return out
    per = _per_client_server(first)
    every = scenario.duration / per if per else math.nan
    if rr is not None and p2c is not None:
        out += [
            "**Beyond round robin: reproduced.** Linkerd's [Beyond Round Robin](https://linkerd.io/2016/03/16/"
            "beyond-round-robin-load-balancing-for-latency/) shows latency-aware p2c (least loaded, peak EWMA) "
            "keeping the tail close to the healthy servers' when one server is slow, while round robin's tail is "
            f"set by the slow server. Same shape here: p2c's p99 is {_ms(p2c.percentile(0.99))} ms against round "
            f"robin's {_ms(rr.percentile(0.99))} ms ({rr.percentile(0.99) / p2c.percentile(0.99):,.0f}×), and "
            f"the slow server gets {_fair(p2c, 0):.2f}× a fair share under p2c against {_fair(rr, 0):.2f}× under "
            f"round robin (it can serve {_capacity(rr, scenario):.2f}×). The balancers that ignore latency "
            "(round_robin, weighted_random, smooth_weighted, ring_hash, outlier, zone_aware) all queue without "
            "bound on it. "
            f"Where we differ: p2c's p999 here ({_ms(p2c.percentile(0.999))} ms) is far above its p99, set by the "
            "calls that many clients send the slow server while each learns alone (below); a setup with few "
            "balancer instances, each seeing many calls per server, does not pay that. And we have no "
            "least-loaded-only p2c to set beside the peak EWMA, as Linkerd's post does: kubrpc's p2c multiplies "
            "both signals.",
            "",
        ]
    timed, nopen, fade = by.get("p2c-failures-timed"), by.get("p2c-no-penalty"), by.get("p2c-slow-fade")
    if p2c is not None and timed is not None and nopen is not None:
        out += [
            "**A fast-failing server, and p2c's penalty.** Linkerd's [load biaser](https://linkerd.io/2-edge/"
            "reference/load-balancing/) exists because a peak EWMA that times failures as answers finds a server "
            "that fails in 0.1 ms the fastest of all. The real p2c class told exactly that (`FailuresTimed` in "
            f"_sim.py) sends the failing server {_fair(timed, 1):.2f}× a fair share ({timed.share(1):.2%} of all "
            "calls, every one an error): the most p2c can give any server, since it is picked only when it is one "
            "of the two candidates (a least-loaded scan over all servers would give it nearly everything). kubrpc's "
            "p2c never feeds a failure's latency into the estimate, so with `failure_penalty=0` the failing server "
            f"stays priced as a server that has not answered yet and gets {_fair(nopen, 1):.2f}× a fair share. "
            f"The default penalty (1 s, fading with τ = 0.5 s) brings it to {_fair(p2c, 1):.2f}×"
            + (f", and `penalty_decay=5` to {_fair(fade, 1):.2f}×" if fade is not None else "")
            + ". The penalty works, but weakly at this scale: it fades in wall-clock time (below 10 ms after about "
            f"2.3 s), and each client calls a given server only every {every:.1f} s, so by the time a client meets "
            "the failing server again as a candidate, most of the penalty is gone; the learning plot shows no "
            "learning, a steady state. With fewer clients carrying the same load, the same penalty keeps the "
            "failing server further off; its calls over a fair share: "
            f"{_sweep_figures(sweep, 'p2c', lambda r: f'{_fair(r, 1):.2f}×')} (sweep below). "
            "`penalty_decay=5` bites at this scale at no cost in latency here, but a server that recovers then "
            "waits up to about 23 s for a client to try it again (the 1 s penalty takes 5·ln 100 ≈ 23 s to fade "
            "below 10 ms, unless a success clears it first).",
            "",
        ]
    if p2c is not None:
        end = math.ceil(scenario.duration)
        late = p2c.share_during(0, 2 * end // 3, end) * scenario.servers
        early = sum(row[1] for row in p2c.per_second[:3])
        out += [
            f"**Why p2c learns slowly with {scenario.clients:,} clients.** Every client has its own balancer "
            "and learns alone. "
            f"This run gives {per:.1f} calls per client per server over {scenario.duration:g} s: one call from a "
            f"given client to a given server every {every:.1f} s. A client prices a server it has not heard from "
            "yet optimistically (so that new pods get calls at once), so every client sends its first call to the "
            f"slow server before it knows: {early:,} calls in the first 3 s from {scenario.clients:,} clients, to a "
            f"server that completes about {p2c.slow_capacity:.0f} a second ({early / p2c.slow_capacity:.0f} s of "
            "its work). Those calls queue for seconds; that is p2c's p999. "
            "After one slow answer a client keeps away for tens of seconds (its peak EWMA decays with τ = 10 s), "
            f"so the slow server's share falls from {p2c.fairness(0, 0):.2f}× fair in the first second to "
            f"{late:.2f}× "
            "in the last third. The sweep below carries the same load from fewer clients: learning costs each "
            "client about the same number of calls, so the far tail grows with the number of clients: p2c's p999 "
            f"is {_sweep_figures(sweep, 'p2c', lambda r: f'{_ms(r.percentile(0.999))} ms')}. Only a signal shared "
            "between clients (server load reports, or subsetting so that fewer clients share each server) would "
            "remove that cost; a client-side balancer cannot.",
            "",
        ]
    outlier = by.get("outlier")
    few = min((r for r in sweep if r.balancer == "outlier"), key=lambda r: r.clients, default=None)
    if outlier is not None:
        out += [
            "**Outlier ejection is for failures, not slowness.** It counts consecutive UNAVAILABLE answers, as "
            f"Envoy's consecutive-5xx detector does, so the slow server keeps {_fair(outlier, 0):.2f}× a fair "
            "share under outlier (round_robin). It does eject the failing server, client by client: half the "
            f"clients had ejected it by {_ejected_by(outlier, 0.5)} and all by {_ejected_by(outlier, 1.0)}, and "
            f"its share over the run is {_fair(outlier, 1):.2f}× fair rather than near 0 because each client needs "
            f"5 consecutive failures (`consecutive_failures=5`) and calls that server only every {every:.1f} s. "
            "The 30 s ejection (`base_ejection`) outlasts the rest of the run, and `max_ejected_fraction` (10%) "
            "does not bind with one failing server."
            + (
                f" With {few.clients:,} clients carrying the same load, every client had ejected it by "
                f"{_ejected_by(few, 1.0)} and it got {_fair(few, 1):.2f}× a fair share (sweep below)."
                if few is not None
                else ""
            )
            + " No defect found in the balancers: these are the costs of learning client by client.",
            "",
        ]
    return out


def report(
    scenario: Scenario,
    results: Sequence[Result],
    wall: dict[str, float],
    sweep: Sequence[Result] = (),
    sweep_scenario: Scenario | None = None,
    plots: dict[str, Path] | None = None,
    plots_note: str = "",
) -> str:
    """The Markdown report: the scenario, one row per balancer, the plots, the findings and the sweep."""
    capacity = _capacity(results[0], scenario) if results else math.nan
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
        f"is {1 / scenario.servers:.1%}, and server 0 can only serve {capacity:.2f}× that. *slow, last ⅓* is "
        "server 0's share in the last third of the run, once the balancers have had time to learn. "
        f"*imbalance* is the mean over samples every {scenario.sample_every * 1e3:g} ms of max/mean in-flight "
        "calls (queued + in service) over the live servers; *w/o slow* is the same without server 0, whose "
        "queue otherwise sets the maximum; *in flight* is the mean in-flight per server (queueing shows here: "
        f"{scenario.workers} would be every worker busy). *new: 1st s* is the added servers' share of calls "
        "in their first second, as a fraction of a fair share; *new: ½ share* is how long until a 100 ms "
        "window first gave them half a fair share. The last three rows are p2c variants that show what its "
        "failure penalty does: the real class with `failure_penalty=0`, with `penalty_decay=5`, and a "
        "subclass that reports failures as answers (what a latency-only EWMA sees).",
        "",
        *main_table(scenario, results, wall),
        "",
    ]
    if plots:
        lines += ["## Plots", ""]
        captions = {
            "latency": "p50, p99 and p999 latency of successful calls per balancer (log scale).",
            "share": "Each server's calls over a fair share, per balancer (log scale; the 10× slow server and "
            "the fast-failing one highlighted).",
            "learning": "The slow and the failing server's share of each second's calls, over a fair share: "
            "how fast each balancer learns.",
        }
        for key, path in plots.items():
            lines += [f"![{captions[key]}]({path.name})", "", f"*{captions[key]}*", ""]
    elif plots_note:
        lines += [f"*Plots: {plots_note}*", ""]
    lines += ["## What it shows", "", *findings(scenario, results, sweep)]
    if sweep:
        assert sweep_scenario is not None
        lines += [
            "## Clients sweep: the same load from fewer clients",
            "",
            f"{sweep_scenario.servers} servers and the same offered load, scenario as above, carried by "
            f"{', '.join(f'{n:,}' for n in sorted({r.clients for r in sweep}))} clients: fewer clients means "
            "more calls per client per server, so each balancer instance learns from more samples. *× fair* is "
            "a server's calls over what a fair balancer would have sent it over the run.",
            "",
            *sweep_table(sweep),
            "",
        ]
    return "\n".join(lines).rstrip("\n") + "\n"


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        return None
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def _plain_ticks(ax: Any) -> None:
    """Shares on a log axis, labelled 0.001 … 2 rather than in powers of ten."""
    ticks = [0.001, 0.01, 0.1, 0.2, 0.5, 1.0, 2.0]
    ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()


def plot(scenario: Scenario, results: Sequence[Result], directory: Path) -> dict[str, Path] | None:
    """Draw the plots as PNG files in `directory`; None when matplotlib is not installed."""
    plt = _pyplot()
    if plt is None:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"Software": None}  # no matplotlib version in the file: a rerun gives the same bytes
    names = [_label(r.balancer) for r in results]
    paths = {key: directory / name for key, name in PLOTS.items()}

    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.27
    for k, (q, label) in enumerate(((0.5, "p50"), (0.99, "p99"), (0.999, "p999"))):
        xs = [i + (k - 1) * width for i in range(len(results))]
        ax.bar(xs, [r.percentile(q) * 1e3 for r in results], width, label=label)
    ax.set_yscale("log")
    ax.set_ylabel("latency, ms (log)")
    ax.set_xticks(range(len(results)), names, rotation=30, ha="right", fontsize=8)
    ax.set_title(f"Latency of successful calls: {scenario.clients:,} clients × {scenario.servers} servers")
    ax.legend()
    ax.grid(axis="y", which="major", alpha=0.3)
    fig.tight_layout()
    fig.savefig(paths["latency"], dpi=100, metadata=metadata)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 4.5))
    floor = 1e-3
    for i, r in enumerate(results):
        others = [sid for sid in r.fair if sid > 1 and r.fair[sid]]
        xs = [i + ((sid * 0.618) % 1 - 0.5) * 0.5 for sid in others]
        ys = [max(r.picks.get(sid, 0) / r.fair[sid], floor) for sid in others]
        ax.scatter(xs, ys, s=6, color="0.6", label="other servers" if i == 0 else None)
        ax.scatter(
            [i], [max(_fair(r, 0), floor)], s=40, color="tab:red", marker="v", label="10× slow" if i == 0 else None
        )
        ax.scatter(
            [i], [max(_fair(r, 1), floor)], s=40, color="tab:orange", marker="x", label="fails fast" if i == 0 else None
        )
    ax.axhline(1.0, color="k", linewidth=0.8, linestyle=":")
    ax.set_yscale("log")
    _plain_ticks(ax)
    ax.set_ylabel("calls over a fair share (log; 0 drawn at 0.001)")
    ax.set_xticks(range(len(results)), names, rotation=30, ha="right", fontsize=8)
    ax.set_title("Load per server over the run (1.0 is a fair share)")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["share"], dpi=100, metadata=metadata)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, server, title in ((axes[0], 0, "server 0, 10× slower"), (axes[1], 1, "server 1, fails fast")):
        for r in results:
            seconds = [s for s in range(len(r.per_second)) if r.per_second[s][0]]
            ys = [max(r.fairness(s, server), floor) for s in seconds]
            style = _STYLES.get(r.balancer, {"color": "0.7", "linewidth": 0.8})
            ax.plot([s + 0.5 for s in seconds], ys, label=_label(r.balancer), **style)
        ax.axhline(1.0, color="k", linewidth=0.8, linestyle=":")
        if server == 0 and results:
            fair_rate = results[0].calls / scenario.duration / scenario.servers
            ax.axhline(results[0].slow_capacity / fair_rate, color="tab:red", linewidth=0.8, linestyle="--")
            ax.text(0.2, results[0].slow_capacity / fair_rate * 1.1, "what it can serve", color="tab:red", fontsize=7)
        ax.set_yscale("log")
        _plain_ticks(ax)
        ax.set_xlabel("simulated time, s")
        ax.set_title(f"{title}: share of each second's calls")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("calls over a fair share (log; 0 drawn at 0.001)")
    axes[1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(paths["learning"], dpi=100, metadata=metadata)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    """Run every balancer through the scenario, then the clients sweep; print (and write) the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="100 clients × 20 servers, 4 s simulated")
    parser.add_argument(
        "--balancers", default=",".join(BALANCERS + VARIANTS), help="comma-separated registry or variant names"
    )
    parser.add_argument("--clients", type=int)
    parser.add_argument("--servers", type=int)
    parser.add_argument("--duration", type=float, help="simulated seconds")
    parser.add_argument("--utilisation", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--no-sweep", action="store_true", help="skip the clients sweep")
    parser.add_argument("--output", type=Path, help=f"write the report here (default for a full run: {RESULT})")
    parser.add_argument("--plots", type=Path, help=f"write the PNGs here (default for a full run: {RESULTS})")
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
    sweep: list[Result] = []
    if not args.no_sweep:
        counts = sorted({max(1, scenario.clients * n // 1000) for n in SWEEP_CLIENTS})
        for name in SWEEP_BALANCERS:
            for clients in counts:
                same = next((r for r in results if r.balancer == name and r.clients == clients), None)
                sweep.append(same or run(dataclasses.replace(scenario, clients=clients), name))
        print(f"sweep: {len(sweep)} runs", file=sys.stderr)
    directory = args.plots or (None if args.quick else RESULTS)
    plots: dict[str, Path] | None = None
    note = ""
    if directory is not None:
        plots = plot(scenario, results, directory)
        if plots is None:
            note = 'skipped, matplotlib is not installed (`pip install -e ".[plots]"` and run again to draw them).'
            print(f"plots {note}", file=sys.stderr)
    output = args.output or (None if args.quick else RESULT)
    if plots and output is not None:  # the report links them relative to itself
        plots = {k: Path(os.path.relpath(p, output.parent)) for k, p in plots.items()}
    text = report(scenario, results, wall, sweep, scenario, plots, note)
    print(text)
    if output is not None:
        output.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
