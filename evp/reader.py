"""Reading a topic through the queue's `records.read` operation, outside any group.

`evp tail` and `evp dlq` use it. Each call returns a bounded batch and the positions
it reached, so the reader keeps its own positions and no group's positions change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from evp.client import ClientError, admin_request

logger = logging.getLogger("evp.reader")

# Records asked for per call. The queue caps a call at 1 MiB of events as well.
BATCH_RECORDS = 1000


@dataclass(frozen=True)
class StoredRecord:
    """One record of a topic, with its value kept as the stored JSON text."""

    topic: str
    partition: int
    offset: int
    timestamp_us: int
    key: str
    value: str

    @property
    def time(self) -> str:
        """The publish time in ISO 8601, UTC, to the microsecond."""
        moment = datetime.fromtimestamp(self.timestamp_us / 1e6, UTC)
        return moment.isoformat(timespec="microseconds")

    def json_line(self, event_only: bool = False) -> str:
        """Return the record as one JSON line: metadata and "event", or the event alone."""
        if event_only:
            return self.value
        # The event is spliced in as stored text, so it is printed exactly as stored.
        metadata = orjson.dumps(
            {
                "topic": self.topic,
                "partition": self.partition,
                "offset": self.offset,
                "key": self.key,
                "timestamp": self.time,
            }
        ).decode()
        return f'{metadata[:-1]},"event":{self.value}}}'


async def describe_topic(address: str, topic: str, token: str | None) -> dict[str, Any] | None:
    """Return `topics.describe` of a topic, or None when the queue has no such topic."""
    names = {row["name"] for row in await admin_request(address, "topics.list", {}, token=token)}
    if topic not in names:
        return None
    return await admin_request(address, "topics.describe", {"name": topic}, token=token)


async def read_batch(
    address: str,
    topic: str,
    positions: dict[int, int],
    *,
    key: str | None = None,
    token: str | None = None,
    max_records: int = BATCH_RECORDS,
) -> tuple[list[StoredRecord], dict[int, int], dict[int, int]]:
    """Read one batch; return the records, the positions after them and the ends."""
    args: dict[str, Any] = {
        "topic": topic,
        "positions": {str(partition): offset for partition, offset in positions.items()},
        "max_records": max_records,
    }
    if key is not None:
        args["key"] = key
    result = await admin_request(address, "records.read", args, token=token)
    for partition, skipped in result["skipped"].items():
        logger.warning(
            "partition %s: %d events before the first retained offset were deleted by "
            "retention; reading from there",
            partition,
            skipped,
        )
    for partition, message in result["errors"].items():
        raise ClientError(f"reading partition {partition} of topic {topic!r} failed: {message}")
    found = [
        StoredRecord(
            topic,
            row["partition"],
            row["offset"],
            row["timestamp_us"],
            row["key"],
            row["value"],
        )
        for row in result["records"]
    ]
    reached = {int(partition): offset for partition, offset in result["positions"].items()}
    ends = {int(partition): offset for partition, offset in result["ends"].items()}
    return found, reached, ends


async def read_until(
    address: str,
    topic: str,
    positions: dict[int, int],
    ends: dict[int, int],
    *,
    key: str | None = None,
    token: str | None = None,
) -> AsyncIterator[StoredRecord]:
    """Yield records from `positions` up to (not including) `ends`, partition by partition."""
    positions = {p: offset for p, offset in positions.items() if offset < ends.get(p, 0)}
    while positions:
        batch, reached, _ = await read_batch(address, topic, positions, key=key, token=token)
        for record in batch:
            if record.offset < ends[record.partition]:
                yield record
        positions = {
            p: offset for p, offset in reached.items() if offset < ends[p] and p in positions
        }


async def follow(
    address: str,
    topic: str,
    positions: dict[int, int],
    *,
    key: str | None = None,
    token: str | None = None,
    interval_s: float = 0.5,
) -> AsyncIterator[StoredRecord]:
    """Yield records from `positions` on, forever, polling every `interval_s` when idle.

    A failed poll (the queue restarting, say) is logged and retried after the interval.
    """
    while True:
        try:
            batch, reached, ends = await read_batch(address, topic, positions, key=key, token=token)
        except ClientError as exc:
            logger.warning(
                "reading topic %s failed: %s; retrying in %.1f s", topic, exc, interval_s
            )
            await asyncio.sleep(interval_s)
            continue
        for record in batch:
            yield record
        positions = reached
        if all(positions[p] >= ends[p] for p in positions):
            await asyncio.sleep(interval_s)
