"""Measures of evp alone: shard scaling, restart with a backlog, and shard failover."""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench import common, report, systems

EVP = [sys.executable, "-m", "evp"]
# The shard to kill is stopped at most this long, well within the queue's 10 s
# session timeout, so the kill and not the timeout removes it.
MAX_STOPPED_S = 5.0


def scaling(
    workdir: Path, events: int, shard_counts: list[int], known: dict[int, dict], repeat: int = 1
) -> list[dict[str, Any]]:
    """End-to-end throughput at full speed with each shard count (`--fsync batch`).

    Each count runs `repeat` times and reports the median run with the range. `known`
    maps shard counts to such summaries already made with the same workload.
    """
    system = next(item for item in systems.SYSTEMS if item.id == "evp-batch")
    rows = []
    for shards in shard_counts:
        summary = known.get(shards)
        if summary is None:
            runs = [systems.run(system, workdir, events, 0, shards=shards) for _ in range(repeat)]
            summary = report.summarize_repeats(runs)
        row = {"shards": shards, "events": events, "repeats": summary.get("repeats", 1)}
        for field in ("end_to_end_events_per_s", "publish_events_per_s", "cpu_s_per_million_events"):
            row[field] = summary[field]
            row[f"{field}_range"] = summary.get(f"{field}_range", [summary[field], summary[field]])
        rows.append(row)
        print(f"  shards={shards}: {row['end_to_end_events_per_s']:,} events/s end to end", flush=True)
    return rows


def _start_queue(
    processes: common.Processes, name: str, port: int, data_dir: Path, log_level: str = "WARNING"
):  # noqa: ANN202
    queue = processes.start(
        name,
        [*EVP, "queue", "--port", str(port), "--data-dir", str(data_dir), "--log-level", log_level],
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


def failover(workdir: Path, events: int, rate: float, shards: int = systems.SHARDS) -> dict[str, Any]:
    """Time from kill -9 of a shard to the first of its events processed elsewhere.

    `shards` shards start and report their pids. One of them is stopped with SIGSTOP,
    so that it surely has unacknowledged events when it dies (a running shard may
    have acknowledged everything at that moment), and `events` events are published at
    `rate` events/s (0 for full speed). Once a fifth are acknowledged and the stopped
    shard has some, it is killed with SIGKILL; the time runs from the SIGKILL. The
    snapshot is polled every 2 ms (each poll costs the queue a snapshot, and the
    figures include up to one interval): the queue counts the shard's unacknowledged
    events as `redelivered` when it removes the member, and the first redelivered
    event has been processed once the committed offset of one of the shard's
    partitions moves past its value at the kill.
    """
    run_dir = workdir / "failover"
    run_dir.mkdir(parents=True)
    processes = common.Processes(run_dir)
    port = common.free_port()
    address = f"127.0.0.1:{port}"
    stopped_pid = 0
    try:
        # INFO logs the member's removal with a millisecond timestamp.
        _start_queue(processes, "queue", port, run_dir / "data", log_level="INFO")
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
        snap = common.snapshot(address)
        victim = max(snap["groups"][0]["members"], key=lambda member: len(member["partitions"]))
        stopped_pid = victim["pid"]
        os.kill(stopped_pid, signal.SIGSTOP)
        stopped = time.monotonic()
        publisher = processes.start(
            "publish",
            [*EVP, "publish", "--queue", address, "--count", str(events), "--rate", f"{rate:g}", "--keys", "10000"],
        )

        def ready_to_kill(snap: dict[str, Any]) -> bool:
            group = snap["groups"][0]
            in_flight = next(
                (member["in_flight"] for member in group["members"] if member["id"] == victim["id"]), 0
            )
            busy = group["acked"] >= events // 5 and in_flight > 0
            return busy or time.monotonic() - stopped > MAX_STOPPED_S

        snap, _ = common.poll_snapshot(address, ready_to_kill, interval_s=0.005, timeout_s=60)
        group = snap["groups"][0]
        victim = next(member for member in group["members"] if member["id"] == victim["id"])
        partitions = victim["partitions"]
        before = group["redelivered"]
        # A stopped shard sends no acknowledgements, so these are the offsets at the kill.
        at_kill = group["committed"]
        if not victim["in_flight"]:
            raise RuntimeError(f"shard {victim['id']} had no unacknowledged events when it was to be killed")
        os.kill(stopped_pid, signal.SIGKILL)
        killed = time.monotonic()
        killed_unix = time.time()
        stopped_pid = 0
        seen: dict[str, float] = {}

        def redelivered_processed(snap: dict[str, Any]) -> bool:
            group = snap["groups"][0]
            now = time.monotonic()
            if "removed" not in seen and group["redelivered"] > before:
                seen["removed"] = now
            if "removed" in seen and any(group["committed"][p] > at_kill[p] for p in partitions):
                seen["first"] = now
                return True
            return False

        snap, _ = common.poll_snapshot(address, redelivered_processed, interval_s=0.002, timeout_s=60)
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
        if stopped_pid:
            # A stopped shard would ignore the SIGTERM that stops the others.
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped_pid, signal.SIGKILL)
        processes.stop_all()
        shutil.rmtree(run_dir / "data", ignore_errors=True)
    return {
        "events": events,
        "rate": rate,
        "shards": shards,
        "victim_partitions": len(partitions),
        "victim_in_flight": victim["in_flight"],
        "redelivered": redelivered,
        "kill_to_removal_ms": round((seen["removed"] - killed) * 1000, 1),
        "kill_to_removal_logged_ms": _logged_removal_ms(run_dir / "queue.log", victim["id"], killed_unix),
        "kill_to_first_redelivered_ms": round((seen["first"] - killed) * 1000, 1),
        "acked_after_drain": snap["groups"][0]["acked"],
    }


def _logged_removal_ms(log: Path, member: str, killed_unix: float) -> float | None:
    """Milliseconds from the kill to the queue's log line about the member leaving.

    This time is free of the snapshot polling, but the log's timestamps have
    millisecond resolution.
    """
    pattern = re.compile(
        r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO evp\.groups: member=" + re.escape(member) + " left group",
        re.M,
    )
    for found in pattern.finditer(log.read_text(errors="replace")):
        logged = datetime.datetime.strptime(found[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if logged >= killed_unix - 0.001:
            return round((logged - killed_unix) * 1000, 1)
    return None
