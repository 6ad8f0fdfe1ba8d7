"""`evp dlq` against dead letters published to a real queue, and evp.deadletter."""

from __future__ import annotations

import signal
import subprocess
from typing import Any

import orjson
import pytest
from conftest import snapshot, wait_until

from evp.deadletter import DeadLetter, dlq_topic


def dead_letter(number: int, user: str, error: str = "ValueError: bad amount") -> DeadLetter:
    return DeadLetter(
        event={"id": f"order-{number}", "user": user, "amount": number},
        error=error,
        frame="app/handlers.py:42 in handle",
        deliveries=4,
        topic="events",
        partition=number % 3,
        offset=100 + number,
        group="default",
        failed_at=f"2026-12-04T19:00:0{number}.123456+00:00",
    )


LETTERS = [dead_letter(0, "alice"), dead_letter(1, "bob", "KeyError: 'sku'"), dead_letter(2, "alice")]


def ok(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def failure_message(result: subprocess.CompletedProcess[bytes]) -> str:
    stderr = result.stderr.decode()
    assert result.returncode != 0, stderr
    assert "Traceback" not in stderr
    return stderr


def publish(evp, address: str, topic: str, values: list[dict[str, Any]], key_field: str) -> None:
    data = b"".join(orjson.dumps(value) + b"\n" for value in values)
    ok(evp.run(
        "publish", "--queue", address, "--topic", topic, "--file", "-", "--key-field", key_field,
        "--rate", "0", input=data,
    ))


@pytest.fixture
def queue_with_letters(evp):
    """A queue whose topic events.dlq (one partition) contains LETTERS and one malformed value."""
    _, address = evp.queue()
    ok(evp.run("topics", "create", dlq_topic("events"), "--partitions", "1", "--queue", address))
    # The dead letter's key is the original event's key, here its user.
    publish(evp, address, "events.dlq", [letter.to_event() for letter in LETTERS], "event.user")
    publish(evp, address, "events.dlq", [{"user": "carol", "note": "not a dead letter"}], "user")
    return address


def listed(evp, address: str, *args: str) -> list[dict[str, Any]]:
    return orjson.loads(ok(evp.run("dlq", "list", "--topic", "events", "--json", "--queue", address, *args)))


def test_dlq_list_and_show(evp, queue_with_letters, monkeypatch):
    address = queue_with_letters
    # Wide enough that rich does not wrap the table's cells.
    monkeypatch.setenv("COLUMNS", "200")
    rows = listed(evp, address)
    assert [row["dlq_offset"] for row in rows] == [0, 1, 2, 3]
    assert [row["key"] for row in rows] == ["alice", "bob", "alice", "carol"]
    assert [row["dead_letter"] for row in rows[:3]] == [letter.to_event() for letter in LETTERS]
    assert rows[3]["dead_letter"] is None
    assert "missing field(s)" in rows[3]["problem"]
    assert [row["dlq_offset"] for row in listed(evp, address, "--key", "alice")] == [0, 2]

    table = ok(evp.run("dlq", "list", "--topic", "events", "--queue", address))
    assert "KeyError: 'sku'" in table
    assert "not a dead letter" in table
    assert "4 dead letters" in table

    shown = ok(evp.run("dlq", "show", "1", "--topic", "events", "--queue", address))
    assert orjson.loads(shown)["dead_letter"] == LETTERS[1].to_event()
    everything = ok(evp.run("dlq", "show", "--topic", "events", "--queue", address))
    assert everything.count('"dlq_offset"') == 4
    missing = evp.run("dlq", "show", "0:9", "--topic", "events", "--queue", address)
    assert "no dead letter at 0:9" in failure_message(missing)
    invalid = evp.run("dlq", "show", "x1", "--topic", "events", "--queue", address)
    assert "invalid dead letter id 'x1'" in failure_message(invalid)


def tail_events(evp, address: str) -> list[dict[str, Any]]:
    text = ok(evp.run("tail", "--topic", "events", "--from-start", "--queue", address))
    return [orjson.loads(line) for line in text.splitlines()]


def test_dlq_replay_publishes_originals(evp, queue_with_letters):
    address = queue_with_letters
    by_key = ok(evp.run("dlq", "replay", "--topic", "events", "--key", "alice", "--queue", address))
    assert "replayed 2 events to topic events" in by_key
    replayed = tail_events(evp, address)
    assert sorted((line["key"], line["event"]["id"]) for line in replayed) == [("alice", "order-0"), ("alice", "order-2")]

    by_offset = ok(evp.run("dlq", "replay", "--topic", "events", "--offset", "0:1", "--queue", address))
    assert "replayed 1 events" in by_offset
    assert [line["event"] for line in tail_events(evp, address) if line["key"] == "bob"] == [LETTERS[1].event]

    # All: the three dead letters are replayed; the malformed record is reported and skipped.
    everything = evp.run("dlq", "replay", "--topic", "events", "--queue", address)
    assert everything.returncode == 1
    assert "replayed 3 events" in everything.stdout.decode()
    assert "skipped 0:3: not a dead letter" in everything.stderr.decode()
    assert len(tail_events(evp, address)) == 6
    # Replaying leaves the dead letters in place.
    assert len(listed(evp, address)) == 4


def test_dlq_purge(evp, queue_with_letters):
    address = queue_with_letters
    unconfirmed = evp.run("dlq", "purge", "--topic", "events", "--queue", address)
    assert "pass --yes" in failure_message(unconfirmed)
    assert len(listed(evp, address)) == 4
    purged = ok(evp.run("dlq", "purge", "--topic", "events", "--yes", "--queue", address))
    assert "purged 4 dead letters of topic events" in purged
    for command in ("list", "show", "replay", "purge"):
        result = evp.run("dlq", command, "--topic", "events", "--queue", address)
        assert result.returncode == 0, result.stderr.decode()
        assert "no dead letters for topic events" in result.stdout.decode()


@pytest.mark.timeout(120)
def test_dlq_purge_rejected_while_consumed(evp, queue_with_letters, tmp_path):
    address = queue_with_letters
    processor = evp.start(
        "process", "--queue", address, "--topic", "events.dlq", "--group", "alerts",
        "--shards", "1", "--node", "dlq", "--output", str(tmp_path / "out"), log_name="process",
    )
    wait_until(
        lambda: any(g["group"] == "alerts" and g["members"] for g in snapshot(address)["groups"]),
        timeout_s=60,
        message="the processor did not join",
    )
    refused = evp.run("dlq", "purge", "--topic", "events", "--yes", "--queue", address)
    assert "has connected processors" in failure_message(refused)
    assert len(listed(evp, address)) == 4
    processor.send_signal(signal.SIGTERM)
    assert processor.wait(timeout=60) == 0
    ok(evp.run("dlq", "purge", "--topic", "events", "--yes", "--queue", address))


def test_dlq_keeps_large_integers(evp):
    _, address = evp.queue()
    big = 2**70 + 1
    letter = dead_letter(5, "dave")
    text = orjson.dumps(letter.to_event()).decode().replace('"amount":5', f'"amount":{big}')
    ok(evp.run(
        "publish", "--queue", address, "--topic", "events.dlq", "--file", "-",
        "--key-field", "event.user", "--rate", "0", input=text.encode() + b"\n",
    ))
    shown = ok(evp.run("dlq", "show", "--topic", "events", "--queue", address))
    assert f'"amount": {big}' in shown
    ok(evp.run("dlq", "replay", "--topic", "events", "--queue", address))
    replayed = ok(evp.run("tail", "--topic", "events", "--events-only", "--queue", address))
    assert f'"amount":{big}' in replayed


def test_dlq_missing_topic_message(evp):
    _, address = evp.queue()
    result = evp.run("dlq", "list", "--topic", "orders", "--queue", address)
    assert result.returncode == 0
    assert result.stdout.decode().startswith("no dead letters for topic orders")
    assert result.stderr == b""


# evp.deadletter.


def test_dead_letter_round_trip():
    letter = LETTERS[1]
    assert DeadLetter.from_event(orjson.loads(orjson.dumps(letter.to_event()))) == letter
    assert set(letter.to_event()) == {
        "event", "error", "frame", "deliveries", "topic", "partition", "offset", "group", "failed_at",
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"deliveries": None}, "field 'deliveries' is None, expected an integer"),
        ({"deliveries": True}, "field 'deliveries' is True"),
        ({"event": "text"}, "field 'event' is 'text', expected a JSON object"),
        ({"failed_at": "yesterday"}, "field 'failed_at' is 'yesterday', expected an ISO 8601 time"),
        ({"offset": "12"}, "field 'offset' is '12'"),
    ],
)
def test_dead_letter_invalid_field(change, message):
    value = dict(LETTERS[0].to_event(), **change)
    with pytest.raises(ValueError, match=message):
        DeadLetter.from_event(value)


def test_dead_letter_missing_fields():
    value = LETTERS[0].to_event()
    del value["error"]
    del value["group"]
    with pytest.raises(ValueError, match=r"missing field\(s\) error, group"):
        DeadLetter.from_event(value)
    with pytest.raises(ValueError, match="expected a JSON object, got list"):
        DeadLetter.from_event([1, 2])
