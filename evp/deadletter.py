"""Dead letters: events a shard gave up on, stored in the topic `<topic>.dlq`.

A dead letter is published with the original event's key, and its value is a JSON
object with the fields of DeadLetter, for example::

    {"event": {...}, "error": "ValueError: message", "frame": "app/handlers.py:42 in handle",
     "deliveries": 4, "topic": "events", "partition": 3, "offset": 1234,
     "group": "default", "failed_at": "2026-12-04T19:00:00.123456+00:00"}
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from datetime import datetime
from typing import Any

DLQ_SUFFIX = ".dlq"


def dlq_topic(topic: str) -> str:
    """Return the name of the topic that contains `topic`'s dead letters."""
    return topic + DLQ_SUFFIX


@dataclass(frozen=True)
class DeadLetter:
    """An event that failed processing, with where and why it failed."""

    event: dict[str, Any]
    # The exception as "TypeName: message".
    error: str
    # The source line that raised, as "path/file.py:LINE in FUNCTION", or None when unknown.
    frame: str | None
    # How many times the event was delivered before the shard gave up.
    deliveries: int
    topic: str
    partition: int
    offset: int
    group: str
    # When the shard gave up, ISO 8601 with a UTC offset.
    failed_at: str

    def to_event(self) -> dict[str, Any]:
        """Return the dead letter as the JSON object that is published."""
        return asdict(self)

    @classmethod
    def from_event(cls, value: Any) -> DeadLetter:
        """Build a DeadLetter from a published value; raise ValueError naming the bad field."""
        if not isinstance(value, dict):
            raise ValueError(f"a dead letter must be a JSON object, got {type(value).__name__}")
        missing = [field.name for field in fields(cls) if field.name not in value]
        if missing:
            raise ValueError(f"not a dead letter: missing field(s) {', '.join(missing)}")
        checks: dict[str, tuple[type, ...]] = {
            "event": (dict,),
            "error": (str,),
            "frame": (str, type(None)),
            "deliveries": (int,),
            "topic": (str,),
            "partition": (int,),
            "offset": (int,),
            "group": (str,),
            "failed_at": (str,),
        }
        for name, kinds in checks.items():
            field_value = value[name]
            # bool is an int subclass, but true is not a count.
            if not isinstance(field_value, kinds) or isinstance(field_value, bool):
                names = ["null" if kind is type(None) else kind.__name__ for kind in kinds]
                expected = " or ".join(names)
                raise ValueError(
                    f"invalid dead letter field {name!r}: expected {expected}, "
                    f"got {field_value!r:.80}"
                )
        try:
            datetime.fromisoformat(value["failed_at"])
        except ValueError:
            raise ValueError(
                f"invalid dead letter field 'failed_at': {value['failed_at']!r:.80} is not an "
                f"ISO 8601 time"
            ) from None
        return cls(**{field.name: value[field.name] for field in fields(cls)})
