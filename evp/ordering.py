"""Per-key order within a partition while some events wait for a retry.

Rules this module keeps, for one partition of one shard:

- A key whose event failed is blocked: its later events queue behind the failed one
  and reach the handler only after it succeeds or is dead-lettered. Other keys go on.
- The acknowledgement position is the next offset, and every offset below it is
  done. It never passes the oldest unfinished offset, so a crash redelivers every
  event that was not finished. Events of other keys finished beyond that offset are delivered
  again after such a crash (at-least-once).
"""

from __future__ import annotations

import collections

from evp import records


class PartitionWork:
    """The unfinished events of one partition and the keys they block."""

    def __init__(self) -> None:
        # Events of blocked keys, each key's in offset order; the head is the one
        # being retried.
        self.blocked: dict[bytes, collections.deque[records.Record]] = {}
        # Offsets delivered but not finished: blocked events, and events whose results
        # the queue has not yet acknowledged.
        self.unfinished: set[int] = set()
        # The offset after the last event delivered.
        self.next_offset = 0

    def delivered(self, offset: int) -> None:
        """Note that every event up to `offset` arrived and is done or unfinished."""
        self.next_offset = offset + 1

    def is_blocked(self, key: bytes) -> bool:
        return key in self.blocked

    def block(self, record: records.Record) -> None:
        """Queue `record` behind its key's failed event, or make it that failed event."""
        self.blocked.setdefault(record.key, collections.deque()).append(record)
        self.unfinished.add(record.offset)

    def head(self, key: bytes) -> records.Record | None:
        """Return the oldest waiting event of `key`, or None when the key is not blocked."""
        waiting = self.blocked.get(key)
        return waiting[0] if waiting else None

    def pop_head(self, key: bytes) -> bool:
        """Remove the oldest waiting event of `key`; return whether the key stays blocked.

        A key with no waiting events left is unblocked. The removed event's offset
        stays unfinished until `finish` is called for it.
        """
        waiting = self.blocked[key]
        waiting.popleft()
        if waiting:
            return True
        del self.blocked[key]
        return False

    def finish(self, offsets: list[int]) -> None:
        """Mark offsets done, e.g. once the queue acknowledged what their handler emitted."""
        self.unfinished.difference_update(offsets)

    def ack_position(self) -> int:
        """Return the next offset to acknowledge: below the oldest unfinished event."""
        if self.unfinished:
            return min(self.unfinished)
        return self.next_offset
