"""The shard processing model against real processes: retries in key order, dead letters,
crashes of the handler's process, handler classes and chains through --output-topic."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import group_state, read_output, wait_for_node, wait_until
from processing_handlers import CRASH_EXIT_CODE, RELEASE_ENV

from evp.deadletter import DeadLetter

HANDLERS = Path(__file__).with_name("processing_handlers.py")
SLOW_HANDLER = f"{Path(__file__).with_name('handlers.py')}:slow"
START_TIMEOUT_S = 60.0
CATCH_UP_TIMEOUT_S = 120.0


# Helpers.


def write_lines(path: Path, events: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(event) + b"\n" for event in events))
    return path


def publish_events(
    evp: Any, address: str, path: Path, topic: str = "events", rate: int = 0
) -> subprocess.Popen[bytes] | None:
    """Publish the events of `path` keyed by "user"; wait for the end unless `rate` is set."""
    args = (
        "publish", "--queue", address, "--topic", topic, "--file", str(path),
        "--key-field", "user", "--rate", str(rate),
    )
    if rate:
        return evp.start(*args, log_name="publish")
    result = evp.run(*args)
    assert result.returncode == 0, result.stderr.decode()
    return None


def start_processor(
    evp: Any, address: str, name: str, *extra: str, shards: int = 1, topic: str = "events",
    group: str = "default",
) -> subprocess.Popen[bytes]:
    """Start `evp process` as node `name` and wait until its shards joined."""
    process = evp.start(
        "process", "--queue", address, "--shards", str(shards), "--node", name,
        "--topic", topic, "--group", group, *extra,
        log_name=name,
    )
    wait_for_node(evp, process, name, address, name, shards, topic, group, START_TIMEOUT_S)
    return process


def wait_for_lag_zero(address: str, topic: str, group: str = "default") -> dict[str, Any]:
    def caught_up() -> dict[str, Any] | None:
        state = group_state(address, topic, group)
        return state if state is not None and state["lag"] == 0 else None

    return wait_until(
        caught_up, CATCH_UP_TIMEOUT_S, message=f"group {group} of {topic} did not reach lag 0"
    )


def read_dead_letters(evp: Any, address: str, tmp_path: Path, expected: int) -> list[dict[str, Any]]:
    """Read `expected` rows of topic events.dlq through a processor without a handler."""
    output = tmp_path / "dlq-out"
    start_processor(
        evp, address, "dlq-reader", "--output", str(output), topic="events.dlq", group="reader"
    )
    wait_until(
        lambda: len(read_output(output)) >= expected,
        CATCH_UP_TIMEOUT_S,
        message=f"fewer than {expected} dead letters arrived",
    )
    return read_output(output)


# Retries in key order.


@pytest.mark.timeout(120)
def test_retry_holds_only_its_key(evp, tmp_path, monkeypatch):
    release = tmp_path / "release"
    monkeypatch.setenv(RELEASE_ENV, str(release))
    _, address = evp.queue(None, None, "--partitions", "1")
    # One partition, so every key shares it. "a-0" is held; the other "a" events are
    # published between events of other keys.
    events = [{"id": "x-0", "user": "x"}, {"id": "a-0", "user": "a", "hold": True}]
    for number in range(1, 4):
        events.append({"id": f"b-{number}", "user": "b"})
        events.append({"id": f"a-{number}", "user": "a"})
        events.append({"id": f"c-{number}", "user": "c"})
    publish_events(evp, address, write_lines(tmp_path / "events.jsonl", events))
    output = tmp_path / "out"
    start_processor(
        evp, address, "order", "--output", str(output), "--max-retries", "30",
        "--handler", f"{HANDLERS}:hold_until_released",
    )
    others = {event["id"] for event in events if event["user"] != "a"}
    wait_until(
        lambda: {row["event"]["id"] for row in read_output(output)} >= others,
        CATCH_UP_TIMEOUT_S,
        message="events of other keys did not pass the held key",
    )
    passed = [row["event"]["id"] for row in read_output(output)]
    assert [event_id for event_id in passed if event_id.startswith("a-")] == []
    # The acknowledgement stops at the held event (offset 1), though the events after
    # it are processed.
    group = wait_until(
        lambda: (state := group_state(address, "events"))["committed"] != [0] and state,
        message="the processed events before the held one were not acknowledged",
    )
    assert group["committed"] == [1]
    assert group["lag"] == len(events) - 1
    retrying = wait_until(lambda: group_state(address, "events")["members"][0]["retrying"])
    assert retrying["key"] == "a"
    assert retrying["offset"] == 1
    assert "HeldError" in retrying["error"]
    # Events published while the key waits reach the shard too, though the partition's
    # position does not move.
    late = [{"id": f"b-late-{number}", "user": "b"} for number in range(3)]
    late.append({"id": "a-late", "user": "a"})
    publish_events(evp, address, write_lines(tmp_path / "late.jsonl", late))
    events += late
    wait_until(
        lambda: {row["event"]["id"] for row in read_output(output)} >= {"b-late-2"},
        message="events published during the retry did not pass the held key",
    )
    assert "a-late" not in {row["event"]["id"] for row in read_output(output)}

    release.touch()
    wait_for_lag_zero(address, "events")
    rows = read_output(output)
    order = [row["event"]["id"] for row in rows]
    assert sorted(order) == sorted(event["id"] for event in events)
    assert [event_id for event_id in order if event_id.startswith("a-")] == [
        "a-0", "a-1", "a-2", "a-3", "a-late",
    ]
    held = next(row for row in rows if row["event"]["id"] == "a-0")
    assert held["event"]["delivery"] > 1
    # The shard reports once a second, so the cleared state shows up a little later.
    wait_until(
        lambda: group_state(address, "events")["members"][0]["retrying"] is None,
        message="the shard still reports a retry after the event passed",
    )


# Dead letters.


@pytest.mark.timeout(120)
def test_dead_letter_after_retries(evp, tmp_path):
    _, address = evp.queue(None, None, "--partitions", "4")
    events = [
        {"id": f"e-{number}", "user": f"user-{number % 5}", "fail": number in (3, 11)}
        for number in range(20)
    ]
    publish_events(evp, address, write_lines(tmp_path / "events.jsonl", events))
    output = tmp_path / "out"
    start_processor(
        evp, address, "dead", "--output", str(output), "--max-retries", "2",
        "--handler", f"{HANDLERS}:fail_marked",
    )
    wait_for_lag_zero(address, "events")
    passed = sorted(row["event"]["id"] for row in read_output(output))
    assert passed == sorted(event["id"] for event in events if not event["fail"])
    sources = {(row["partition"], row["offset"]) for row in read_output(output)}

    rows = read_dead_letters(evp, address, tmp_path, 2)
    assert len(rows) == 2
    letters = {row["event"]["event"]["id"]: (row, DeadLetter.from_event(row["event"])) for row in rows}
    assert sorted(letters) == ["e-11", "e-3"]
    for event_id, (row, letter) in letters.items():
        original = next(event for event in events if event["id"] == event_id)
        assert set(row["event"]) == {
            "event", "error", "frame", "deliveries", "topic", "partition", "offset",
            "group", "failed_at",
        }
        assert letter.event == original
        assert row["key"] == original["user"]
        assert letter.error == f"MarkedError: event {event_id} is marked to fail"
        assert re.fullmatch(r".*processing_handlers\.py:\d+ in fail_marked", letter.frame)
        assert letter.deliveries == 3
        assert letter.topic == "events"
        assert letter.group == "default"
        assert (letter.partition, letter.offset) not in sources
        failed_at = datetime.datetime.fromisoformat(letter.failed_at)
        assert failed_at.tzinfo is not None
    offsets = sorted((letter.partition, letter.offset) for _, letter in letters.values())
    assert len(set(offsets)) == 2
    # The shard reports its counters once a second.
    wait_until(lambda: group_state(address, "events")["members"][0]["failed"] >= 2)
    assert group_state(address, "events")["members"][0]["failed"] == 2


@pytest.mark.timeout(120)
def test_invalid_results_dead_lettered(evp, tmp_path):
    _, address = evp.queue(None, None, "--partitions", "2", "--max-event-bytes", "4096")
    events = [{"id": f"e-{number}", "user": f"user-{number % 3}"} for number in range(6)]
    events[1]["bad_key"] = True
    events[4]["huge"] = True
    publish_events(evp, address, write_lines(tmp_path / "events.jsonl", events))
    start_processor(
        evp, address, "invalid", "--max-retries", "0", "--output-topic", "results",
        "--handler", f"{HANDLERS}:invalid_results",
    )
    wait_for_lag_zero(address, "events")
    rows = read_dead_letters(evp, address, tmp_path, 2)
    errors = {row["event"]["event"]["id"]: row["event"]["error"] for row in rows}
    assert sorted(errors) == ["e-1", "e-4"]
    assert errors["e-1"] == "TypeError: Keyed key 123 is not a non-empty string"
    assert errors["e-4"].startswith("ValueError: handler returned an event of ")
    assert "over the queue's limit of 4096 bytes" in errors["e-4"]
    # The other results reached the output topic, none of them lost with the bad ones.
    results = tmp_path / "results"
    start_processor(evp, address, "results", "--output", str(results), topic="results", group="r")
    wait_for_lag_zero(address, "results", "r")
    assert sorted(row["event"]["id"] for row in read_output(results)) == [
        "e-0", "e-2", "e-3", "e-5",
    ]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("shards", [1, 2])
def test_crashing_event_dead_lettered(evp, tmp_path, shards):
    _, address = evp.queue(None, None, "--partitions", "2")
    events = [
        {"id": f"e-{number}", "user": f"user-{number % 4}", "crash": number == 5}
        for number in range(12)
    ]
    publish_events(evp, address, write_lines(tmp_path / "events.jsonl", events))
    output = tmp_path / "out"
    # With two shards, the crashing event moves to the other shard after each crash.
    process = start_processor(
        evp, address, "crash", "--output", str(output), "--max-retries", "2",
        "--handler", f"{HANDLERS}:exit_on_marked",
        shards=shards,
    )
    wait_for_lag_zero(address, "events")
    rows = read_dead_letters(evp, address, tmp_path, 1)
    assert len(rows) == 1
    letter = DeadLetter.from_event(rows[0]["event"])
    assert letter.event["id"] == "e-5"
    assert letter.deliveries == 3
    assert letter.error.startswith("ShardCrashed:")
    assert f"exit code {CRASH_EXIT_CODE}" in letter.error
    assert letter.frame == ""

    passed = {row["event"]["id"] for row in read_output(output)}
    assert passed == {event["id"] for event in events if not event["crash"]}
    assert process.poll() is None
    # Every shard is back (one may still be in its restart backoff at lag 0), and it
    # took exactly two restarts: the third delivery was dead-lettered.
    wait_for_node(evp, process, "crash", address, "crash", shards)
    log = evp.log("crash")
    starts = re.findall(r"started shard-(\d+) pid=(\d+)", log)
    assert len(starts) == shards + 2, log
    assert len(re.findall(r"while handling topic=events partition=\d+ offset=\d+", log)) == 2
    latest = {f"crash/shard-{index}": int(pid) for index, pid in starts}

    # Members report their pid with their first heartbeat.
    def reported_pids() -> dict[str, int] | None:
        members = group_state(address, "events")["members"]
        pids = {member["id"]: member["pid"] for member in members}
        return pids if all(pids.values()) else None

    assert wait_until(reported_pids) == latest


# Handler classes and the context.


@pytest.mark.timeout(120)
def test_class_handler_lifecycle(evp, tmp_path):
    _, address = evp.queue(None, None, "--partitions", "4")
    events = [{"id": f"e-{number}", "user": f"user-{number % 3}"} for number in range(10)]
    before_publish = datetime.datetime.now(datetime.UTC)
    publish_events(evp, address, write_lines(tmp_path / "events.jsonl", events))
    after_publish = datetime.datetime.now(datetime.UTC)
    output = tmp_path / "out"
    calls_path = tmp_path / "calls-{shard}.jsonl"
    process = start_processor(
        evp, address, "cls", "--output", str(output), "--handler", f"{HANDLERS}:Recorder",
        "--handler-arg", f"path={calls_path}",
    )
    wait_for_lag_zero(address, "events")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0

    calls = [orjson.loads(line) for line in (tmp_path / "calls-0.jsonl").read_bytes().splitlines()]
    assert calls[0] == {"call": "setup", "shard": 0, "member": "cls/shard-0"}
    assert calls[-1] == {"call": "teardown"}
    assert [call["call"] for call in calls[1:-1]] == ["handle"] * len(events)
    rows = {row["event"]["id"]: row for row in read_output(output)}
    assert sorted(rows) == sorted(event["id"] for event in events)
    for event in events:
        row = rows[event["id"]]
        context = row["event"]["context"]
        assert context["topic"] == "events"
        assert context["partition"] == row["partition"]
        assert context["offset"] == row["offset"]
        assert context["key"] == event["user"]
        assert context["shard"] == 0
        assert context["member"] == "cls/shard-0"
        assert context["delivery"] == 1
        assert context["logger"] == "evp.handler.shard-0"
        timestamp = datetime.datetime.fromisoformat(context["timestamp"])
        assert before_publish <= timestamp <= after_publish


@pytest.mark.timeout(120)
def test_setup_failure_not_restarted(evp):
    _, address = evp.queue()
    process = evp.start(
        "process", "--queue", address, "--shards", "2", "--node", "broken",
        "--handler", f"{HANDLERS}:BrokenSetup",
        log_name="broken",
    )
    assert process.wait(timeout=90) == 1
    log = evp.log("broken")
    assert "setup() of handler" in log
    assert "FileNotFoundError: settings.toml not found" in log
    assert len(re.findall(r"started shard-\d pid=", log)) == 2
    assert "every shard has stopped and none will be restarted" in log


@pytest.mark.timeout(120)
def test_drain_waits_for_retry(evp, tmp_path, monkeypatch):
    release = tmp_path / "release"
    monkeypatch.setenv(RELEASE_ENV, str(release))
    _, address = evp.queue(None, None, "--partitions", "1")
    events = [{"id": "a-0", "user": "a", "hold": True}, {"id": "a-1", "user": "a"}]
    events += [{"id": f"b-{number}", "user": "b"} for number in range(3)]
    publish_events(evp, address, write_lines(tmp_path / "events.jsonl", events))
    output = tmp_path / "out"
    process = start_processor(
        evp, address, "drain", "--output", str(output), "--max-retries", "30",
        "--handler", f"{HANDLERS}:hold_until_released",
    )
    wait_until(lambda: len(read_output(output)) == 3, message="the b events did not pass")
    process.send_signal(signal.SIGTERM)
    # The shard keeps retrying while it drains; the drain ends once the held event
    # and the event queued behind it are done and acknowledged.
    wait_until(
        lambda: group_state(address, "events")["members"][0]["leaving"],
        message="the shard did not start its drain",
    )
    assert process.poll() is None
    release.touch()
    assert process.wait(timeout=60) == 0
    assert group_state(address, "events")["lag"] == 0
    order = [row["event"]["id"] for row in read_output(output)]
    assert sorted(order) == sorted(event["id"] for event in events)
    assert order[-2:] == ["a-0", "a-1"]


def test_handler_arg_rejected_for_function(evp, tmp_path):
    result = evp.run(
        "process", "--queue", "127.0.0.1:1", "--handler", f"{HANDLERS}:fail_marked",
        "--handler-arg", "path=x",
    )
    assert result.returncode == 2
    assert "--handler-arg is only for handler classes" in result.stderr.decode()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--handler", "evp:nosuch"), "unknown built-in handler 'evp:nosuch'"),
        (("--handler", "evp:jsonl", "--handler-arg", "path"), "invalid --handler-arg 'path'"),
        (("--handler", "evp:jsonl", "--handler-arg", "mode=x"), "does not accept --handler-arg mode"),
        (("--handler", "evp:count", "--output-topic", "events"), "is the input topic"),
        (("--handler-arg", "path=x",), "--handler-arg needs --handler"),
    ],
    ids=["unknown-builtin", "arg-without-value", "arg-unknown", "output-is-input", "arg-alone"],
)
def test_process_options_invalid(evp, args, message):
    result = evp.run("process", "--queue", "127.0.0.1:1", *args)
    assert result.returncode == 2
    assert message in result.stderr.decode()


# Chains through --output-topic.


@pytest.mark.timeout(180)
def test_chain_survives_stage_kill(evp, tmp_path):
    _, address = evp.queue(None, None, "--partitions", "8")
    events = [{"id": f"e-{number:04d}", "user": f"user-{number % 50}"} for number in range(600)]
    output = tmp_path / "out"
    start_processor(
        evp, address, "second", "--output", str(output), "--handler", f"{HANDLERS}:rekey_by_id",
        "--output-topic", "by-id", topic="stage", group="second",
    )
    start_processor(
        evp, address, "first", "--handler", SLOW_HANDLER, "--output-topic", "stage",
        shards=2,
    )
    publish_events(evp, address, write_lines(tmp_path / "events.jsonl", events))
    # Kill one shard of the first stage while its results are flowing downstream.
    wait_until(lambda: len(read_output(output)) >= 100, CATCH_UP_TIMEOUT_S)
    members = group_state(address, "events")["members"]
    victim = next(member["pid"] for member in members if member["pid"] and member["partitions"])
    os.kill(victim, signal.SIGKILL)

    wait_for_lag_zero(address, "events")
    wait_for_lag_zero(address, "stage", "second")
    rows = read_output(output)
    assert {row["event"]["id"] for row in rows} == {event["id"] for event in events}
    for row in rows:
        assert row["key"] == row["event"]["user"]
    # The second stage re-keyed its results by id; read them back to check the keys.
    by_id = tmp_path / "by-id"
    start_processor(
        evp, address, "third", "--output", str(by_id), topic="by-id", group="third"
    )
    wait_for_lag_zero(address, "by-id", "third")
    keyed = read_output(by_id)
    assert {row["key"] for row in keyed} == {event["id"] for event in events}
    for row in keyed:
        assert row["key"] == row["event"]["id"]


PUBLISH_FRAME_TYPE = 0x10


class PublishDelayProxy:
    """A TCP proxy on 127.0.0.1 in front of the queue that delays PUBLISH frames.

    Each PUBLISH frame from a client waits `delay_s` in the proxy before it goes on to
    the queue, and is dropped if the client's connection closes first, as if it had
    never left a host that died. Other frames pass at once, in order.
    """

    def __init__(self, upstream_port: int, delay_s: float) -> None:
        self.upstream_port = upstream_port
        self.delay_s = delay_s
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PublishDelayProxy:
        self._thread.start()
        assert self._ready.wait(10), "the proxy did not start"
        return self

    def __exit__(self, *exc_info: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()
        self._loop.close()

    async def _serve(self, client_reader: Any, client_writer: Any) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(
            "127.0.0.1", self.upstream_port
        )
        await asyncio.gather(
            self._client_to_queue(client_reader, upstream_writer),
            self._queue_to_client(upstream_reader, client_writer),
            return_exceptions=True,
        )

    async def _client_to_queue(self, reader: Any, writer: Any) -> None:
        loop = asyncio.get_running_loop()
        frames: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        client_closed = asyncio.Event()

        async def forward() -> None:
            while True:
                due, frame = await frames.get()
                if due > loop.time():
                    closed = asyncio.create_task(client_closed.wait())
                    await asyncio.wait({closed}, timeout=due - loop.time())
                    closed.cancel()
                if client_closed.is_set() and due > loop.time():
                    return
                writer.write(frame)
                await writer.drain()

        forwarder = asyncio.create_task(forward())
        try:
            while True:
                header = await reader.readexactly(4)
                body = await reader.readexactly(int.from_bytes(header, "big"))
                delay_s = self.delay_s if body[0] == PUBLISH_FRAME_TYPE else 0.0
                frames.put_nowait((loop.time() + delay_s, header + body))
        except (asyncio.IncompleteReadError, ConnectionError):
            client_closed.set()
        # Frames due already go out; held PUBLISH frames are dropped.
        while not frames.empty() and not forwarder.done():
            await asyncio.sleep(0.01)
        forwarder.cancel()
        writer.close()

    async def _queue_to_client(self, reader: Any, writer: Any) -> None:
        try:
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        finally:
            writer.close()


@pytest.mark.timeout(180)
def test_results_acknowledged_before_input(evp, tmp_path):
    _, address = evp.queue(None, None, "--partitions", "4")
    events = [{"id": f"e-{number:04d}", "user": f"user-{number % 20}"} for number in range(1000)]
    output = tmp_path / "out"
    start_processor(
        evp, address, "second", "--output", str(output), topic="stage", group="second"
    )
    queue_port = int(address.rpartition(":")[2])
    with PublishDelayProxy(queue_port, delay_s=0.3) as proxy:
        first = evp.start(
            "process", "--queue", f"127.0.0.1:{proxy.port}", "--shards", "1", "--node", "first",
            "--handler", "evp:passthrough", "--output-topic", "stage", "--max-in-flight", "100",
            log_name="first",
        )
        wait_for_node(evp, first, "first", address, "first", 1)
        # Published over about 4 s, so results keep waiting in the proxy throughout.
        publisher = publish_events(
            evp, address, write_lines(tmp_path / "events.jsonl", events), rate=250
        )
        # Kill the first stage's shard while results it published are held in the
        # proxy: a shard that acknowledged its input before PUBLISHED loses them.
        wait_until(lambda: len(read_output(output)) >= 300, CATCH_UP_TIMEOUT_S)
        os.kill(group_state(address, "events")["members"][0]["pid"], signal.SIGKILL)
        wait_until(
            lambda: len(re.findall(r"started shard-0 pid=", evp.log("first"))) == 2,
            message="the killed shard was not restarted",
        )
        assert publisher.wait(timeout=60) == 0
        wait_for_lag_zero(address, "events")
        wait_for_lag_zero(address, "stage", "second")
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0
    missing = {event["id"] for event in events} - {row["event"]["id"] for row in read_output(output)}
    assert missing == set()


# Built-in handlers.


@pytest.mark.timeout(120)
def test_builtin_print_passes_events(evp, tmp_path):
    _, address = evp.queue(None, None, "--partitions", "4")
    events = [{"id": f"e-{number}", "user": f"user-{number % 3}"} for number in range(8)]
    publish_events(evp, address, write_lines(tmp_path / "events.jsonl", events))
    output = tmp_path / "out"
    start_processor(evp, address, "printer", "--output", str(output), "--handler", "evp:print")
    wait_for_lag_zero(address, "events")
    rows = read_output(output)
    assert sorted(row["event"]["id"] for row in rows) == sorted(e["id"] for e in events)
    assert all(row["event"] in events for row in rows)

    def printed() -> list[dict[str, Any]]:
        lines = evp.log("printer").splitlines()
        return [orjson.loads(line) for line in lines if line.startswith('{"topic":')]

    wait_until(lambda: len(printed()) >= len(events), message="evp:print wrote too few lines")
    by_id = {line["event"]["id"]: line for line in printed()}
    assert sorted(by_id) == sorted(e["id"] for e in events)
    for row in rows:
        line = by_id[row["event"]["id"]]
        assert line["topic"] == "events"
        assert (line["partition"], line["offset"]) == (row["partition"], row["offset"])
        assert line["key"] == row["event"]["user"]


# Events the queue accepts but orjson alone cannot read or write.


@pytest.mark.timeout(120)
def test_unusual_json_handled_and_dead_lettered(evp, tmp_path):
    big = 10**400 + 7
    deep: Any = []
    for _ in range(300):
        deep = [deep]
    lines = [
        b'{"id":"big","user":"u-1","n":' + str(big).encode() + b"}",
        orjson.dumps({"id": "deep", "user": "u-2", "fail": True}).replace(
            b"}", b',"deep":' + b"[" * 300 + b"]" * 300 + b"}"
        ),
        *(orjson.dumps({"id": f"plain-{number}", "user": f"u-{number % 3}"}) for number in range(6)),
    ]
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    _, address = evp.queue(None, None, "--partitions", "2")
    output = tmp_path / "out"
    start_processor(
        evp, address, "odd", "--output", str(output), "--max-retries", "1",
        "--handler", f"{HANDLERS}:fail_marked",
    )
    publish_events(evp, address, path)
    wait_for_lag_zero(address, "events")

    # The standard library reads the integer exactly; orjson would not read it at all.
    rows = {}
    for file in output.glob("*.jsonl"):
        for line in file.read_text().splitlines():
            row = json.loads(line)
            rows[row["event"]["id"]] = row["event"]
    assert set(rows) == {"big", *(f"plain-{number}" for number in range(6))}
    assert rows["big"]["n"] == big
    letters = read_dead_letters(evp, address, tmp_path, 1)
    letter = DeadLetter.from_event(letters[0]["event"])
    assert letter.event["id"] == "deep"
    assert letter.deliveries == 2
    assert "marked to fail" in letter.error


@pytest.mark.timeout(120)
def test_shard_waits_out_connection_limit(evp, tmp_path):
    """A shard refused by --max-connections at start retries instead of giving up."""
    _, address = evp.queue(None, None, "--max-connections", "3", "--partitions", "2")
    host, port = address.rsplit(":", 1)
    idle = [socket.create_connection((host, int(port))) for _ in range(3)]
    try:
        process = evp.start(
            "process", "--queue", address, "--shards", "1", "--node", "limited",
            "--output-topic", "copies", log_name="limited",
        )
        wait_until(
            lambda: "too_many_connections" in evp.log("limited"),
            START_TIMEOUT_S,
            message="the shard never met the connection limit",
        )
    finally:
        for connection in idle:
            connection.close()
    # One shard needs two connections (its consumer and its producer), the check a third.
    wait_for_node(evp, process, "limited", address, "limited", 1, timeout_s=START_TIMEOUT_S)
    assert process.poll() is None


@pytest.mark.timeout(120)
def test_count_builtin_logs_after_burst(evp, tmp_path):
    """evp:count logs its totals every interval, also once events stop arriving."""
    _, address = evp.queue(None, None, "--partitions", "1")
    process = start_processor(
        evp, address, "counter", "--handler", "evp:count", "--handler-arg", "interval=0.5"
    )
    events = [{"id": f"e-{number}", "user": "u-1"} for number in range(5)]
    publish_events(evp, address, write_lines(tmp_path / "events.jsonl", events))
    wait_until(
        lambda: "count total=5 " in evp.log("counter"),
        START_TIMEOUT_S,
        message="evp:count logged no total while running",
    )
    assert process.poll() is None
    # Nothing new arrives, so nothing more is logged until the shard stops.
    lines = evp.log("counter").count("count total=")
    time.sleep(1.5)
    assert evp.log("counter").count("count total=") == lines
