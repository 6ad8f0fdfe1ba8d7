"""The statistics snapshot and /metrics of a running queue, checked against what ran."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from pathlib import Path

import orjson
import pytest
from conftest import free_port, snapshot, wait_until
from prometheus_client.parser import text_string_to_metric_families

HANDLERS = Path(__file__).with_name("handlers.py")


def group_of(address: str, name: str = "default") -> dict:
    groups = [group for group in snapshot(address)["groups"] if group["group"] == name]
    assert len(groups) == 1, groups
    return groups[0]


def publish(evp, address: str, count: int, *extra: str) -> None:
    result = evp.run("publish", "--queue", address, "--count", str(count), "--rate", "0", *extra)
    assert result.returncode == 0, result.stderr.decode()


def start_processor(evp, address: str, shards: int, *extra: str):
    process = evp.start(
        "process", "--queue", address, "--shards", str(shards), "--node", "t", *extra,
        log_name="process",
    )
    wait_until(
        lambda: any(len(g["members"]) == shards for g in snapshot(address)["groups"]),
        timeout_s=60,
        message=f"{shards} shards did not join",
    )
    return process


def write_lines(path: Path, events: list[dict]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(event) + b"\n" for event in events))
    return path


@pytest.mark.timeout(120)
def test_snapshot_matches_processing(evp):
    _, address = evp.queue()
    start_processor(evp, address, 2)
    publish(evp, address, 3000)
    wait_until(lambda: group_of(address)["lag"] == 0, message="lag did not reach 0")
    stats = snapshot(address)
    topic = stats["topics"][0]
    group = group_of(address)
    assert topic["events"] == 3000
    assert topic["events_in"] == 3000
    assert group["acked"] == 3000
    assert group["lag_seconds"] == 0.0
    assert group["stall"] is None
    assert sum(group["partition_lag"]) == 0
    wait_until(lambda: sum(m["processed"] for m in group_of(address)["members"]) == 3000, timeout_s=10)
    members = group_of(address)["members"]
    assert {member["node"] for member in members} == {"t"}
    assert all(member["pid"] > 0 for member in members)
    assert group_of(address)["latency"]["p50_ms"] is not None


@pytest.mark.timeout(120)
def test_lag_grows_while_shard_stopped(evp):
    _, address = evp.queue(None, None, "--session-timeout-ms", "60000")
    start_processor(evp, address, 1)
    pid = wait_until(lambda: group_of(address)["members"][0]["pid"], timeout_s=10)
    os.kill(pid, signal.SIGSTOP)
    try:
        publish(evp, address, 500)
        first = wait_until(lambda: group_of(address)["lag_seconds"] > 0 and group_of(address), timeout_s=10)
        time.sleep(1.5)
        second = group_of(address)
        assert first["lag"] > 0
        assert second["lag"] == first["lag"]
        assert second["lag_seconds"] > first["lag_seconds"]
        # The reason names the silent shard once it has missed three heartbeats.
        stalled = wait_until(
            lambda: (stall := group_of(address)["stall"]) and "heartbeat" in stall and stall,
            timeout_s=10,
        )
        assert "sent no heartbeat" in stalled
        assert "t/shard-0" in stalled
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: group_of(address)["lag"] == 0, message="lag did not reach 0 after SIGCONT")


@pytest.mark.timeout(60)
def test_stall_reason_no_members(evp):
    _, address = evp.queue()
    process = start_processor(evp, address, 1)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)
    publish(evp, address, 100)
    reason = wait_until(lambda: group_of(address)["stall"], timeout_s=10)
    assert "no shards are connected" in reason


@pytest.mark.timeout(90)
def test_stall_reason_in_flight_limit(evp, tmp_path):
    _, address = evp.queue()
    start_processor(
        evp, address, 1, "--handler", f"{HANDLERS}:blocking", "--max-in-flight", "5"
    )
    publish(evp, address, 50)
    reason = wait_until(lambda: group_of(address)["stall"], timeout_s=15)
    assert "in-flight limit" in reason
    member = group_of(address)["members"][0]
    assert member["in_flight"] == member["max_in_flight"] == 5


@pytest.mark.timeout(90)
def test_stall_reason_poison_event(evp, tmp_path):
    _, address = evp.queue()
    start_processor(evp, address, 1, "--handler", f"{HANDLERS}:poison_slowly")
    events = [{"id": f"e-{n}", "poison": n == 0} for n in range(5)]
    path = write_lines(tmp_path / "poison.jsonl", events)
    result = evp.run("publish", "--queue", address, "--file", str(path), "--rate", "0")
    assert result.returncode == 0, result.stderr.decode()
    reason = wait_until(
        lambda: (stall := group_of(address)["stall"]) and "retrying" in stall and stall,
        timeout_s=20,
    )
    assert "PoisonError" in reason
    assert "attempt" in reason


@pytest.mark.timeout(90)
def test_hot_key_reported(evp, tmp_path):
    _, address = evp.queue(None, None, "--partitions", "4")
    events = [{"id": f"e-{n}", "user": "hot" if n % 2 else f"cold-{n}"} for n in range(4000)]
    path = write_lines(tmp_path / "hot.jsonl", events)
    evp.start(
        "publish", "--queue", address, "--file", str(path), "--key-field", "user",
        "--rate", "1000", log_name="publish",
    )
    hot = wait_until(lambda: snapshot(address)["topics"] and snapshot(address)["topics"][0]["hot_keys"], timeout_s=15)
    assert hot[0]["key"] == "hot"
    assert hot[0]["share"] >= 0.2
    assert hot[0]["events_per_s"] > 0


@pytest.mark.timeout(120)
def test_metrics_agree_with_snapshot(evp):
    metrics_port = free_port()
    _, address = evp.queue(None, None, "--metrics-port", str(metrics_port))
    start_processor(evp, address, 2)
    publish(evp, address, 2000)
    wait_until(lambda: group_of(address)["lag"] == 0, message="lag did not reach 0")
    time.sleep(2.5)  # the metrics read the snapshot sampled once a second
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read()
    families = {family.name: family for family in text_string_to_metric_families(body.decode())}
    stats = snapshot(address)
    group = group_of(address)

    def value(name: str, suffix: str = "") -> float:
        samples = [s for s in families[name].samples if s.name == name + suffix]
        assert len(samples) == 1, samples
        return samples[0].value

    assert value("evp_events_in", "_total") == stats["topics"][0]["events_in"]
    assert value("evp_topic_events") == stats["topics"][0]["events"]
    assert value("evp_group_acked", "_total") == group["acked"]
    assert value("evp_group_lag_events") == 0
    assert value("evp_group_members") == 2
    partition_samples = families["evp_partition_lag_events"].samples
    assert len(partition_samples) == stats["topics"][0]["partitions"]
    latency = families["evp_processing_latency_seconds"].samples
    count = [s.value for s in latency if s.name.endswith("_count")]
    assert count and count[0] > 0
    infinity = [s.value for s in latency if s.labels.get("le") == "+Inf"]
    assert infinity == count


def test_hot_key_counts_bounded_for_long_keys():
    from evp.telemetry import MAX_COUNTED_KEY_BYTES, MAX_KEYS_COUNTED, KeyCounter

    counter = KeyCounter(partitions=4)
    for number in range(MAX_KEYS_COUNTED + 500):
        counter.add(b"%06d" % number + b"x" * 60_000, number % 4)
    assert len(counter.keys) == MAX_KEYS_COUNTED
    assert max(len(key) for key in counter.keys) == MAX_COUNTED_KEY_BYTES
    # A long key that is hot is still found, under its first bytes.
    counter.reset()
    hot = b"hot-" + b"y" * 70_000
    for _ in range(100):
        counter.add(hot, 1)
    found = counter.hot_keys(interval_s=1.0)
    assert len(found) == 1
    assert found[0]["key"] == hot[:MAX_COUNTED_KEY_BYTES].decode()
    assert found[0]["partition"] == 1
