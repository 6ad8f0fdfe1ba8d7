"""Per-key waiting and the acknowledgement position of one partition (evp.ordering)."""

from __future__ import annotations

from evp.ordering import PartitionWork
from evp.records import Record


def record(offset: int, key: str) -> Record:
    return Record(offset, 0, key.encode(), b"{}")


def test_position_follows_delivery():
    work = PartitionWork()
    work.delivered(9)
    assert work.ack_position() == 10


def test_position_stops_at_blocked_event():
    work = PartitionWork()
    work.block(record(3, "a"))
    work.delivered(9)
    assert work.ack_position() == 3
    assert work.is_blocked(b"a")
    assert not work.is_blocked(b"b")


def test_later_events_queue_behind_head():
    work = PartitionWork()
    work.block(record(3, "a"))
    work.block(record(5, "a"))
    work.delivered(9)
    assert work.head(b"a") == record(3, "a")
    assert work.pop_head(b"a") is True
    assert work.head(b"a") == record(5, "a")
    # Popped but not finished: its results may still wait for PUBLISHED.
    assert work.ack_position() == 3
    work.finish([3])
    assert work.ack_position() == 5
    assert work.pop_head(b"a") is False
    assert not work.is_blocked(b"a")
    assert work.head(b"a") is None
    work.finish([5])
    assert work.ack_position() == 10


def test_position_takes_lowest_of_keys():
    work = PartitionWork()
    work.block(record(7, "b"))
    work.block(record(4, "a"))
    work.delivered(9)
    assert work.ack_position() == 4
    work.finish([4])
    assert work.ack_position() == 7


def test_position_before_first_batch_ends():
    # A retry that finishes while the partition's first batch is still running must
    # not acknowledge the batch's unfinished events.
    work = PartitionWork()
    work.block(record(12, "a"))
    work.finish([12])
    assert work.ack_position() == 0
