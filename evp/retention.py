"""Retention: deleting whole old segments without losing unprocessed events silently.

Rules:

- Only sealed segments are deleted, oldest first; the active segment of a partition
  stays, so offsets continue after a restart.
- A segment is past retention when the topic's age limit is exceeded (by the file's
  modification time, the time of its newest record) or when its partition is larger
  than the topic's size limit (per partition, like Kafka's retention.bytes).
- A segment past retention that some group has not acknowledged to its end is kept.
- The queue's hard limits override that: above `max_disk_bytes` in all, or below
  `min_free_disk_bytes` free on the data directory's file system, the oldest sealed
  segments are deleted even when a group still needs them. Each group whose unacknowledged events went with
  them gets a warning and a `lost_to_retention` count, and continues from the first
  retained offset.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from evp.storage import Retention, Topic

if TYPE_CHECKING:
    from evp.groups import Group
    from evp.server import QueueServer

logger = logging.getLogger("evp.retention")


@dataclass
class DiskLimits:
    max_disk_bytes: int | None = None
    min_free_disk_bytes: int = 256 * 1024 * 1024
    warned_full: bool = False


def effective(topic: Topic, default: Retention) -> Retention:
    """Return the topic's retention, with the queue's defaults where it sets none."""
    if topic.retention is None:
        return default
    return topic.retention


def groups_of(server: QueueServer, topic: Topic) -> list[Group]:
    return [group for (name, _), group in server.groups.items() if name == topic.name]


def _after_delete(
    server: QueueServer, topic: Topic, partition: int, losses: dict[tuple[str, str], int]
) -> int:
    """Move group positions that point into deleted data; add each group's loss to `losses`."""
    start = topic.logs[partition].start_offset
    lost = 0
    for group in groups_of(server, topic):
        count = group.skip_deleted(partition, start)
        if count:
            key = (topic.name, group.name)
            losses[key] = losses.get(key, 0) + count
            lost += count
    return lost


def _log_losses(losses: dict[tuple[str, str], int]) -> None:
    for (topic_name, group_name), count in sorted(losses.items()):
        logger.warning(
            "group=%s topic=%s lost %d unacknowledged events to the disk limits; it "
            "continues from the first retained offsets",
            group_name,
            topic_name,
            count,
        )


def apply_retention(server: QueueServer, default: Retention, now: float | None = None) -> int:
    """Delete sealed segments past their topic's retention that every group has finished.

    Returns the number of segments deleted.
    """
    now = time.time() if now is None else now
    deleted = 0
    for topic in list(server.store.topics.values()):
        retention = effective(topic, default)
        if retention.max_age_s is None and retention.max_partition_bytes is None:
            continue
        groups = groups_of(server, topic)
        for partition, log in enumerate(topic.logs):
            for segment in log.segments():
                if segment.active:
                    break
                too_old = retention.max_age_s is not None and now - segment.modified_at > retention.max_age_s
                too_big = (
                    retention.max_partition_bytes is not None
                    and log.size_bytes > retention.max_partition_bytes
                )
                if not (too_old or too_big):
                    break
                if any(group.cursors[partition].committed < segment.end_offset for group in groups):
                    # Retention waits for the slowest group; only the hard limits
                    # delete unacknowledged events.
                    break
                log.delete_oldest_segment()
                # Every group has acknowledged this segment, so no position moves.
                deleted += 1
    if deleted:
        logger.info("retention deleted %d segments that every group had processed", deleted)
    return deleted


def apply_disk_limits(server: QueueServer, limits: DiskLimits) -> int:
    """Delete the oldest sealed segments while the queue is over a hard disk limit.

    Returns the number of events lost to it across all groups. Logs one summary line
    per call and one line per group that lost events, not one per segment.
    """
    losses: dict[tuple[str, str], int] = {}
    deleted_segments = 0
    deleted_bytes = 0
    while True:
        used = sum(topic.size_bytes() for topic in server.store.topics.values())
        free = shutil.disk_usage(server.store.data_dir).free
        over_total = limits.max_disk_bytes is not None and used > limits.max_disk_bytes
        under_free = free < limits.min_free_disk_bytes
        if not (over_total or under_free):
            limits.warned_full = False
            break
        oldest = None
        for topic in server.store.topics.values():
            for partition, log in enumerate(topic.logs):
                segments = log.segments()
                if len(segments) > 1 and (oldest is None or segments[0].modified_at < oldest[0]):
                    oldest = (segments[0].modified_at, topic, partition)
        if oldest is None:
            if not limits.warned_full:
                # Logged once until the queue is back under its limits, not every second.
                limits.warned_full = True
                logger.error(
                    "the queue is over its disk limit (used=%d max_disk_bytes=%s free=%d "
                    "min_free_disk_bytes=%d) but only active segments remain",
                    used,
                    limits.max_disk_bytes,
                    free,
                    limits.min_free_disk_bytes,
                )
            break
        _, topic, partition = oldest
        info = topic.logs[partition].delete_oldest_segment()
        deleted_segments += 1
        deleted_bytes += info.size_bytes
        _after_delete(server, topic, partition, losses)
    if deleted_segments:
        logger.warning(
            "disk limit: deleted %d segments (%d bytes); used=%d free=%d",
            deleted_segments,
            deleted_bytes,
            sum(topic.size_bytes() for topic in server.store.topics.values()),
            shutil.disk_usage(server.store.data_dir).free,
        )
    _log_losses(losses)
    return sum(losses.values())
