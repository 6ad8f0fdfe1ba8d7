"""A failed fsync under --fsync always: nothing written before it is acknowledged.

Linux reports a failed writeback once, and a later fsync of the same file can succeed
although the pages are gone. The queue runs in this process so that os.fsync can fail
on cue; clients talk to it over a real socket.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time

import orjson
import pytest

from evp import protocol
from evp.client import connect
from evp.server import QueueConfig, QueueServer


def entries(first: int, count: int) -> list[tuple[bytes, bytes, int]]:
    timestamp_us = time.time_ns() // 1000
    return [(b"k", orjson.dumps({"n": number}), timestamp_us) for number in range(first, first + count)]


@pytest.mark.timeout(60)
def test_batches_before_failed_fsync_not_acknowledged(tmp_path, monkeypatch):
    real_fsync = os.fsync
    log_fsyncs = 0

    def failing_once(fd: int) -> None:
        nonlocal log_fsyncs
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".log"):
            log_fsyncs += 1
            if log_fsyncs == 1:
                time.sleep(0.5)  # a slow writeback that fails
                raise OSError(errno.EIO, "injected writeback failure")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_once)

    async def scenario() -> tuple[list[protocol.Frame], bool]:
        config = QueueConfig(port=0, data_dir=tmp_path / "data", partitions=1, fsync="always")
        server = QueueServer(config)
        await server.start()
        replies: list[protocol.Frame] = []
        try:
            connection, _ = await connect(
                f"127.0.0.1:{server.config.port}", replies.append, producer_id="00c0ffee00c0ffee"
            )
            connection.send(protocol.encode_publish(1, "events", entries(1, 5)))
            await asyncio.sleep(0.1)  # its fsync is running now
            connection.send(protocol.encode_publish(6, "events", entries(6, 5)))
            await asyncio.sleep(1.5)  # the next round's fsync succeeds
            connection.send(protocol.encode_publish(11, "events", entries(11, 5)))
            await asyncio.sleep(0.5)
            failed = server.store.topic("events").logs[0].failed
        finally:
            await server.stop()
        return replies, failed

    replies, failed = asyncio.run(scenario())
    assert failed
    acknowledged = [reply.seq for reply in replies if isinstance(reply, protocol.Published)]
    assert acknowledged == [], replies
    errors = {reply.seq: reply.code for reply in replies if isinstance(reply, protocol.Error)}
    assert errors[1] == "storage_error"
    assert errors[6] == "storage_error"
    assert errors[11] == "storage_error"
