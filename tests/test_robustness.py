"""Regression tests for failures found by trying evp as a user and by review."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import orjson
import psutil
import pytest
from conftest import free_port, snapshot, wait_until

from evp import protocol

HANDLERS = Path(__file__).with_name("handlers.py")


def group_of(address: str) -> dict:
    return [g for g in snapshot(address)["groups"] if g["group"] == "default"][0]


def publish_lines(evp, address: str, tmp_path: Path, events: list[dict]) -> None:
    path = tmp_path / "input.jsonl"
    path.write_bytes(b"".join(orjson.dumps(event) + b"\n" for event in events))
    result = evp.run("publish", "--queue", address, "--file", str(path), "--rate", "0")
    assert result.returncode == 0, result.stderr.decode()


@pytest.mark.timeout(120)
def test_slow_sync_handler_keeps_heartbeating(evp, tmp_path):
    _, address = evp.queue(None, None, "--session-timeout-ms", "2000")
    evp.start(
        "process", "--queue", address, "--shards", "1", "--node", "s",
        "--handler", f"{HANDLERS}:sleepy_sync", log_name="process",
    )
    wait_until(lambda: group_of(address)["members"] if snapshot(address)["groups"] else None, timeout_s=60)
    publish_lines(evp, address, tmp_path, [{"id": f"e-{n}"} for n in range(300)])
    wait_until(lambda: group_of(address)["lag"] == 0, timeout_s=60, message="the slow shard stalled")
    assert "declaring it dead" not in evp.log("queue")
    assert group_of(address)["redelivered"] == 0


@pytest.mark.timeout(90)
def test_handler_bad_result_is_a_failure(evp, tmp_path):
    _, address = evp.queue()
    output = tmp_path / "out"
    evp.start(
        "process", "--queue", address, "--shards", "1", "--node", "r",
        "--handler", f"{HANDLERS}:returns_set", "--output", str(output), log_name="process",
    )
    wait_until(lambda: snapshot(address)["groups"] and group_of(address)["members"], timeout_s=60)
    events = [{"id": f"e-{n}", "bad": n == 3} for n in range(20)]
    publish_lines(evp, address, tmp_path, events)
    wait_until(lambda: group_of(address)["lag"] == 0, timeout_s=30, message="the shard stalled")
    lines = (output / "shard-0.jsonl").read_bytes().splitlines()
    ids = [orjson.loads(line)["event"]["id"] for line in lines]
    assert "e-3" not in ids
    assert len(ids) == 19
    assert "handler returned a set" in evp.log("process")


@pytest.mark.timeout(90)
def test_duplicate_node_rejected_clearly(evp, tmp_path):
    _, address = evp.queue()
    evp.start("process", "--queue", address, "--shards", "2", "--node", "same", log_name="first")
    wait_until(lambda: snapshot(address)["groups"] and len(group_of(address)["members"]) == 2, timeout_s=60)
    generation = group_of(address)["generation"]
    second = evp.start(
        "process", "--queue", address, "--shards", "2", "--node", "same", log_name="second"
    )
    wait_until(lambda: "is in use by a live connection" in evp.log("second"), timeout_s=30)
    time.sleep(2)
    group = group_of(address)
    assert sorted(m["id"] for m in group["members"]) == ["same/shard-0", "same/shard-1"]
    assert group["generation"] == generation
    # The second processor gives up after the session timeout (10 s), trying about
    # once per heartbeat interval rather than in a tight loop, and exits non-zero.
    assert second.wait(timeout=60) == 1
    log = evp.log("second")
    assert "give each processor on one host its own --node" in log
    attempts = log.count("the queue reported an error to member=same/shard-0")
    assert 2 <= attempts <= 15, attempts


@pytest.mark.timeout(60)
def test_second_queue_on_data_dir_rejected(evp, tmp_path):
    _, _ = evp.queue(tmp_path / "data")
    result = evp.run("queue", "--port", str(free_port()), "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 2
    assert "is in use by another evp queue" in result.stderr.decode()


@pytest.mark.timeout(60)
def test_client_that_never_reads_is_throttled(evp):
    queue, address = evp.queue()
    host, port = address.split(":")
    rss_before = psutil.Process(queue.pid).memory_info().rss
    request = protocol.encode(protocol.StatsRequest())
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(protocol.encode(protocol.Hello(client="test")))
        sock.setblocking(False)
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            try:
                sock.send(request * 256)
            except BlockingIOError:
                time.sleep(0.01)
        growth_mb = (psutil.Process(queue.pid).memory_info().rss - rss_before) / 2**20
    # The queue stops reading once its replies back up past 4 MiB, so a client that
    # never reads costs a bounded buffer. Without that, the replies piled up at about
    # 15 MiB per second on a 2-core test machine.
    assert growth_mb < 24
    assert "topics" in snapshot(address)
