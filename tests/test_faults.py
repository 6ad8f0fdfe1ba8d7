"""Fault injection against real evp processes: kill -9, torn log tails, drains.

Most tests check the at-least-once contract from the outside: each event that the
queue acknowledged ends up in some shard's output file, whatever was killed on the way.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
from conftest import background_publish, snapshot, wait_for_node, wait_until

from evp import protocol, records
from evp.client import connect

START_TIMEOUT_S = 60.0
CATCH_UP_TIMEOUT_S = 120.0
HANDLERS = Path(__file__).with_name("handlers.py")


# Helpers.


def write_events(path: Path, count: int, prefix: str, users: int = 40) -> list[str]:
    """Write `count` JSON lines with unique ids and the key field `user`, and return the ids."""
    ids = [f"{prefix}-{number:05d}" for number in range(count)]
    with path.open("wb") as file:
        for number, event_id in enumerate(ids):
            event = {"id": event_id, "user": f"user-{number % users}", "pad": "x" * 64}
            file.write(orjson.dumps(event) + b"\n")
    return ids


# The publish rate of the fault tests that publish a file: several thousand events per
# second, so that faults meet a queue that is busy writing.
FAULT_RATE = "5000"


def publish_file(evp: Any, address: str, path: Path, rate: str = "0") -> None:
    result = evp.run(
        "publish", "--queue", address, "--file", str(path), "--key-field", "user", "--rate", rate
    )
    assert result.returncode == 0, result.stderr.decode()


def print_figures(test: str, **figures: int) -> None:
    """Print one line of figures (events published, acknowledged, processed...).

    `pytest -s` shows the line; docs/reliability.md quotes it.
    """
    fields = " ".join(f"{name}={value}" for name, value in figures.items())
    print(f"\nfigures test={test} {fields}")


def output_ids(*directories: Path) -> list[str]:
    """Return the `id` of every row in the shard output files, duplicates included."""
    ids = []
    for directory in directories:
        for path in sorted(directory.glob("shard-*.jsonl")):
            with path.open("rb") as file:
                ids.extend(orjson.loads(line)["event"]["id"] for line in file)
    return ids


def group_snapshot(address: str) -> dict[str, Any] | None:
    groups = snapshot(address)["groups"]
    return groups[0] if groups else None


def start_processor(
    evp: Any, address: str, output: Path, shards: int, node: str, *extra: str,
    new_session: bool = False,
) -> subprocess.Popen[bytes]:
    """Start `evp process` and wait until its shards are members of the group.

    With `new_session`, it leads a process group of its own, as in a terminal.
    """
    process = evp.start(
        "process",
        "--queue", address,
        "--shards", str(shards),
        "--output", str(output),
        "--node", node,
        *extra,
        log_name=f"process-{node}",
        start_new_session=new_session,
    )
    wait_for_node(evp, process, f"process-{node}", address, node, shards, timeout_s=START_TIMEOUT_S)
    return process


def wait_for_lag_zero(address: str) -> dict[str, Any]:
    def caught_up() -> dict[str, Any] | None:
        group = group_snapshot(address)
        return group if group is not None and group["lag"] == 0 else None

    return wait_until(caught_up, CATCH_UP_TIMEOUT_S, message="the group did not reach lag 0")


def stop(process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=timeout_s)


def shard_pids(log: str) -> dict[int, list[int]]:
    """Map each shard index to the pids the supervisor logged for it, oldest first."""
    pids: dict[int, list[int]] = {}
    for index, pid in re.findall(r"started shard-(\d+) pid=(\d+)", log):
        pids.setdefault(int(index), []).append(int(pid))
    return pids


# Durability across kill -9 of the queue.

# Batches of this many events, and this many batches unacknowledged at once, so that a
# kill always lands while some batches are written but not yet acknowledged.
BATCH_EVENTS = 100
WINDOW_BATCHES = 20
KILL_AFTER_ACKED = 4000


class RecordingPublisher:
    """A raw protocol client that records which event ids the queue acknowledged."""

    def __init__(self, address: str, prefix: str) -> None:
        self.address = address
        self.prefix = prefix
        self.acked_ids: set[str] = set()
        self.pending: dict[int, list[str]] = {}
        self.errors: list[protocol.Error] = []
        self.miscounted_seqs: list[int] = []
        self.unacked_at_kill = 0

    def on_frame(self, frame: protocol.Frame) -> None:
        if isinstance(frame, protocol.Published):
            # An assert here would only reach the event loop's exception handler.
            ids = self.pending.pop(frame.seq, [])
            if frame.count != len(ids):
                self.miscounted_seqs.append(frame.seq)
            self.acked_ids.update(ids)
        elif isinstance(frame, protocol.Error):
            self.errors.append(frame)

    def batch(self, seq: int) -> tuple[list[str], bytes]:
        ids = [f"{self.prefix}-{seq:05d}-{index:03d}" for index in range(BATCH_EVENTS)]
        timestamp_us = time.time_ns() // 1000
        entries = []
        for index, event_id in enumerate(ids):
            value = orjson.dumps({"id": event_id, "pad": "y" * 64})
            entries.append((f"key-{index % 50}".encode(), value, timestamp_us))
        return ids, protocol.encode_publish(seq, "events", entries)

    async def run_until_killed(self, queue_pid: int, timeout_s: float = 60.0) -> None:
        """Publish, kill -9 the queue once KILL_AFTER_ACKED events are acknowledged and
        half the window is unacknowledged, then keep sending until the connection drops."""
        connection, _ = await connect(self.address, self.on_frame)
        deadline = time.monotonic() + timeout_s
        seq = 0
        killed = False
        while not connection.is_closed:
            assert time.monotonic() < deadline, "the connection did not close after the kill"
            enough_acked = len(self.acked_ids) >= KILL_AFTER_ACKED
            if not killed and enough_acked and len(self.pending) >= WINDOW_BATCHES // 2:
                self.unacked_at_kill = len(self.pending)
                os.kill(queue_pid, signal.SIGKILL)
                killed = True
            if len(self.pending) >= WINDOW_BATCHES:
                await asyncio.sleep(0.001)
                continue
            seq += 1
            ids, frame = self.batch(seq)
            self.pending[seq] = ids
            connection.send(frame)
            await asyncio.sleep(0)
        connection.close()


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("fsync", "kills"), [("batch", 2), ("always", 1)])
def test_acknowledged_survive_kill(evp, tmp_path, fsync, kills):
    data_dir = tmp_path / "data"
    port = None
    acked: set[str] = set()
    for round_number in range(kills):
        queue, address = evp.queue(data_dir, port, "--fsync", fsync)
        port = int(address.rsplit(":", 1)[1])
        client = RecordingPublisher(address, f"round{round_number}")
        asyncio.run(client.run_until_killed(queue.pid))
        assert queue.wait(timeout=10) == -signal.SIGKILL
        assert client.errors == []
        assert client.miscounted_seqs == []
        assert len(client.acked_ids) >= KILL_AFTER_ACKED
        assert client.unacked_at_kill > 0
        acked |= client.acked_ids

    _, address = evp.queue(data_dir, port, "--fsync", fsync)
    stored = sum(topic["events"] for topic in snapshot(address)["topics"])
    assert stored >= len(acked)
    output = tmp_path / "out"
    start_processor(evp, address, output, 2, "durable")
    wait_for_lag_zero(address)
    missing = acked - set(output_ids(output))
    assert sorted(missing)[:10] == []


# Torn tail of the active segment.

RECORD_PREFIX = struct.Struct(">II")  # crc, length of the rest
RECORD_BODY = records.BODY_HEADER  # offset, timestamp, producer, sequence, key length


def last_record(segment: Path) -> tuple[int, int, bytes]:
    """Return (start byte, size in bytes, value) of the last record in a segment file."""
    data = segment.read_bytes()
    position = 0
    start = size = 0
    while position < len(data):
        _, length = RECORD_PREFIX.unpack_from(data, position)
        start, size = position, RECORD_PREFIX.size + length
        position += size
    assert position == len(data), f"{segment} does not end on a record boundary"
    body = data[start + RECORD_PREFIX.size : start + size]
    key_bytes = RECORD_BODY.unpack_from(body)[-1]
    return start, size, body[RECORD_BODY.size + key_bytes :]


def record_starts(segment: Path) -> list[int]:
    """Return the start byte of every record in a segment file."""
    data = segment.read_bytes()
    starts = []
    position = 0
    while position < len(data):
        starts.append(position)
        _, length = RECORD_PREFIX.unpack_from(data, position)
        position += RECORD_PREFIX.size + length
    assert position == len(data), f"{segment} does not end on a record boundary"
    return starts


def record_value(segment: Path, start: int) -> bytes:
    data = segment.read_bytes()
    _, length = RECORD_PREFIX.unpack_from(data, start)
    body = data[start + RECORD_PREFIX.size : start + RECORD_PREFIX.size + length]
    key_bytes = RECORD_BODY.unpack_from(body)[-1]
    return body[RECORD_BODY.size + key_bytes :]


def first_partition_segment(data_dir: Path, partitions: int) -> Path:
    partition_dirs = sorted((data_dir / "topics" / "events").glob("[0-9]" * 5))
    assert len(partition_dirs) == partitions
    segment = sorted(partition_dirs[0].glob("*.log"))[-1]
    assert re.fullmatch(r"\d{20}\.log", segment.name)
    return segment


TORN_EVENTS = 10_000


@pytest.mark.timeout(180)
@pytest.mark.parametrize("cut", ["header", "body", "last_byte"])
def test_torn_tail_recovered(evp, tmp_path, cut):
    data_dir = tmp_path / "data"
    ids = write_events(tmp_path / "input.jsonl", TORN_EVENTS, "torn")
    queue, address = evp.queue(data_dir, None, "--partitions", "4")
    port = int(address.rsplit(":", 1)[1])
    publish_file(evp, address, tmp_path / "input.jsonl", FAULT_RATE)
    assert stop(queue) == 0

    segment = first_partition_segment(data_dir, 4)
    start, size, value = last_record(segment)
    torn_id = orjson.loads(value)["id"]
    # A record header is 42 bytes, so keeping 10 bytes tears the header and keeping half
    # of the record tears its body.
    keep_bytes = {"header": 10, "body": size // 2, "last_byte": size - 1}[cut]
    with segment.open("r+b") as file:
        file.truncate(start + keep_bytes)

    queue, _ = evp.queue(data_dir, port, "--partitions", "4")
    warnings = [line for line in evp.log("queue").splitlines() if "WARNING" in line]
    assert any(str(segment) in line and f"at byte {start}" in line for line in warnings), warnings
    assert "ERROR" not in evp.log("queue")
    stored = sum(topic["events"] for topic in snapshot(address)["topics"])
    assert stored == len(ids) - 1

    # An event published after the repair survives a second restart.
    after = write_events(tmp_path / "after.jsonl", 1, "after-repair")
    publish_file(evp, address, tmp_path / "after.jsonl")
    assert stop(queue) == 0
    evp.queue(data_dir, port, "--partitions", "4")
    stored = sum(topic["events"] for topic in snapshot(address)["topics"])
    assert stored == len(ids)

    output = tmp_path / "out"
    start_processor(evp, address, output, 2, "torn")
    wait_for_lag_zero(address)
    processed = output_ids(output)
    assert set(processed) == (set(ids) - {torn_id}) | set(after)
    print_figures(
        f"test_torn_tail_recovered[{cut}]",
        published=len(ids) + 1,
        acknowledged=len(ids) + 1,
        dropped_torn=1,
        processed=len(set(processed)),
        lost=len(ids) + 1 - 1 - len(set(processed)),
        duplicated=len(processed) - len(set(processed)),
    )


# A byte flipped in the middle of the active segment.


@pytest.mark.timeout(180)
def test_flipped_byte_blocks_partition(evp, tmp_path):
    data_dir = tmp_path / "data"
    ids = write_events(tmp_path / "input.jsonl", TORN_EVENTS, "flip")
    queue, address = evp.queue(data_dir, None, "--partitions", "4")
    port = int(address.rsplit(":", 1)[1])
    publish_file(evp, address, tmp_path / "input.jsonl", FAULT_RATE)
    assert stop(queue) == 0

    segment = first_partition_segment(data_dir, 4)
    starts = record_starts(segment)
    bad_offset = len(starts) // 2
    values = [orjson.loads(record_value(segment, start))["id"] for start in starts]
    data = bytearray(segment.read_bytes())
    data[starts[bad_offset] + 40] ^= 0x01  # a byte of the event's JSON
    segment.write_bytes(bytes(data))

    _, address = evp.queue(data_dir, port, "--partitions", "4")
    log = evp.log("queue")
    errors = [line for line in log.splitlines() if "ERROR" in line]
    assert any(
        str(segment) in line and f"(offset {bad_offset})" in line for line in errors
    ), errors
    assert "truncating" not in log
    stored = sum(topic["events"] for topic in snapshot(address)["topics"])
    assert stored == len(ids)

    # The partition stops at the corrupt record: every other event is processed, and
    # nothing at or after the bad offset of that partition is handed out.
    blocked_ids = set(values[bad_offset:])
    output = tmp_path / "out"
    start_processor(evp, address, output, 2, "flip")

    def stalled() -> dict[str, Any] | None:
        group = group_snapshot(address)
        done = group["acked"] == len(ids) - len(blocked_ids)
        return group if done and group["stall"] else None

    group = wait_until(stalled, CATCH_UP_TIMEOUT_S, message="the group did not stop at the damage")
    assert group["lag"] == len(blocked_ids)
    assert "blocked by a corrupt record" in group["stall"]
    assert "[0]" in group["stall"]
    processed = output_ids(output)
    assert set(processed) == set(ids) - blocked_ids
    log = evp.log("queue")
    assert f"partition events/0 is blocked at offset {bad_offset}" in log
    print_figures(
        "test_flipped_byte_blocks_partition",
        published=len(ids),
        acknowledged=len(ids),
        processed=len(set(processed)),
        held_at_damage=len(blocked_ids),
        duplicated=len(processed) - len(set(processed)),
    )


# Queue restarts while clients are connected.


@pytest.mark.timeout(120)
def test_queue_killed_during_processing(evp, tmp_path):
    ids = write_events(tmp_path / "input.jsonl", 400, "restart")
    data_dir = tmp_path / "data"
    queue, address = evp.queue(data_dir)
    port = int(address.rsplit(":", 1)[1])
    output = tmp_path / "out"
    processor = start_processor(
        evp, address, output, 2, "restart", "--handler", f"{HANDLERS}:slow",
        "--max-in-flight", "50",
    )
    publish_file(evp, address, tmp_path / "input.jsonl")

    def quarter_done() -> bool:
        return group_snapshot(address)["acked"] >= len(ids) // 4

    message = "the shards acknowledged under a quarter of the events"
    wait_until(quarter_done, 60, interval_s=0.05, message=message)
    os.kill(queue.pid, signal.SIGKILL)
    assert queue.wait(timeout=10) == -signal.SIGKILL
    evp.queue(data_dir, port)

    wait_until(
        lambda: (group_snapshot(address) or {"members": []})["members"],
        START_TIMEOUT_S,
        message="the shards did not rejoin after the queue restarted",
    )
    wait_for_lag_zero(address)
    assert set(ids) - set(output_ids(output)) == set()
    assert processor.poll() is None


# Shard crashes and shutdowns.


@pytest.mark.timeout(120)
def test_killed_shard_redelivered(evp, tmp_path):
    ids = write_events(tmp_path / "input.jsonl", 400, "redeliver")
    _, address = evp.queue(tmp_path / "data")
    output = tmp_path / "out"
    handler = f"{HANDLERS}:slow"
    processor = start_processor(
        evp, address, output, 2, "redeliver", "--handler", handler, "--max-in-flight", "50"
    )
    publish_file(evp, address, tmp_path / "input.jsonl")

    def busy_member() -> str | None:
        group = group_snapshot(address)
        busy = [member["id"] for member in group["members"] if member["in_flight"] > 0]
        return busy[0] if busy else None

    member = wait_until(busy_member, 30, interval_s=0.05, message="no shard had events in flight")
    index = int(member.rsplit("shard-", 1)[1])
    pid = shard_pids(evp.log("process-redeliver"))[index][-1]
    children = {child.pid for child in psutil.Process(processor.pid).children()}
    assert pid in children
    os.kill(pid, signal.SIGKILL)

    def restarted() -> bool:
        return len(shard_pids(evp.log("process-redeliver")).get(index, [])) == 2

    wait_until(restarted, 30, message=f"shard-{index} was not restarted")
    group = wait_for_lag_zero(address)
    assert group["redelivered"] > 0
    assert set(ids) - set(output_ids(output)) == set()
    assert processor.poll() is None


DRAIN_TIMEOUT_S = 15.0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stop_with", ["sigterm", "ctrl_c"])
def test_sigterm_drains_processor(evp, tmp_path, stop_with):
    ids = write_events(tmp_path / "input.jsonl", 600, "drain")
    _, address = evp.queue(tmp_path / "data")
    first_output = tmp_path / "out-first"
    processor = start_processor(
        evp,
        address,
        first_output,
        2,
        "first",
        "--handler", f"{HANDLERS}:slow",
        "--max-in-flight", "50",
        "--drain-timeout", str(DRAIN_TIMEOUT_S),
        new_session=True,
    )
    publish_file(evp, address, tmp_path / "input.jsonl")

    def flowing() -> bool:
        group = group_snapshot(address)
        return group["acked"] > 0 and group["lag"] > 0

    wait_until(flowing, 30, interval_s=0.05, message="events did not start flowing")
    if stop_with == "sigterm":
        processor.send_signal(signal.SIGTERM)
    else:
        # A terminal's Ctrl-C: SIGINT to every process of the group, shards included.
        os.killpg(processor.pid, signal.SIGINT)
    assert processor.wait(timeout=DRAIN_TIMEOUT_S) == 0
    log = evp.log("process-first")
    assert "did not drain" not in log
    assert "killing pid" not in log
    assert "without finishing its drain" not in log

    group = group_snapshot(address)
    assert group["members"] == []
    assert group["lag"] > 0
    second_output = tmp_path / "out-second"
    start_processor(evp, address, second_output, 2, "second")
    wait_for_lag_zero(address)
    assert set(ids) - set(output_ids(first_output, second_output)) == set()


def gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.timeout(60)
def test_no_orphan_shards(evp, tmp_path):
    _, address = evp.queue(tmp_path / "data")
    processor = start_processor(evp, address, tmp_path / "out", 3, "orphan")
    children = psutil.Process(processor.pid).children(recursive=True)
    assert len(children) >= 3

    os.kill(processor.pid, signal.SIGKILL)
    processor.wait(timeout=10)

    def all_gone() -> bool:
        return all(gone(child) for child in children)

    survivors: list[int] = []
    try:
        wait_until(all_gone, 5, interval_s=0.1)
    except TimeoutError:
        survivors = [child.pid for child in children if not gone(child)]
    for child in children:
        if not gone(child):
            child.kill()
    assert survivors == []

    def no_members() -> bool:
        return group_snapshot(address)["members"] == []

    wait_until(no_members, 15, message="the queue kept the dead shards as members")


def partitions_by_node(group: dict[str, Any]) -> dict[str, list[int]]:
    owned: dict[str, list[int]] = {}
    for member in group["members"]:
        node = member["id"].split("/", 1)[0]
        owned.setdefault(node, []).extend(member["partitions"])
    return owned


@pytest.mark.timeout(150)
def test_two_processors_share_partitions(evp, tmp_path):
    partitions = 16
    _, address = evp.queue(tmp_path / "data", None, "--partitions", str(partitions))
    out_a = tmp_path / "out-a"
    out_b = tmp_path / "out-b"
    start_processor(evp, address, out_a, 2, "node-a")
    processor_b = start_processor(evp, address, out_b, 2, "node-b")

    def all_assigned() -> dict[str, list[int]] | None:
        owned = partitions_by_node(group_snapshot(address))
        total = sum(len(parts) for parts in owned.values())
        return owned if total == partitions else None

    owned = wait_until(all_assigned, 30, message="the partitions were not all assigned")
    assert len(owned["node-a"]) > 0
    assert len(owned["node-b"]) > 0
    assert set(owned["node-a"]) & set(owned["node-b"]) == set()
    assert set(owned["node-a"]) | set(owned["node-b"]) == set(range(partitions))

    first_ids = write_events(tmp_path / "first.jsonl", 300, "shared")
    publish_file(evp, address, tmp_path / "first.jsonl")
    wait_for_lag_zero(address)
    assert len(output_ids(out_a)) > 0
    assert len(output_ids(out_b)) > 0

    assert stop(processor_b) == 0

    def only_a() -> dict[str, list[int]] | None:
        owned = partitions_by_node(group_snapshot(address))
        return owned if list(owned) == ["node-a"] and len(owned["node-a"]) == partitions else None

    owned = wait_until(only_a, 30, message="node-a did not take over every partition")
    assert sorted(owned["node-a"]) == list(range(partitions))

    second_ids = write_events(tmp_path / "second.jsonl", 300, "alone")
    publish_file(evp, address, tmp_path / "second.jsonl")
    wait_for_lag_zero(address)
    assert set(first_ids) - set(output_ids(out_a, out_b)) == set()
    assert set(second_ids) - set(output_ids(out_a)) == set()


# A shard killed with 500 events in flight, replaced under the same member id.

IN_FLIGHT = 500


def write_gated_events(path: Path, count: int, prefix: str, gate: Path) -> list[str]:
    """Write events that the `gated` handler waits on while `gate` exists; return their ids."""
    ids = [f"{prefix}-{number:05d}" for number in range(count)]
    with path.open("wb") as file:
        for number, event_id in enumerate(ids):
            event = {"id": event_id, "user": f"user-{number % 40}", "gate": str(gate)}
            file.write(orjson.dumps(event) + b"\n")
    return ids


def member_of(address: str, member_id: str) -> dict[str, Any] | None:
    group = group_snapshot(address)
    if group is None:
        return None
    return next((member for member in group["members"] if member["id"] == member_id), None)


@pytest.mark.timeout(180)
def test_killed_shard_in_flight_redelivered(evp, tmp_path):
    gate = tmp_path / "gate"
    gate.touch()
    ids = write_gated_events(tmp_path / "input.jsonl", 2000, "held", gate)
    _, address = evp.queue(tmp_path / "data", None, "--partitions", "8")
    # Published first, so the shard's first dispatch fills its whole window: a shard
    # with events in flight gets more only when it acknowledges some.
    publish_file(evp, address, tmp_path / "input.jsonl", FAULT_RATE)
    output = tmp_path / "out"
    processor = start_processor(
        evp, address, output, 1, "held",
        "--handler", f"{HANDLERS}:gated", "--max-in-flight", str(IN_FLIGHT),
    )

    def full() -> dict[str, Any] | None:
        member = member_of(address, "held/shard-0")
        return member if member is not None and member["in_flight"] == IN_FLIGHT else None

    wait_until(full, 30, message=f"the shard did not reach {IN_FLIGHT} events in flight")
    old_pid = shard_pids(evp.log("process-held"))[0][-1]
    os.kill(old_pid, signal.SIGKILL)

    def replaced() -> dict[str, Any] | None:
        pids = shard_pids(evp.log("process-held")).get(0, [])
        member = member_of(address, "held/shard-0")
        if len(pids) == 2 and member is not None and member["pid"] == pids[-1]:
            return member
        return None

    # The new shard of the same id starts from zero: it is sent a full window again
    # rather than stalling at the old connection's count.
    wait_until(replaced, 60, message="shard-0 was not replaced under its member id")
    member = wait_until(full, 60, message="the replaced shard was not sent a full window")
    assert member["in_flight"] == IN_FLIGHT
    gate.unlink()

    group = wait_for_lag_zero(address)
    processed = output_ids(output)
    assert set(processed) == set(ids)
    assert group["redelivered"] >= IN_FLIGHT
    assert member_of(address, "held/shard-0")["in_flight"] == 0
    assert processor.poll() is None
    print_figures(
        "test_killed_shard_in_flight_redelivered",
        published=len(ids),
        acknowledged=len(ids),
        in_flight_at_kill=IN_FLIGHT,
        redelivered=group["redelivered"],
        processed=len(set(processed)),
        lost=len(set(ids) - set(processed)),
        duplicated=len(processed) - len(set(processed)),
    )


# A handler that blocks the event loop after its event is finished.


@pytest.mark.timeout(180)
@pytest.mark.parametrize("order", ["backlog", "live"])
def test_loop_block_after_ack(evp, tmp_path, order):
    count = 4000
    blocked_id = f"block-{count // 2:05d}"
    path = tmp_path / "input.jsonl"
    with path.open("wb") as file:
        for number in range(count):
            event = {"id": f"block-{number:05d}", "user": f"user-{number % 40}"}
            if number == count // 2:
                event["block"] = True
            file.write(orjson.dumps(event) + b"\n")
    # A session timeout shorter than the 3 s block: if the finished event's
    # acknowledgement waited for the loop, the queue would declare the shard dead
    # first and deliver the event again.
    _, address = evp.queue(tmp_path / "data", None, "--partitions", "8", "--session-timeout-ms", "2000")
    # A backlog fills DELIVER frames, so the marked event sits inside a frame; live
    # publishing sends small frames as events arrive.
    if order == "backlog":
        publish_file(evp, address, path, FAULT_RATE)
    output = tmp_path / "out"
    start_processor(evp, address, output, 1, "blocky", "--handler", f"{HANDLERS}:block_loop_after")
    if order == "live":
        publish_file(evp, address, path, FAULT_RATE)
    wait_until(
        lambda: blocked_id in output_ids(output), 60, message="the marked event was not processed"
    )

    def caught_up() -> dict[str, Any] | None:
        group = group_snapshot(address)
        return group if group["lag"] == 0 else None

    # A redelivered marked event blocks the loop again, so the group would not catch up.
    group = wait_until(
        caught_up,
        60,
        message=f"the group did not catch up: the marked event was processed "
        f"{output_ids(output).count(blocked_id)} times",
    )
    processed = output_ids(output)
    assert processed.count(blocked_id) == 1
    assert set(processed) == {f"block-{number:05d}" for number in range(count)}
    print_figures(
        f"test_loop_block_after_ack[{order}]",
        published=count,
        acknowledged=count,
        processed=len(set(processed)),
        redelivered=group["redelivered"],
        marked_event_processed=processed.count(blocked_id),
        duplicated=len(processed) - len(set(processed)),
    )


# One of two processors stopped with SIGTERM while it has fetched, unprocessed events.


def output_rows(*directories: Path) -> list[dict[str, Any]]:
    rows = []
    for directory in directories:
        for path in sorted(directory.glob("shard-*.jsonl")):
            with path.open("rb") as file:
                rows.extend(orjson.loads(line) for line in file)
    return rows


@pytest.mark.timeout(180)
def test_sigterm_moves_partitions_intact(evp, tmp_path):
    partitions = 8
    count = 10_000
    path = tmp_path / "input.jsonl"
    holding = tmp_path / "holding"
    with path.open("wb") as file:
        for number in range(count):
            event = {"id": f"moved-{number:05d}", "user": f"user-{number % 64}"}
            if number % 97 == 50:
                event["hold"] = str(holding)
            file.write(orjson.dumps(event) + b"\n")
    _, address = evp.queue(tmp_path / "data", None, "--partitions", str(partitions))
    out_held = tmp_path / "out-held"
    out_free = tmp_path / "out-free"
    # The first processor waits without end on events marked "hold", so it stops
    # with events fetched but unprocessed; its drain times out after 2 s.
    held = start_processor(
        evp, address, out_held, 2, "held",
        "--handler", f"{HANDLERS}:hold_marked", "--drain-timeout", "2",
    )
    start_processor(evp, address, out_free, 2, "free")
    with background_publish(
        "--queue", address,
        "--file", str(path),
        "--key-field", "user",
        "--rate", FAULT_RATE,
    ) as publisher:
        wait_until(
            holding.exists, 30, interval_s=0.05, message="the held processor held no event"
        )
        held_partitions = sorted(partitions_by_node(group_snapshot(address))["held"])
        assert held_partitions
        assert publisher.poll() is None, "the publisher ended before the SIGTERM"
        held.send_signal(signal.SIGTERM)
        assert held.wait(timeout=30) == 0
        _, stderr_bytes = publisher.communicate(timeout=90)
    assert publisher.returncode == 0, stderr_bytes.decode()
    assert f"acknowledged={count} " in stderr_bytes.decode()
    assert "did not drain" in evp.log("process-held")

    group = wait_for_lag_zero(address)
    stored = {topic["name"]: topic for topic in snapshot(address)["topics"]}["events"]
    assert stored["events"] == count
    # Nothing skipped: every offset of every partition reached some shard's output,
    # including the moved partitions from their oldest unacknowledged event on.
    rows = output_rows(out_held, out_free)
    seen: dict[int, set[int]] = {}
    for row in rows:
        seen.setdefault(row["partition"], set()).add(row["offset"])
    assert sum(len(offsets) for offsets in seen.values()) == count
    for partition, offsets in seen.items():
        assert offsets == set(range(len(offsets))), f"partition {partition} has a gap"
    # The moved partitions continued on the other processor.
    free_partitions = {row["partition"] for row in output_rows(out_free)}
    assert set(held_partitions) <= free_partitions
    ids = [row["event"]["id"] for row in rows]
    print_figures(
        "test_sigterm_moves_partitions_intact",
        published=count,
        acknowledged=count,
        moved_partitions=len(held_partitions),
        redelivered=group["redelivered"],
        processed=len(set(ids)),
        lost=count - len(set(ids)),
        duplicated=len(ids) - len(set(ids)),
    )


# A handler that ends its own process on one event.

PROCESSING_HANDLERS = Path(__file__).with_name("processing_handlers.py")


@pytest.mark.timeout(180)
def test_crashing_handler_dead_lettered_under_load(evp, tmp_path):
    count = 10_000
    crash_id = "crash-03000"
    ids = [f"crash-{number:05d}" for number in range(count)]
    with (tmp_path / "input.jsonl").open("wb") as file:
        for number, event_id in enumerate(ids):
            event = {"id": event_id, "user": f"user-{number % 40}", "crash": event_id == crash_id}
            file.write(orjson.dumps(event) + b"\n")
    data_dir = tmp_path / "data"
    _, address = evp.queue(data_dir)
    output = tmp_path / "out"
    processor = start_processor(
        evp, address, output, 4, "crashing",
        "--handler", f"{PROCESSING_HANDLERS}:exit_on_marked", "--max-retries", "2",
    )
    publish_file(evp, address, tmp_path / "input.jsonl", FAULT_RATE)
    wait_for_lag_zero(address)

    letters = []
    for segment in sorted((data_dir / "topics" / "events.dlq").glob("*/*.log")):
        letters.extend(orjson.loads(record.value) for record in records.decode(segment.read_bytes()))
    assert [letter["event"]["id"] for letter in letters] == [crash_id]
    # Two crashes, two restarts, and the third delivery goes to the dead-letter topic.
    # When the queue hands the event to another shard before the supervisor has
    # counted the last crash, that shard crashes too: at most one extra crash per shard.
    deliveries = letters[0]["deliveries"]
    assert 3 <= deliveries <= 2 + 4
    assert letters[0]["error"].startswith("ShardCrashed:")
    processed = output_ids(output)
    assert set(processed) == set(ids) - {crash_id}
    log = evp.log("process-crashing")
    restarts = sum(len(pids) - 1 for pids in shard_pids(log).values())
    assert restarts == deliveries - 1, log
    assert processor.poll() is None
    print_figures(
        "test_crashing_handler_dead_lettered_under_load",
        published=count,
        acknowledged=count,
        processed=len(set(processed)),
        dead_lettered=len(letters),
        deliveries_of_dead_letter=letters[0]["deliveries"],
        shard_restarts=restarts,
        lost=count - len(set(processed)) - len(letters),
        duplicated=len(processed) - len(set(processed)),
    )
