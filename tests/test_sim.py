"""The balancer simulator (benchmarks/_sim.py) on a tiny scenario: qualitative properties of the real balancers.

Simulated time only: nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from kubrpc.balancers.outlier import OutlierEjection
from kubrpc.balancers.p2c import PowerOfTwoChoices
from kubrpc.balancers.ring_hash import RingHash
from kubrpc.balancers.round_robin import RoundRobin
from kubrpc.balancers.zone_aware import ZoneAware

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import sim_balancers
from _sim import BALANCERS, VARIANTS, FailuresTimed, Result, Scenario, make_balancer, run

# 20 clients × 5 servers: server 0 is 10× slower, server 1 fails fast, server 2 has GC pauses, server 3
# degrades, server 4 leaves at 0.9 s and server 5 joins at 1.5 s. About 3,300 calls in 3 s simulated.
TINY = Scenario(clients=20, servers=5, duration=3.0, gc_servers=1, churn=1, seed=3)

_cache: dict[str, Result] = {}


def result(name: str) -> Result:
    """The tiny scenario's result for `name`, simulated once per test session."""
    if name not in _cache:
        _cache[name] = run(TINY, name)
    return _cache[name]


@pytest.mark.parametrize("name", BALANCERS + VARIANTS)
def test_every_call_is_accounted_for(name: str) -> None:
    """Every issued call is answered once: as a success or an error, and sent to a server or to none."""
    r = result(name)
    assert r.calls > 2000
    assert r.completed == r.calls
    assert len(r.latencies) + r.errors == r.calls
    assert sum(r.picks.values()) + r.no_endpoint == r.calls
    assert r.no_endpoint == 0
    assert set(r.picks) <= set(range(TINY.servers + TINY.churn))
    # What a fair balancer would have sent each server adds up to every call.
    assert sum(r.fair.values()) == pytest.approx(r.calls)
    assert sum(row[0] for row in r.per_second) == r.calls


def test_the_simulation_is_reproducible() -> None:
    """Seeded: the same scenario gives the same figures; another seed gives others."""
    again = run(TINY, "p2c")
    assert (again.picks, again.latencies) == (result("p2c").picks, result("p2c").latencies)
    other = run(dataclasses.replace(TINY, seed=4), "p2c")
    assert other.picks != again.picks


def test_clients_get_the_real_balancer_classes() -> None:
    """The simulator drives kubrpc's own classes, wrapped as configured, not re-implementations."""
    clock = lambda: 0.0  # noqa: E731
    assert isinstance(make_balancer("p2c", 0, "a", clock, 1), PowerOfTwoChoices)
    assert isinstance(make_balancer("ring_hash", 0, "a", clock, 1), RingHash)
    outlier = make_balancer("outlier", 0, "a", clock, 1)
    assert isinstance(outlier, OutlierEjection) and isinstance(outlier.inner, RoundRobin)
    zoned = make_balancer("zone_aware", 0, "b", clock, 1)
    assert isinstance(zoned, ZoneAware) and zoned.zone == "b"
    # The p2c variants are the real class, configured, or a subclass that changes only the reported status.
    assert type(make_balancer("p2c-no-penalty", 0, "a", clock, 1)) is PowerOfTwoChoices
    assert type(make_balancer("p2c-slow-fade", 0, "a", clock, 1)) is PowerOfTwoChoices
    timed = make_balancer("p2c-failures-timed", 0, "a", clock, 1)
    assert type(timed) is FailuresTimed and isinstance(timed, PowerOfTwoChoices)


def test_p2c_sends_fewer_calls_to_the_slow_server_than_round_robin() -> None:
    """p2c's latency estimate steers calls away from a server 10× slower; round_robin gives it a full share."""
    p2c, rr = result("p2c"), result("round_robin")
    assert p2c.share(0) < rr.share(0) / 2
    assert p2c.percentile(0.99) < rr.percentile(0.99)


def test_p2c_penalises_the_fast_failing_server() -> None:
    """A server that fails in 0.1 ms does not attract p2c's calls (it would with latency alone)."""
    assert result("p2c").share(1) < result("round_robin").share(1)


def test_a_fast_failing_server_attracts_a_p2c_that_times_failures() -> None:
    """Linkerd's load-biaser case: timed as answers, fast failures draw up to p2c's cap of 2/n of the calls."""
    timed, rr = result("p2c-failures-timed"), result("round_robin")
    assert timed.share(1) > 1.5 * rr.share(1)
    assert timed.share(1) <= 2 / TINY.servers + 0.02  # picked only as one of two candidates
    assert timed.errors > rr.errors


def test_the_failure_penalty_is_what_keeps_p2c_off_the_failing_server() -> None:
    """The same class without its penalty (failure_penalty=0) sends the failing server twice as many calls."""
    assert result("p2c").share(1) < result("p2c-no-penalty").share(1) / 2
    assert result("p2c-slow-fade").share(1) <= result("p2c-no-penalty").share(1) / 2


def test_outlier_ejection_sends_fewer_calls_to_the_failing_server() -> None:
    """outlier over round_robin ejects the failing server; plain round_robin keeps sending it its share."""
    outlier, rr = result("outlier"), result("round_robin")
    assert outlier.share(1) < rr.share(1) / 2
    assert outlier.errors < rr.errors
    # Every client ejects it, and no balancer but outlier reports ejections.
    assert outlier.ejecting and outlier.ejecting[-1] == 1.0
    assert rr.ejecting == []


def test_outlier_ejection_ignores_a_slow_server() -> None:
    """Ejection counts failures, not latency: the 10× slow server keeps about a fair share under outlier."""
    outlier, rr = result("outlier"), result("round_robin")
    assert outlier.share(0) >= 0.8 * rr.share(0)


def test_a_server_added_mid_run_gets_calls_under_p2c() -> None:
    """No starvation: the new server is tried at once and takes a share of the calls after it joins."""
    r = result("p2c")
    assert r.new_picks > 0
    assert r.new_share_first_second > 0.25


def test_a_removed_server_gets_no_calls_after_it_leaves() -> None:
    """Server 4 leaves at 0.9 s: it took calls before, and every balancer stops sending to it then."""
    for name in ("round_robin", "p2c"):
        r = result(name)
        assert 0 < r.picks.get(4, 0) < r.calls / TINY.servers
    for name in BALANCERS:
        assert result(name).dead_picks == 0, name


def _report(tmp_path: Path) -> str:
    """The quick report, two balancers, with the plots asked for in `tmp_path`."""
    out = tmp_path / "sim.md"
    argv = ["--quick", "--duration", "2", "--balancers", "round_robin,p2c,outlier", "--output", str(out)]
    assert sim_balancers.main([*argv, "--plots", str(tmp_path)]) == 0
    return out.read_text()


def test_the_report_is_written_without_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """matplotlib is optional: without it the Markdown is complete and says the plots were skipped."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    text = _report(tmp_path)
    assert "Plots: skipped, matplotlib is not installed" in text
    assert '".[plots]"' in text
    assert "| p2c |" in text and "## What it shows" in text and "## Clients sweep" in text
    assert not list(tmp_path.glob("*.png"))
    assert "plots skipped" in capsys.readouterr().err


def test_the_plots_are_drawn_with_matplotlib(tmp_path: Path) -> None:
    """With matplotlib, three PNGs are written next to the report, which links them by relative path."""
    pytest.importorskip("matplotlib")
    text = _report(tmp_path)
    for name in sim_balancers.PLOTS.values():
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in text
    assert "skipped" not in text
