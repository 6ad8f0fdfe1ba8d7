"""`evp tail`: print a topic's events as JSON lines, without joining a group."""

from __future__ import annotations

import collections
import sys
from dataclasses import dataclass

from evp import hashing, reader


@dataclass
class TailPlan:
    queue: str
    topic: str
    key: str | None = None
    partition: int | None = None
    from_start: bool = False
    from_offset: int | None = None
    # Start with the newest `last` events; None when another start is chosen.
    last: int | None = 10
    follow: bool = False
    events_only: bool = False
    interval_s: float = 0.5
    token: str | None = None


def _message(text: str) -> None:
    sys.stderr.write(text + "\n")


def _emit(record: reader.StoredRecord, events_only: bool) -> None:
    sys.stdout.write(record.json_line(events_only) + "\n")


def _partitions(plan: TailPlan, count: int) -> list[int] | None:
    """Return the partitions to read, or None after printing why the request is invalid."""
    if plan.partition is not None and plan.partition >= count:
        _message(
            f"error: invalid --partition {plan.partition}: topic {plan.topic!r} has "
            f"partitions 0 to {count - 1}"
        )
        return None
    if plan.key is None:
        return [plan.partition] if plan.partition is not None else list(range(count))
    owner = hashing.partition_for(plan.key.encode(), count)
    if plan.partition is not None and plan.partition != owner:
        _message(
            f"error: key {plan.key!r} is stored in partition {owner}, not in --partition "
            f"{plan.partition}; drop --partition"
        )
        return None
    return [owner]


def _start_at_offset(
    plan: TailPlan, partitions: list[int], firsts: dict[int, int], nexts: dict[int, int]
) -> dict[int, int]:
    assert plan.from_offset is not None
    positions = {}
    for partition in partitions:
        offset = plan.from_offset
        if offset < firsts[partition]:
            _message(
                f"partition {partition}: offset {offset} is below the first retained offset "
                f"{firsts[partition]}; starting there"
            )
            offset = firsts[partition]
        elif offset > nexts[partition]:
            _message(
                f"partition {partition}: offset {offset} is beyond the end {nexts[partition]}; "
                f"starting at the end"
            )
            offset = nexts[partition]
        positions[partition] = offset
    return positions


async def _print_last(
    plan: TailPlan, partitions: list[int], firsts: dict[int, int], nexts: dict[int, int]
) -> None:
    """Print the newest `plan.last` events (of the key, with --key), oldest first."""
    assert plan.last is not None
    if plan.last == 0:
        return
    if plan.key is not None:
        # The key's events are spread through its partition, so its newest ones are
        # found by reading the partition and keeping the last N matches.
        # NOTE: this reads the whole partition on the queue, in bounded calls.
        starts = {partition: firsts[partition] for partition in partitions}
    else:
        starts = {
            partition: max(firsts[partition], nexts[partition] - plan.last)
            for partition in partitions
        }
    newest: collections.deque[reader.StoredRecord] = collections.deque(maxlen=plan.last)
    collected = reader.read_until(
        plan.queue, plan.topic, starts, nexts, key=plan.key, token=plan.token
    )
    if len(partitions) == 1:
        async for record in collected:
            newest.append(record)
    else:
        # At most `last` events per partition; across partitions the newest by time.
        every = [record async for record in collected]
        every.sort(key=lambda record: (record.timestamp_us, record.partition, record.offset))
        newest.extend(every)
    for record in newest:
        _emit(record, plan.events_only)


async def run(plan: TailPlan) -> int:
    """Print the chosen events, and with `follow` new ones until cancelled; return the exit code."""
    info = await reader.describe_topic(plan.queue, plan.topic, plan.token)
    if info is None:
        _message(f"error: topic {plan.topic!r} not found; `evp topics list` shows the topics")
        return 2
    partitions = _partitions(plan, len(info["partitions"]))
    if partitions is None:
        return 2
    firsts = {row["partition"]: row["first_offset"] for row in info["partitions"]}
    nexts = {row["partition"]: row["next_offset"] for row in info["partitions"]}

    if plan.last is not None:
        await _print_last(plan, partitions, firsts, nexts)
    else:
        if plan.from_start:
            positions = {partition: firsts[partition] for partition in partitions}
        else:
            positions = _start_at_offset(plan, partitions, firsts, nexts)
        ends = {partition: nexts[partition] for partition in partitions}
        async for record in reader.read_until(
            plan.queue, plan.topic, positions, ends, key=plan.key, token=plan.token
        ):
            _emit(record, plan.events_only)
    sys.stdout.flush()
    if not plan.follow:
        return 0

    positions = {partition: nexts[partition] for partition in partitions}
    async for record in reader.follow(
        plan.queue,
        plan.topic,
        positions,
        key=plan.key,
        token=plan.token,
        interval_s=plan.interval_s,
    ):
        _emit(record, plan.events_only)
        sys.stdout.flush()
    return 0
