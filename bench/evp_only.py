"""Measures of evp alone: shard scaling, restart with a backlog, and shard failover."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench import common, systems

EVP = [sys.executable, "-m", "evp"]
# Long enough for the queue to fill a stopped shard's in-flight window at full speed.
STOPPED_S = 0.2


def scaling(workdir: Path, events: int, shard_counts: list[int], known: dict[int, dict]) -> list[dict[str, Any]]:
    """End-to-end throughput at full speed with each shard count (`--fsync batch`).

    `known` holds runs already made with the same workload, by shard count.
    """
    system = next(item for item in systems.SYSTEMS if item.id == "evp-batch")
    rows = []
    for shards in shard_counts:
        result = known.get(shards) or systems.run(system, workdir, events, 0, shards=shards)
        rows.append(
            {
                "shards": shards,
                "events": events,
                "end_to_end_events_per_s": result["end_to_end_events_per_s"],
                "publish_events_per_s": result["publish_events_per_s"],
                "cpu_s_per_million_events": result["cpu_s_per_million_events"],
            }
        )
        print(f"  shards={shards}: {result['end_to_end_events_per_s']:,} events/s end to end", flush=True)
    return rows


def _start_queue(processes: common.Processes, name: str, port: int, data_dir: Path):  # noqa: ANN202
    queue = processes.start(
        name,
        [*EVP, "queue", "--port", str(port), "--data-dir", str(data_dir), "--log-level", "WARNING"],
    )
    common.wait_for_port(port, queue, timeout_s=600)
    return queue


def _publish(processes: common.Processes, address: str, events: int) -> tuple[float, float]:
    """Publish generated events at full speed; return (seconds, events/s)."""
    started = time.monotonic()
    publisher = processes.start(
        "publish", [*EVP, "publish", "--queue", address, "--count", str(events), "--rate", "0", "--keys", "10000"]
    )
    code, _cpu_s = common.wait_with_cpu(publisher, timeout_s=120 + events / 20_000)
    elapsed_s = time.monotonic() - started
    if code != 0:
        raise RuntimeError(f"evp publish of the backlog failed with code {code}")
    return elapsed_s, events / elapsed_s


def restart(workdir: Path, events: int) -> dict[str, Any]:
    """Queue RSS with `events` stored, and the time to restart it, clean and after kill -9.

    The restart time runs from starting `evp queue` until its snapshot reports every
    event stored (it has read its logs and accepts connections).
    """
    run_dir = workdir / "restart"
    run_dir.mkdir(parents=True)
    data_dir = run_dir / "data"
    processes = common.Processes(run_dir)
    port = common.free_port()
    address = f"127.0.0.1:{port}"

    def stored(snap: dict[str, Any]) -> bool:
        return bool(snap["topics"]) and snap["topics"][0]["events"] >= events

    def timed_start(name: str) -> tuple[Any, float]:
        started = time.monotonic()
        queue = _start_queue(processes, name, port, data_dir)
        _snap, seen = common.poll_snapshot(address, stored, interval_s=0.01, timeout_s=600)
        return queue, seen - started

    try:
        queue = _start_queue(processes, "queue", port, data_dir)
        rss = common.PeakRss(queue.pid)
        publish_s, publish_rate = _publish(processes, address, events)
        peak_publish_mb = rss.stop_mb()
        time.sleep(1)
        idle_mb = common.rss_mb(queue.pid)
        stop_started = time.monotonic()
        processes.stop(queue)
        stop_s = time.monotonic() - stop_started
        queue, clean_s = timed_start("queue-clean-restart")
        time.sleep(1)
        restarted_mb = common.rss_mb(queue.pid)
        processes.stop(queue, signal.SIGKILL)
        queue, crash_s = timed_start("queue-crash-restart")
        processes.stop(queue)
        data_bytes = sum(path.stat().st_size for path in data_dir.rglob("*") if path.is_file())
    finally:
        processes.stop_all()
        shutil.rmtree(data_dir, ignore_errors=True)
    return {
        "events": events,
        "data_mb": round(data_bytes / 2**20),
        "publish_s": round(publish_s, 1),
        "publish_events_per_s": round(publish_rate),
        "queue_peak_rss_mb_while_publishing": peak_publish_mb,
        "queue_rss_mb_with_backlog": idle_mb,
        "stop_s": round(stop_s, 2),
        "restart_s": round(clean_s, 2),
        "queue_rss_mb_after_restart": restarted_mb,
        "restart_after_kill9_s": round(crash_s, 2),
    }


def failover(workdir: Path, events: int, shards: int = systems.SHARDS) -> dict[str, Any]:
    """Time from kill -9 of a busy shard to the first of its events processed elsewhere.

    `shards` shards start and report their pids, then `events` events are published at
    full speed. Once a tenth are acknowledged, one shard is stopped with SIGSTOP for
    STOPPED_S, so that it surely holds unacknowledged events (a running shard may have
    acknowledged everything the moment it dies), and then killed with SIGKILL; the
    time runs from the SIGKILL. The snapshot is polled every millisecond or so: the
    queue counts the shard's unacknowledged events as `redelivered` when it removes the
    member, and the first redelivered event has been processed once the committed
    offset of one of the shard's partitions moves past its value at the removal.
    """
    run_dir = workdir / "failover"
    run_dir.mkdir(parents=True)
    processes = common.Processes(run_dir)
    port = common.free_port()
    address = f"127.0.0.1:{port}"
    try:
        _start_queue(processes, "queue", port, run_dir / "data")
        processes.start(
            "process",
            [*EVP, "process", "--queue", address, "--shards", str(shards), "--node", "bench",
             "--log-level", "WARNING"],
        )
        common.poll_snapshot(
            address,
            lambda snap: bool(snap["groups"])
            and sum(1 for member in snap["groups"][0]["members"] if member["pid"]) == shards,
            interval_s=0.1,
            timeout_s=120,
        )
        publisher = processes.start(
            "publish", [*EVP, "publish", "--queue", address, "--count", str(events), "--rate", "0", "--keys", "10000"]
        )

        snap, _ = common.poll_snapshot(
            address, lambda snap: snap["groups"][0]["acked"] >= events // 10, interval_s=0.005, timeout_s=120
        )
        victim = max(snap["groups"][0]["members"], key=lambda member: len(member["partitions"]))
        os.kill(victim["pid"], signal.SIGSTOP)
        time.sleep(STOPPED_S)
        snap = common.snapshot(address)
        group = snap["groups"][0]
        victim = next(member for member in group["members"] if member["id"] == victim["id"])
        partitions = victim["partitions"]
        before = group["redelivered"]
        os.kill(victim["pid"], signal.SIGKILL)
        killed = time.monotonic()
        snap, removed = common.poll_snapshot(
            address, lambda snap: snap["groups"][0]["redelivered"] > before, interval_s=0.005, timeout_s=60
        )
        at_removal = snap["groups"][0]["committed"]
        snap, first = common.poll_snapshot(
            address,
            lambda snap: any(snap["groups"][0]["committed"][p] > at_removal[p] for p in partitions),
            interval_s=0.001,
            timeout_s=60,
        )
        redelivered = snap["groups"][0]["redelivered"] - before
        code, _cpu_s = common.wait_with_cpu(publisher, timeout_s=120 + events / 20_000)
        if code != 0:
            raise RuntimeError(f"evp publish failed with code {code}; see {run_dir}/publish.log")
        snap, _ = common.poll_snapshot(
            address,
            lambda snap: snap["groups"][0]["lag"] == 0 and snap["groups"][0]["acked"] >= events,
            interval_s=0.05,
            timeout_s=300,
        )
    finally:
        processes.stop_all()
        shutil.rmtree(run_dir / "data", ignore_errors=True)
    return {
        "events": events,
        "shards": shards,
        "victim_partitions": len(partitions),
        "victim_in_flight": victim["in_flight"],
        "redelivered": redelivered,
        "kill_to_removal_ms": round((removed - killed) * 1000, 1),
        "kill_to_first_redelivered_ms": round((first - killed) * 1000, 1),
        "acked_after_drain": snap["groups"][0]["acked"],
    }
