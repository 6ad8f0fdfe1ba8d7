"""Handler functions that the tests pass to `evp process --handler tests/handlers.py:NAME`.

Each runs inside a shard process, so it may only depend on the event it is given.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

# The processing delay of `slow`. 20 ms per event keeps a shard busy long enough for a
# test to find events in flight, and short enough that a few hundred events pass in
# seconds.
SLOW_DELAY_S = 0.02


def github(event: dict[str, Any]) -> Any:
    """Drop WatchEvent, fan a PushEvent out to one result per commit, tag the rest.

    A PushEvent without commits yields an empty list, so nothing is written for it.
    """
    if event["type"] == "WatchEvent":
        return None
    if event["type"] == "PushEvent":
        return [
            {"repo": event["repo"]["name"], "event_id": event["id"], "sha": commit["sha"]}
            for commit in event["payload"].get("commits", [])
        ]
    return dict(event, handled_by="tests.handlers.github")


async def slow(event: dict[str, Any]) -> dict[str, Any]:
    """Return the event unchanged after SLOW_DELAY_S, without blocking the event loop."""
    await asyncio.sleep(SLOW_DELAY_S)
    return event


# How long `blocking` waits: far longer than any test, so its events stay in flight.
BLOCKING_DELAY_S = 3600.0
# How long `poison_slowly` works before failing, so a retry is visible in the
# statistics, which the shard reports once a second.
POISON_DELAY_S = 1.5


class PoisonError(Exception):
    """The failure `poison_slowly` raises for an event marked as poison."""


async def blocking(event: dict[str, Any]) -> dict[str, Any]:
    """Wait BLOCKING_DELAY_S without blocking the event loop, so heartbeats go on."""
    await asyncio.sleep(BLOCKING_DELAY_S)
    return event


async def poison_slowly(event: dict[str, Any]) -> dict[str, Any]:
    """Fail on events with "poison": true after POISON_DELAY_S; pass the rest."""
    if event.get("poison"):
        await asyncio.sleep(POISON_DELAY_S)
        raise PoisonError(f"event {event.get('id')} is poison")
    return event


def sleepy_sync(event: dict[str, Any]) -> dict[str, Any]:
    """Block the shard's event loop for 20 ms per event, like a slow synchronous call."""
    time.sleep(0.02)
    return event


def returns_set(event: dict[str, Any]) -> Any:
    """Return a value that is not an event for events marked "bad"."""
    if event.get("bad"):
        return {1, 2}
    return event


# How long `block_loop_after` blocks the event loop after its marked event returns:
# longer than the session timeout the test gives the queue.
LOOP_BLOCK_S = 3.0


async def block_loop_after(event: dict[str, Any]) -> dict[str, Any]:
    """Pass each event after one await; after an event marked "block", block the loop.

    The await stands for a handler's I/O. The marked event's handler returns first,
    and only then does the blocking call run, so that event is finished and is owed
    an acknowledgement while the event loop is stuck.
    """
    await asyncio.sleep(0)
    if event.get("block"):
        asyncio.get_running_loop().call_soon(time.sleep, LOOP_BLOCK_S)
    return event


async def hold_marked(event: dict[str, Any]) -> dict[str, Any]:
    """Pass events, but wait without end on events with a "hold" field.

    The field names a file, which the handler creates when it starts waiting, so a
    test can wait until the shard has an event it will not finish.
    """
    if event.get("hold"):
        Path(event["hold"]).touch()
        await asyncio.sleep(BLOCKING_DELAY_S)
    return event


async def gated(event: dict[str, Any]) -> dict[str, Any]:
    """Wait while the file named by the event's "gate" field exists, then pass the event."""
    gate = Path(event["gate"])
    while gate.exists():
        await asyncio.sleep(0.05)
    return event
