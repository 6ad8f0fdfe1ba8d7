"""The queue's data directory: topics, their partition logs and group positions.

Layout::

    <data-dir>/
      topics/<topic>/topic.json          {"partitions": 64, "record_format": 2, ...}
      topics/<topic>/<partition>/        one PartitionLog per partition, named 00000..
      groups/<topic>/<group>.json        {"offsets": {"<partition>": next_offset, ...}}

A topic's partition count is fixed when the topic is created, because changing it
would move keys between partitions and break per-key order.

Group positions are written atomically (temporary file, fsync, rename, fsync of the
directory) at most every `commit_interval_s` and at shutdown. After a crash a group
restarts from its last written positions, so events acknowledged after that write are
delivered again: that is the at-least-once contract, and the duplicates are bounded by
what the group acknowledged in one interval.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from evp import records
from evp.log import PartitionLog

logger = logging.getLogger("evp.storage")

# Names become directory names, so they keep to a portable set of characters.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
MAX_PARTITIONS = 4096


class StorageError(Exception):
    """A problem with the data directory or a name that cannot be stored."""


def check_name(kind: str, name: str) -> str:
    """Raise StorageError unless `name` is a valid topic or group name."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise StorageError(
            f"invalid {kind} name {name!r}: use 1 to 200 letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit"
        )
    return name


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new file."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


@dataclass
class Retention:
    """How long a topic keeps events: by age and by size per partition; None is no limit."""

    max_age_s: float | None = None
    max_partition_bytes: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"max_age_s": self.max_age_s, "max_partition_bytes": self.max_partition_bytes}

    @classmethod
    def from_json(cls, data: Any) -> Retention:
        if not isinstance(data, dict):
            return cls()
        age = data.get("max_age_s")
        size = data.get("max_partition_bytes")
        return cls(
            float(age) if age is not None else None, int(size) if size is not None else None
        )


class Topic:
    def __init__(
        self,
        name: str,
        directory: Path,
        partitions: int,
        segment_bytes: int,
        tail_bytes: int,
        retention: Retention | None = None,
    ) -> None:
        self.name = name
        self.directory = directory
        # None means the queue's defaults apply.
        self.retention = retention
        self.logs = [
            PartitionLog(
                directory / f"{index:05d}",
                segment_bytes=segment_bytes,
                tail_bytes=tail_bytes,
                name=f"{name}/{index}",
            )
            for index in range(partitions)
        ]
        self.events_in = 0
        self.bytes_in = 0
        # Events a producer sent again that the log already held, skipped at publish.
        self.duplicates_dropped = 0
        # The partition of keys published before, which the queue checked already.
        self.routes: dict[bytes, int] = {}

    @property
    def partition_count(self) -> int:
        return len(self.logs)

    def stored_events(self) -> int:
        return sum(log.next_offset - log.start_offset for log in self.logs)

    def size_bytes(self) -> int:
        return sum(log.size_bytes for log in self.logs)

    def close(self) -> None:
        for log in self.logs:
            log.close()


class Store:
    """All topics and group positions under one data directory."""

    def __init__(
        self,
        data_dir: Path,
        default_partitions: int,
        segment_bytes: int = 64 * 1024 * 1024,
        tail_bytes: int = 256 * 1024,
    ) -> None:
        if not 1 <= default_partitions <= MAX_PARTITIONS:
            raise StorageError(
                f"invalid partition count {default_partitions}: use 1 to {MAX_PARTITIONS}"
            )
        self.data_dir = data_dir
        self.default_partitions = default_partitions
        self.segment_bytes = segment_bytes
        self.tail_bytes = tail_bytes
        self.topics: dict[str, Topic] = {}
        try:
            (data_dir / "topics").mkdir(parents=True, exist_ok=True)
            (data_dir / "groups").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create data directory {data_dir}: {exc}") from exc
        self._lock_fd = self._lock(data_dir)
        self._open_existing()

    @staticmethod
    def _lock(data_dir: Path) -> int:
        """Take an exclusive lock on the data directory, held until the process exits.

        Two queues appending to the same segment files would overwrite each other's
        acknowledged events. The kernel drops the lock when the process dies, even by
        kill -9, so a stale lock file never blocks a restart.
        """
        path = data_dir / "lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StorageError(
                f"data directory {data_dir} is in use by another evp queue (pid {owner}); "
                f"stop it or choose another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _open_existing(self) -> None:
        for entry in sorted((self.data_dir / "topics").iterdir()):
            meta = entry / "topic.json"
            if not meta.is_file():
                logger.warning("ignoring %s: it has no topic.json", entry)
                continue
            try:
                data = orjson.loads(meta.read_bytes())
                partitions = int(data["partitions"])
                retention = Retention.from_json(data["retention"]) if data.get("retention") else None
                record_format = int(data.get("record_format", 1))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise StorageError(f"cannot read {meta}: {exc}") from exc
            if record_format != records.FORMAT_VERSION:
                raise StorageError(
                    f"topic {entry.name!r} stores records in format {record_format} "
                    f"({meta}), and this evp reads format {records.FORMAT_VERSION}; run the "
                    f"evp release that wrote it, or move --data-dir aside to start empty"
                )
            self.topics[entry.name] = Topic(
                entry.name, entry, partitions, self.segment_bytes, self.tail_bytes, retention
            )
            logger.info(
                "opened topic=%s partitions=%d events=%d",
                entry.name,
                partitions,
                self.topics[entry.name].stored_events(),
            )

    def topic(self, name: str) -> Topic:
        """Return the topic, creating it with the default partition count if new."""
        topic = self.topics.get(name)
        if topic is not None:
            return topic
        return self.create_topic(name, self.default_partitions)

    def create_topic(
        self, name: str, partitions: int, retention: Retention | None = None
    ) -> Topic:
        """Create a topic; raise StorageError if it exists or an argument is invalid."""
        check_name("topic", name)
        if name in self.topics:
            raise StorageError(f"topic {name!r} already exists")
        if not 1 <= partitions <= MAX_PARTITIONS:
            raise StorageError(f"invalid partition count {partitions}: use 1 to {MAX_PARTITIONS}")
        directory = self.data_dir / "topics" / name
        directory.mkdir(parents=True, exist_ok=True)
        meta: dict[str, Any] = {
            "partitions": partitions,
            "record_format": records.FORMAT_VERSION,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        if retention is not None:
            meta["retention"] = retention.to_json()
        write_atomic(directory / "topic.json", orjson.dumps(meta))
        topic = Topic(name, directory, partitions, self.segment_bytes, self.tail_bytes, retention)
        self.topics[name] = topic
        logger.info("created topic=%s partitions=%d", name, partitions)
        return topic

    def delete_topic(self, name: str) -> None:
        """Close a topic's logs and remove its directory and its groups' positions."""
        topic = self.topics.pop(name, None)
        if topic is None:
            raise StorageError(f"topic {name!r} not found")
        topic.close()
        shutil.rmtree(topic.directory)
        shutil.rmtree(self.data_dir / "groups" / name, ignore_errors=True)
        logger.info("deleted topic=%s and its group positions", name)

    def delete_offsets(self, topic: str, group: str) -> None:
        path = self.data_dir / "groups" / topic / f"{group}.json"
        path.unlink(missing_ok=True)

    def load_offsets(self, topic: str, group: str) -> tuple[dict[int, int], int]:
        """Return a group's saved positions and its count of events lost to retention."""
        path = self.data_dir / "groups" / topic / f"{group}.json"
        if not path.exists():
            return {}, 0
        try:
            data = orjson.loads(path.read_bytes())
            offsets = {int(p): int(offset) for p, offset in data["offsets"].items()}
            return offsets, int(data.get("lost_to_retention", 0))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StorageError(f"cannot read group positions {path}: {exc}") from exc

    def saved_groups(self) -> list[tuple[str, str]]:
        """List (topic, group) pairs that have positions on disk."""
        pairs = []
        for topic_dir in sorted((self.data_dir / "groups").iterdir()):
            for path in sorted(topic_dir.glob("*.json")):
                pairs.append((topic_dir.name, path.stem))
        return pairs

    def save_offsets(
        self, topic: str, group: str, offsets: dict[int, int], lost_to_retention: int = 0
    ) -> None:
        directory = self.data_dir / "groups" / topic
        directory.mkdir(parents=True, exist_ok=True)
        payload = {
            "offsets": {str(partition): offset for partition, offset in offsets.items()},
            "lost_to_retention": lost_to_retention,
        }
        write_atomic(directory / f"{group}.json", orjson.dumps(payload))

    def close(self) -> None:
        for topic in self.topics.values():
            topic.close()
        os.close(self._lock_fd)
