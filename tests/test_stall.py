"""A shard stopped with SIGSTOP while a publisher runs at 10,000 events/s for 60 s.

The slowest test of the suite: it publishes for a full minute on purpose, because a
memory bound only shows over time.
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
from conftest import background_publish, snapshot, wait_until
from test_faults import (
    group_snapshot,
    partitions_by_node,
    print_figures,
    shard_pids,
    start_processor,
)

RATE = "10000"
DURATION_S = "60"
# A generous bound on the queue's memory growth while one shard is stopped. The
# queue keeps a bounded tail per partition and caps each connection's send buffer at
# 4 MiB. So the growth stays far below this bound, whatever the backlog.
MAX_RSS_GROWTH_MB = 100


@pytest.mark.timeout(420)
def test_stopped_shard_bounded_memory(evp, tmp_path):
    partitions = 8
    queue, address = evp.queue(
        tmp_path / "data", None, "--partitions", str(partitions), "--session-timeout-ms", "3000"
    )
    start_processor(evp, address, tmp_path / "out-stopped", 1, "stopped", "--max-in-flight", "10000")
    start_processor(evp, address, tmp_path / "out-live", 2, "live")
    stopped_pid = shard_pids(evp.log("process-stopped"))[0][-1]
    queue_process = psutil.Process(queue.pid)
    rss_before = queue_process.memory_info().rss
    rss_max = rss_before

    with background_publish(
        "--queue", address, "--rate", RATE, "--duration", DURATION_S, "--keys", "10000"
    ) as publisher:
        wait_until(
            lambda: sum(topic["events"] for topic in snapshot(address)["topics"]) > 20_000,
            60,
            message="the publisher stored no events",
        )
        os.kill(stopped_pid, signal.SIGSTOP)
        try:
            moved = False
            while publisher.poll() is None:
                rss_max = max(rss_max, queue_process.memory_info().rss)
                if not moved:
                    owned = partitions_by_node(group_snapshot(address))
                    moved = list(owned) == ["live"] and len(owned["live"]) == partitions
                time.sleep(0.5)
            _, stderr_bytes = publisher.communicate(timeout=60)
            stderr = stderr_bytes.decode()
            assert publisher.returncode == 0, stderr
            assert moved, "the stopped shard's partitions did not move to the live shards"
            assert "member=stopped/shard-0" in evp.log("queue")
            assert "declaring it dead" in evp.log("queue")

            # Everything published reaches the live shards while the other is stopped.
            def caught_up() -> dict | None:
                group = group_snapshot(address)
                return group if group["lag"] == 0 else None

            group = wait_until(caught_up, 180, message="the live shards did not catch up")
            rss_max = max(rss_max, queue_process.memory_info().rss)
        finally:
            os.kill(stopped_pid, signal.SIGCONT)

    summary = next(line for line in stderr.splitlines() if line.startswith("sent="))
    figures = dict(field.split("=") for field in summary.split())
    stored = sum(topic["events"] for topic in snapshot(address)["topics"])
    growth_mb = (rss_max - rss_before) / 2**20
    assert int(figures["acknowledged"]) == int(figures["sent"])
    assert stored == int(figures["acknowledged"])
    assert growth_mb <= MAX_RSS_GROWTH_MB
    print_figures(
        "test_stopped_shard_bounded_memory",
        published=int(figures["sent"]),
        acknowledged=int(figures["acknowledged"]),
        publish_rate_per_s=int(figures["rate_per_s"]),
        processed=group["acked"],
        lost=stored - group["acked"],
        redelivered=group["redelivered"],
        queue_rss_before_mb=round(rss_before / 2**20),
        queue_rss_growth_mb=round(growth_mb),
    )
