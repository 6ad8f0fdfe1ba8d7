"""Consumer groups: which shard owns which partition, and what it may be sent next.

Rules this module keeps:

- Each partition of a group has one cursor: `committed` is the next offset not yet
  acknowledged, `delivered` the next offset not yet sent. Events in between are in
  flight at the owner.
- Only the owner of a partition is sent its events, in offset order.
- A member never has more than `max_in_flight` unacknowledged events, and a member whose
  connection is not writable gets nothing until it is (backpressure).
- When the assignment moves a partition from a live member, the partition is first
  drained: the old owner gets no more of it, and the new owner gets it only once the
  old owner has acknowledged everything it was sent. So two members never process the
  same key at the same time.
- When a member dies (disconnects, misses heartbeats or is replaced by a new member
  with the same id), its cursors go back to `committed` and the unacknowledged events
  are sent again to the partition's next owner. They are counted as redelivered.

Assignment is consistent hashing with bounded loads over the member ids (see
evp.hashing), recomputed on every join and leave.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from evp import hashing
from evp.protocol import encode_deliver
from evp.log import CorruptLog
from evp.metrics import LatencyHistogram
from evp.storage import Topic

logger = logging.getLogger("evp.groups")

# A DELIVER frame carries at most this many records and about this many bytes. Small
# enough that one busy partition does not take all of a member's credit at once, large
# enough that the per-frame cost is spread over many events.
MAX_RECORDS_PER_DELIVER = 256
MAX_BYTES_PER_DELIVER = 1024 * 1024


class MemberConnection(Protocol):
    """The connection of a group member, as the group uses it."""

    @property
    def writable(self) -> bool: ...

    def send_frames(self, frames: list[bytes]) -> None: ...

    def send_assigned(self, partitions: list[int], generation: int, partition_count: int) -> None: ...

    def close(self, reason: str) -> None: ...


class Member:
    def __init__(self, member_id: str, connection: MemberConnection, max_in_flight: int) -> None:
        self.id = member_id
        self.connection = connection
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.partitions: list[int] = []
        self.leaving = False
        self.notified_leaving = False
        self.delivered_total = 0
        self.acked_total = 0
        # Counters the shard reports about itself (REPORT frames).
        self.processed = 0
        self.failed = 0
        self.pid = 0
        self.latency = LatencyHistogram()
        self.latency_total = LatencyHistogram()
        self.retrying: dict | None = None
        self.joined_at = time.monotonic()
        self.last_seen = self.joined_at
        self._next_index = 0  # round-robin start in `partitions`


class Cursor:
    __slots__ = ("owner", "next_owner", "moving", "committed", "delivered", "blocked")

    def __init__(self, committed: int) -> None:
        self.owner: Member | None = None
        self.next_owner: Member | None = None
        self.moving = False
        self.committed = committed
        self.delivered = committed
        self.blocked = False


class Group:
    def __init__(self, topic: Topic, name: str, committed: dict[int, int]) -> None:
        self.topic = topic
        self.name = name
        # Saved positions are clamped to the log, so positions left from a deleted and
        # recreated topic cannot skip its new events.
        self.cursors = [
            Cursor(min(max(committed.get(index, log.start_offset), log.start_offset), log.next_offset))
            for index, log in enumerate(topic.logs)
        ]
        self.members: dict[str, Member] = {}
        self.generation = 0
        self.dirty = False
        self.delivered_total = 0
        self.acked_total = 0
        self.redelivered_total = 0
        self.rebalances = 0
        self.lost_to_retention = 0
        # Publish-to-processing latency of every event the group's shards reported,
        # monotonic for Prometheus.
        self.latency_total = LatencyHistogram()

    # Membership.

    def join(self, member: Member) -> None:
        previous = self.members.get(member.id)
        if previous is not None:
            logger.warning(
                "member=%s rejoined group=%s topic=%s; closing its previous connection",
                member.id,
                self.name,
                self.topic.name,
            )
            self.remove(previous, reason="replaced by a new connection with the same member id")
        self.members[member.id] = member
        logger.info(
            "member=%s joined group=%s topic=%s max_in_flight=%d",
            member.id,
            self.name,
            self.topic.name,
            member.max_in_flight,
        )
        self.rebalance()

    def leave(self, member: Member) -> None:
        """Start a graceful leave: no more deliveries, partitions move once acknowledged."""
        if member.leaving or self.members.get(member.id) is not member:
            return
        member.leaving = True
        logger.info("member=%s is leaving group=%s topic=%s", member.id, self.name, self.topic.name)
        self.rebalance()

    def remove(self, member: Member, reason: str) -> None:
        """Drop a member at once; its unacknowledged events go back to the backlog."""
        if self.members.get(member.id) is not member:
            return
        del self.members[member.id]
        redelivered = 0
        for cursor in self.cursors:
            if cursor.owner is member:
                redelivered += cursor.delivered - cursor.committed
                cursor.delivered = cursor.committed
                cursor.owner = None
                cursor.moving = False
            if cursor.next_owner is member:
                cursor.next_owner = None
                cursor.moving = False
        self.redelivered_total += redelivered
        member.in_flight = 0
        member.partitions = []
        logger.info(
            "member=%s left group=%s topic=%s reason=%r unacknowledged=%d",
            member.id,
            self.name,
            self.topic.name,
            reason,
            redelivered,
        )
        member.connection.close(reason)
        self.rebalance()

    def rebalance(self) -> None:
        active = sorted(member_id for member_id, m in self.members.items() if not m.leaving)
        assignment = hashing.assign(self.topic.partition_count, active)
        target: dict[int, Member] = {
            partition: self.members[member_id]
            for member_id, partitions in assignment.items()
            for partition in partitions
        }
        moved = 0
        for partition, cursor in enumerate(self.cursors):
            new_owner = target.get(partition)
            if cursor.owner is new_owner:
                cursor.next_owner = None
                cursor.moving = False
                continue
            moved += 1
            if cursor.owner is None or cursor.delivered == cursor.committed:
                self._hand_over(cursor, new_owner)
            else:
                cursor.next_owner = new_owner
                cursor.moving = True
        self.generation += 1
        self.rebalances += 1
        logger.info(
            "rebalanced group=%s topic=%s generation=%d members=%d partitions_moved=%d",
            self.name,
            self.topic.name,
            self.generation,
            len(active),
            moved,
        )
        self._refresh_partitions()
        self.dispatch_all()

    def _hand_over(self, cursor: Cursor, new_owner: Member | None) -> None:
        old = cursor.owner
        if old is not None:
            old.in_flight -= cursor.delivered - cursor.committed
        cursor.delivered = cursor.committed
        cursor.owner = new_owner
        cursor.next_owner = None
        cursor.moving = False

    def _refresh_partitions(self) -> None:
        owned: dict[str, list[int]] = {member_id: [] for member_id in self.members}
        for partition, cursor in enumerate(self.cursors):
            if cursor.owner is not None and not cursor.moving:
                owned[cursor.owner.id].append(partition)
        for member_id, partitions in owned.items():
            member = self.members[member_id]
            if member.partitions != partitions or (member.leaving and not member.notified_leaving):
                member.notified_leaving = member.leaving
                member.partitions = partitions
                member._next_index = 0
                member.connection.send_assigned(
                    partitions, self.generation, self.topic.partition_count
                )

    # Acknowledgements and delivery.

    def ack(self, member: Member, partition: int, next_offset: int) -> None:
        if not 0 <= partition < len(self.cursors):
            logger.warning(
                "member=%s acknowledged partition %d, which topic=%s does not have",
                member.id,
                partition,
                self.topic.name,
            )
            return
        cursor = self.cursors[partition]
        if cursor.owner is not member:
            # An acknowledgement from before a rebalance or a reconnect: the events were
            # handed to someone else and will be acknowledged there.
            logger.debug("stale ack member=%s partition=%d", member.id, partition)
            return
        if next_offset < cursor.committed:
            # Already acknowledged, e.g. sent again on a new connection after the
            # events were redelivered; nothing to do.
            logger.debug("duplicate ack member=%s partition=%d", member.id, partition)
            return
        if next_offset > cursor.delivered:
            logger.warning(
                "member=%s acknowledged offset %d of partition %d beyond what it was "
                "sent (committed %d, delivered %d); ignoring it",
                member.id,
                next_offset,
                partition,
                cursor.committed,
                cursor.delivered,
            )
            return
        count = next_offset - cursor.committed
        if count == 0:
            # A shard holding back its position behind an event it retries still
            # acknowledges each frame, to ask for more events of its other keys.
            self.dispatch(member)
            return
        cursor.committed = next_offset
        member.in_flight -= count
        member.acked_total += count
        self.acked_total += count
        self.dirty = True
        if cursor.moving and cursor.committed == cursor.delivered:
            new_owner = cursor.next_owner
            self._hand_over(cursor, new_owner)
            self._refresh_partitions()
            if new_owner is not None:
                self.dispatch(new_owner)
        self.dispatch(member)

    def add_latency(self, member: Member, total: LatencyHistogram) -> None:
        """Add what a member's cumulative latency histogram gained since its last report."""
        previous = member.latency_total.counts
        for bucket, count in total.counts.items():
            gained = count - previous.get(bucket, 0)
            if gained > 0:
                self.latency_total.record_bucket(bucket, gained)
        member.latency_total = total

    def skip_deleted(self, partition: int, start_offset: int, dispatch: bool = True) -> int:
        """Move a cursor that points before `start_offset` (deleted data) up to it.

        Every unacknowledged event below `start_offset` is gone from the log, so it is
        counted in `lost_to_retention`, including events the owner still holds: their
        late acknowledgements are ignored. Returns the count; the caller logs it.
        """
        cursor = self.cursors[partition]
        if cursor.committed >= start_offset:
            return 0
        lost = start_offset - cursor.committed
        owner = cursor.owner
        if owner is not None:
            owner.in_flight -= min(cursor.delivered, start_offset) - cursor.committed
        cursor.committed = start_offset
        cursor.delivered = max(cursor.delivered, start_offset)
        self.lost_to_retention += lost
        self.dirty = True
        if cursor.moving and cursor.committed == cursor.delivered:
            # NOTE: the old owner may still be finishing events that were deleted
            # under it; only the hard disk limits get here with a partition moving.
            self._hand_over(cursor, cursor.next_owner)
            self._refresh_partitions()
        if dispatch and cursor.owner is not None:
            self.dispatch(cursor.owner)
        return lost

    def on_append(self, partitions: list[int]) -> None:
        """Dispatch to the owners of partitions that just received events, once each."""
        owners: dict[str, Member] = {}
        for partition in partitions:
            cursor = self.cursors[partition]
            owner = cursor.owner
            if owner is not None and not cursor.moving:
                owners[owner.id] = owner
        for owner in owners.values():
            # A member with unacknowledged events gets new ones from the dispatch that
            # its next ACK triggers. It processes in order, so sending earlier would
            # not process them earlier, and waiting lets many small publishes share
            # one DELIVER frame per partition. A member retrying an event is sent at
            # once, because it holds back its acknowledgements until the retry ends
            # and its other keys would wait that long.
            if owner.in_flight == 0 or owner.retrying:
                self.dispatch(owner)

    def dispatch_all(self) -> None:
        for member in list(self.members.values()):
            self.dispatch(member)

    def dispatch(self, member: Member) -> None:
        """Send `member` events from its partitions while it has credit and room."""
        if member.leaving or not member.partitions:
            return
        # Frames go out in one write per dispatch, not one per partition: at low rates
        # most frames carry a single event and the system call would dominate.
        frames: list[bytes] = []
        try:
            self._fill(member, frames)
        finally:
            if frames:
                member.connection.send_frames(frames)

    def _fill(self, member: Member, frames: list[bytes]) -> None:
        connection = member.connection
        logs = self.topic.logs
        cursors = self.cursors
        partitions = member.partitions
        count_partitions = len(partitions)
        pending_bytes = 0
        progress = True
        while progress:
            progress = False
            for step in range(count_partitions):
                credit = member.max_in_flight - member.in_flight
                if credit <= 0 or not connection.writable or pending_bytes > MAX_BYTES_PER_DELIVER:
                    # NOTE: the next dispatch starts again at the partition this pass
                    # started at, so while credit is short one partition with a backlog
                    # can take the credit each ACK frees and the others wait.
                    return
                index = (member._next_index + step) % count_partitions
                partition = partitions[index]
                cursor = cursors[partition]
                log = logs[partition]
                if cursor.blocked:
                    continue
                if cursor.committed < log.start_offset:
                    lost = self.skip_deleted(partition, log.start_offset, dispatch=False)
                    logger.warning(
                        "group=%s topic=%s partition=%d lost %d unacknowledged events that "
                        "retention deleted; it continues from offset %d",
                        self.name,
                        self.topic.name,
                        partition,
                        lost,
                        log.start_offset,
                    )
                available = log.next_offset - cursor.delivered
                if available <= 0:
                    continue
                wanted = min(available, credit, MAX_RECORDS_PER_DELIVER)
                try:
                    data, count = log.read(cursor.delivered, wanted, MAX_BYTES_PER_DELIVER)
                except CorruptLog as exc:
                    # NOTE: the partition stops here until an operator repairs the
                    # segment; nothing corrupt is handed out and nothing is skipped.
                    cursor.blocked = True
                    logger.error(
                        "partition %s/%d is blocked at offset %d: %s; group=%s delivers "
                        "nothing more from it until the segment is restored from a backup, "
                        "or until `evp replay --topic %s --group %s --partition %d "
                        "--from-offset N` (with the group's processors stopped) moves it to "
                        "the first readable offset N after the damage",
                        self.topic.name,
                        partition,
                        cursor.delivered,
                        exc,
                        self.name,
                        self.topic.name,
                        self.name,
                        partition,
                    )
                    continue
                frames.append(encode_deliver(partition, count, data))
                pending_bytes += len(data)
                cursor.delivered += count
                member.in_flight += count
                member.delivered_total += count
                self.delivered_total += count
                # Another pass only when this partition has events left, so the usual
                # dispatch of a few new events looks at each partition once.
                if count < available:
                    progress = True
            member._next_index = (member._next_index + 1) % count_partitions

    # Introspection.

    def committed_offsets(self) -> dict[int, int]:
        return {partition: cursor.committed for partition, cursor in enumerate(self.cursors)}

    def lag(self) -> int:
        return sum(
            max(0, log.next_offset - cursor.committed)
            for log, cursor in zip(self.topic.logs, self.cursors, strict=True)
        )
