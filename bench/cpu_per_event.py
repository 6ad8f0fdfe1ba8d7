"""CPU time per event of each evp role, at a fixed rate or at full speed.

Starts `evp queue` and `evp process --shards N`, waits for the shards to join, then
runs `evp publish --count EVENTS --rate RATE` and reads the CPU time of the queue's
and the processor's process trees before and after the run, and the publisher's at
its end. CPU time, unlike wall time, changes little when other work shares the
machine, so this shows where the cost per event goes at a given rate.

Usage: python bench/cpu_per_event.py --rate 10000 --events 50000 [--shards 8]
Prints one JSON line: microseconds of CPU per event for the queue, all shards
together and the publisher, and the shards' latency percentiles.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import cpu_tree_s, free_port, wait_for_port  # noqa: E402
from bench.e2e import evp, wait_lag_zero, wait_members  # noqa: E402


def process_cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def measure(rate: float, events: int, shards: int, workdir: Path, fsync: str = "batch") -> dict:
    port = free_port()
    address = f"127.0.0.1:{port}"
    queue = evp(
        "queue", "--port", str(port), "--data-dir", str(workdir / "data"),
        "--fsync", fsync, "--log-level", "WARNING", log=workdir / "queue.log",
    )
    try:
        wait_for_port(port, queue, timeout_s=10)
        processor = evp(
            "process", "--queue", address, "--shards", str(shards), "--node", "cpu",
            "--log-level", "WARNING", log=workdir / "process.log",
        )
        wait_members(address, shards)
        time.sleep(2)  # let the shards finish starting, so their start-up is not counted
        queue_before, shards_before = cpu_tree_s(queue.pid), cpu_tree_s(processor.pid)
        started = time.monotonic()
        publisher = subprocess.Popen(
            [sys.executable, "-m", "evp", "publish", "--queue", address,
             "--count", str(events), "--rate", f"{rate:g}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        handle = psutil.Process(publisher.pid)
        publisher_s = 0.0
        while publisher.poll() is None:
            try:
                publisher_s = process_cpu_s(handle)
            except psutil.Error:
                break
            time.sleep(0.05)
        snap = wait_lag_zero(address, events)
        elapsed_s = time.monotonic() - started
        queue_s = cpu_tree_s(queue.pid) - queue_before
        shards_s = cpu_tree_s(processor.pid) - shards_before
        processor.send_signal(signal.SIGTERM)
        processor.wait(timeout=60)
    finally:
        queue.send_signal(signal.SIGTERM)
        queue.wait(timeout=60)
    return {
        "rate": rate,
        "events": events,
        "shards": shards,
        "elapsed_s": round(elapsed_s, 2),
        "cpu_us_per_event": {
            "queue": round(queue_s / events * 1e6, 1),
            "shards": round(shards_s / events * 1e6, 1),
            # Sampled every 50 ms until it exits, so its last moments are missing.
            "publisher": round(publisher_s / events * 1e6, 1),
        },
        "latency_ms": snap["groups"][0]["latency"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=10_000, help="events/s; 0 is full speed")
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--fsync", default="batch", help="the queue's fsync policy")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="evp-cpu-") as tmp:
        print(json.dumps(measure(args.rate, args.events, args.shards, Path(tmp), args.fsync)))


if __name__ == "__main__":
    main()
