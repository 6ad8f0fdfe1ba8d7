"""One benchmark run of one system: start it, push a workload through, measure, stop.

A run publishes `events` events (generated, or the lines of a file) at `rate` events/s
(0 for full speed) and returns the same fields for every system:

- `end_to_end_events_per_s`: events divided by the time from the publisher's first
  event to the last event processed;
- `publish_events_per_s`: events divided by the time from the first event to the last
  acknowledgement, in the same run (consumers compete for the same cores);
- `latency_ms` (p50, p99, p99.9) and `cdf`: publish to processing;
- `server_peak_rss_mb`: the server's RSS, sampled every 50 ms;
- `cpu_s`: CPU seconds of the publisher (whole process), and of the server and the
  consumers from the publisher's start to the last event processed.

evp measures latency itself: each shard records the time from the publisher's
timestamp to the end of processing in a histogram with 4.4 % buckets, and the queue's
snapshot merges them. The peers' publishers add the publish time to each event
(`sent_ns`), and their consumers compute the latency of every event after decoding it.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import common, workload

# The peers' stream (or subject) count and consumer processes, and evp's shards.
PARTITIONS = 8
SHARDS = 8


@dataclass(frozen=True)
class System:
    id: str
    label: str
    family: str
    durability: str
    # fsync policy for evp; redis: append-only file or not; nats: jetstream or core.
    variant: str


SYSTEMS = (
    System("evp-batch", "evp, fsync batch", "evp", "log written before the ack, fsync every 200 ms", "batch"),
    System("evp-always", "evp, fsync always", "evp", "fsync before the ack", "always"),
    System("redis-aof", "Redis Streams, AOF everysec", "redis", "append-only file, fsync every second", "aof"),
    System("redis-memory", "Redis Streams, no persistence", "redis", "memory only", "memory"),
    System("nats-jetstream", "NATS JetStream", "nats", "file store, server's default sync", "jetstream"),
    System("nats-core", "NATS core, queue group", "nats", "none: not stored, drops when slow", "core"),
)


def missing(system: System) -> str | None:
    """Return why `system` cannot run here, or None when it can."""
    if system.family == "redis":
        from bench import redis_peer

        return redis_peer.missing()
    if system.family == "nats":
        from bench import nats_peer

        return nats_peer.missing()
    return None


def run(
    system: System,
    workdir: Path,
    events: int,
    rate: float = 0,
    *,
    keys: int = 10_000,
    file: Path | None = None,
    key_field: str = "page",
    shards: int = SHARDS,
) -> dict[str, Any]:
    """Run one workload through one system and return its measures."""
    run_dir = workdir / f"{system.id}-{rate:g}-{int(time.time() * 1000)}"
    run_dir.mkdir(parents=True)
    if system.family == "evp":
        result = _run_evp(system, run_dir, events, rate, keys, file, key_field, shards)
    else:
        result = _run_peer(system, run_dir, events, rate, keys, file, key_field)
    result["cpu_s"]["total"] = round(sum(result["cpu_s"].values()), 3)
    processed = result["processed"] or 1
    result["cpu_s_per_million_events"] = round(result["cpu_s"]["total"] / processed * 1e6, 1)
    # A file run requests "all events" with a large count, so record the count published.
    result.update(system=system.id, events=result["published"] if file else events, rate=rate)
    result["file"] = file.name if file else None
    if rate > 0 and result["publish_events_per_s"] < 0.95 * rate:
        result["note"] = f"the publisher reached only {result['publish_events_per_s']:,} of {rate:,.0f} events/s"
    return result


def _timeout_s(events: int) -> float:
    # NOTE: a guess that covers 5,000 events/s, slower than any system ran here.
    return 60 + events / 5000


# evp: `evp queue`, `evp process`, `evp publish`, exactly as a user runs them.

PUBLISH_SUMMARY = re.compile(r"sent=(\d+) acknowledged=(\d+).*elapsed_s=([\d.]+)")


def _run_evp(
    system: System,
    run_dir: Path,
    events: int,
    rate: float,
    keys: int,
    file: Path | None,
    key_field: str,
    shards: int,
) -> dict[str, Any]:
    processes = common.Processes(run_dir)
    port, metrics_port = common.free_port(), common.free_port()
    address = f"127.0.0.1:{port}"
    evp = [sys.executable, "-m", "evp"]
    try:
        queue = processes.start(
            "queue",
            [*evp, "queue", "--port", str(port), "--data-dir", str(run_dir / "data"),
             "--fsync", system.variant, "--metrics-port", str(metrics_port),
             "--log-level", "WARNING"],
        )
        common.wait_for_port(port, queue)
        processor = processes.start(
            "process",
            [*evp, "process", "--queue", address, "--shards", str(shards), "--node", "bench",
             "--log-level", "WARNING"],
        )
        common.poll_snapshot(
            address,
            lambda snap: bool(snap["groups"]) and len(snap["groups"][0]["members"]) >= shards,
            interval_s=0.1,
            timeout_s=120,
        )
        rss = common.PeakRss(queue.pid)
        queue_cpu_before = common.cpu_tree_s(queue.pid)
        shards_cpu_before = common.cpu_tree_s(processor.pid)
        source = ["--file", str(file), "--key-field", key_field] if file else ["--keys", str(keys)]
        publisher = processes.start(
            "publish",
            [*evp, "publish", "--queue", address, "--count", str(events), "--rate", f"{rate:g}", *source],
        )
        code, publisher_cpu_s = common.wait_with_cpu(publisher, _timeout_s(events))
        exited = time.monotonic()
        log = (run_dir / "publish.log").read_text()
        summary = PUBLISH_SUMMARY.search(log)
        if code != 0 or summary is None:
            raise RuntimeError(f"evp publish failed with code {code}: {log[-2000:]}")
        sent, acked, elapsed_s = int(summary[1]), int(summary[2]), float(summary[3])

        def caught_up(snap: dict[str, Any]) -> bool:
            group = snap["groups"][0]
            return group["acked"] >= acked and group["lag"] == 0

        def interval_s(snap: dict[str, Any]) -> float:
            # Poll often only near the end: each poll costs the queue a snapshot.
            return min(0.1, max(0.005, snap["groups"][0]["lag"] / 500_000))

        snap, done = common.poll_snapshot(address, caught_up, interval_s, _timeout_s(events))
        queue_cpu_s = common.cpu_tree_s(queue.pid) - queue_cpu_before
        shards_cpu_s = common.cpu_tree_s(processor.pid) - shards_cpu_before
        peak_rss_mb = rss.stop_mb()
        latency, cdf = _evp_latency(address, metrics_port, acked)
        first_event = exited - elapsed_s
        group = snap["groups"][0]
        result = {
            "processed": group["acked"],
            "published": acked,
            "lost": max(0, sent - group["acked"]),
            "redelivered": group["redelivered"],
            "end_to_end_events_per_s": round(acked / (done - first_event)),
            "publish_events_per_s": round(acked / elapsed_s),
            "latency_ms": latency,
            "cdf": cdf,
            "cdf_source": "the queue's Prometheus histogram buckets and the snapshot's percentiles",
            "server_peak_rss_mb": peak_rss_mb,
            "cpu_s": {
                "publisher": round(publisher_cpu_s, 3),
                "server": round(queue_cpu_s, 3),
                "consumers": round(shards_cpu_s, 3),
            },
        }
        processes.stop(processor)
        return result
    finally:
        processes.stop_all()
        shutil.rmtree(run_dir / "data", ignore_errors=True)


PROMETHEUS_BUCKET = re.compile(r'^evp_processing_latency_seconds_bucket\{[^}]*\ble="([^"]+)"[^}]*\} (\S+)$', re.M)
PROMETHEUS_COUNT = re.compile(r"^evp_processing_latency_seconds_count\{[^}]*\} (\S+)$", re.M)


def _evp_latency(address: str, metrics_port: int, events: int) -> tuple[dict[str, Any], list[list[float]]]:
    """Read the group's latency once every shard has reported its last events.

    The shards report their histograms every heartbeat (1 s) and /metrics serves the
    snapshot sampled each second, so the count reaches `events` within about 2 s.
    """
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    deadline = time.monotonic() + 10
    text = ""
    counted = 0
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        found = PROMETHEUS_COUNT.search(text)
        counted = int(float(found[1])) if found else 0
        if counted >= events:
            break
        time.sleep(0.2)
    latency = dict(common.snapshot(address)["groups"][0]["latency"])
    # The shards report over a sliding window of 30 to 60 s: a longer run would drop
    # its first events from the histogram, and this count would show it.
    latency["events_counted"] = counted
    buckets = [(float(bound), float(count)) for bound, count in PROMETHEUS_BUCKET.findall(text)]
    total = buckets[-1][1] if buckets else 0
    cdf: list[list[float]] = []
    if total:
        points = [(bound * 1000, count / total) for bound, count in buckets if bound != float("inf")]
        points += [(latency[name], quantile) for name, quantile in
                   (("p50_ms", 0.5), ("p99_ms", 0.99), ("p999_ms", 0.999)) if latency[name] is not None]
        cdf = [[round(ms, 4), round(fraction, 6)] for ms, fraction in sorted(points)]
    return latency, cdf


# Redis Streams and NATS: their servers from Debian, clients from bench/*_peer.py.


def _run_peer(
    system: System,
    run_dir: Path,
    events: int,
    rate: float,
    keys: int,
    file: Path | None,
    key_field: str,
) -> dict[str, Any]:
    from bench import nats_peer, redis_peer

    processes = common.Processes(run_dir)
    port = common.free_port()
    address = f"127.0.0.1:{port}"
    data_dir = run_dir / "data"
    data_dir.mkdir()
    if system.family == "redis":
        module, peer = "bench.redis_peer", redis_peer
        command = redis_peer.server_command(port, data_dir, durable=system.variant == "aof")
    else:
        module, peer = "bench.nats_peer", nats_peer
        command = nats_peer.server_command(port, str(data_dir))
    try:
        server = processes.start("server", command)
        common.wait_for_port(port, server)
        if system.variant != "core":
            peer.setup(address, PARTITIONS)
        ready = [run_dir / f"consumer-{index}.ready" for index in range(PARTITIONS)]
        results = [run_dir / f"consumer-{index}.json" for index in range(PARTITIONS)]
        consumers = [
            processes.python(
                f"consumer-{index}", "-m", module, "consume", "--address", address,
                "--partition", str(index), "--mode", system.variant,
                "--ready", str(ready[index]), "--result", str(results[index]),
            )
            for index in range(PARTITIONS)
        ]
        common.wait_for_files(ready, consumers, timeout_s=60)
        rss = common.PeakRss(server.pid)
        server_cpu_before = common.cpu_tree_s(server.pid)
        source = ["--file", str(file), "--key-field", key_field] if file else ["--keys", str(keys)]
        publisher_result = run_dir / "publisher.json"
        publisher = processes.python(
            "publisher", "-m", module, "publish", "--address", address, "--mode", system.variant,
            "--partitions", str(PARTITIONS), "--events", str(events), "--rate", f"{rate:g}",
            "--result", str(publisher_result), *source,
        )
        code, publisher_cpu_s = common.wait_with_cpu(publisher, _timeout_s(events))
        if code != 0:
            raise RuntimeError(f"the {system.label} publisher failed with code {code}; see {run_dir}/publisher.log")
        published = common.read_json(publisher_result)
        common.wait_for_files(results, consumers, _timeout_s(events))
        server_cpu_s = common.cpu_tree_s(server.pid) - server_cpu_before
        peak_rss_mb = rss.stop_mb()
        for consumer in consumers:
            processes.stop(consumer)
    finally:
        processes.stop_all()
    consumed = [common.read_json(path) for path in results]
    samples = workload.load_samples([Path(item["samples"]) for item in consumed])
    processed = sum(item["received"] for item in consumed)
    done_unix = max(item["done_unix"] for item in consumed)
    first_unix = published["first_send_unix"]
    shutil.rmtree(data_dir, ignore_errors=True)
    return {
        "processed": processed,
        "published": published["acked"],
        "lost": max(0, published["sent"] - processed),
        "dropped_by_client": sum(item["dropped"] for item in consumed),
        "errors": published["errors"] + [error for item in consumed for error in item["errors"]],
        "end_to_end_events_per_s": round(processed / (done_unix - first_unix)),
        "publish_events_per_s": round(published["acked"] / (published["last_ack_unix"] - first_unix)),
        "latency_ms": workload.latency_summary(samples),
        "cdf": workload.cdf_points(samples),
        "cdf_source": "every event's latency",
        "server_peak_rss_mb": peak_rss_mb,
        "cpu_s": {
            "publisher": round(publisher_cpu_s, 3),
            "server": round(server_cpu_s, 3),
            "consumers": round(sum(item["cpu_s"] for item in consumed), 3),
        },
    }
