"""Retention and topic administration against a real queue with small segments."""

from __future__ import annotations

import signal
from pathlib import Path

import orjson
import pytest
from conftest import snapshot, stop_cleanly, wait_until

HANDLERS = Path(__file__).with_name("handlers.py")

# 1.8 s: short enough for a test, long enough that segments outlive one check.
RETENTION_HOURS = "0.0005"
SEGMENT_BYTES = "4096"


def admin(evp, address: str, *args: str) -> object:
    result = evp.run(*args, "--queue", address, "--json")
    assert result.returncode == 0, result.stderr.decode()
    return orjson.loads(result.stdout)


def describe(evp, address: str, topic: str) -> dict:
    return admin(evp, address, "topics", "describe", topic)  # type: ignore[return-value]


def publish(evp, address: str, topic: str, count: int) -> None:
    # A held rate sends many small batches; one batch always lands in one segment, so
    # a single large batch would not roll segments.
    result = evp.run(
        "publish", "--queue", address, "--topic", topic, "--count", str(count), "--rate", "3000"
    )
    assert result.returncode == 0, result.stderr.decode()


def run_processor(evp, address: str, topic: str, output: Path):
    process = evp.start(
        "process", "--queue", address, "--topic", topic, "--group", "g", "--shards", "1",
        "--node", "r", "--output", str(output), log_name="process",
    )
    wait_until(
        lambda: any(g["group"] == "g" and g["members"] for g in snapshot(address)["groups"]),
        timeout_s=60,
        message="the processor did not join",
    )
    return process


def output_offsets(output: Path) -> list[int]:
    offsets = []
    for path in output.glob("shard-*.jsonl"):
        offsets.extend(orjson.loads(line)["offset"] for line in path.read_bytes().splitlines())
    return sorted(offsets)


@pytest.mark.timeout(120)
def test_retention_waits_for_groups(evp, tmp_path):
    _, address = evp.queue(None, None, "--segment-bytes", SEGMENT_BYTES)
    created = evp.run(
        "topics", "create", "short", "--partitions", "1", "--retention-hours", RETENTION_HOURS,
        "--queue", address,
    )
    assert created.returncode == 0, created.stderr.decode()
    stop_cleanly(run_processor(evp, address, "short", tmp_path / "out"))
    publish(evp, address, "short", 300)
    before = describe(evp, address, "short")["partitions"][0]
    assert before["segments"] > 2

    # The group has processed nothing, so expired segments stay.
    wait_until(lambda: snapshot(address)["uptime_s"] > 4, timeout_s=10)
    held = describe(evp, address, "short")["partitions"][0]
    assert held["first_offset"] == 0
    assert held["segments"] == before["segments"]

    processor = run_processor(evp, address, "short", tmp_path / "out")
    wait_until(
        lambda: describe(evp, address, "short")["partitions"][0]["first_offset"] > 0,
        timeout_s=20,
        message="processed segments were not deleted",
    )
    stop_cleanly(processor)
    after = describe(evp, address, "short")
    assert after["partitions"][0]["segments"] >= 1
    assert after["partitions"][0]["next_offset"] == 300
    assert after["groups"][0]["lost_to_retention"] == 0
    assert output_offsets(tmp_path / "out") == list(range(300))


@pytest.mark.timeout(120)
def test_disk_limit_deletes_and_counts(evp, tmp_path):
    _, address = evp.queue(
        None, None, "--segment-bytes", SEGMENT_BYTES, "--max-disk-bytes", "20000"
    )
    created = evp.run("topics", "create", "capped", "--partitions", "1", "--queue", address)
    assert created.returncode == 0, created.stderr.decode()
    stop_cleanly(run_processor(evp, address, "capped", tmp_path / "out"))
    publish(evp, address, "capped", 600)

    described = wait_until(
        lambda: (d := describe(evp, address, "capped"))["partitions"][0]["bytes"] <= 20000 and d,
        timeout_s=20,
        message="the disk limit was not enforced",
    )
    first = described["partitions"][0]["first_offset"]
    assert first > 0
    assert described["groups"][0]["lost_to_retention"] == first
    group = [g for g in snapshot(address)["groups"] if g["topic"] == "capped"][0]
    assert group["lost_to_retention"] == first
    assert group["committed"] == [first]

    processor = run_processor(evp, address, "capped", tmp_path / "out")
    wait_until(
        lambda: [g for g in snapshot(address)["groups"] if g["topic"] == "capped"][0]["lag"] == 0,
        timeout_s=30,
    )
    stop_cleanly(processor)
    assert output_offsets(tmp_path / "out") == list(range(first, 600))


@pytest.mark.timeout(120)
def test_offsets_continue_after_restart(evp, tmp_path):
    data = tmp_path / "data"
    queue, address = evp.queue(data, None, "--segment-bytes", SEGMENT_BYTES, "--max-disk-bytes", "20000")
    evp.run("topics", "create", "roll", "--partitions", "1", "--queue", address)
    publish(evp, address, "roll", 600)
    wait_until(lambda: describe(evp, address, "roll")["partitions"][0]["first_offset"] > 0, timeout_s=20)
    queue.send_signal(signal.SIGTERM)
    assert queue.wait(timeout=30) == 0

    _, address = evp.queue(data, None, "--segment-bytes", SEGMENT_BYTES)
    first = describe(evp, address, "roll")["partitions"][0]
    assert first["next_offset"] == 600
    publish(evp, address, "roll", 1)
    assert describe(evp, address, "roll")["partitions"][0]["next_offset"] == 601


@pytest.mark.timeout(60)
def test_topic_commands(evp, tmp_path):
    data = tmp_path / "data"
    _, address = evp.queue(data)
    created = evp.run("topics", "create", "orders", "--partitions", "8", "--retention-bytes", "1000000", "--queue", address)
    assert created.returncode == 0, created.stderr.decode()
    duplicate = evp.run("topics", "create", "orders", "--queue", address)
    assert duplicate.returncode == 2
    assert "already exists" in duplicate.stderr.decode()
    publish(evp, address, "orders", 50)

    listed = {row["name"]: row for row in admin(evp, address, "topics", "list")}
    assert listed["orders"]["partitions"] == 8
    assert listed["orders"]["events"] == 50
    assert listed["orders"]["oldest_event_time"] is not None
    assert listed["orders"]["retention"]["max_partition_bytes"] == 1000000
    described = describe(evp, address, "orders")
    assert sum(p["events"] for p in described["partitions"]) == 50

    unconfirmed = evp.run("topics", "delete", "orders", "--queue", address)
    assert unconfirmed.returncode == 2
    assert (data / "topics" / "orders").is_dir()
    deleted = evp.run("topics", "delete", "orders", "--yes", "--queue", address)
    assert deleted.returncode == 0, deleted.stderr.decode()
    assert not (data / "topics" / "orders").exists()
    missing = evp.run("topics", "describe", "orders", "--queue", address)
    assert missing.returncode == 2
    assert "not found" in missing.stderr.decode()


@pytest.mark.timeout(90)
def test_group_commands(evp, tmp_path):
    _, address = evp.queue()
    processor = run_processor(evp, address, "events", tmp_path / "out")
    publish(evp, address, "events", 20)
    busy = evp.run("groups", "delete", "g", "--topic", "events", "--queue", address)
    assert busy.returncode == 2
    assert "stop its processors first" in busy.stderr.decode()
    stop_cleanly(processor)

    rows = admin(evp, address, "groups")
    assert [(row["topic"], row["group"], row["members"]) for row in rows] == [("events", "g", [])]
    deleted = evp.run("groups", "delete", "g", "--topic", "events", "--queue", address)
    assert deleted.returncode == 0, deleted.stderr.decode()
    assert admin(evp, address, "groups") == []


@pytest.mark.timeout(120)
def test_disk_limit_with_busy_shard(evp, tmp_path):
    _, address = evp.queue(
        None, None, "--segment-bytes", SEGMENT_BYTES, "--max-disk-bytes", "30000"
    )
    evp.run("topics", "create", "busy", "--partitions", "2", "--queue", address)
    output = tmp_path / "out"
    processor = evp.start(
        "process", "--queue", address, "--topic", "busy", "--group", "g", "--shards", "1",
        "--node", "b", "--output", str(output), "--handler", f"{HANDLERS}:slow",
        "--max-in-flight", "200", log_name="process",
    )
    wait_until(
        lambda: any(g["group"] == "g" and g["members"] for g in snapshot(address)["groups"]),
        timeout_s=60,
    )
    publish(evp, address, "busy", 3000)

    def group() -> dict:
        return [g for g in snapshot(address)["groups"] if g["topic"] == "busy"][0]

    # The shard held events whose segments the limit deleted; the group must still
    # reach the end instead of waiting for acknowledgements that cannot count.
    wait_until(lambda: group()["lag"] == 0, timeout_s=60, message="the group stopped moving")
    lost = group()["lost_to_retention"]
    assert lost > 0
    member = group()["members"][0]
    assert member["in_flight"] <= member["max_in_flight"]
    stop_cleanly(processor)
    assert group()["lost_to_retention"] == lost
    processed = {orjson.loads(line)["offset"] for path in output.glob("*.jsonl") for line in path.read_bytes().splitlines()}
    assert len(processed) + lost >= 3000


@pytest.mark.timeout(90)
def test_topic_delete_refused_while_consumed(evp, tmp_path):
    _, address = evp.queue()
    processor = run_processor(evp, address, "inuse", tmp_path / "out")
    refused = evp.run("topics", "delete", "inuse", "--yes", "--queue", address)
    assert refused.returncode == 2
    assert "has connected processors" in refused.stderr.decode()
    stop_cleanly(processor)
    deleted = evp.run("topics", "delete", "inuse", "--yes", "--queue", address)
    assert deleted.returncode == 0, deleted.stderr.decode()
