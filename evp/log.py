"""The append-only log of one partition: segment files, recovery, reads and fsync.

Layout
------
Each partition has its own directory, for example ``<data-dir>/topics/events/00007/``.
The log is a sequence of segment files, each named by the offset of its first record
as 20 decimal digits, so that names sort in offset order::

    00000000000000000000.log     records 0 .. 41 217     (sealed)
    00000000000000041218.log     records 41 218 ..       (active)

A segment contains records in the format of ``evp.records``, back to back, with no
header or footer. Only the last segment, the active one, is written to. Appends roll to
a new segment when the active one would grow past ``segment_bytes``. A batch is always
written whole to one segment, so a batch larger than ``segment_bytes`` gets a segment
of its own and a record is never split between two files.

Recovery
--------
Opening a log lists the segments and trusts their names. A sealed segment is not read
at open, so restart time does not grow with the backlog. Its record count is the
difference between its base offset and the next segment's. The active segment is
scanned in full with checksums verified. Scanning stops at the first record that is
torn (the file ends inside it), fails its checksum or contains an offset that does
not continue the sequence. The rest of the file is then searched for a valid record
with a later offset:

* none follows: the damage is a torn tail, as a crash mid-write leaves. The file is
  truncated there and a WARNING names the file, the byte position and the number of
  bytes dropped.
* valid records follow: the damage is corruption in the middle of the segment, and
  the records after it were acknowledged, so nothing is truncated. An ERROR names the
  file, the byte position and the unreadable offsets, and scanning resumes at the
  valid record. Reads of the damaged offsets raise CorruptLog.

A process crash mid-write can only leave a torn record at the end of the active
segment, which is why only that segment is checked. Damage inside a sealed segment is found when it is read, and ``read`` raises
CorruptLog. That includes records missing after a power loss from a sealed segment
written since the last sync, because the next segment's name still promises them.
Files whose names are not segment names are ignored and logged once.

Producer state
--------------
A publisher that lost an acknowledgement sends its batch again, so the log remembers,
per producer id, the sequence number of the last event it stored, and the queue skips
events at or below it. The state is rebuilt at open from the records of the active
segment, which the recovery scan reads anyway, on top of ``producers.json``. That file
is written when the log rolls to a new segment and holds the state as it was at the
end of the sealed segments, so a resend right after a roll is still recognised. Only
the ``MAX_PRODUCERS`` producers that published most recently are remembered; a
producer forgotten that way loses only duplicate detection, never events.

Memory
------
Memory does not grow with the size of the log:

* the most recent batches stay in memory as encoded bytes (the tail), at most about
  ``tail_bytes`` of them, and never less than the last appended batch;
* each segment gets a sparse index with one entry per ``INDEX_INTERVAL_BYTES`` of
  records, kept only for the active segment and for the ``MAX_OPEN_SEALED_SEGMENTS``
  sealed ones read most recently, together with their file descriptors;
* a read from disk first fetches ``READ_BLOCK_BYTES`` plus one index interval with
  ``os.pread``, and then up to ``max_bytes`` only if the records that fit need more,
  or a single record when that record alone is larger.

Threads
-------
``append``, ``read`` and ``close`` must be called from one thread, the event loop's.
``sync`` may run in another thread at the same time, typically through
``asyncio.to_thread``. When ``sync`` returns, every record appended before it was called
is durable, including records in segments rolled since the previous sync, and so is
each new segment's directory entry. A lock guards the set of segments waiting for fsync
and every close of a file descriptor. ``sync`` holds it only to duplicate the
descriptors it needs, never during fsync, so appends are not stalled by a slow disk.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import struct
import threading
from array import array
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import orjson

from evp import records

logger = logging.getLogger("evp.log")

SEGMENT_NAME = re.compile(r"^(\d{20})\.log$")

# Kafka's default index.interval.bytes: one index entry per 4 KiB of records, so a
# lookup skips only the records that start within 4 KiB after the entry it finds.
INDEX_INTERVAL_BYTES = 4096

# Smallest block a disk read fetches, so that small max_bytes values still get one
# pread of useful size. A guess, not measured.
READ_BLOCK_BYTES = 64 * 1024

# Block size for scanning a whole segment (recovery and index building).
SCAN_BLOCK_BYTES = 1024 * 1024

# Sealed segments whose file descriptor and index stay open after a read. A consumer
# reading a backlog moves through segments in order, so a few suffice. A guess.
MAX_OPEN_SEALED_SEGMENTS = 8

# Producers whose last sequence number each log remembers, most recent first. Every
# run of `evp publish` and every shard with an output topic is one producer.
MAX_PRODUCERS = 4096

PRODUCERS_FILE = "producers.json"

# Directories are opened read-only to fsync them.
_DIRECTORY_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)


class OffsetOutOfRange(Exception):
    """An offset outside ``start_offset <= offset < next_offset``."""

    def __init__(self, message: str, offset: int, start_offset: int, next_offset: int) -> None:
        super().__init__(message)
        self.offset = offset
        self.start_offset = start_offset
        self.next_offset = next_offset


class CorruptLog(Exception):
    """A stored record that fails its checksum or does not fit its segment.

    ``offset`` is the offset expected at ``position``.
    """

    def __init__(self, segment: Path, position: int, offset: int | None, reason: str) -> None:
        where = f"at byte {position}" if offset is None else f"at byte {position} (offset {offset})"
        super().__init__(f"corrupt record in segment {segment} {where}: {reason}")
        self.segment = segment
        self.position = position
        self.offset = offset


class _SparseIndex:
    """Offset-to-position entries for one segment, about every INDEX_INTERVAL_BYTES."""

    __slots__ = ("offsets", "positions", "next_entry_position")

    def __init__(self) -> None:
        self.offsets = array("q")
        self.positions = array("q")
        # Records starting at or after this file position get the next entry.
        self.next_entry_position = 0

    def add_batch(self, base_offset: int, position: int, ends: Sequence[int]) -> None:
        """Index consecutive records written at `position`, with `ends` relative to it.

        The cost is one bisection per index entry added, not a step per record.
        """
        next_relative = self.next_entry_position - position
        if next_relative <= 0:
            self.offsets.append(base_offset)
            self.positions.append(position)
            next_relative = INDEX_INTERVAL_BYTES
        count = len(ends)
        while True:
            # Record i + 1 starts where record i ends.
            i = bisect_left(ends, next_relative)
            if i + 1 >= count:
                break
            start = ends[i]
            self.offsets.append(base_offset + i + 1)
            self.positions.append(position + start)
            next_relative = start + INDEX_INTERVAL_BYTES
        self.next_entry_position = position + next_relative

    def locate(self, offset: int) -> tuple[int, int] | None:
        """Return the last entry at or before `offset`, as (offset, position)."""
        i = bisect_right(self.offsets, offset) - 1
        if i < 0:
            return None
        return self.offsets[i], self.positions[i]


class _Segment:
    __slots__ = ("base_offset", "path", "size_bytes", "fd", "index")

    def __init__(self, base_offset: int, path: Path, size_bytes: int) -> None:
        self.base_offset = base_offset
        self.path = path
        self.size_bytes = size_bytes
        # Opened on demand, closed only under PartitionLog._lock (see sync).
        self.fd: int | None = None
        self.index: _SparseIndex | None = None


class SegmentInfo(NamedTuple):
    base_offset: int
    end_offset: int  # the offset after its last record
    size_bytes: int
    modified_at: float  # the file's modification time, seconds since the epoch
    active: bool


class _ScanResult(NamedTuple):
    valid_bytes: int  # the file position where valid records end
    next_offset: int  # the offset after the last valid record
    problem: str | None  # why scanning stopped before the end of the file, if it did


def _segment_path(directory: Path, base_offset: int) -> Path:
    return directory / f"{base_offset:020d}.log"


def _pread(fd: int, length: int, position: int) -> bytes:
    """Read up to `length` bytes at `position`, fewer only at the end of the file."""
    data = os.pread(fd, length, position)
    if len(data) == length or not data:
        return data
    parts = [data]
    done = len(data)
    while done < length:
        more = os.pread(fd, length - done, position + done)
        if not more:
            break
        parts.append(more)
        done += len(more)
    return b"".join(parts)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, _DIRECTORY_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _first_record_problem(data: bytes | memoryview) -> str:
    """Describe why the record at the start of `data` did not scan as valid."""
    try:
        next(records.decode(data, verify=True))
    except records.CorruptRecord as error:
        return str(error)
    return "the record is valid on its own but was rejected in context"


def _fit_records(view: memoryview, max_records: int, limit_bytes: int) -> tuple[int, int]:
    """Count the records, at most `max_records`, that fit whole in `limit_bytes`.

    Returns the count and the end position of the last one. Only length fields are
    read, so the records still need their checksums verified.
    """
    end = 0
    count = 0
    unpack_prefix = records.PREFIX.unpack_from
    while count < max_records and end + records.PREFIX.size <= limit_bytes:
        _, body_bytes = unpack_prefix(view, end)
        record_end = end + records.PREFIX.size + body_bytes
        if record_end > limit_bytes:
            break
        end = record_end
        count += 1
    return count, end


def _next_record_end(view: memoryview, position: int) -> int:
    """Return where the record at `position` ends, or a lower bound if its length field
    is cut off by the end of `view`."""
    if position + records.PREFIX.size > len(view):
        return position + records.HEADER_BYTES
    _, body_bytes = records.PREFIX.unpack_from(view, position)
    return position + records.PREFIX.size + body_bytes


def _remember_producers(producers: OrderedDict[int, int], latest: dict[int, int]) -> None:
    """Record the latest sequence of each producer as its most recent, forgetting the
    least recent producers beyond MAX_PRODUCERS."""
    for producer, sequence in latest.items():
        if producer:
            producers[producer] = sequence
            producers.move_to_end(producer)
    while len(producers) > MAX_PRODUCERS:
        producers.popitem(last=False)


def _scan_segment(
    fd: int,
    size_bytes: int,
    base_offset: int,
    verify: bool,
    index: _SparseIndex,
    producers: OrderedDict[int, int] | None = None,
    start: int = 0,
) -> _ScanResult:
    """Scan a segment from byte `start` in SCAN_BLOCK_BYTES blocks, filling `index`.

    `base_offset` is the offset of the record at `start`. Stops at the first record
    that is torn, invalid (checksums only when `verify` is set) or contains an offset
    other than the next one expected. The producer and sequence of each valid record go
    into `producers` when it is given.
    """
    position = start
    offset = base_offset
    needed_bytes = 0  # set when one record is longer than the block read
    latest: dict[int, int] | None = {} if producers is not None else None
    while position < size_bytes:
        length = min(max(SCAN_BLOCK_BYTES, needed_bytes), size_bytes - position)
        block = _pread(fd, length, position)
        if len(block) < length:
            return _ScanResult(position, offset, f"the file ended at byte {position + len(block)}")
        if latest is not None:
            latest.clear()
        offsets, ends, stop = records.scan(block, verify, latest)
        count = len(offsets)
        if count and offsets != list(range(offset, offset + count)):
            first_bad = next(i for i in range(count) if offsets[i] != offset + i)
            problem = f"record has offset {offsets[first_bad]}, expected {offset + first_bad}"
            if first_bad:
                index.add_batch(offset, position, ends[:first_bad])
            if producers is not None:
                # Rare (damage): decode the accepted records again for their producers.
                accepted = memoryview(block)[: ends[first_bad - 1] if first_bad else 0]
                _remember_producers(
                    producers, {record.producer: record.sequence for record in records.decode(accepted)}
                )
            end = ends[first_bad - 1] if first_bad else 0
            return _ScanResult(position + end, offset + first_bad, problem)
        if count:
            index.add_batch(offset, position, ends)
            if producers is not None and latest is not None:
                _remember_producers(producers, latest)
            offset += count
        position += stop
        if stop == len(block):
            needed_bytes = 0
            continue

        # Scanning stopped inside the block: the record there is bad, or continues past
        # the block, or runs past the end of the file.
        rest = memoryview(block)[stop:]
        if len(rest) < records.HEADER_BYTES:
            if position + len(rest) >= size_bytes:
                return _ScanResult(position, offset, "torn record header at the end of the file")
            needed_bytes = 0  # stop > 0 here, so the next block starts further on
            continue
        _, body_bytes = records.PREFIX.unpack_from(rest)
        record_bytes = records.PREFIX.size + body_bytes
        if record_bytes <= len(rest):
            return _ScanResult(position, offset, _first_record_problem(rest[:record_bytes]))
        if position + record_bytes > size_bytes:
            return _ScanResult(
                position,
                offset,
                f"torn record: it declares {record_bytes} bytes "
                f"and {size_bytes - position} remain in the file",
            )
        needed_bytes = record_bytes
    return _ScanResult(position, offset, None)


def _find_next_record(
    fd: int, start: int, size_bytes: int, expected_offset: int
) -> tuple[int, int] | None:
    """Find the first valid record after damaged bytes, searching from byte `start`.

    A record qualifies when its checksum matches and its offset lies after
    `expected_offset`, the offset of the damaged record. Returns its (position,
    offset), or None when no valid record follows, which makes the damage a torn tail.
    Candidates are found by the high bytes of their offset field, so the search runs
    at the speed of ``bytes.find`` and verifies about one checksum per record.
    """
    # NOTE: this reads the rest of the segment into memory at once, so it costs up to
    # --segment-bytes (plus one batch) of memory, only while recovering a damaged log.
    data = _pread(fd, size_bytes - start, start)
    view = memoryview(data)
    # Each record takes at least HEADER_BYTES, which bounds the offsets that can follow.
    max_offset = expected_offset + len(data) // records.HEADER_BYTES + 1
    prefixes = {
        struct.pack(">Q", expected_offset + 1)[:5],
        struct.pack(">Q", max_offset)[:5],
    }
    for prefix in sorted(prefixes):
        found = data.find(prefix, records.PREFIX.size)
        while found != -1 and found + 8 <= len(data):
            record_start = found - records.PREFIX.size
            (offset,) = struct.unpack_from(">Q", data, found)
            if expected_offset < offset <= max_offset:
                _, body_bytes = records.PREFIX.unpack_from(data, record_start)
                record_end = record_start + records.PREFIX.size + body_bytes
                if body_bytes >= records.BODY_HEADER_BYTES and record_end <= len(data):
                    offsets, _, _ = records.scan(view[record_start:record_end], verify=True)
                    if offsets:
                        return start + record_start, offset
            found = data.find(prefix, found + 1)
    return None


class PartitionLog:
    """The segment files of one partition, with an in-memory tail of recent batches."""

    def __init__(
        self,
        directory: Path,
        *,
        segment_bytes: int = 64 * 1024 * 1024,
        tail_bytes: int = 1024 * 1024,
        name: str = "",
    ) -> None:
        if segment_bytes < 1:
            raise ValueError(f"segment_bytes must be at least 1, got {segment_bytes}")
        if tail_bytes < 0:
            raise ValueError(f"tail_bytes must not be negative, got {tail_bytes}")
        self.directory = Path(directory)
        self.segment_bytes = segment_bytes
        self.tail_bytes = tail_bytes
        self.name = name or str(self.directory)

        self.start_offset = 0
        self.next_offset = 0
        self.size_bytes = 0

        self._segments: list[_Segment] = []
        self._bases: list[int] = []  # base offsets of _segments, for bisection
        self._open_sealed: OrderedDict[_Segment, None] = OrderedDict()  # least recent first
        self._closed = False
        # Set when a failed append could not be undone, which may leave a partial record
        # at the end of the active segment.
        self._append_error: str | None = None
        # Producer id -> sequence of its last stored event, least recent first.
        self.producers: OrderedDict[int, int] = OrderedDict()

        # The tail: parallel lists of batch base offsets and (bytes, record ends), live
        # from _tail_head on. Evicted entries are set to None and compacted in bulk.
        self._tail_bases: list[int] = []
        self._tail_batches: list[tuple[bytes, tuple[int, ...]] | None] = []
        self._tail_head = 0
        self._tail_size_bytes = 0

        # Shared with sync(), guarded by _lock.
        self._lock = threading.Lock()
        self._unsynced: dict[_Segment, None] = {}  # segments written since the last sync
        self._unsynced_directories: dict[Path, None] = {}

        self._open()

    # ------------------------------------------------------------------ recovery

    def _open(self) -> None:
        self._create_directory()
        bases = self._list_segments()
        if not bases:
            self._create_segment(0)
            logger.debug("log %s: new log in %s", self.name, self.directory)
            return

        self._load_producers(bases[-1])
        for base in bases[:-1]:
            path = _segment_path(self.directory, base)
            segment = _Segment(base, path, path.stat().st_size)
            self._segments.append(segment)
            self._bases.append(base)
            self.size_bytes += segment.size_bytes
        self._recover_active(bases[-1])
        self.start_offset = self._bases[0]
        logger.debug(
            "log %s: opened segments=%d start_offset=%d next_offset=%d size_bytes=%d",
            self.name,
            len(self._segments),
            self.start_offset,
            self.next_offset,
            self.size_bytes,
        )

    def _create_directory(self) -> None:
        """Create the directory and any missing parents, and queue them for fsync."""
        missing: list[Path] = []
        path = self.directory
        while not path.exists():
            missing.append(path)
            path = path.parent
        self.directory.mkdir(parents=True, exist_ok=True)
        # A new directory's entry is durable once its parent is fsynced.
        for created in missing:
            self._unsynced_directories[created.parent] = None

    def _list_segments(self) -> list[int]:
        bases: list[int] = []
        unknown: list[str] = []
        for entry in os.scandir(self.directory):
            match = SEGMENT_NAME.match(entry.name)
            if match and entry.is_file():
                bases.append(int(match.group(1)))
            elif entry.name not in (PRODUCERS_FILE, PRODUCERS_FILE + ".tmp"):
                unknown.append(entry.name)
        if unknown:
            unknown.sort()
            listed_names = ", ".join(unknown[:10])
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            logger.warning(
                "log %s: ignoring %d unknown files in %s: %s%s",
                self.name,
                len(unknown),
                self.directory,
                listed_names,
                more,
            )
        bases.sort()
        return bases

    def _load_producers(self, active_base: int) -> None:
        """Start from the producer state saved when the active segment was created."""
        path = self.directory / PRODUCERS_FILE
        try:
            saved = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, orjson.JSONDecodeError) as exc:
            logger.warning("log %s: ignoring unreadable %s: %s", self.name, path, exc)
            return
        if not isinstance(saved, dict) or saved.get("segment") != active_base:
            # Written for an older segment, or by a roll whose segment did not survive:
            # the active segment's own records are all the state there is.
            return
        try:
            pairs = [(int(producer, 16), int(sequence)) for producer, sequence in saved["producers"]]
        except (KeyError, TypeError, ValueError) as exc:
            logger.warning("log %s: ignoring malformed %s: %s", self.name, path, exc)
            return
        _remember_producers(self.producers, dict(pairs))

    def _save_producers(self, segment_base: int) -> None:
        """Write the producer state as of the start of the segment at `segment_base`."""
        path = self.directory / PRODUCERS_FILE
        temporary = path.with_name(PRODUCERS_FILE + ".tmp")
        state = {
            "segment": segment_base,
            "producers": [[f"{producer:016x}", sequence] for producer, sequence in self.producers.items()],
        }
        try:
            temporary.write_bytes(orjson.dumps(state))
            os.replace(temporary, path)
        except OSError as exc:
            # Only duplicate detection across this roll is at stake, not stored events.
            logger.warning("log %s: could not write %s: %s", self.name, path, exc)

    def _recover_active(self, base_offset: int) -> None:
        """Scan the last segment, truncate a torn tail after its last valid record, open it.

        Damage followed by valid records is not a torn tail: a crash only tears the end
        of the file, so those records were acknowledged and are kept. The damaged
        records stay in the file, unreadable, and a read that reaches them raises
        CorruptLog. Only bytes after the last valid record are truncated.
        """
        path = _segment_path(self.directory, base_offset)
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
        try:
            size_bytes = os.fstat(fd).st_size
            index = _SparseIndex()
            result = _scan_segment(fd, size_bytes, base_offset, True, index, self.producers)
            while result.valid_bytes < size_bytes:
                found = _find_next_record(fd, result.valid_bytes + 1, size_bytes, result.next_offset)
                if found is None:
                    break
                resume_position, resume_offset = found
                logger.error(
                    "log %s: corrupt record in %s at byte %d (offset %d): %s; valid records "
                    "follow from byte %d (offset %d), so the segment is kept whole and offsets "
                    "%d to %d are unreadable; groups stop at offset %d until the segment is "
                    "restored from a backup or `evp replay --from-offset %d` moves them past it",
                    self.name,
                    path,
                    result.valid_bytes,
                    result.next_offset,
                    result.problem,
                    resume_position,
                    resume_offset,
                    result.next_offset,
                    resume_offset - 1,
                    result.next_offset,
                    resume_offset,
                )
                # An index entry at the resume point lets reads reach the records after
                # the damage without skipping through it by its length fields.
                index.next_entry_position = resume_position
                # The records after the damage stay out of the producer state: a
                # batch torn by it was never acknowledged, and its resend must be
                # stored again, not skipped as already stored.
                result = _scan_segment(
                    fd, size_bytes, resume_offset, True, index, start=resume_position
                )
            if result.valid_bytes < size_bytes:
                logger.warning(
                    "log %s: truncating %s at byte %d, dropping %d bytes: %s",
                    self.name,
                    path,
                    result.valid_bytes,
                    size_bytes - result.valid_bytes,
                    result.problem,
                )
                os.ftruncate(fd, result.valid_bytes)
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        segment = _Segment(base_offset, path, result.valid_bytes)
        segment.fd = fd
        segment.index = index
        self._segments.append(segment)
        self._bases.append(base_offset)
        self.size_bytes += segment.size_bytes
        self.next_offset = result.next_offset

    # ------------------------------------------------------------------ append

    @property
    def _active(self) -> _Segment:
        return self._segments[-1]

    def _create_segment(self, base_offset: int) -> _Segment:
        """Create an empty segment file and make it the active segment."""
        path = _segment_path(self.directory, base_offset)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        segment = _Segment(base_offset, path, 0)
        segment.fd = fd
        segment.index = _SparseIndex()
        with self._lock:
            if self._segments:
                self._keep_open(self._active)
            self._segments.append(segment)
            self._bases.append(base_offset)
            self._unsynced_directories[self.directory] = None
        return segment

    @property
    def failed(self) -> bool:
        """Whether a failed write or fsync has stopped appends (see ``check_writable``)."""
        return self._append_error is not None

    def check_writable(self) -> None:
        """Raise OSError (EIO) if a failed write or fsync has stopped appends."""
        self._check_open()
        if self._append_error is not None:
            raise OSError(errno.EIO, self._append_error)

    def last_sequence(self, producer: int) -> int:
        """Return the sequence of the last stored event of `producer`, or 0 if none."""
        return self.producers.get(producer, 0)

    def append(
        self,
        entries: list[tuple[bytes, bytes, int]],
        producer: int = 0,
        sequences: list[int] | None = None,
    ) -> int:
        """Append `(key, value, timestamp_us)` entries as one batch; return its base offset.

        `producer` and `sequences` (one per entry, increasing) identify the events for
        duplicate detection; see ``last_sequence``. Raises the OSError of a failed write
        after truncating the segment back to its previous end, so no partial record
        stays in the log and next_offset is unchanged.
        """
        self.check_writable()
        if not entries:
            raise ValueError("append needs at least one entry")

        base_offset = self.next_offset
        data, ends = records.encode_batch(base_offset, entries, producer, sequences)
        segment = self._active
        if segment.size_bytes and segment.size_bytes + len(data) > self.segment_bytes:
            self._save_producers(base_offset)
            segment = self._create_segment(base_offset)
            logger.debug("log %s: rolled to segment %s", self.name, segment.path.name)
        position = segment.size_bytes
        self._write(segment, data)

        segment.size_bytes = position + len(data)
        self.size_bytes += len(data)
        assert segment.index is not None  # the active segment always has its index
        segment.index.add_batch(base_offset, position, ends)
        self.next_offset = base_offset + len(ends)
        if producer and sequences:
            _remember_producers(self.producers, {producer: sequences[-1]})
        self._add_to_tail(base_offset, data, ends)
        with self._lock:
            self._unsynced[segment] = None
        return base_offset

    def _write(self, segment: _Segment, data: bytes) -> None:
        fd = segment.fd
        assert fd is not None
        try:
            written = os.write(fd, data)
            if written < len(data):
                view = memoryview(data)
                while written < len(data):
                    count = os.write(fd, view[written:])
                    if count == 0:
                        message = f"write to {segment.path} failed: os.write returned 0"
                        raise OSError(errno.EIO, message)
                    written += count
        except OSError as error:
            # O_APPEND makes the next write land at the new end after this truncation.
            try:
                os.ftruncate(fd, segment.size_bytes)
            except OSError as truncate_error:
                self._append_error = (
                    f"log {self.name} stopped appending: truncating {segment.path} back to "
                    f"{segment.size_bytes} bytes failed ({truncate_error}) after a write "
                    f"error ({error}); reopen the log to recover"
                )
                logger.error("%s", self._append_error)
            raise

    def _add_to_tail(self, base_offset: int, data: bytes, ends: Sequence[int]) -> None:
        self._tail_bases.append(base_offset)
        # A tuple of ints, unlike a list, is untracked by the garbage collector after
        # its first collection, so the many small batches of a slow publisher do not
        # lengthen full collections.
        self._tail_batches.append((data, tuple(ends)))
        self._tail_size_bytes += len(data)
        batches = self._tail_batches
        head = self._tail_head
        last = len(batches) - 1
        while self._tail_size_bytes > self.tail_bytes and head < last:
            evicted = batches[head]
            assert evicted is not None
            self._tail_size_bytes -= len(evicted[0])
            batches[head] = None
            head += 1
        # Compact in bulk, so that eviction costs O(1) per batch on average.
        if head > 64 and head * 2 > len(batches):
            del batches[:head]
            del self._tail_bases[:head]
            head = 0
        self._tail_head = head

    def _clear_tail(self) -> None:
        self._tail_bases.clear()
        self._tail_batches.clear()
        self._tail_head = 0
        self._tail_size_bytes = 0

    # ------------------------------------------------------------------ sync

    @property
    def dirty(self) -> bool:
        """Whether records were appended since the last sync."""
        return bool(self._unsynced)

    def sync(self) -> None:
        """Fsync every segment written since the last sync, and new directory entries.

        Safe to call from a worker thread while the event loop thread appends and reads.
        After an fsync error the segments stay queued and ``dirty`` stays set, but a
        later successful fsync does not prove the data is on disk. Linux may discard the
        dirty pages whose writeback failed and report success on the next fsync (see
        "Fsync Errors" on the PostgreSQL wiki), so the log treats the error as data loss
        and refuses appends from then on (``check_writable``).
        """
        with self._lock:
            if self._closed:
                raise ValueError(f"log {self.name} is closed")
            segments = list(self._unsynced)
            directories = list(self._unsynced_directories)
            if not segments and not directories:
                return
            self._unsynced.clear()
            self._unsynced_directories.clear()
            # Duplicates stay valid even if the event loop thread closes the originals
            # (segment eviction, close) while fsync runs.
            fds: list[int] = []
            try:
                for segment in segments:
                    if segment.fd is not None:
                        fds.append(os.dup(segment.fd))
                    else:
                        fds.append(os.open(segment.path, os.O_RDONLY))
            except OSError:
                self._requeue(segments, directories)
                for fd in fds:
                    os.close(fd)
                raise

        try:
            for fd in fds:
                os.fsync(fd)
            for directory in directories:
                _fsync_directory(directory)
        except OSError as error:
            with self._lock:
                self._requeue(segments, directories)
            # The pages whose writeback failed may be gone while reads still see them,
            # so nothing appended so far can be called durable. Appends stop until a
            # restart rebuilds the log from what the disk really holds.
            self._append_error = (
                f"log {self.name} stopped appending: fsync failed ({error}); restart the "
                f"queue once the disk is healthy"
            )
            logger.error("%s", self._append_error)
            raise
        finally:
            for fd in fds:
                os.close(fd)

    def _requeue(self, segments: list[_Segment], directories: list[Path]) -> None:
        """Queue segments and directories for the next sync. Call with _lock held."""
        for segment in segments:
            self._unsynced[segment] = None
        for directory in directories:
            self._unsynced_directories[directory] = None

    # ------------------------------------------------------------------ read

    def read(self, offset: int, max_records: int, max_bytes: int) -> tuple[bytes, int]:
        """Read whole consecutive records starting at `offset`; return (data, count).

        ``count`` is at least 1 and at most `max_records`. ``data`` is at most
        `max_bytes` long unless the first record alone is longer, and then it is that
        record. Reads from the tail may span batches and segments. Reads from disk stop
        at the end of a segment, so a caller wanting more reads again at the next
        offset. Records from disk are checksum-verified. When a bad record follows
        good ones, the good ones are returned and the read that starts at the bad
        record raises CorruptLog.
        """
        self._check_open()
        if max_records < 1:
            raise ValueError(f"max_records must be at least 1, got {max_records}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        if not self.start_offset <= offset < self.next_offset:
            raise self._out_of_range(offset)
        head = self._tail_head
        if head < len(self._tail_bases) and offset >= self._tail_bases[head]:
            return self._read_tail(offset, max_records, max_bytes)
        return self._read_disk(offset, max_records, max_bytes)

    def _out_of_range(self, offset: int) -> OffsetOutOfRange:
        if self.start_offset == self.next_offset:
            valid = f"the log is empty and its next offset is {self.next_offset}"
        else:
            valid = f"valid offsets are {self.start_offset} to {self.next_offset - 1}"
        return OffsetOutOfRange(
            f"offset {offset} is out of range for log {self.name}: {valid}",
            offset,
            self.start_offset,
            self.next_offset,
        )

    def _read_tail(self, offset: int, max_records: int, max_bytes: int) -> tuple[bytes, int]:
        """Slice records out of the cached batches by their end positions, unparsed."""
        bases = self._tail_bases
        batches = self._tail_batches
        i = bisect_right(bases, offset, self._tail_head) - 1
        parts: list[bytes] = []
        count = 0
        size_bytes = 0
        while i < len(batches) and count < max_records:
            batch = batches[i]
            assert batch is not None
            data, ends = batch
            first = offset + count - bases[i]
            start = ends[first - 1] if first else 0
            last = min(len(ends), first + max_records - count)
            batch_count = bisect_right(ends, start + max_bytes - size_bytes, first, last) - first
            if batch_count == 0:
                if count:
                    break
                batch_count = 1  # the first record alone exceeds max_bytes
            end = ends[first + batch_count - 1]
            parts.append(data if start == 0 and end == len(data) else data[start:end])
            count += batch_count
            size_bytes += end - start
            if first + batch_count < len(ends):
                break  # a limit stopped the read inside this batch
            i += 1
        return (parts[0] if len(parts) == 1 else b"".join(parts)), count

    def _read_disk(self, offset: int, max_records: int, max_bytes: int) -> tuple[bytes, int]:
        i = bisect_right(self._bases, offset) - 1
        segment = self._segments[i]
        end_offset = self._bases[i + 1] if i + 1 < len(self._bases) else self.next_offset
        max_records = min(max_records, end_offset - offset)
        fd, index = self._open_for_read(segment)

        entry = index.locate(offset)
        if entry is None:
            raise CorruptLog(segment.path, 0, offset, "no valid record found in the segment")
        current, position = entry
        # Start small, so that a read of a few records does not fetch max_bytes from
        # disk. The slack of one index interval covers the skip to `offset`.
        block_bytes = READ_BLOCK_BYTES + INDEX_INTERVAL_BYTES
        block = b""
        block_start = position

        # Skip from the index entry to `offset` by record lengths, without checksums.
        while current < offset:
            relative = position - block_start
            if len(block) - relative < records.PREFIX.size:
                block = self._pread_segment(segment, fd, block_bytes, position)
                block_start = position
                relative = 0
                if len(block) < records.PREFIX.size:
                    raise CorruptLog(segment.path, position, current, "the segment ends here")
            _, body_bytes = records.PREFIX.unpack_from(block, relative)
            if (
                body_bytes < records.BODY_HEADER_BYTES
                or position + records.PREFIX.size + body_bytes > segment.size_bytes
            ):
                raise CorruptLog(
                    segment.path, position, current, f"invalid record length {body_bytes}"
                )
            position += records.PREFIX.size + body_bytes
            current += 1

        if position >= segment.size_bytes:
            raise CorruptLog(segment.path, position, offset, "the segment ends here")

        # Make sure the first record is whole in the buffer, or that the segment ends.
        view = memoryview(block)[position - block_start :]
        while True:
            first_bytes = records.HEADER_BYTES
            if len(view) >= records.PREFIX.size:
                _, body_bytes = records.PREFIX.unpack_from(view)
                first_bytes = max(first_bytes, records.PREFIX.size + body_bytes)
            if len(view) >= first_bytes or position + len(view) >= segment.size_bytes:
                break
            block = self._pread_segment(segment, fd, max(block_bytes, first_bytes), position)
            view = memoryview(block)

        # Find the records within the limits by their lengths, then verify only those,
        # so the work is proportional to what is returned.
        requested_bytes = max(max_bytes, first_bytes)
        count, end = _fit_records(view, max_records, min(len(view), requested_bytes))
        if (
            count < max_records
            and len(view) < requested_bytes
            and position + len(view) < segment.size_bytes
            and _next_record_end(view, end) <= requested_bytes
        ):
            # The buffer, not a limit, stopped the records, so fetch up to max_bytes.
            view = memoryview(self._pread_segment(segment, fd, requested_bytes, position))
            count, end = _fit_records(view, max_records, min(len(view), requested_bytes))
        offsets, ends, _ = records.scan(view[:end], verify=True)
        if not offsets:
            if position + first_bytes > segment.size_bytes:
                reason = (
                    f"the record declares {first_bytes} bytes and "
                    f"{segment.size_bytes - position} remain in the segment"
                )
            else:
                reason = _first_record_problem(view[:first_bytes])
            raise CorruptLog(segment.path, position, offset, reason)
        if offsets[0] != offset:
            raise CorruptLog(
                segment.path, position, offset, f"the record has offset {offsets[0]}"
            )
        # A bad record after good ones shortens the result; a read starting at it raises.
        count = len(offsets)
        if offsets[-1] != offset + count - 1:
            count = next(k for k in range(count) if offsets[k] != offset + k)
        return bytes(view[: ends[count - 1]]), count

    def _pread_segment(self, segment: _Segment, fd: int, length: int, position: int) -> bytes:
        return _pread(fd, min(length, segment.size_bytes - position), position)

    def _open_for_read(self, segment: _Segment) -> tuple[int, _SparseIndex]:
        """Return the segment's descriptor and index, opening and indexing it if needed."""
        if segment is not self._active:
            if segment.fd is None:
                segment.fd = os.open(segment.path, os.O_RDONLY)
            if segment.index is None:
                index = _SparseIndex()
                # NOTE: this scans every header of the segment on the calling thread.
                # A full 64 MiB segment of 110-byte records took about 0.26 s on a
                # 2-core AMD EPYC. Damage stops the index early, and reads past that
                # point then raise CorruptLog at the damaged record.
                _scan_segment(segment.fd, segment.size_bytes, segment.base_offset, False, index)
                segment.index = index
            with self._lock:
                self._keep_open(segment)
        assert segment.fd is not None and segment.index is not None
        return segment.fd, segment.index

    def _keep_open(self, segment: _Segment) -> None:
        """Mark a sealed segment as recently used and close the least recent over the cap.

        Call with _lock held, because sync() may be duplicating a descriptor.
        """
        self._open_sealed[segment] = None
        self._open_sealed.move_to_end(segment)
        while len(self._open_sealed) > MAX_OPEN_SEALED_SEGMENTS:
            evicted, _ = self._open_sealed.popitem(last=False)
            self._close_segment(evicted)

    def _close_segment(self, segment: _Segment) -> None:
        """Drop a sealed segment's index and descriptor. Call with _lock held."""
        segment.index = None
        if segment.fd is not None:
            os.close(segment.fd)
            segment.fd = None

    # ------------------------------------------------------------------ time search

    def timestamp_at(self, offset: int) -> int:
        """Return the publish timestamp (µs since the epoch) of the record at `offset`."""
        data, _ = self.read(offset, 1, 1)
        return records.HEADER.unpack_from(data)[3]

    def offset_for_time(self, timestamp_us: int) -> int:
        """Return the first offset whose record timestamp is at or after `timestamp_us`.

        Returns ``next_offset`` when every record is older. The segment is chosen by
        bisecting the timestamps of the segments' first records, each read from byte 0
        of its file, so only the chosen segment gets a sparse index. Offsets within
        that segment are then bisected through the index. Raises CorruptLog when a
        record it needs is damaged.

        NOTE: bisection assumes timestamps grow with offsets. Publishers stamp their
        own events, so with clocks that disagree the result is only close to the
        first such record, not exact.
        """
        self._check_open()
        if self.start_offset == self.next_offset:
            return self.next_offset
        # The last segment whose first record is older than the time, or -1.
        low, high = 0, len(self._segments)
        while low < high:
            middle = (low + high) // 2
            first = self._first_timestamp(self._segments[middle])
            if first is not None and first < timestamp_us:
                low = middle + 1
            else:
                high = middle
        chosen = low - 1
        if chosen < 0:
            return self.start_offset
        # Every offset before `low` is older than the time. `high` is the first known
        # offset that is at least as recent, or the end of the segment.
        low = self._bases[chosen] + 1
        high = self._bases[chosen + 1] if chosen + 1 < len(self._bases) else self.next_offset
        while low < high:
            middle = (low + high) // 2
            if self.timestamp_at(middle) < timestamp_us:
                low = middle + 1
            else:
                high = middle
        return low

    def _first_timestamp(self, segment: _Segment) -> int | None:
        """Read the timestamp of a segment's first record, or None for an empty segment."""
        if segment.size_bytes < records.HEADER_BYTES:
            return None
        if segment.fd is not None:
            header = _pread(segment.fd, records.HEADER_BYTES, 0)
        else:
            fd = os.open(segment.path, os.O_RDONLY)
            try:
                header = _pread(fd, records.HEADER_BYTES, 0)
            finally:
                os.close(fd)
        if len(header) < records.HEADER_BYTES:
            raise CorruptLog(segment.path, 0, segment.base_offset, "the segment ends here")
        _, _, offset, timestamp_us, _, _, _ = records.HEADER.unpack(header)
        if offset != segment.base_offset:
            raise CorruptLog(
                segment.path, 0, segment.base_offset, f"the first record has offset {offset}"
            )
        return timestamp_us

    # ------------------------------------------------------------------ retention

    def segments(self) -> list[SegmentInfo]:
        """Describe the segments, oldest first; the last one is the active segment."""
        infos = []
        for index, segment in enumerate(self._segments):
            active = index == len(self._segments) - 1
            end = self.next_offset if active else self._segments[index + 1].base_offset
            try:
                modified_at = segment.path.stat().st_mtime
            except OSError:
                modified_at = 0.0
            infos.append(
                SegmentInfo(segment.base_offset, end, segment.size_bytes, modified_at, active)
            )
        return infos

    def delete_oldest_segment(self) -> SegmentInfo:
        """Delete the oldest sealed segment and move `start_offset` past it.

        The active segment is never deleted, so offsets continue after a restart even
        when retention has removed everything else. Raises ValueError when only the
        active segment is left.
        """
        self._check_open()
        if len(self._segments) < 2:
            raise ValueError(f"log {self.name} has only its active segment; nothing to delete")
        info = self.segments()[0]
        with self._lock:
            segment = self._segments.pop(0)
            self._bases.pop(0)
            self._open_sealed.pop(segment, None)
            self._unsynced.pop(segment, None)
            self._close_segment(segment)
            self._unsynced_directories[self.directory] = None
        segment.path.unlink(missing_ok=True)
        self.size_bytes -= segment.size_bytes
        self.start_offset = self._bases[0]
        logger.debug(
            "log %s: deleted segment %s with offsets %d to %d (%d bytes)",
            self.name,
            segment.path.name,
            info.base_offset,
            info.end_offset - 1,
            info.size_bytes,
        )
        return info

    # ------------------------------------------------------------------ close

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"log {self.name} is closed")

    def close(self) -> None:
        """Close every file descriptor. This does not fsync, so call sync() first."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for segment in self._segments:
                if segment.fd is not None:
                    os.close(segment.fd)
                    segment.fd = None
                segment.index = None
            self._open_sealed.clear()
            self._unsynced.clear()
            self._unsynced_directories.clear()
        self._clear_tail()
        logger.debug("log %s: closed at next_offset=%d", self.name, self.next_offset)
