"""`evp replay`, `evp tail`, `evp route` and `evp groups` against a real queue and processors."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import evp_command, snapshot, stop_cleanly, wait_until

from evp.hashing import partition_for

PARTITIONS = 4


# Helpers.


def ok(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def failure_message(result: subprocess.CompletedProcess[bytes]) -> str:
    """Return stderr of a run that must fail with exit code 2 and no traceback."""
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert "Traceback" not in stderr
    return stderr


def as_json(evp, address: str, *args: str) -> Any:
    return orjson.loads(ok(evp.run(*args, "--queue", address, "--json")))


def publish_lines(evp, address: str, topic: str, rows: list[dict[str, Any]], key_field: str = "user") -> None:
    data = b"".join(orjson.dumps(row) + b"\n" for row in rows)
    result = evp.run(
        "publish", "--queue", address, "--topic", topic, "--file", "-", "--key-field", key_field,
        "--rate", "0", input=data,
    )
    ok(result)


def batch(name: str, count: int) -> list[dict[str, Any]]:
    return [{"id": f"{name}-{index}", "batch": name, "user": f"user-{index % 5}"} for index in range(count)]


def start_processor(evp, address: str, topic: str, output: Path, node: str = "t", shards: int = 1):
    process = evp.start(
        "process", "--queue", address, "--topic", topic, "--group", "g", "--shards", str(shards),
        "--node", node, "--output", str(output), log_name=f"process-{node}",
    )
    wait_until(
        lambda: any(
            g["group"] == "g" and g["topic"] == topic and len(g["members"]) == shards
            for g in snapshot(address)["groups"]
        ),
        timeout_s=60,
        message="the processor did not join",
    )
    return process


def output_rows(output: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(output.glob("shard-*.jsonl")):
        rows.extend(orjson.loads(line) for line in path.read_bytes().splitlines())
    return rows


def process_until(evp, address: str, topic: str, output: Path, count: int) -> list[dict[str, Any]]:
    """Run one processor until its output has `count` rows and the group has no lag."""
    processor = start_processor(evp, address, topic, output)
    wait_until(lambda: len(output_rows(output)) >= count, timeout_s=60, message="events not processed")
    wait_until(
        lambda: all(g["lag"] == 0 for g in snapshot(address)["groups"] if g["topic"] == topic),
        timeout_s=30,
    )
    stop_cleanly(processor)
    return output_rows(output)


def create_topic(evp, address: str, topic: str, partitions: int = PARTITIONS) -> None:
    ok(evp.run("topics", "create", topic, "--partitions", str(partitions), "--queue", address))


def group_positions(evp, address: str, topic: str) -> dict[str, list[int]]:
    rows = as_json(evp, address, "groups", "--topic", topic)
    return {row["group"]: row["positions"] for row in rows}


# evp replay.


@pytest.mark.timeout(180)
def test_replay_from_time_reprocesses_second_batch(evp, tmp_path):
    _, address = evp.queue()
    create_topic(evp, address, "events")
    publish_lines(evp, address, "events", batch("first", 20))
    # Records carry the publisher's clock; the pause puts the boundary strictly
    # between the two batches.
    time.sleep(0.3)
    boundary = datetime.now(UTC).isoformat()
    time.sleep(0.3)
    publish_lines(evp, address, "events", batch("second", 20))
    first_run = process_until(evp, address, "events", tmp_path / "out1", 40)
    assert len(first_run) == 40

    replayed = evp.run("replay", "--topic", "events", "--group", "g", "--from-time", boundary, "--queue", address)
    text = ok(replayed)
    assert " -> " in text
    rows = as_json(evp, address, "groups", "--topic", "events")
    assert rows[0]["lag"] == 20

    second_run = process_until(evp, address, "events", tmp_path / "out2", 20)
    assert sorted(row["event"]["id"] for row in second_run) == sorted(row["id"] for row in batch("second", 20))


@pytest.mark.timeout(120)
def test_replay_rejected_while_processing(evp, tmp_path):
    _, address = evp.queue()
    create_topic(evp, address, "events")
    processor = start_processor(evp, address, "events", tmp_path / "out", node="busy")
    refused = evp.run("replay", "--topic", "events", "--group", "g", "--from-start", "--queue", address)
    message = failure_message(refused)
    assert "group 'g'" in message
    assert "busy/shard-0" in message
    stop_cleanly(processor)
    allowed = evp.run("replay", "--topic", "events", "--group", "g", "--from-start", "--queue", address)
    ok(allowed)


@pytest.mark.timeout(120)
def test_replay_positions_survive_kill(evp, tmp_path):
    data = tmp_path / "data"
    queue, address = evp.queue(data)
    create_topic(evp, address, "events")
    publish_lines(evp, address, "events", batch("a", 40))
    moved = ok(evp.run("replay", "--topic", "events", "--group", "g", "--to-end", "--queue", address))
    assert "group g of topic events is new" in moved
    ends = [row["next_offset"] for row in as_json(evp, address, "topics", "describe", "events")["partitions"]]
    assert group_positions(evp, address, "events") == {"g": ends}

    # SIGKILL right after the command returns: the positions must already be on disk.
    queue.send_signal(signal.SIGKILL)
    queue.wait(timeout=30)
    _, address = evp.queue(data)
    assert group_positions(evp, address, "events") == {"g": ends}

    ok(evp.run("replay", "--topic", "events", "--group", "g", "--from-offset", "2", "--partition", "1", "--queue", address))
    expected = list(ends)
    expected[1] = 2
    assert group_positions(evp, address, "events") == {"g": expected}


@pytest.mark.timeout(60)
def test_replay_clamps_offset_beyond_end(evp, tmp_path):
    _, address = evp.queue()
    create_topic(evp, address, "events", partitions=1)
    publish_lines(evp, address, "events", batch("a", 5))
    result = evp.run("replay", "--topic", "events", "--group", "g", "--from-offset", "99", "--queue", address)
    text = ok(result)
    assert "offset 99 is beyond the end 5; using 5" in text
    assert "partition 0: 0 -> 5" in text
    assert group_positions(evp, address, "events") == {"g": [5]}


@pytest.mark.timeout(90)
def test_replay_clamps_offset_below_retained(evp, tmp_path):
    # Small segments and 1.8 s of retention: the oldest segments go while no group
    # protects them.
    _, address = evp.queue(None, None, "--segment-bytes", "4096", "--retention-hours", "0.0005")
    create_topic(evp, address, "events", partitions=1)
    for part in range(4):
        publish_lines(evp, address, "events", batch(f"p{part}", 60))
    wait_until(
        lambda: as_json(evp, address, "topics", "describe", "events")["partitions"][0]["first_offset"] > 0,
        timeout_s=30,
        message="retention deleted no segment",
    )
    text = ok(evp.run("replay", "--topic", "events", "--group", "g", "--from-offset", "0", "--queue", address))
    # Retention may delete more segments until the group exists, so the clamped offset
    # is read from the message and checked against the state afterwards.
    match = re.search(r"offset 0 is below the first retained offset (\d+); using (\d+)", text)
    assert match, text
    first = int(match.group(1))
    assert first > 0
    assert int(match.group(2)) == first
    assert group_positions(evp, address, "events") == {"g": [first]}
    # The group now protects its unprocessed segments from retention.
    assert as_json(evp, address, "topics", "describe", "events")["partitions"][0]["first_offset"] == first


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give exactly one of"),
        (["--from-start", "--to-end"], "got --from-start, --to-end"),
        (["--from-time", "yesterday"], "invalid time 'yesterday'"),
        (["--from-start", "--topic", "missing"], "topic 'missing' not found"),
        (["--from-start", "--partition", "9"], "invalid partition 9"),
    ],
)
def test_replay_invalid_input(evp, args, message):
    _, address = evp.queue()
    create_topic(evp, address, "events")
    result = evp.run("replay", "--group", "g", *args, "--queue", address)
    assert message in failure_message(result)


# evp groups.


@pytest.mark.timeout(60)
def test_groups_detail_per_partition(evp, tmp_path):
    _, address = evp.queue()
    create_topic(evp, address, "events")
    publish_lines(evp, address, "events", batch("a", 12))
    ok(evp.run("replay", "--topic", "events", "--group", "g", "--from-start", "--queue", address))
    rows = as_json(evp, address, "groups", "--topic", "events")
    partitions = rows[0]["partitions"]
    assert [row["partition"] for row in partitions] == list(range(PARTITIONS))
    assert sum(row["lag"] for row in partitions) == 12
    assert all(row["position"] == 0 and row["owner"] is None for row in partitions)
    detail = evp.run("groups", "--topic", "events", "--detail", "--queue", address)
    assert "Group g of topic events" in ok(detail)


# evp tail.


def tail_lines(evp, address: str, *args: str) -> list[dict[str, Any]]:
    text = ok(evp.run("tail", "--queue", address, *args))
    return [orjson.loads(line) for line in text.splitlines()]


@pytest.mark.timeout(120)
def test_tail_key_and_follow(evp, tmp_path):
    _, address = evp.queue()
    create_topic(evp, address, "events")
    rows = batch("a", 30)
    publish_lines(evp, address, "events", rows)
    ok(evp.run("replay", "--topic", "events", "--group", "g", "--from-start", "--queue", address))
    positions_before = group_positions(evp, address, "events")

    wanted = [row for row in rows if row["user"] == "user-3"]
    lines = tail_lines(evp, address, "--key", "user-3", "--from-start")
    assert [line["event"] for line in lines] == wanted
    assert {line["key"] for line in lines} == {"user-3"}
    assert {line["partition"] for line in lines} == {partition_for(b"user-3", PARTITIONS)}
    assert [line["offset"] for line in lines] == sorted(line["offset"] for line in lines)
    assert tail_lines(evp, address, "--key", "user-3", "--last", "2", "--events-only") == wanted[-2:]
    assert len(tail_lines(evp, address, "--from-start")) == 30
    assert len(tail_lines(evp, address)) == 10

    output = tmp_path / "follow.jsonl"
    with output.open("wb") as sink:
        follower = subprocess.Popen(
            evp_command("tail", "--queue", address, "--key", "user-3", "--from-start", "--follow", "--interval", "0.1"),
            stdout=sink,
            stderr=subprocess.DEVNULL,
        )
    try:
        def followed() -> list[dict[str, Any]]:
            return [orjson.loads(line)["event"] for line in output.read_bytes().splitlines()]

        wait_until(lambda: len(followed()) == len(wanted), timeout_s=30, message="tail did not catch up")
        late = [{"id": "late-other", "user": "user-4"}, {"id": "late", "user": "user-3"}]
        publish_lines(evp, address, "events", late)
        wait_until(lambda: len(followed()) > len(wanted), timeout_s=30, message="tail --follow missed the new event")
        assert followed() == wanted + [late[1]]
    finally:
        follower.send_signal(signal.SIGINT)
        follower.wait(timeout=30)
    # Reading never moves or creates a group.
    assert group_positions(evp, address, "events") == positions_before


@pytest.mark.timeout(120)
def test_tail_follow_survives_queue_restart(evp, tmp_path):
    data = tmp_path / "data"
    queue, address = evp.queue(data)
    create_topic(evp, address, "events")
    publish_lines(evp, address, "events", [{"id": "before", "user": "user-1"}])
    output = tmp_path / "follow.jsonl"
    with output.open("wb") as sink:
        follower = subprocess.Popen(
            evp_command("tail", "--queue", address, "--from-start", "--follow", "--interval", "0.1", "--events-only"),
            stdout=sink,
            stderr=subprocess.DEVNULL,
        )
    try:
        def followed() -> list[str]:
            return [orjson.loads(line)["id"] for line in output.read_bytes().splitlines()]

        wait_until(lambda: followed() == ["before"], timeout_s=30, message="tail did not start")
        queue.send_signal(signal.SIGTERM)
        assert queue.wait(timeout=30) == 0
        _, address = evp.queue(data, int(address.rsplit(":", 1)[1]))
        publish_lines(evp, address, "events", [{"id": "after", "user": "user-1"}])
        wait_until(lambda: len(followed()) > 1, timeout_s=30, message="tail stopped following")
        assert followed() == ["before", "after"]
        assert follower.poll() is None
    finally:
        follower.send_signal(signal.SIGINT)
        follower.wait(timeout=30)


@pytest.mark.timeout(60)
def test_tail_partition_and_offset(evp, tmp_path):
    _, address = evp.queue()
    create_topic(evp, address, "events")
    publish_lines(evp, address, "events", batch("a", 40))
    lines = tail_lines(evp, address, "--partition", "2", "--from-offset", "3")
    assert lines
    assert {line["partition"] for line in lines} == {2}
    assert lines[0]["offset"] == 3
    beyond = evp.run("tail", "--queue", address, "--partition", "2", "--from-offset", "1000")
    assert beyond.returncode == 0
    assert beyond.stdout == b""
    assert "beyond the end" in beyond.stderr.decode()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--topic", "missing"], "topic 'missing' not found"),
        (["--partition", "7"], "invalid --partition 7"),
        (["--key", "user-3", "--partition", "3"], "drop --partition"),
        (["--from-start", "--last", "3"], "at most one of"),
    ],
)
def test_tail_invalid_input(evp, args, message):
    _, address = evp.queue()
    create_topic(evp, address, "events")
    if "--partition" in args and "--key" in args:
        # Pick a partition that is not the key's, whatever the hash returns.
        args = ["--key", "user-3", "--partition", str((partition_for(b"user-3", PARTITIONS) + 1) % PARTITIONS)]
    result = evp.run("tail", "--queue", address, *args)
    assert message in failure_message(result)


# evp route.


@pytest.mark.timeout(120)
def test_route_matches_processing_shard(evp, tmp_path):
    _, address = evp.queue()
    create_topic(evp, address, "events", partitions=8)
    output = tmp_path / "out"
    processor = start_processor(evp, address, "events", output, node="rt", shards=2)
    publish_lines(evp, address, "events", batch("a", 40))
    wait_until(lambda: len(output_rows(output)) >= 40, timeout_s=60, message="events not processed")

    for key in ("user-0", "user-1", "user-2", "user-3", "user-4"):
        routed = as_json(evp, address, "route", key, "--topic", "events", "--group", "g")
        owner = routed["groups"][0]["owner"]
        assert owner is not None
        shard = owner.rsplit("-", 1)[1]
        written = [
            orjson.loads(line)
            for line in (output / f"shard-{shard}.jsonl").read_bytes().splitlines()
        ]
        mine = [row for row in written if row["key"] == key]
        assert mine, f"{key} is routed to {owner}, which processed none of its events"
        assert {row["partition"] for row in mine} == {routed["partition"]}
        assert routed["partition"] == partition_for(key.encode(), 8)
        text = ok(evp.run("route", key, "--topic", "events", "--queue", address))
        assert f"partition {routed['partition']} of 8" in text
        assert f"group g: {owner}" in text
    stop_cleanly(processor)
    stopped = ok(evp.run("route", "user-0", "--topic", "events", "--queue", address))
    assert "no member owns it now" in stopped


# The records.read operation behind evp tail.


def read_records(address: str, args: dict[str, Any]) -> Any:
    import asyncio

    from evp.client import admin_request

    return asyncio.run(admin_request(address, "records.read", args))


@pytest.mark.timeout(60)
def test_records_read_bounded_batches(evp, tmp_path):
    _, address = evp.queue()
    create_topic(evp, address, "events", partitions=1)
    publish_lines(evp, address, "events", batch("a", 30))
    positions = {"0": 0}
    seen = []
    calls = 0
    while positions["0"] < 30:
        result = read_records(address, {"topic": "events", "positions": positions, "max_records": 7})
        assert len(result["records"]) <= 7
        assert result["ends"] == {"0": 30}
        seen.extend(orjson.loads(row["value"])["id"] for row in result["records"])
        positions = result["positions"]
        calls += 1
    assert calls == 5
    assert seen == [row["id"] for row in batch("a", 30)]
    one = read_records(address, {"topic": "events", "positions": {"0": 0}, "max_bytes": 1})
    assert len(one["records"]) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"topic": "events"}, "missing positions"),
        ({"topic": "events", "positions": {"9": 0}}, "invalid partition 9"),
        ({"topic": "events", "positions": {"0": -1}}, "invalid offset -1"),
        ({"topic": "nope", "positions": {"0": 0}}, "topic 'nope' not found"),
        ({"topic": "events", "positions": {"0": 0}, "key": 5}, "invalid key 5"),
    ],
)
def test_records_read_invalid_args(evp, args, message):
    from evp.client import ServerError

    _, address = evp.queue()
    create_topic(evp, address, "events", partitions=1)
    with pytest.raises(ServerError, match=message):
        read_records(address, args)


@pytest.mark.parametrize(
    ("key", "pattern"),
    [
        (b"\xff\xfe", "is not valid UTF-8"),
        (b"k" * 65_536, "65536 bytes in UTF-8, over the limit of 65535 bytes"),
    ],
    ids=["not-utf8", "too-long"],
)
def test_route_and_tail_reject_impossible_key(evp, key, pattern):
    _, address = evp.queue()
    for args in (("route", key), ("tail", "--key", key)):
        stderr = failure_message(evp.run(*args, "--queue", address))
        assert pattern in stderr, (args[0], stderr)
