"""Kubernetes resolver benchmark: event-to-yield latency, and CPU and memory for a big Service under churn.

    python benchmarks/bench_resolver.py            # about 25 s; prints a Markdown table
    python benchmarks/bench_resolver.py --quick    # a few seconds, smaller numbers (smoke test)

The fake API server (kubrpc.testing.kube.FakeKubeAPI) runs in a child process, so that the CPU time
and RSS measured in this process are the resolver's alone (plus the interpreter). Both processes
read the same system-wide monotonic clock, so "sent" (just after the server wrote the watch event
to the socket) and "yielded" (the resolver's watch() produced the new list) are comparable.

1. Latency: one small Service; the server changes it every `--interval` seconds, `--events` times;
   each change is timed from the write to the yield.
2. Scale: `--endpoints` endpoints in `--slices` slices; after the first full list, the server makes
   `--rate` single-endpoint changes per second (a pod going unready, ready again, or replaced) for
   `--duration` seconds. Reported: CPU time / wall time of this process, RSS at each stage.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import platform
import random
import resource
import statistics
import sys
import time
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kubrpc.resolvers.k8s import KubernetesResolver  # noqa: E402

NAMESPACE = "bench"


def rss_mib() -> float:
    """This process's resident set size now, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- the API server (child process)


def big_slice(index: int, states: list[tuple[str, bool]]) -> dict[str, Any]:
    from kubrpc.testing.kube import endpoint_slice, slice_endpoint

    endpoints = [
        slice_endpoint(address, ready=ready, zone=f"zone-{i % 3}", node_name=f"node-{i % 40}", pod=f"big-{index}-{i}")
        for i, (address, ready) in enumerate(states)
    ]
    return endpoint_slice("big", NAMESPACE, f"big-{index:03d}", *endpoints, port=9000, port_name="rpc")


async def serve(conn: Connection) -> None:
    from kubrpc.testing.kube import FakeKubeAPI, endpoint_slice

    rng = random.Random(7)
    sent: dict[str, float] = {}
    scale_state: list[list[tuple[str, bool]]] = []

    def mark_sent(event: dict[str, Any]) -> None:
        sent.setdefault(event["object"]["metadata"]["resourceVersion"], time.monotonic())

    async with FakeKubeAPI() as api:
        api.on_event_sent = mark_sent
        conn.send(api.url)
        while True:
            command, options = await anyio.to_thread.run_sync(conn.recv)
            if command == "stop":
                return
            if command == "latency-setup":
                api.upsert_slice(endpoint_slice("lat", NAMESPACE, "lat-a", "10.0.0.1", "10.1.0.0"))
                conn.send(None)
            elif command == "latency":
                with anyio.fail_after(10):
                    await api.wait_for_watches()
                marks: list[tuple[int, str]] = []
                for i in range(1, options["events"] + 1):
                    second = f"10.1.{i // 256}.{i % 256}"
                    stored = api.upsert_slice(endpoint_slice("lat", NAMESPACE, "lat-a", "10.0.0.1", second))
                    marks.append((i, stored["metadata"]["resourceVersion"]))
                    await anyio.sleep(options["interval"])
                await anyio.sleep(0.2)
                conn.send([(i, sent.get(rv)) for i, rv in marks])
            elif command == "scale-setup":
                slices, per_slice = options["slices"], options["endpoints"] // options["slices"]
                scale_state = [
                    [(f"10.{2 + s // 200}.{s % 200}.{i}", True) for i in range(per_slice)] for s in range(slices)
                ]
                for s in range(slices):
                    api.upsert_slice(big_slice(s, scale_state[s]))
                conn.send(None)
            elif command == "churn":
                with anyio.fail_after(10):
                    await api.wait_for_watches()
                start, changes = time.monotonic(), 0
                while (now := time.monotonic()) - start < options["duration"]:
                    due = start + changes / options["rate"]
                    if due > now:
                        await anyio.sleep(due - now)
                    s = rng.randrange(len(scale_state))
                    i = rng.randrange(len(scale_state[s]))
                    address, ready = scale_state[s][i]
                    if rng.random() < 0.2:  # the pod is replaced: a new address
                        address = f"10.{100 + changes // 60000}.{(changes // 240) % 250}.{changes % 240 + 1}"
                        ready = True
                    else:  # it goes unready, or ready again
                        ready = not ready
                    scale_state[s][i] = (address, ready)
                    api.upsert_slice(big_slice(s, scale_state[s]))
                    changes += 1
                conn.send(changes)


def child_main(conn: Connection) -> None:
    asyncio.run(serve(conn))


# ---------------------------------------------------------------- the resolver (this process)


async def call(conn: Connection, command: str, **options: Any) -> Any:
    conn.send((command, options))
    return await anyio.to_thread.run_sync(conn.recv)


async def measure_latency(conn: Connection, url: str, events: int, interval: float) -> dict[str, Any]:
    from kubernetes_asyncio.client import Configuration

    await call(conn, "latency-setup")
    received: dict[int, float] = {}
    resolver = KubernetesResolver("lat", "rpc", NAMESPACE, configuration=Configuration(host=url))
    conn.send(("latency", {"events": events, "interval": interval}))
    async with resolver, anyio.create_task_group() as tg:

        async def consume() -> None:
            async for snapshot in resolver.watch():
                now = time.monotonic()
                for endpoint in snapshot:
                    if endpoint.host.startswith("10.1."):
                        _, _, high, low = endpoint.host.split(".")
                        received.setdefault(int(high) * 256 + int(low), now)

        tg.start_soon(consume)
        marks = await anyio.to_thread.run_sync(conn.recv)
        tg.cancel_scope.cancel()
    latencies = sorted((received[i] - sent) * 1000 for i, sent in marks if sent is not None and i in received and i > 0)
    return {
        "events": events,
        "measured": len(latencies),
        "median_ms": statistics.median(latencies),
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "max_ms": latencies[-1],
    }


async def churn(conn: Connection, rate: float, duration: float) -> tuple[float, float, int, float]:
    """Have the server churn the big Service; (CPU seconds, wall seconds, changes, peak RSS MiB) here meanwhile."""
    peak = rss_mib()
    cpu0, wall0 = time.process_time(), time.monotonic()
    conn.send(("churn", {"rate": rate, "duration": duration}))
    done = anyio.Event()
    changes = 0

    async def wait_done() -> None:
        nonlocal changes
        changes = await anyio.to_thread.run_sync(conn.recv)
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait_done)
        while not done.is_set():
            with anyio.move_on_after(0.25):
                await done.wait()
            peak = max(peak, rss_mib())
    await anyio.sleep(0.2)  # let the last events arrive
    return time.process_time() - cpu0, time.monotonic() - wall0, changes, peak


async def measure_peer(conn: Connection, url: str, rate: float, duration: float) -> dict[str, Any]:
    """The obvious alternative, for comparison: kubernetes-asyncio's Watch helper with model objects,
    rebuilding the endpoint list from every slice on each event."""
    from kubernetes_asyncio.client import ApiClient, Configuration, DiscoveryV1Api
    from kubernetes_asyncio.watch import Watch

    from kubrpc import Endpoint

    selector = "kubernetes.io/service-name=big"
    yields = 0
    async with ApiClient(Configuration(host=url)) as client, Watch() as watch:
        api = DiscoveryV1Api(client)
        listed = await api.list_namespaced_endpoint_slice(NAMESPACE, label_selector=selector)
        slices = {s.metadata.name: s for s in listed.items}

        def build() -> list[Endpoint]:
            endpoints = []
            for item in slices.values():
                port = next(p.port for p in item.ports if p.name == "rpc")
                for e in item.endpoints:
                    ready = e.conditions.ready is not False and not e.conditions.terminating
                    meta = {"slice": item.metadata.name, "node": e.node_name, "pod": e.target_ref.name}
                    endpoints.append(Endpoint(e.addresses[0], port, zone=e.zone, ready=ready, metadata=meta))
            return endpoints

        last = build()
        stream = watch.stream(
            api.list_namespaced_endpoint_slice,
            NAMESPACE,
            label_selector=selector,
            resource_version=listed.metadata.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=600,
        )

        async def consume() -> None:
            nonlocal yields, last
            async for event in stream:
                if event["type"] == "DELETED":
                    slices.pop(event["object"].metadata.name, None)
                elif event["type"] in ("ADDED", "MODIFIED"):
                    slices[event["object"].metadata.name] = event["object"]
                else:
                    continue
                snapshot = build()
                if snapshot != last:
                    yields += 1
                    last = snapshot

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            cpu, wall, changes, _ = await churn(conn, rate, duration)
            tg.cancel_scope.cancel()
    return {"cpu_percent": 100 * cpu / wall, "cpu_ms_per_change": 1000 * cpu / max(1, changes), "snapshots": yields}


async def measure_scale(
    conn: Connection, url: str, endpoints: int, slices: int, rate: float, duration: float
) -> dict[str, Any]:
    from kubernetes_asyncio.client import Configuration

    await call(conn, "scale-setup", endpoints=endpoints, slices=slices)
    result: dict[str, Any] = {"endpoints": endpoints, "slices": slices, "rate": rate, "duration": duration}
    result["rss_before_mib"] = rss_mib()
    resolver = KubernetesResolver("big", "rpc", NAMESPACE, configuration=Configuration(host=url))
    yields = 0
    last: list[Any] = []
    synced = anyio.Event()
    started = time.monotonic()
    async with resolver, anyio.create_task_group() as tg:

        async def consume() -> None:
            nonlocal yields, last
            async for snapshot in resolver.watch():
                yields += 1
                last = snapshot
                if len(snapshot) == endpoints:
                    synced.set()

        tg.start_soon(consume)
        with anyio.fail_after(30):
            await synced.wait()
        result["first_snapshot_s"] = time.monotonic() - started
        result["rss_synced_mib"] = rss_mib()
        yields_before = yields
        cpu, wall, result["changes"], result["rss_peak_mib"] = await churn(conn, rate, duration)
        tg.cancel_scope.cancel()
    result["cpu_percent"] = 100 * cpu / wall
    result["cpu_ms_per_change"] = 1000 * cpu / max(1, result["changes"])
    result["snapshots"] = yields - yields_before
    result["final_endpoints"] = len(last)
    return result


def table(
    latency: dict[str, Any], scale: dict[str, Any], peer: dict[str, Any] | None, baseline: float, imported: float
) -> str:
    rows = [
        ("event → yield latency, median", f"{latency['median_ms']:.2f} ms (target < 20 ms)"),
        ("event → yield latency, p99", f"{latency['p99_ms']:.2f} ms"),
        ("event → yield latency, max", f"{latency['max_ms']:.2f} ms"),
        ("events measured", f"{latency['measured']} of {latency['events']}"),
        ("big Service", f"{scale['endpoints']:,} endpoints in {scale['slices']} slices"),
        ("first full snapshot after start", f"{scale['first_snapshot_s'] * 1000:.0f} ms"),
        ("churn", f"{scale['changes']} changes in {scale['duration']:g} s ({scale['rate']:g}/s requested)"),
        ("snapshots yielded under churn", f"{scale['snapshots']}"),
        (
            "resolver CPU under churn",
            f"{scale['cpu_percent']:.1f} % of one core ({scale['cpu_ms_per_change']:.2f} ms/change)",
        ),
        *(
            [
                (
                    "peer: kubernetes-asyncio Watch + models, full rebuild",
                    f"{peer['cpu_percent']:.1f} % of one core ({peer['cpu_ms_per_change']:.2f} ms/change)"
                    + (", saturated: falls behind" if peer["cpu_percent"] > 90 else ""),
                ),
                ("peer: snapshots yielded under churn", f"{peer['snapshots']}"),
            ]
            if peer
            else []
        ),
        ("RSS: interpreter + kubrpc.resolvers.k8s", f"{baseline:.1f} MiB"),
        ("RSS: + kubernetes-asyncio imported", f"{imported:.1f} MiB"),
        ("RSS: after the latency run", f"{scale['rss_before_mib']:.1f} MiB"),
        ("RSS: big Service synced", f"{scale['rss_synced_mib']:.1f} MiB"),
        ("RSS: peak under churn", f"{scale['rss_peak_mib']:.1f} MiB"),
    ]
    lines = ["| measure | value |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> str:
    baseline = rss_mib()
    import kubernetes_asyncio.client  # noqa: F401  (measured: the resolver imports it when it starts)

    imported = rss_mib()
    context = multiprocessing.get_context("spawn")
    conn, child_conn = context.Pipe()
    child = context.Process(target=child_main, args=(child_conn,), daemon=True)
    child.start()
    try:
        url = await anyio.to_thread.run_sync(conn.recv)
        latency = await measure_latency(conn, url, args.events, args.interval)
        scale = await measure_scale(conn, url, args.endpoints, args.slices, args.rate, args.duration)
        peer = None if args.no_peer else await measure_peer(conn, url, args.rate, args.duration)
        conn.send(("stop", {}))
    finally:
        await anyio.to_thread.run_sync(child.join, 10)
        if child.is_alive():
            child.kill()
    return table(latency, scale, peer, baseline, imported)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--interval", type=float, default=0.015)
    parser.add_argument("--endpoints", type=int, default=5000)
    parser.add_argument("--slices", type=int, default=50)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--no-peer", action="store_true", help="skip the kubernetes-asyncio Watch comparison")
    parser.add_argument("--quick", action="store_true", help="small and short: a smoke test")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "resolver.md")
    args = parser.parse_args()
    if args.quick:
        args.events, args.endpoints, args.slices, args.duration = 50, 1000, 10, 2.0
    report = anyio.run(run, args)
    header = (
        f"# Kubernetes resolver benchmark\n\n"
        f"{datetime.now(UTC):%Y-%m-%d}, Python {platform.python_version()}, {platform.machine()}, "
        f"{multiprocessing.cpu_count()} CPUs; `python benchmarks/bench_resolver.py"
        f"{' --quick' if args.quick else ''}`. The fake API server runs in a child process; "
        f"CPU and RSS are this process's (the resolver and the interpreter).\n\n"
    )
    print(report)
    if not args.quick:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(header + report + "\n")
        print(f"\nwritten to {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}")


if __name__ == "__main__":
    main()
