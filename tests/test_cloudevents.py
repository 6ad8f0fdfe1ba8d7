"""CloudEvents: routing by `partitionkey` and the `evp publish --cloudevents` envelope."""

from __future__ import annotations

import subprocess
import uuid
from datetime import datetime
from typing import Any

import orjson
import pytest

from evp import events
from evp.hashing import partition_for

PARTITIONS = 8


def ok(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def tailed(evp, address: str, topic: str) -> list[dict[str, Any]]:
    text = ok(evp.run("tail", "--topic", topic, "--from-start", "--queue", address))
    return [orjson.loads(line) for line in text.splitlines()]


def cloudevent(number: int, partition_key: str | None) -> dict[str, Any]:
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": f"ce-{number}",
        "source": "/orders",
        "type": "com.example.order",
        "user": f"other-{number}",
        "data": {"n": number},
    }
    if partition_key is not None:
        event["partitionkey"] = partition_key
    return event


# Key rules.


def test_cloudevent_key_beats_key_field():
    paths = events.key_path("user")
    assert events.extract_key(cloudevent(1, "customer-9"), paths) == b"customer-9"
    assert events.extract_key(cloudevent(2, None), paths) == b"other-2"
    assert events.extract_key(cloudevent(3, None), events.key_path(None)) == b"ce-3"


def test_partitionkey_without_specversion_follows_key_field():
    plain = {"partitionkey": "p", "user": "u", "id": "i"}
    assert events.extract_key(plain, events.key_path("user")) == b"u"
    assert events.extract_key(plain, events.key_path(None)) == b"p"


def test_cloudevent_partitionkey_invalid_type():
    with pytest.raises(events.InvalidEvent, match="key field 'partitionkey' is null"):
        events.extract_key(dict(cloudevent(1, None), partitionkey=None), events.key_path("user"))


def test_envelope_fields():
    key, value = events.to_cloudevent(
        {"user": "u7", "n": 2**70}, events.key_path("user"), "evp://host/publish", "evp.event"
    )
    envelope = orjson.loads(value.replace(str(2**70).encode(), b"0"))
    assert key == b"u7"
    assert envelope["partitionkey"] == "u7"
    assert envelope["specversion"] == "1.0"
    assert envelope["datacontenttype"] == "application/json"
    assert uuid.UUID(envelope["id"])
    assert datetime.fromisoformat(envelope["time"]).tzinfo is not None
    # Integers beyond 64 bits stay exact.
    assert str(2**70).encode() in value


def test_existing_cloudevent_without_key_kept_as_is():
    event = {"specversion": "1.0", "id": "ce-9", "source": "s", "type": "t", "data": {}}
    key, value = events.to_cloudevent(event, events.key_path("user"), "evp://h/p", "evp.event")
    assert key == b"ce-9"
    assert orjson.loads(value) == event


# Against a queue.


def test_publish_routes_by_partitionkey(evp):
    _, address = evp.queue()
    ok(evp.run("topics", "create", "orders", "--partitions", str(PARTITIONS), "--queue", address))
    rows = [cloudevent(number, f"customer-{number % 3}") for number in range(12)]
    rows.append(cloudevent(99, None))
    data = b"".join(orjson.dumps(row) + b"\n" for row in rows)
    ok(evp.run(
        "publish", "--queue", address, "--topic", "orders", "--file", "-", "--key-field", "user",
        "--rate", "0", input=data,
    ))
    stored = {line["event"]["id"]: line for line in tailed(evp, address, "orders")}
    assert len(stored) == 13
    for row in rows[:12]:
        line = stored[row["id"]]
        assert line["key"] == row["partitionkey"]
        assert line["partition"] == partition_for(row["partitionkey"].encode(), PARTITIONS)
    # Without partitionkey, --key-field applies as to any event.
    assert stored["ce-99"]["key"] == "other-99"


def test_publish_cloudevents_envelope(evp):
    _, address = evp.queue()
    rows = [{"user": f"u{number % 2}", "n": number} for number in range(5)] + [{"n": 5}]
    data = b"".join(orjson.dumps(row) + b"\n" for row in rows)
    ok(evp.run(
        "publish", "--queue", address, "--topic", "wrapped", "--file", "-", "--key-field", "user",
        "--cloudevents", "--cloudevents-source", "urn:test:publisher", "--rate", "0", input=data,
    ))
    lines = tailed(evp, address, "wrapped")
    assert len(lines) == 6
    by_number = {line["event"]["data"]["n"]: line for line in lines}
    assert sorted(by_number) == list(range(6))
    ids = set()
    for number, row in enumerate(rows):
        line = by_number[number]
        envelope = line["event"]
        assert envelope["specversion"] == "1.0"
        assert envelope["source"] == "urn:test:publisher"
        assert envelope["type"] == "evp.event"
        assert envelope["datacontenttype"] == "application/json"
        assert envelope["data"] == row
        assert datetime.fromisoformat(envelope["time"]).tzinfo is not None
        ids.add(envelope["id"])
        if "user" in row:
            assert envelope["partitionkey"] == row["user"]
            assert line["key"] == row["user"]
        else:
            # No key: no partitionkey, and the envelope is keyed by its unique id.
            assert "partitionkey" not in envelope
            assert line["key"] == envelope["id"]
    assert len(ids) == 6


def test_publish_cloudevents_generated_and_type(evp):
    _, address = evp.queue()
    ok(evp.run(
        "publish", "--queue", address, "--topic", "generated", "--count", "5", "--rate", "0",
        "--cloudevents", "--cloudevents-type", "com.example.action",
    ))
    lines = tailed(evp, address, "generated")
    assert len(lines) == 5
    for line in lines:
        envelope = line["event"]
        assert envelope["type"] == "com.example.action"
        assert envelope["source"].startswith("evp://")
        assert envelope["partitionkey"] == envelope["data"]["user"] == line["key"]


def test_publish_cloudevents_empty_type(evp):
    result = evp.run("publish", "--queue", "127.0.0.1:1", "--cloudevents", "--cloudevents-type", " ")
    assert result.returncode == 2
    assert "invalid --cloudevents-type" in result.stderr.decode()
