"""Counting shard crashes per event, so an event that kills its shard is dead-lettered.

A handler can end its own process (os._exit, a segfault in an extension, the kernel's
OOM killer) on one particular event. The queue then delivers that event again, to the
restarted shard or to another one, and the crash would repeat forever. So:

- Before each handler call a shard writes the event's (partition, offset) into its
  `InProgress` slot, a small shared-memory array, and clears it after the call.
- When a shard exits abnormally, the supervisor reads the slot. If an event was in
  progress, it adds one to that event's count in the `CrashTable`, which every shard
  of the processor shares (the event may go to any shard after a crash).
- Before calling the handler, a shard looks the event up in the table. An event that
  crashed its shard `--max-retries` times is dead-lettered without calling the handler.

Only the supervisor writes the table; shards read it. Each write bumps a version number,
and a shard copies the table again only when the version changed, so the lookup per
event is one read of shared memory.
"""

from __future__ import annotations

import signal
from typing import Any

# Events remembered at once. An entry matters only until its event is dead-lettered,
# and 256 is a guess well above how many different events crash a processor's shards
# in that time. When the table is full, the oldest entry is replaced.
CRASH_TABLE_ENTRIES = 256
_FIELDS = 4  # partition, offset, crashes, last exit code
_EMPTY = -1


def describe_exit(code: int | None) -> str:
    """Describe a process exit code, e.g. "signal SIGSEGV" for -11."""
    if code is None:
        return "an unknown exit status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class InProgress:
    """The event a shard's handler is working on, readable after the shard dies."""

    def __init__(self, context: Any) -> None:
        self.array = context.Array("q", [_EMPTY, _EMPTY], lock=False)

    def set(self, partition: int, offset: int) -> None:
        # The offset first: the supervisor treats partition >= 0 as "set".
        self.array[1] = offset
        self.array[0] = partition

    def clear(self, partition: int, offset: int) -> None:
        """Clear the slot if it still contains this event, not one a later call set."""
        if self.array[0] == partition and self.array[1] == offset:
            self.array[0] = _EMPTY

    def take(self) -> tuple[int, int] | None:
        """Return and clear the (partition, offset) in progress, or None."""
        partition, offset = self.array[0], self.array[1]
        self.array[0] = _EMPTY
        if partition < 0:
            return None
        return partition, offset


class CrashTable:
    """Crash counts per (partition, offset) of the processor's topic, in shared memory."""

    def __init__(self, context: Any) -> None:
        self.entries = context.Array("q", [_EMPTY] * (CRASH_TABLE_ENTRIES * _FIELDS))
        self.version = context.Value("q", 0, lock=False)
        self._next_slot = 0
        self._copy: dict[tuple[int, int], tuple[int, int]] = {}
        self._copy_version = -1

    # Supervisor side.

    def record(self, partition: int, offset: int, exit_code: int) -> int:
        """Add one crash of the event at (partition, offset); return its crash count."""
        with self.entries.get_lock():
            data = self.entries.get_obj()
            slot = self._find(data, partition, offset)
            if slot is None:
                slot = self._next_slot
                self._next_slot = (self._next_slot + 1) % CRASH_TABLE_ENTRIES
                base = slot * _FIELDS
                data[base] = partition
                data[base + 1] = offset
                data[base + 2] = 0
            base = slot * _FIELDS
            data[base + 2] += 1
            data[base + 3] = exit_code
            crashes = data[base + 2]
        self.version.value += 1
        return crashes

    @staticmethod
    def _find(data: Any, partition: int, offset: int) -> int | None:
        for slot in range(CRASH_TABLE_ENTRIES):
            base = slot * _FIELDS
            if data[base] == partition and data[base + 1] == offset:
                return slot
        return None

    # Shard side.

    def lookup(self, partition: int, offset: int) -> tuple[int, int] | None:
        """Return (crashes, last exit code) of the event, or None if it never crashed."""
        if self.version.value != self._copy_version:
            self._reload()
        if not self._copy:
            return None
        return self._copy.get((partition, offset))

    def _reload(self) -> None:
        with self.entries.get_lock():
            version = self.version.value
            data = list(self.entries.get_obj())
        copy = {}
        for base in range(0, len(data), _FIELDS):
            if data[base] >= 0:
                copy[(data[base], data[base + 1])] = (data[base + 2], data[base + 3])
        self._copy = copy
        self._copy_version = version
