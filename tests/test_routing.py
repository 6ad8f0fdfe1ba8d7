"""Routing in a queue running in this process on real log files: the partition of each
key, and the key cache of the publish path."""

from __future__ import annotations

from pathlib import Path

from evp import hashing, protocol, records
from evp.server import MAX_ROUTED_KEY_BYTES, QueueConfig, QueueServer

VALID = b'{"a":1}'


def make_server(tmp_path: Path, partitions: int) -> QueueServer:
    return QueueServer(QueueConfig(data_dir=tmp_path / "data", partitions=partitions))


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
