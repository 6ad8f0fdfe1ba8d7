"""Example handler for GitHub events (the GH Archive format): keep only pushes."""

from __future__ import annotations

from typing import Any


def push_events(event: dict[str, Any]) -> dict[str, Any] | None:
    """Return a short summary of a PushEvent; drop every other event type."""
    if event.get("type") != "PushEvent":
        return None
    payload = event.get("payload") or {}
    return {
        "id": event["id"],
        "repo": event["repo"]["name"],
        "actor": event["actor"]["login"],
        "commits": len(payload.get("commits") or []),
        "created_at": event.get("created_at"),
    }
