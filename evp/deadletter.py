"""The dead-letter record: what a shard publishes to `<topic>.dlq` for an event it gave up on.

A dead letter keeps the original event's key, and its value is the JSON object that
`DeadLetter.to_event` returns. Tools that read dead-letter topics parse it with
`DeadLetter.from_event`, so the field names live here and nowhere else.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, fields
from typing import Any

DLQ_SUFFIX = ".dlq"


def dlq_topic(topic: str) -> str:
    """Return the dead-letter topic of `topic`."""
    return topic + DLQ_SUFFIX


def utc_now() -> str:
    """Return the current time as an ISO 8601 string in UTC, with microseconds."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event that failed every delivery, with where it came from and why it failed."""

    # The original event, exactly as the handler received it.
    event: dict[str, Any]
    # "ExceptionType: message" of the last failure.
    error: str
    # The last frame of the traceback, "path/file.py:42 in handle"; empty when the
    # shard process died and left no traceback.
    frame: str
    # How many times the event was delivered to the handler, the last failure included.
    deliveries: int
    topic: str
    partition: int
    offset: int
    group: str
    # When the shard gave up, ISO 8601 in UTC.
    failed_at: str

    def to_event(self) -> dict[str, Any]:
        """Return the dead letter as the JSON object published to the dead-letter topic.

        The event is not copied: a deep copy would fail on an event nested deeper than
        Python's recursion limit, and the caller only encodes the result.
        """
        return {field.name: getattr(self, field.name) for field in fields(self)}

    @classmethod
    def from_event(cls, value: Any) -> DeadLetter:
        """Parse a dead-letter topic's event; raise ValueError naming what is wrong."""
        if not isinstance(value, dict):
            raise ValueError(
                f"invalid dead letter: expected a JSON object, got {type(value).__name__}"
            )
        expected = {field.name for field in fields(cls)}
        missing = sorted(expected - value.keys())
        if missing:
            raise ValueError(
                f"invalid dead letter: missing field(s) {', '.join(missing)}; "
                f"a dead letter has the fields {', '.join(sorted(expected))}"
            )
        checks: dict[str, type] = {
            "event": dict,
            "error": str,
            "frame": str,
            "deliveries": int,
            "topic": str,
            "partition": int,
            "offset": int,
            "group": str,
            "failed_at": str,
        }
        for name, kind in checks.items():
            field_value = value[name]
            # bool is an int in Python, but never a valid count or offset.
            if not isinstance(field_value, kind) or isinstance(field_value, bool):
                raise ValueError(
                    f"invalid dead letter: field {name!r} is {field_value!r}, "
                    f"expected {_kind_name(kind)}"
                )
        for name in ("deliveries", "partition", "offset"):
            if value[name] < 0:
                raise ValueError(
                    f"invalid dead letter: field {name!r} is {value[name]}, expected a "
                    f"non-negative integer"
                )
        try:
            datetime.datetime.fromisoformat(value["failed_at"])
        except ValueError:
            raise ValueError(
                f"invalid dead letter: field 'failed_at' is {value['failed_at']!r:.80}, "
                f"expected an ISO 8601 time"
            ) from None
        return cls(**{name: value[name] for name in expected})


def _kind_name(kind: type) -> str:
    return {dict: "a JSON object", str: "a string", int: "an integer"}.get(kind, kind.__name__)
