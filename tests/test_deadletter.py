"""The dead-letter record: its JSON shape and the errors for malformed values."""

from __future__ import annotations

import orjson
import pytest

from evp.deadletter import DeadLetter, dlq_topic

FIELDS = {
    "event": {"id": "e-1", "user": "u"},
    "error": "ValueError: bad amount",
    "frame": "app/handlers.py:42 in handle",
    "deliveries": 4,
    "topic": "events",
    "partition": 3,
    "offset": 1234,
    "group": "default",
    "failed_at": "2026-12-04T19:00:00.123456+00:00",
}


def test_round_trip_through_json():
    letter = DeadLetter(**FIELDS)
    value = orjson.loads(orjson.dumps(letter.to_event()))
    assert value == FIELDS
    assert DeadLetter.from_event(value) == letter


def test_dlq_topic_name():
    assert dlq_topic("events") == "events.dlq"


def test_letter_is_frozen():
    letter = DeadLetter(**FIELDS)
    with pytest.raises(AttributeError):
        letter.deliveries = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([1, 2], "expected a JSON object, got list"),
        ({k: v for k, v in FIELDS.items() if k != "frame"}, "missing field(s) frame"),
        ({**FIELDS, "event": "text"}, "field 'event' is 'text', expected a JSON object"),
        ({**FIELDS, "deliveries": "4"}, "field 'deliveries' is '4', expected an integer"),
        ({**FIELDS, "offset": True}, "field 'offset' is True"),
        ({**FIELDS, "partition": -1}, "field 'partition' is -1, expected a non-negative integer"),
        ({**FIELDS, "failed_at": None}, "field 'failed_at' is None, expected a string"),
    ],
    ids=["not-object", "missing", "event-text", "count-text", "bool", "negative", "null-time"],
)
def test_malformed_value_rejected(value, message):
    with pytest.raises(ValueError, match="invalid dead letter") as info:
        DeadLetter.from_event(value)
    assert message in str(info.value)


def test_extra_fields_ignored():
    letter = DeadLetter.from_event({**FIELDS, "note": "added by a later version"})
    assert letter == DeadLetter(**FIELDS)
