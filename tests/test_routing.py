"""Routing in a queue running in this process on real log files: the key cache of the
publish path and the share of credit that a dispatch gives each partition."""

from __future__ import annotations

from collections import Counter, deque
from pathlib import Path

from evp import hashing, protocol, records
from evp.groups import Group, Member
from evp.server import MAX_ROUTED_KEY_BYTES, QueueConfig, QueueServer

VALID = b'{"a":1}'


def make_server(tmp_path: Path, partitions: int) -> QueueServer:
    return QueueServer(QueueConfig(data_dir=tmp_path / "data", partitions=partitions))


def keys_of_partition(partition: int, count: int, partitions: int) -> list[bytes]:
    """Return `count` keys that hash to `partition`."""
    keys: list[bytes] = []
    number = 0
    while len(keys) < count:
        key = f"k{number}".encode()
        if hashing.partition_for(key, partitions) == partition:
            keys.append(key)
        number += 1
    return keys


def stored_partition_of_each_key(server: QueueServer, topic_name: str) -> dict[bytes, int]:
    topic = server.store.topics[topic_name]
    where: dict[bytes, int] = {}
    for partition, log in enumerate(topic.logs):
        offset = log.start_offset
        while offset < log.next_offset:
            data, count = log.read(offset, 1000, 1 << 20)
            for record in records.decode(data):
                where[record.key] = partition
            offset += count
    return where


def test_keys_routed_by_hash_after_recreate(tmp_path):
    server = make_server(tmp_path, partitions=8)
    keys = [f"user-{number}".encode() for number in range(200)]
    server.publish(protocol.Publish(1, "t", [(key, VALID, 1) for key in keys]))
    server.store.delete_topic("t")
    server.store.create_topic("t", 3)
    server.publish(protocol.Publish(2, "t", [(key, VALID, 1) for key in keys]))
    where = stored_partition_of_each_key(server, "t")
    assert len(where) == len(keys)
    for key in keys:
        assert where[key] == hashing.partition_for(key, 3), key


def test_long_keys_not_remembered(tmp_path):
    server = make_server(tmp_path, partitions=4)
    short = [b"s%03d" % number for number in range(50)]
    long = [b"%04d" % number + b"x" * 60_000 for number in range(50)]
    entries = [(key, VALID, 1) for key in short + long]
    server.publish(protocol.Publish(1, "t", entries))
    routes = server.store.topics["t"].routes
    assert set(routes) == set(short)
    assert all(len(key) <= MAX_ROUTED_KEY_BYTES for key in routes)
    where = stored_partition_of_each_key(server, "t")
    for key in short + long:
        assert where[key] == hashing.partition_for(key, 4)


class RecordingConnection:
    """The part of a member's connection that a dispatch uses: it keeps the frames."""

    writable = True

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def send_frames(self, frames: list[bytes]) -> None:
        self.frames.extend(frames)

    def send_assigned(self, partitions: list[int], generation: int, partition_count: int) -> None:
        pass

    def close(self, reason: str) -> None:
        pass


def test_dispatch_shares_credit_between_partitions(tmp_path):
    # Four partitions with a backlog of 3,000 events each and a credit of 1,000: a
    # shard that acknowledges each frame in turn must be served from all four.
    partitions = 4
    server = make_server(tmp_path, partitions=partitions)
    for partition in range(partitions):
        keys = keys_of_partition(partition, 3000, partitions)
        server.publish(protocol.Publish(1, "t", [(key, VALID, 1) for key in keys]))
    group = Group(server.store.topics["t"], "g", {})
    connection = RecordingConnection()
    member = Member("m", connection, max_in_flight=1000)
    group.join(member)
    decoder = protocol.Decoder()
    waiting: deque[protocol.Deliver] = deque()
    processed: Counter[int] = Counter()
    for _ in range(20):
        waiting.extend(decoder.feed(b"".join(connection.frames)))
        connection.frames.clear()
        frame = waiting.popleft()
        processed[frame.partition] += frame.count
        group.ack(member, frame.partition, group.cursors[frame.partition].committed + frame.count)
    served = [processed[partition] for partition in range(partitions)]
    assert min(served) > 0, served
    # Round robin: no partition gets more than twice the events of another.
    assert max(served) < 2 * min(served), served
