"""A discrete-event simulation of many clients, each with its own real kubrpc balancer, calling many servers.

`run(scenario, balancer_name)` drives instances of the built-in balancer classes (made by
`kubrpc.balancers.create`) with a simulated clock: every client gets the same endpoint snapshots
through `update()`, picks with `pick()` (or `pick_for(key)` with a random key for ring_hash) and
reports each call through `on_start` / `on_finish` when the balancer implements CallFeedback.
Servers have K workers and a FIFO queue; load is open-loop Poisson at a set utilisation. Everything
random comes from seeded `random.Random` instances, so a run is reproducible.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubrpc import Endpoint, Status, balancers
from kubrpc.balancers.outlier import OutlierEjection
from kubrpc.balancers.p2c import PowerOfTwoChoices
from kubrpc.errors import RpcError
from kubrpc.interfaces import Balancer, CallFeedback, KeyedBalancer

__all__ = ("BALANCERS", "LABELS", "VARIANTS", "Result", "Scenario", "run")

BALANCERS = (
    "round_robin",
    "weighted_random",
    "smooth_weighted",
    "p2c",
    "ring_hash",
    "outlier",
    "zone_aware",
)
"""The balancers a full run compares, by registry name (outlier wraps round_robin; zone_aware too)."""

P2C_OPTIONS: dict[str, dict[str, float]] = {
    "p2c-no-penalty": {"failure_penalty": 0.0},
    "p2c-slow-fade": {"penalty_decay": 5.0},
}
"""p2c variants that are the real class with other options."""

VARIANTS = ("p2c-no-penalty", "p2c-slow-fade", "p2c-failures-timed")
"""p2c configured or subclassed to show what its failure penalty does (see `make_balancer`)."""

LABELS = {
    "outlier": "outlier (round_robin)",
    "zone_aware": "zone_aware (round_robin)",
    "ring_hash": "ring_hash (random keys)",
    "p2c-no-penalty": "p2c, failure_penalty=0",
    "p2c-slow-fade": "p2c, penalty_decay=5",
    "p2c-failures-timed": "p2c, failures timed as answers",
}
"""How the report names each balancer or variant."""


class FailuresTimed(PowerOfTwoChoices):
    """kubrpc's p2c fed every failure as if it were an answer that took that long.

    This is what a latency-only peak EWMA (tower's PeakEwma, which Linkerd's proxy uses) sees: a server
    that fails in 0.1 ms looks like the fastest server there is. Only the status is changed; the
    real class does the rest.
    """

    def on_finish(self, endpoint: Endpoint, /, *, status: Status, latency: float) -> None:
        """Report anything but a cancellation as a success that took `latency`."""
        super().on_finish(endpoint, status=status if status is Status.CANCELLED else Status.OK, latency=latency)


ZONES = ("a", "b", "c")

# Event kinds, in the heap as (time, seq, kind, payload).
_ARRIVAL, _DONE, _DELIVER, _CONTROL, _SAMPLE = range(5)


@dataclass(frozen=True)
class Scenario:
    """The parameters of one simulated run (times in seconds)."""

    clients: int = 1000
    servers: int = 100
    workers: int = 4  # K: requests served at once by a server; the rest queue (FIFO)
    service_low: float = 0.005  # each server's mean service time is uniform in [low, high]
    service_high: float = 0.015
    service_sigma: float = 0.5  # lognormal spread of each request's service time around the server's mean
    utilisation: float = 0.7  # offered load over the healthy servers' capacity (open loop, Poisson)
    duration: float = 30.0
    slow_factor: float = 10.0  # server 0 is this much slower
    fail_latency: float = 0.0001  # server 1 answers UNAVAILABLE after this long
    gc_servers: int = 2  # servers 2.. stall for gc_pause every gc_period
    gc_period: float = 2.0
    gc_pause: float = 0.2
    degrade_at: float = 0.6  # fraction of the run at which server (2 + gc_servers) gets degrade_factor slower
    degrade_factor: float = 3.0
    remove_at: float = 0.3  # fraction of the run at which the last `churn` servers leave
    add_at: float = 0.5  # fraction of the run at which `churn` new servers join
    churn: int = 5
    rtt_local: float = 0.0002  # network round trip within a zone
    rtt_remote: float = 0.001  # and across zones
    sample_every: float = 0.05  # how often in-flight load is sampled for the imbalance figure
    share_bin: float = 0.1  # bins for the new servers' share of picks after they join
    seed: int = 1

    def describe(self) -> list[tuple[str, str]]:
        """The scenario as (parameter, value) rows for the report."""
        d = self.duration
        g = 2 + self.gc_servers
        return [
            ("clients × servers", f"{self.clients} × {self.servers} (each client has its own balancer instance)"),
            ("workers per server (K)", f"{self.workers}, FIFO queue, unbounded"),
            (
                "service time",
                f"lognormal (σ={self.service_sigma}) around a per-server mean drawn uniformly in "
                f"[{self.service_low * 1e3:g}, {self.service_high * 1e3:g}] ms",
            ),
            ("load", f"open-loop Poisson at {self.utilisation:.0%} of the healthy servers' capacity"),
            ("duration", f"{d:g} s simulated"),
            ("slow server", f"server 0, {self.slow_factor:g}× slower"),
            ("failing server", f"server 1, UNAVAILABLE after {self.fail_latency * 1e3:g} ms"),
            (
                "GC pauses",
                f"servers 2..{g - 1} stall for {self.gc_pause * 1e3:g} ms every {self.gc_period:g} s",
            ),
            ("degrading server", f"server {g} becomes {self.degrade_factor:g}× slower at t={self.degrade_at * d:g} s"),
            (
                "churn",
                f"{self.churn} servers removed at t={self.remove_at * d:g} s (in-flight calls finish), "
                f"{self.churn} new ones added at t={self.add_at * d:g} s",
            ),
            (
                "zones",
                f"{len(ZONES)} zones, servers and clients round-robin over them; round trip "
                f"{self.rtt_local * 1e3:g} ms in zone, {self.rtt_remote * 1e3:g} ms across",
            ),
            ("seed", str(self.seed)),
        ]


@dataclass
class Result:
    """What one balancer did in one scenario."""

    balancer: str
    calls: int = 0  # calls issued
    completed: int = 0  # calls answered (every issued call is answered by the end of the run)
    errors: int = 0  # UNAVAILABLE answers, plus picks that found no endpoint
    no_endpoint: int = 0
    latencies: list[float] = field(default_factory=list)  # successful calls, seconds
    picks: dict[int, int] = field(default_factory=dict)  # server id -> calls sent to it
    imbalance: float = 0.0  # mean over samples of max/mean in-flight over the live servers
    mean_in_flight: float = 0.0  # mean over samples of the mean in-flight per live server
    imbalance_rest: float = 0.0  # the same without the slow server (whose queue dominates max)
    new_share_first_second: float = 0.0  # new servers' share of picks in their first second, over a fair share
    new_time_to_half: float = math.inf  # seconds until a 100 ms bin gave the new servers half their fair share
    new_picks: int = 0
    # Per simulated second: [calls, to server 0, to server 1, live servers at the second's last call].
    per_second: list[list[int]] = field(default_factory=list)
    fair: dict[int, float] = field(default_factory=dict)  # server id -> calls it would get from a fair balancer
    ejecting: list[float] = field(default_factory=list)  # per simulated second: share of clients ejecting server 1
    clients: int = 0
    servers: int = 0
    slow_capacity: float = 0.0  # calls per second server 0 completes with every worker busy
    dead_picks: int = 0  # calls sent to a server after its removal was published (must stay 0)
    feedback: bool = False

    def percentile(self, q: float) -> float:
        """Latency at quantile q (nearest rank) over successful calls, in seconds."""
        data = self.latencies
        if not data:
            return math.nan
        return data[min(len(data) - 1, max(0, math.ceil(q * len(data)) - 1))]

    def fairness(self, second: int, server: int) -> float:
        """Server 0's or 1's share of the calls issued in `second`, over a fair share (1.0 is fair)."""
        calls, _, _, live = self.per_second[second]
        return self.per_second[second][server + 1] * live / calls if calls else math.nan

    def share_during(self, server: int, start: int, stop: int) -> float:
        """The fraction of the calls issued in simulated seconds [start, stop) sent to server 0 or 1."""
        rows = self.per_second[start:stop]
        total = sum(row[0] for row in rows)
        return sum(row[server + 1] for row in rows) / total if total else 0.0

    def share(self, server: int) -> float:
        """The fraction of all calls sent to `server`."""
        return self.picks.get(server, 0) / self.calls if self.calls else 0.0


class _Server:
    __slots__ = (
        "busy",
        "endpoint",
        "fail",
        "gc_phase",
        "id",
        "in_flight",
        "live",
        "mean",
        "queue",
        "zone",
    )

    def __init__(self, sid: int, mean: float, zone: str) -> None:
        self.id = sid
        self.mean = mean
        self.zone = zone
        self.endpoint = Endpoint(f"10.0.{sid >> 8}.{sid & 255}", 8000, zone=zone)
        self.fail = False
        self.gc_phase = -1.0  # < 0: no GC pauses
        self.busy = 0
        self.in_flight = 0  # queued + in service
        self.queue: deque[_Call] = deque()
        self.live = True


class _Call:
    __slots__ = ("client", "latency", "sent", "server", "status")

    def __init__(self, client: int, server: _Server, sent: float) -> None:
        self.client = client
        self.server = server
        self.sent = sent
        self.status = Status.OK
        self.latency = 0.0


class _Clock:
    """The simulated time, as a clock function for the balancers that take `clock=`."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_balancer(name: str, index: int, zone: str, clock: Callable[[], float], seed: int) -> Balancer:
    """Client `index`'s balancer: the real class from the registry, seeded and on the simulated clock.

    round_robin, weighted_random, smooth_weighted and ring_hash take `rng=` and read no clock; p2c
    takes `rng=` and `clock=`; outlier takes `clock=` and wraps round_robin; zone_aware wraps
    round_robin and is given the client's zone. None of them reads time.monotonic when given a clock.
    The variants: `p2c-no-penalty` is p2c with `failure_penalty=0`, `p2c-slow-fade` p2c with
    `penalty_decay=5` (s), and `p2c-failures-timed` is `FailuresTimed`, the real p2c class told that
    failures were answers.
    """
    rng = random.Random(seed * 1_000_003 + index)
    options: dict[str, Any]
    if name == "p2c-failures-timed":
        return FailuresTimed(rng=rng, clock=clock)
    if name in P2C_OPTIONS:
        name, options = "p2c", {"rng": rng, "clock": clock, **P2C_OPTIONS[name]}
    elif name == "p2c":
        options = {"rng": rng, "clock": clock}
    elif name == "outlier":
        options = {"clock": clock, "inner": "round_robin", "inner_options": {"rng": rng}}
    elif name == "zone_aware":
        options = {"zone": zone, "inner": "round_robin", "inner_options": {"rng": rng}}
    else:
        options = {"rng": rng}
    balancer: Balancer = balancers.create(name, **options)
    return balancer


def run(scenario: Scenario, name: str) -> Result:
    """Simulate `scenario` with one `name` balancer per client; every random draw is seeded."""
    sc = scenario
    rng = random.Random(sc.seed)  # servers, arrivals and service times: the same for every balancer
    clock = _Clock()
    result = Result(name, clients=sc.clients, servers=sc.servers)

    servers: list[_Server] = []

    def new_server() -> _Server:
        sid = len(servers)
        server = _Server(sid, rng.uniform(sc.service_low, sc.service_high), ZONES[sid % len(ZONES)])
        servers.append(server)
        return server

    for _ in range(sc.servers):
        new_server()
    servers[0].mean *= sc.slow_factor
    result.slow_capacity = sc.workers / servers[0].mean
    servers[1].fail = True
    servers[1].mean = sc.fail_latency
    for s in servers[2 : 2 + sc.gc_servers]:
        s.gc_phase = rng.uniform(0.0, sc.gc_period)
    # Healthy capacity sets the arrival rate (the failing server serves nothing useful).
    capacity = sum(sc.workers / s.mean for s in servers if not s.fail)
    rate = sc.utilisation * capacity
    churn_out = servers[sc.servers - sc.churn :] if sc.churn else []

    client_zones = [ZONES[i % len(ZONES)] for i in range(sc.clients)]
    clients = [make_balancer(name, i, client_zones[i], clock, sc.seed) for i in range(sc.clients)]
    feedback: list[CallFeedback | None] = [b if isinstance(b, CallFeedback) else None for b in clients]
    result.feedback = feedback[0] is not None if feedback else False
    keyed: list[KeyedBalancer | None] = [
        b if name == "ring_hash" and isinstance(b, KeyedBalancer) else None for b in clients
    ]
    failing_key = (servers[1].endpoint.host, servers[1].endpoint.port)
    ejectors = [b for b in clients if isinstance(b, OutlierEjection)]

    def publish() -> None:
        snapshot = [s.endpoint for s in servers if s.live]
        for b in clients:
            b.update(snapshot)

    publish()
    by_endpoint = {s.endpoint: s for s in servers}

    events: list[tuple[float, int, int, Any]] = []
    seq = 0

    def push(t: float, kind: int, payload: Any) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, payload))

    push(rng.expovariate(rate), _ARRIVAL, None)
    push(sc.remove_at * sc.duration, _CONTROL, "remove")
    push(sc.add_at * sc.duration, _CONTROL, "add")
    push(sc.degrade_at * sc.duration, _CONTROL, "degrade")
    push(sc.sample_every, _SAMPLE, None)
    push(1.0, _CONTROL, "second")

    service_rng = random.Random(sc.seed + 7)
    pick_rng = random.Random(sc.seed + 11)  # chooses the calling client and ring_hash keys
    sigma = sc.service_sigma
    mu = -sigma * sigma / 2.0  # lognormal with mean 1
    workers = sc.workers
    gc_period, gc_pause = sc.gc_period, sc.gc_pause
    picks: dict[int, int] = {}
    per_second = result.per_second
    per_second.extend([0, 0, 0, 0] for _ in range(math.ceil(sc.duration) + 1))
    # A fair balancer gives each live server 1/live of each call: `fair_clock` sums 1/live over the calls,
    # and a server's fair count is its value when the server left minus when it joined.
    live = sc.servers
    fair_clock = 0.0
    joined = dict.fromkeys(range(sc.servers), 0.0)
    fair: dict[int, float] = {}
    latencies = result.latencies
    imbalance_sum = 0.0
    imbalance_n = 0
    rest_sum = 0.0
    in_flight_sum = 0.0
    in_flight_n = 0
    rest_n = 0
    new_servers: list[_Server] = []
    added_at = math.inf
    bins_total: dict[int, int] = {}
    bins_new: dict[int, int] = {}
    live_at_add = 0

    def start(server: _Server, call: _Call, now: float) -> None:
        """Put `call` in service on `server` at `now`, and schedule its end."""
        server.busy += 1
        if server.fail:
            push(now + server.mean, _DONE, call)
            return
        begin = now
        work = server.mean * service_rng.lognormvariate(mu, sigma)
        if server.gc_phase >= 0.0:
            # Pauses stall the whole server: [phase + k·period, phase + k·period + pause).
            k = math.floor((begin - server.gc_phase) / gc_period)
            pause_start = server.gc_phase + k * gc_period
            if begin < pause_start + gc_pause:
                begin = pause_start + gc_pause
            end = begin + work
            next_pause = pause_start + gc_period
            while end > next_pause:
                end += gc_pause
                next_pause += gc_period
        else:
            end = begin + work
        push(end, _DONE, call)

    duration = sc.duration
    while events:
        t, _, kind, payload = heapq.heappop(events)
        clock.now = t
        if kind == _ARRIVAL:
            if t < duration:
                push(t + rng.expovariate(rate), _ARRIVAL, None)
            else:
                continue
            index = int(pick_rng.random() * sc.clients)
            result.calls += 1
            fair_clock += 1.0 / live
            balancer = clients[index]
            try:
                kb = keyed[index]
                endpoint = kb.pick_for(str(pick_rng.getrandbits(32))) if kb is not None else balancer.pick()
            except RpcError:
                result.no_endpoint += 1
                result.errors += 1
                result.completed += 1
                continue
            server = by_endpoint[endpoint]
            picks[server.id] = picks.get(server.id, 0) + 1
            row = per_second[int(t)]
            row[0] += 1
            row[3] = live
            if server.id < 2:
                row[server.id + 1] += 1
            if not server.live:
                result.dead_picks += 1
            if t >= added_at:
                b = int((t - added_at) / sc.share_bin)
                bins_total[b] = bins_total.get(b, 0) + 1
                if server.id >= sc.servers:
                    bins_new[b] = bins_new.get(b, 0) + 1
            fb = feedback[index]
            if fb is not None:
                fb.on_start(endpoint)
            call = _Call(index, server, t)
            server.in_flight += 1
            if server.busy < workers:
                start(server, call, t)
            else:
                server.queue.append(call)
        elif kind == _DONE:
            call = payload
            server = call.server
            server.busy -= 1
            server.in_flight -= 1
            if server.queue:
                start(server, server.queue.popleft(), t)
            rtt = sc.rtt_local if server.zone == client_zones[call.client] else sc.rtt_remote
            if server.fail:
                call.status = Status.UNAVAILABLE
            push(t + rtt, _DELIVER, call)
        elif kind == _DELIVER:
            call = payload
            latency = t - call.sent
            result.completed += 1
            if call.status is Status.OK:
                latencies.append(latency)
            else:
                result.errors += 1
            fb = feedback[call.client]
            if fb is not None:
                fb.on_finish(call.server.endpoint, status=call.status, latency=latency)
        elif kind == _SAMPLE:
            if t < duration:
                push(t + sc.sample_every, _SAMPLE, None)
            loads = [s.in_flight for s in servers if s.live]
            mean = sum(loads) / len(loads) if loads else 0.0
            in_flight_sum += mean
            in_flight_n += 1
            if mean > 0:
                imbalance_sum += max(loads) / mean
                imbalance_n += 1
            rest = [s.in_flight for s in servers if s.live and s.id != 0]
            mean = sum(rest) / len(rest) if rest else 0.0
            if mean > 0:
                rest_sum += max(rest) / mean
                rest_n += 1
        elif payload == "second":
            if ejectors:  # the share of clients that have server 1 ejected now
                result.ejecting.append(sum(failing_key in b.ejected for b in ejectors) / len(ejectors))
            if t + 1.0 <= duration:
                push(t + 1.0, _CONTROL, "second")
        elif payload == "remove":
            for s in churn_out:
                s.live = False
                fair[s.id] = fair_clock - joined.pop(s.id)
            live -= len(churn_out)
            publish()
        elif payload == "add":
            for _ in range(sc.churn):
                server = new_server()
                by_endpoint[server.endpoint] = server
                new_servers.append(server)
                joined[server.id] = fair_clock
            live += sc.churn
            added_at = t
            live_at_add = sum(1 for s in servers if s.live)
            publish()
        elif payload == "degrade":
            if len(servers) > 2 + sc.gc_servers:
                servers[2 + sc.gc_servers].mean *= sc.degrade_factor

    latencies.sort()
    for sid, at in joined.items():
        fair[sid] = fair_clock - at
    result.fair = dict(sorted(fair.items()))
    result.picks = picks
    result.imbalance = imbalance_sum / imbalance_n if imbalance_n else math.nan
    result.mean_in_flight = in_flight_sum / in_flight_n if in_flight_n else math.nan
    result.imbalance_rest = rest_sum / rest_n if rest_n else math.nan
    result.new_picks = sum(picks.get(s.id, 0) for s in new_servers)
    if new_servers and live_at_add:
        new_fair = len(new_servers) / live_at_add
        first = int(round(1.0 / sc.share_bin))
        total = sum(bins_total.get(b, 0) for b in range(first))
        got = sum(bins_new.get(b, 0) for b in range(first))
        result.new_share_first_second = got / total / new_fair if total else 0.0
        for b in sorted(bins_total):
            if bins_total[b] and bins_new.get(b, 0) / bins_total[b] >= 0.5 * new_fair:
                result.new_time_to_half = (b + 1) * sc.share_bin
                break
    return result
