"""Admin operations behind `evp replay`, `evp tail`, `evp route` and `evp dlq`.

- ``groups.reset`` moves a group's positions to an offset, a time, the start or the
  end of each partition, and saves them before it returns. It is rejected while the
  group has members, because a live shard has unacknowledged events past the old position.
- ``records.read`` returns a bounded batch of records from given positions without
  joining a group, so no group's positions change. Each call reads at most
  MAX_READ_BYTES of matching records and scans at most MAX_SCAN_BYTES, which bounds
  the queue's memory per call however large the topic is.
- ``keys.route`` returns the partition of a key and the members that own it now.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from evp import hashing, records
from evp.admin import AdminError, _owner_id, _topic
from evp.log import CorruptLog
from evp.storage import StorageError, Topic, check_name

if TYPE_CHECKING:
    from evp.server import QueueServer

# Limits of one records.read call. The default and maximum byte limit match the
# DELIVER frame limit, so a read costs the queue about what one delivery costs.
DEFAULT_READ_RECORDS = 500
MAX_READ_RECORDS = 5000
MAX_READ_BYTES = 1024 * 1024
# A read filtered by key looks at up to this many bytes of records per call. It then
# returns what it found with the position it reached, so a rare key in a huge
# partition costs many short calls instead of one long one.
MAX_SCAN_BYTES = 8 * 1024 * 1024


def _name(args: dict[str, Any], field: str) -> str:
    value = args.get(field)
    if not isinstance(value, str):
        raise AdminError(f"missing {field} name")
    try:
        return check_name(field, value)
    except StorageError as exc:
        raise AdminError(str(exc)) from None


def _whole_number(args: dict[str, Any], field: str) -> int | None:
    value = args.get(field)
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise AdminError(f"invalid {field} {value!r}: use a whole number of 0 or more")
    return value


def _partition_arg(topic: Topic, value: Any) -> int:
    if type(value) is not int or not 0 <= value < topic.partition_count:
        raise AdminError(
            f"invalid partition {value!r}: topic {topic.name!r} has partitions 0 to "
            f"{topic.partition_count - 1}"
        )
    return value


# groups.reset


def _reset_target(args: dict[str, Any]) -> tuple[str, int | None]:
    """Return the kind of target ("offset", "time", "start" or "end") and its value."""
    given = [kind for kind in ("offset", "time_us", "start", "end") if args.get(kind) is not None]
    if len(given) != 1:
        raise AdminError("give exactly one of offset, time_us, start or end")
    kind = given[0]
    if kind in ("start", "end"):
        return kind, None
    value = _whole_number(args, kind)
    return kind, value


def _reset_position(
    topic: Topic, partition: int, kind: str, value: int | None
) -> tuple[int, str | None]:
    """Return the new position of one partition and a note when it was clamped."""
    log = topic.logs[partition]
    if kind == "start":
        return log.start_offset, None
    if kind == "end":
        return log.next_offset, None
    if kind == "time_us":
        assert value is not None
        try:
            return log.offset_for_time(value), None
        except CorruptLog as exc:
            raise AdminError(f"partition {partition}: cannot search by time: {exc}") from None
    assert value is not None
    if value < log.start_offset:
        return log.start_offset, (
            f"offset {value} is below the first retained offset {log.start_offset}; "
            f"using {log.start_offset}"
        )
    if value > log.next_offset:
        return log.next_offset, (
            f"offset {value} is beyond the end {log.next_offset}; using {log.next_offset}"
        )
    return value, None


async def groups_reset(server: QueueServer, args: dict[str, Any]) -> dict[str, Any]:
    topic_name = _name(args, "topic")
    group_name = _name(args, "group")
    topic = server.store.topics.get(topic_name)
    if topic is None:
        raise AdminError(f"topic {topic_name!r} not found; `evp topics list` shows the topics")
    kind, value = _reset_target(args)
    partitions: Any = range(topic.partition_count)
    if args.get("partition") is not None:
        partitions = [_partition_arg(topic, args["partition"])]

    existing = server.groups.get((topic_name, group_name))
    if existing is not None and existing.members:
        members = ", ".join(sorted(existing.members))
        raise AdminError(
            f"group {group_name!r} of topic {topic_name!r} has live members ({members}); "
            f"stop its processors before moving its positions"
        )
    # Every new position is found before any is changed, so a failed search neither
    # changes nor creates a group.
    targets = {
        partition: _reset_position(topic, partition, kind, value) for partition in partitions
    }

    group = server.group(topic_name, group_name)
    changes = []
    for partition, (new, note) in targets.items():
        cursor = group.cursors[partition]
        changes.append({"partition": partition, "old": cursor.committed, "new": new, "note": note})
        cursor.committed = new
        cursor.delivered = new
        # A partition stopped at a damaged record is tried again from its new position.
        cursor.blocked = False
    group.dirty = True

    try:
        await server.save_groups()
    except OSError as exc:
        raise AdminError(f"the new positions could not be saved: {exc}") from None
    created = existing is None
    return {"topic": topic_name, "group": group_name, "created": created, "partitions": changes}


# records.read


def _positions_arg(topic: Topic, value: Any) -> dict[int, int]:
    if not isinstance(value, dict) or not value:
        raise AdminError("missing positions: give an object of partition to offset")
    positions = {}
    for partition_text, offset in value.items():
        try:
            partition = int(partition_text)
        except ValueError:
            raise AdminError(f"invalid partition {partition_text!r} in positions") from None
        _partition_arg(topic, partition)
        if type(offset) is not int or offset < 0:
            raise AdminError(f"invalid offset {offset!r} for partition {partition}")
        positions[partition] = offset
    return positions


def records_read(server: QueueServer, args: dict[str, Any]) -> dict[str, Any]:
    topic = _topic(server, {"name": args.get("topic")})
    positions = _positions_arg(topic, args.get("positions"))
    key_text = args.get("key")
    if key_text is not None and not isinstance(key_text, str):
        raise AdminError(f"invalid key {key_text!r}: use a string")
    key = key_text.encode() if key_text is not None else None
    max_records = min(_whole_number(args, "max_records") or DEFAULT_READ_RECORDS, MAX_READ_RECORDS)
    max_bytes = min(_whole_number(args, "max_bytes") or MAX_READ_BYTES, MAX_READ_BYTES)

    found: list[dict[str, Any]] = []
    found_bytes = 0
    scanned_bytes = 0
    errors: dict[str, str] = {}
    next_positions: dict[str, int] = {}
    skipped: dict[str, int] = {}
    for partition, offset in sorted(positions.items()):
        log = topic.logs[partition]
        if offset < log.start_offset:
            skipped[str(partition)] = log.start_offset - offset
            offset = log.start_offset
        offset = min(offset, log.next_offset)
        while (
            offset < log.next_offset
            and len(found) < max_records
            and found_bytes < max_bytes
            and scanned_bytes < MAX_SCAN_BYTES
        ):
            wanted = max_records - len(found) if key is None else MAX_READ_RECORDS
            limit = max_bytes - found_bytes if key is None else MAX_SCAN_BYTES - scanned_bytes
            try:
                data, count = log.read(offset, wanted, limit)
            except CorruptLog as exc:
                errors[str(partition)] = str(exc)
                break
            scanned_bytes += len(data)
            for record in records.decode(data, verify=False):
                offset = record.offset + 1
                if key is not None and record.key != key:
                    continue
                found.append(_record_json(partition, record))
                found_bytes += len(record.value)
                if len(found) >= max_records or found_bytes >= max_bytes:
                    break
        next_positions[str(partition)] = offset
    ends = {str(partition): topic.logs[partition].next_offset for partition in positions}
    return {
        "topic": topic.name,
        "records": found,
        "positions": next_positions,
        "ends": ends,
        "skipped": skipped,
        "errors": errors,
    }


def _record_json(partition: int, record: records.Record) -> dict[str, Any]:
    # The value goes out as its JSON text, not parsed, so an event comes back exactly
    # as it was stored, including integers beyond 64 bits.
    return {
        "partition": partition,
        "offset": record.offset,
        "timestamp_us": record.timestamp_us,
        "key": record.key.decode(),
        "value": record.value.decode(),
    }


# keys.route


def keys_route(server: QueueServer, args: dict[str, Any]) -> dict[str, Any]:
    topic = _topic(server, {"name": args.get("topic")})
    key = args.get("key")
    if not isinstance(key, str):
        raise AdminError(f"invalid key {key!r}: use a string")
    wanted_group = args.get("group")
    partition = hashing.partition_for(key.encode(), topic.partition_count)
    owners = []
    for (topic_name, group_name), group in sorted(server.groups.items()):
        if topic_name != topic.name or (wanted_group is not None and group_name != wanted_group):
            continue
        cursor = group.cursors[partition]
        next_owner = cursor.next_owner.id if cursor.moving and cursor.next_owner else None
        owners.append(
            {
                "group": group_name,
                "owner": _owner_id(cursor),
                "moving_to": next_owner,
                "members": sorted(group.members),
                "position": cursor.committed,
            }
        )
    if wanted_group is not None and not owners:
        raise AdminError(f"group {wanted_group!r} of topic {topic.name!r} not found")
    return {
        "topic": topic.name,
        "key": key,
        "partition": partition,
        "partition_count": topic.partition_count,
        "groups": owners,
    }


OPERATIONS = {
    "groups.reset": groups_reset,
    "records.read": records_read,
    "keys.route": keys_route,
}
