"""Example handlers for Wikipedia edit events (page, user, delta, isRobot, ...)."""

from __future__ import annotations

from typing import Any


def human_edits(event: dict[str, Any]) -> dict[str, Any] | None:
    """Pass edits made by people; drop edits by bots."""
    if event.get("isRobot"):
        return None
    return event


class LargeEdits:
    """Emit an alert for each edit that adds or removes at least `threshold` bytes."""

    def __init__(self, threshold: str = "1000") -> None:
        try:
            self.threshold = int(threshold)
        except ValueError:
            raise ValueError(
                f"invalid threshold {threshold!r}: give a whole number of bytes, "
                f"e.g. threshold=1000"
            ) from None

    def handle(self, event: dict[str, Any], context: Any) -> dict[str, Any] | None:
        delta = event.get("delta") or 0
        if abs(delta) < self.threshold:
            return None
        context.logger.debug("large edit of %+d bytes on %r", delta, event.get("page"))
        return {
            "alert": "large_edit",
            "page": event.get("page"),
            "user": event.get("user"),
            "channel": event.get("channel"),
            "delta": delta,
            "time": event.get("time"),
        }
