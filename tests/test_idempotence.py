"""Resends are stored once: producer ids and sequence numbers, in the log and on the wire.

A producer that loses an acknowledgement sends its batch again. These tests send the
same numbered events twice, across connections, queue kills and segment rolls, and
count what the log holds.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
from conftest import background_publish, snapshot, wait_until
from test_faults import output_ids, start_processor, wait_for_lag_zero, write_events

from evp import protocol, records
from evp.client import ServerError, connect
from evp.log import MAX_PRODUCERS, PRODUCERS_FILE, PartitionLog

PRODUCER = "00c0ffee00c0ffee"


def entries(first: int, count: int) -> list[tuple[bytes, bytes, int]]:
    """Events numbered `first` to `first + count - 1`, spread over ten keys."""
    timestamp_us = time.time_ns() // 1000
    return [
        (f"key-{number % 10}".encode(), orjson.dumps({"n": number}), timestamp_us)
        for number in range(first, first + count)
    ]


class NumberedPublisher:
    """Sends PUBLISH frames with chosen sequence numbers and collects the replies."""

    def __init__(self, address: str, producer_id: str | None = PRODUCER) -> None:
        self.address = address
        self.producer_id = producer_id
        self.replies: list[protocol.Frame] = []

    async def send(self, batches: list[tuple[int, int]]) -> list[protocol.Frame]:
        """Send each `(first sequence, count)` batch on a new connection, wait for replies."""
        connection, _ = await connect(self.address, self.replies.append, producer_id=self.producer_id)
        for first, count in batches:
            connection.send(protocol.encode_publish(first, "events", entries(first, count)))
        deadline = time.monotonic() + 10
        while len(self.replies) < len(batches):
            assert time.monotonic() < deadline, f"replies so far: {self.replies}"
            await asyncio.sleep(0.01)
        connection.close()
        return self.replies[-len(batches):]


def log_numbers(data_dir: Path) -> Counter[int]:
    """Count each event number stored in the segment files of topic `events`."""
    counts: Counter[int] = Counter()
    for segment in (data_dir / "topics" / "events").glob("*/*.log"):
        for record in records.decode(segment.read_bytes()):
            counts[orjson.loads(record.value)["n"]] += 1
    return counts


def topic_stats(address: str) -> dict:
    return next(topic for topic in snapshot(address)["topics"] if topic["name"] == "events")


def test_resent_batch_stored_once(evp, tmp_path):
    data_dir = tmp_path / "data"
    _, address = evp.queue(data_dir)
    publisher = NumberedPublisher(address)
    first = asyncio.run(publisher.send([(1, 50)]))
    # The same batch again, then one that repeats 41..50 and adds 51..60.
    again = asyncio.run(publisher.send([(1, 50), (41, 20)]))
    for reply, count in zip([*first, *again], [50, 50, 20], strict=True):
        assert isinstance(reply, protocol.Published), reply
        assert reply.count == count
    stats = topic_stats(address)
    assert stats["events"] == 60
    assert stats["duplicates_dropped"] == 60
    counts = log_numbers(data_dir)
    assert sorted(counts) == list(range(1, 61))
    assert set(counts.values()) == {1}


def test_without_producer_id_resends_are_stored_again(evp, tmp_path):
    _, address = evp.queue(tmp_path / "data")
    publisher = NumberedPublisher(address, producer_id=None)
    asyncio.run(publisher.send([(1, 10), (1, 10)]))
    stats = topic_stats(address)
    assert stats["events"] == 20
    assert stats["duplicates_dropped"] == 0


def test_other_producers_are_not_affected(evp, tmp_path):
    data_dir = tmp_path / "data"
    _, address = evp.queue(data_dir)
    asyncio.run(NumberedPublisher(address, "1").send([(1, 10)]))
    # Another producer's numbers start at 1 too.
    asyncio.run(NumberedPublisher(address, "2").send([(1, 10)]))
    assert topic_stats(address)["events"] == 20


@pytest.mark.parametrize("segment_bytes", [64 * 1024 * 1024, 4096])
def test_resend_after_queue_kill_stored_once(evp, tmp_path, segment_bytes):
    """The last sequences are rebuilt from the log, and from producers.json after rolls."""
    data_dir = tmp_path / "data"
    options = ("--segment-bytes", str(segment_bytes), "--partitions", "2")
    queue, address = evp.queue(data_dir, None, *options)
    port = int(address.rsplit(":", 1)[1])
    publisher = NumberedPublisher(address)
    asyncio.run(publisher.send([(1, 100), (101, 100), (201, 300)]))
    os.kill(queue.pid, signal.SIGKILL)
    assert queue.wait(timeout=10) == -signal.SIGKILL
    if segment_bytes == 4096:
        # Events 201..500 rolled every partition past the segments holding 101..200.
        files = list((data_dir / "topics" / "events").glob(f"*/{PRODUCERS_FILE}"))
        assert len(files) == 2, "each partition rolled and saved its producers"

    _, address = evp.queue(data_dir, port, *options)
    replies = asyncio.run(NumberedPublisher(address).send([(101, 100), (201, 300), (501, 10)]))
    assert [reply.count for reply in replies] == [100, 300, 10]
    stats = topic_stats(address)
    assert stats["events"] == 510
    assert stats["duplicates_dropped"] == 400
    counts = log_numbers(data_dir)
    assert sorted(counts) == list(range(1, 511))
    assert set(counts.values()) == {1}


@pytest.mark.parametrize("producer_id", ["0", "xyz", "1" * 17, "0x1f", ""])
def test_invalid_producer_id(evp, tmp_path, producer_id):
    _, address = evp.queue(tmp_path / "data")
    if producer_id == "":
        # An empty id means none: the connection works without duplicate detection.
        asyncio.run(NumberedPublisher(address, producer_id).send([(1, 1)]))
        return
    with pytest.raises(ServerError) as raised:
        asyncio.run(NumberedPublisher(address, producer_id).send([(1, 1)]))
    assert raised.value.code == "invalid_producer_id"
    assert repr(producer_id) in str(raised.value)


# The log's producer state, without a queue.


def test_log_remembers_last_sequences(tmp_path):
    log = PartitionLog(tmp_path / "p", segment_bytes=4096)
    for first in range(1, 400, 20):
        log.append(entries(first, 20), producer=7, sequences=list(range(first, first + 20)))
    log.append(entries(1, 3), producer=9, sequences=[1, 2, 3])
    assert log.last_sequence(7) == 400
    assert log.last_sequence(9) == 3
    assert log.last_sequence(8) == 0
    assert len(log.segments()) > 1
    log.sync()
    log.close()

    reopened = PartitionLog(tmp_path / "p", segment_bytes=4096)
    assert reopened.last_sequence(7) == 400
    assert reopened.last_sequence(9) == 3
    reopened.close()


def test_log_state_without_producers_file(tmp_path):
    """A lost producers.json costs only what the sealed segments held."""
    log = PartitionLog(tmp_path / "p", segment_bytes=4096)
    log.append(entries(1, 60), producer=5, sequences=list(range(1, 61)))
    log.append(entries(61, 60), producer=5, sequences=list(range(61, 121)))
    log.append(entries(1, 1), producer=6, sequences=[1])
    log.close()
    (tmp_path / "p" / PRODUCERS_FILE).unlink()
    reopened = PartitionLog(tmp_path / "p", segment_bytes=4096)
    assert reopened.last_sequence(6) == 1
    assert reopened.last_sequence(5) in (0, 120)
    reopened.close()


def test_log_forgets_least_recent_producers(tmp_path):
    log = PartitionLog(tmp_path / "p")
    for producer in range(1, MAX_PRODUCERS + 11):
        log.append(entries(1, 1), producer=producer, sequences=[1])
    assert len(log.producers) == MAX_PRODUCERS
    assert log.last_sequence(1) == 0
    assert log.last_sequence(MAX_PRODUCERS + 10) == 1
    log.close()


# Fault: kill -9 the queue again and again while `evp publish` runs.


@pytest.mark.timeout(240)
def test_publisher_resends_through_queue_kills(evp, tmp_path):
    count = 60_000
    kills = 3
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    ids = write_events(tmp_path / "input.jsonl", count, "kills")
    data_dir = tmp_path / "data"
    queue, address = evp.queue(data_dir)
    port = int(address.rsplit(":", 1)[1])
    dropped = 0
    with background_publish(
        "--queue", address,
        "--file", str(tmp_path / "input.jsonl"),
        "--key-field", "user",
        "--rate", "10000",
    ) as publisher:
        def publishing() -> bool:
            return any(topic["events"] > 500 for topic in snapshot(address)["topics"])

        wait_until(publishing, 30, interval_s=0.05, message="the publisher stored nothing")
        for kill in range(kills):
            # A random moment within the next stretch of the publish.
            time.sleep(rng.uniform(0.3, 1.0))
            stats = topic_stats(address)
            dropped += stats["duplicates_dropped"]
            os.kill(queue.pid, signal.SIGKILL)
            assert queue.wait(timeout=10) == -signal.SIGKILL
            assert stats["events"] < count, f"kill {kill} came after the publish ended"
            queue, address = evp.queue(data_dir, port)
        _, stderr_bytes = publisher.communicate(timeout=120)
    stderr = stderr_bytes.decode()
    assert publisher.returncode == 0, stderr
    assert f"acknowledged={count} " in stderr
    dropped += topic_stats(address)["duplicates_dropped"]

    stored = Counter()
    by_key: dict[str, list[int]] = {}
    for segment in sorted((data_dir / "topics" / "events").glob("*/*.log")):
        for record in records.decode(segment.read_bytes()):
            event = orjson.loads(record.value)
            stored[event["id"]] += 1
            by_key.setdefault(event["user"], []).append(int(event["id"].split("-")[1]))
    duplicates = sum(stored.values()) - len(stored)
    print(
        f"queue kills={kills} seed={seed} published={count} acknowledged={count} "
        f"stored={sum(stored.values())} duplicates_in_log={duplicates} "
        f"resends_dropped={dropped}"
    )
    assert set(stored) == set(ids)
    assert duplicates == 0
    # Segment files sort by offset within a partition, and a key lives in one partition.
    for key, numbers in by_key.items():
        assert numbers == sorted(numbers), f"events of {key} are out of order in the log"

    output = tmp_path / "out"
    start_processor(evp, address, output, 2, "kills")
    wait_for_lag_zero(address)
    processed = output_ids(output)
    assert set(processed) == set(ids)
    print(f"processed={len(processed)} processing_duplicates={len(processed) - len(set(processed))}")


def test_resend_after_recovered_hole_stored(evp, tmp_path):
    """A batch whose first page never reached the disk is not counted as stored."""
    data_dir = tmp_path / "data"
    queue, address = evp.queue(data_dir, None, "--partitions", "1", "--fsync", "always")
    port = int(address.rsplit(":", 1)[1])
    asyncio.run(NumberedPublisher(address).send([(1, 10)]))
    segment = next((data_dir / "topics" / "events").glob("*/*.log"))
    first_batch_end = segment.stat().st_size
    asyncio.run(NumberedPublisher(address).send([(11, 100)]))
    os.kill(queue.pid, signal.SIGKILL)
    assert queue.wait(timeout=10) == -signal.SIGKILL
    # Pages written out of order by a power loss: the one that starts the second
    # batch is zeros, the later ones arrived.
    data = bytearray(segment.read_bytes())
    page_end = (first_batch_end // 4096 + 1) * 4096
    data[first_batch_end:page_end] = bytes(page_end - first_batch_end)
    segment.write_bytes(bytes(data))

    _, address = evp.queue(data_dir, port, "--partitions", "1", "--fsync", "always")
    replies = asyncio.run(NumberedPublisher(address).send([(11, 100)]))
    assert isinstance(replies[0], protocol.Published)
    stats = topic_stats(address)
    assert stats["duplicates_dropped"] == 0
    # The resend is stored again after the records that survived the damage.
    assert stats["events"] == 210
