"""Topic and group administration, run by the queue for ADMIN frames.

Each operation takes the JSON arguments of the request and returns a JSON result, or
raises AdminError with a message for the user. The CLI commands `evp topics` and
`evp groups` send these requests.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from evp import records
from evp.groups import Group
from evp.log import CorruptLog, OffsetOutOfRange, PartitionLog
from evp.retention import effective
from evp.storage import Retention, StorageError, check_name

if TYPE_CHECKING:
    from evp.server import QueueServer

logger = logging.getLogger("evp.admin")


class AdminError(Exception):
    """A request that cannot be carried out, with the reason for the user."""


def _timestamp_at(log: PartitionLog, offset: int) -> int | None:
    try:
        data, _ = log.read(offset, 1, 1)
    except (OffsetOutOfRange, CorruptLog):
        return None
    return next(records.decode(data, verify=False)).timestamp_us


def _iso(timestamp_us: int | None) -> str | None:
    if timestamp_us is None:
        return None
    moment = datetime.fromtimestamp(timestamp_us / 1e6, UTC)
    return moment.isoformat(timespec="milliseconds")


def _retention_json(retention: Retention) -> dict[str, Any]:
    return retention.to_json()


def _topic(server: QueueServer, args: dict[str, Any]) -> Any:
    name = args.get("name")
    if not isinstance(name, str):
        raise AdminError("missing topic name")
    topic = server.store.topics.get(name)
    if topic is None:
        raise AdminError(f"topic {name!r} not found; `evp topics list` shows the topics")
    return topic


def topics_list(server: QueueServer, args: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, topic in sorted(server.store.topics.items()):
        oldest = [
            _timestamp_at(log, log.start_offset)
            for log in topic.logs
            if log.next_offset > log.start_offset
        ]
        newest = [
            _timestamp_at(log, log.next_offset - 1)
            for log in topic.logs
            if log.next_offset > log.start_offset
        ]
        rows.append(
            {
                "name": name,
                "partitions": topic.partition_count,
                "events": topic.stored_events(),
                "bytes": topic.size_bytes(),
                "oldest_event_time": _iso(min((t for t in oldest if t), default=None)),
                "newest_event_time": _iso(max((t for t in newest if t), default=None)),
                "groups": sorted(g for (t, g) in server.groups if t == name),
                "retention": _retention_json(effective(topic, server.default_retention)),
            }
        )
    return rows


def topics_describe(server: QueueServer, args: dict[str, Any]) -> dict[str, Any]:
    topic = _topic(server, args)
    partitions = []
    for index, log in enumerate(topic.logs):
        partitions.append(
            {
                "partition": index,
                "first_offset": log.start_offset,
                "next_offset": log.next_offset,
                "events": log.next_offset - log.start_offset,
                "bytes": log.size_bytes,
                "segments": len(log.segments()),
            }
        )
    groups = []
    for (topic_name, group_name), group in sorted(server.groups.items()):
        if topic_name != topic.name:
            continue
        groups.append(
            {
                "group": group_name,
                "members": sorted(group.members),
                "positions": [cursor.committed for cursor in group.cursors],
                "lag": group.lag(),
                "lost_to_retention": group.lost_to_retention,
            }
        )
    return {
        "name": topic.name,
        "partitions": partitions,
        "groups": groups,
        "retention": _retention_json(effective(topic, server.default_retention)),
    }


def _optional_number(args: dict[str, Any], name: str, kind: type) -> Any:
    value = args.get(name)
    if value is None:
        return None
    if type(value) not in (int, float) or value < 0 or (kind is int and int(value) != value):
        raise AdminError(f"invalid {name} {value!r}: use a non-negative number")
    return kind(value)


def topics_create(server: QueueServer, args: dict[str, Any]) -> dict[str, Any]:
    name = args.get("name")
    partitions = args.get("partitions", server.config.partitions)
    if not isinstance(name, str):
        raise AdminError("missing topic name")
    if type(partitions) is not int:
        raise AdminError(f"invalid partition count {partitions!r}: use a whole number")
    hours = _optional_number(args, "retention_hours", float)
    size = _optional_number(args, "retention_bytes", int)
    retention = None
    if hours is not None or size is not None:
        retention = Retention(hours * 3600 if hours is not None else None, size)
    try:
        server.store.create_topic(name, partitions, retention)
    except StorageError as exc:
        raise AdminError(str(exc)) from None
    return topics_describe(server, {"name": name})


def topics_delete(server: QueueServer, args: dict[str, Any]) -> dict[str, Any]:
    topic = _topic(server, args)
    busy = sorted(
        f"{name}: {len(group.members)} shards"
        for (topic_name, name), group in server.groups.items()
        if topic_name == topic.name and group.members
    )
    if busy:
        # Its processors would reconnect and recreate the topic at once, with the
        # queue's default partition count, which maps keys to other partitions.
        raise AdminError(
            f"topic {topic.name!r} has connected processors ({'; '.join(busy)}); stop them first"
        )
    removed_groups = []
    for key in [key for key in server.groups if key[0] == topic.name]:
        group = server.groups.pop(key)
        for member in list(group.members.values()):
            member.connection.close(f"topic {topic.name} was deleted")
        removed_groups.append(key[1])
    try:
        server.store.delete_topic(topic.name)
    except (StorageError, OSError) as exc:
        raise AdminError(f"deleting topic {topic.name!r} failed: {exc}") from None
    server.telemetry.key_counters.pop(topic.name, None)
    return {"deleted": topic.name, "groups": removed_groups}


def groups_list(server: QueueServer, args: dict[str, Any]) -> list[dict[str, Any]]:
    wanted = args.get("topic")
    rows = []
    for (topic_name, group_name), group in sorted(server.groups.items()):
        if wanted is not None and topic_name != wanted:
            continue
        rows.append(
            {
                "topic": topic_name,
                "group": group_name,
                "members": sorted(group.members),
                "lag": group.lag(),
                "acked": group.acked_total,
                "lost_to_retention": group.lost_to_retention,
                "positions": [cursor.committed for cursor in group.cursors],
                "partitions": _partition_positions(group),
            }
        )
    return rows


def _owner_id(cursor: Any) -> str | None:
    return cursor.owner.id if cursor.owner is not None else None


def _partition_positions(group: Group) -> list[dict[str, Any]]:
    """List each partition's position, end, lag and current owner in a group."""
    rows = []
    for partition, (log, cursor) in enumerate(zip(group.topic.logs, group.cursors, strict=True)):
        rows.append(
            {
                "partition": partition,
                "position": cursor.committed,
                "first_offset": log.start_offset,
                "next_offset": log.next_offset,
                "lag": max(0, log.next_offset - cursor.committed),
                "owner": _owner_id(cursor),
            }
        )
    return rows


def groups_delete(server: QueueServer, args: dict[str, Any]) -> dict[str, Any]:
    topic_name = args.get("topic")
    group_name = args.get("group")
    if not isinstance(topic_name, str) or not isinstance(group_name, str):
        raise AdminError("missing topic or group name")
    try:
        check_name("topic", topic_name)
        check_name("group", group_name)
    except StorageError as exc:
        raise AdminError(str(exc)) from None
    group = server.groups.get((topic_name, group_name))
    if group is None:
        raise AdminError(f"group {group_name!r} of topic {topic_name!r} not found")
    if group.members:
        raise AdminError(
            f"group {group_name!r} has {len(group.members)} connected shards; stop its "
            f"processors first"
        )
    del server.groups[(topic_name, group_name)]
    server.store.delete_offsets(topic_name, group_name)
    logger.info("deleted group=%s topic=%s and its positions", group_name, topic_name)
    return {"deleted": group_name, "topic": topic_name}


OPERATIONS = {
    "topics.list": topics_list,
    "topics.describe": topics_describe,
    "topics.create": topics_create,
    "topics.delete": topics_delete,
    "groups.list": groups_list,
    "groups.delete": groups_delete,
}


# Imported last because evp.admin_tools uses AdminError and the helpers above.
from evp import admin_tools  # noqa: E402

OPERATIONS.update(admin_tools.OPERATIONS)


def run(server: QueueServer, operation: str, args: dict[str, Any]) -> Any:
    """Run one operation; the result is a JSON value, or a coroutine that returns one."""
    handler = OPERATIONS.get(operation)
    if handler is None:
        raise AdminError(
            f"unknown admin operation {operation!r}; known: {', '.join(sorted(OPERATIONS))}"
        )
    return handler(server, args)
