"""End-to-end benchmark: queue, `--shards N` and a publisher on one machine.

Runs `evp queue`, `evp process --shards N` and `evp publish --rate 0 --count N` as
separate processes, exactly as a user would, and measures:

- events per second end to end: events published divided by the time from the
  publisher's start until the group's lag is 0;
- publish-only events per second, as the publisher reports it;
- p50 and p99 latency from publish to processing, from the shards' merged histogram
  (the queue's statistics snapshot), both at full speed and at a fixed rate;
- the queue's peak RSS, sampled every 50 ms, and CPU seconds of all processes.

Usage: python bench/e2e.py [--events 1000000] [--shards 8] [--rate-events 100000]
Writes bench/results/<date>-<host>-e2e.json and prints a summary.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import PeakRss, cpu_tree_s, free_port, poll_snapshot, wait_for_port  # noqa: E402
from evp import __version__  # noqa: E402


def evp(*args: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "evp", *args],
        stdout=open(log, "ab"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )


def wait_members(address: str, count: int, timeout_s: float = 60) -> None:
    poll_snapshot(
        address,
        lambda snap: bool(snap["groups"]) and len(snap["groups"][0]["members"]) >= count,
        interval_s=0.1,
        timeout_s=timeout_s,
    )


def wait_lag_zero(address: str, expected: int, timeout_s: float = 1800) -> dict:
    def caught_up(snap: dict) -> bool:
        group = snap["groups"][0]
        return group["acked"] >= expected and group["lag"] == 0

    return poll_snapshot(address, caught_up, interval_s=0.02, timeout_s=timeout_s)[0]


def run_once(workdir: Path, events: int, shards: int, rate: float, fsync: str) -> dict:
    port = free_port()
    address = f"127.0.0.1:{port}"
    queue = evp("queue", "--port", str(port), "--data-dir", str(workdir / f"data-{fsync}-{rate}"), "--fsync", fsync, "--log-level", "WARNING", log=workdir / "queue.log")
    try:
        wait_for_port(port, queue, timeout_s=10)
        rss = PeakRss(queue.pid)
        processor = evp("process", "--queue", address, "--shards", str(shards), "--node", "bench", "--log-level", "WARNING", log=workdir / "process.log")
        wait_members(address, shards)
        started = time.monotonic()
        publish = subprocess.run(
            [sys.executable, "-m", "evp", "publish", "--queue", address, "--count", str(events), "--rate", str(rate)],
            capture_output=True,
            text=True,
        )
        published_s = time.monotonic() - started
        if publish.returncode != 0:
            raise RuntimeError(f"publish failed: {publish.stderr}")
        snap = wait_lag_zero(address, events)
        total_s = time.monotonic() - started
        cpu_s = cpu_tree_s(queue.pid) + cpu_tree_s(processor.pid)
        group = snap["groups"][0]
        processor.send_signal(signal.SIGTERM)
        processor.wait(timeout=60)
        return {
            "events": events,
            "shards": shards,
            "fsync": fsync,
            "rate": rate,
            "end_to_end_events_per_s": round(events / total_s),
            "publish_events_per_s": round(events / published_s),
            "latency_ms": group["latency"],
            "queue_peak_rss_mb": rss.stop_mb(),
            "cpu_s_queue_and_shards": round(cpu_s, 2),
            "redelivered": group["redelivered"],
        }
    finally:
        queue.send_signal(signal.SIGTERM)
        queue.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000, help="events at full speed")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--rate", type=float, default=10_000, help="fixed rate for the latency run, events/s")
    parser.add_argument("--rate-events", type=int, default=100_000, help="events in the fixed-rate run")
    parser.add_argument("--fsync", default="batch")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="evp-bench-") as tmp:
        workdir = Path(tmp)
        results.append(run_once(workdir, args.events, args.shards, 0, args.fsync))
        print(json.dumps(results[-1]), flush=True)
        if args.rate_events:
            results.append(run_once(workdir, args.rate_events, args.shards, args.rate, args.fsync))
            print(json.dumps(results[-1]), flush=True)
    machine = {
        "host": socket.gethostname(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "evp": __version__,
    }
    record = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv), "machine": machine, "results": results}
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{record['date']}-{machine['host']}-e2e.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
