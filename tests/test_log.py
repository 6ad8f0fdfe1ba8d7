"""Tests for evp.log.PartitionLog, on real files in temporary directories."""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import mounted_tmpfs

from evp import log as log_module
from evp import records
from evp.log import CorruptLog, OffsetOutOfRange, PartitionLog


def make_entries(start: int, count: int, value_bytes: int = 40) -> list[tuple[bytes, bytes, int]]:
    """Entries whose key, value and timestamp are derived from their number."""
    return [
        (f"key-{n}".encode(), (f"value-{n}-".encode() * value_bytes)[:value_bytes], 1_000_000 + n)
        for n in range(start, start + count)
    ]


def expected_record(offset: int, value_bytes: int = 40) -> records.Record:
    key, value, timestamp_us = make_entries(offset, 1, value_bytes)[0]
    return records.Record(offset, timestamp_us, key, value)


def read_all(
    log: PartitionLog, max_records: int = 1000, max_bytes: int = 1 << 20
) -> list[records.Record]:
    """Read every stored record with the given limits, checking each read's limits."""
    result: list[records.Record] = []
    offset = log.start_offset
    while offset < log.next_offset:
        data, count = log.read(offset, max_records, max_bytes)
        decoded = list(records.decode(data))
        assert len(decoded) == count
        assert 1 <= count <= max_records
        assert count == 1 or len(data) <= max_bytes
        result.extend(decoded)
        offset += count
    return result


def read_all_until(log: PartitionLog, end_offset: int) -> list[records.Record]:
    """Read the records before `end_offset`, one at a time."""
    result: list[records.Record] = []
    for offset in range(log.start_offset, end_offset):
        data, _ = log.read(offset, 1, 1 << 20)
        result.extend(records.decode(data))
    return result


def segment_paths(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.log"))


def record_positions(path: Path) -> list[tuple[int, int]]:
    """(offset, start position) of every record in a segment file."""
    offsets, ends, _ = records.scan(path.read_bytes())
    starts = [0, *ends[:-1]]
    return list(zip(offsets, starts))


# ---------------------------------------------------------------- append and read


def test_new_log_empty(tmp_path: Path) -> None:
    log = PartitionLog(tmp_path / "topics" / "events" / "00000")
    assert log.start_offset == 0
    assert log.next_offset == 0
    assert log.size_bytes == 0
    assert [p.name for p in segment_paths(log.directory)] == ["00000000000000000000.log"]
    with pytest.raises(OffsetOutOfRange, match="the log is empty and its next offset is 0"):
        log.read(0, 1, 100)
    log.close()


def test_append_read_back(tmp_path: Path) -> None:
    log = PartitionLog(tmp_path)
    assert log.append(make_entries(0, 3)) == 0
    assert log.append(make_entries(3, 1)) == 3
    assert log.append(make_entries(4, 5)) == 4
    assert log.next_offset == 9
    assert log.size_bytes == sum(p.stat().st_size for p in segment_paths(tmp_path))

    data, count = log.read(0, 100, 1 << 20)
    assert count == 9
    assert list(records.decode(data)) == [expected_record(n) for n in range(9)]
    log.close()


def test_append_empty_rejected(tmp_path: Path) -> None:
    log = PartitionLog(tmp_path)
    with pytest.raises(ValueError, match="at least one entry"):
        log.append([])
    assert log.next_offset == 0
    log.close()


def test_read_tail_spans_batches(tmp_path: Path) -> None:
    log = PartitionLog(tmp_path)
    for start in (0, 2, 4):
        log.append(make_entries(start, 2))
    data, count = log.read(1, 100, 1 << 20)
    assert count == 5
    assert [r.offset for r in records.decode(data)] == [1, 2, 3, 4, 5]
    log.close()


@pytest.mark.parametrize("reopen", [False, True], ids=["tail", "disk"])
def test_read_limits(tmp_path: Path, reopen: bool) -> None:
    log = PartitionLog(tmp_path)
    log.append(make_entries(0, 10))
    if reopen:
        log.close()
        log = PartitionLog(tmp_path)
    record_bytes = len(records.encode(*expected_record(0)))

    _, count = log.read(2, 4, 1 << 20)
    assert count == 4
    _, count = log.read(2, 100, 3 * record_bytes)
    assert count == 3
    _, count = log.read(2, 100, 3 * record_bytes - 1)
    assert count == 2
    data, count = log.read(2, 100, 1)
    assert count == 1
    assert list(records.decode(data)) == [expected_record(2)]
    data, count = log.read(9, 100, 1 << 20)
    assert count == 1
    log.close()


@pytest.mark.parametrize("reopen", [False, True], ids=["tail", "disk"])
def test_read_record_larger_than_max_bytes(tmp_path: Path, reopen: bool) -> None:
    # 200 KiB is larger than the 64 KiB minimum block, so the disk path must re-read.
    big_bytes = 200 * 1024
    log = PartitionLog(tmp_path, tail_bytes=1 << 20)
    log.append(make_entries(0, 3))
    log.append(make_entries(3, 1, value_bytes=big_bytes))
    log.append(make_entries(4, 3))
    if reopen:
        log.close()
        log = PartitionLog(tmp_path)

    data, count = log.read(3, 100, 100)
    assert count == 1
    assert list(records.decode(data)) == [expected_record(3, big_bytes)]
    _, count = log.read(0, 100, 1000)
    assert count == 3
    data, count = log.read(4, 100, 1 << 20)
    assert count == 3
    assert [r.offset for r in records.decode(data)] == [4, 5, 6]
    log.close()


# ---------------------------------------------------------------- segments and reopen


def test_reopen_continues(tmp_path: Path) -> None:
    log = PartitionLog(tmp_path, segment_bytes=1000)
    for start in range(0, 40, 4):
        log.append(make_entries(start, 4))
    size_bytes = log.size_bytes
    log.close()

    log = PartitionLog(tmp_path, segment_bytes=1000)
    assert log.next_offset == 40
    assert log.start_offset == 0
    assert log.size_bytes == size_bytes
    assert read_all(log) == [expected_record(n) for n in range(40)]
    assert log.append(make_entries(40, 2)) == 40
    log.close()

    log = PartitionLog(tmp_path, segment_bytes=1000)
    assert read_all(log) == [expected_record(n) for n in range(42)]
    log.close()


def test_segment_roll_never_splits(tmp_path: Path) -> None:
    log = PartitionLog(tmp_path, segment_bytes=1000)
    log.append(make_entries(0, 2))
    log.append(make_entries(2, 30))  # about 2.4 KB: larger than a segment
    log.append(make_entries(32, 2))
    log.close()

    paths = segment_paths(tmp_path)
    assert [p.name for p in paths] == [
        "00000000000000000000.log",
        "00000000000000000002.log",
        "00000000000000000032.log",
    ]
    for path in paths:
        decoded = list(records.decode(path.read_bytes()))
        assert decoded[0].offset == int(path.stem)


def test_disk_read_many_segments(tmp_path: Path) -> None:
    # More segments than MAX_OPEN_SEALED_SEGMENTS, so descriptors and indexes are evicted.
    log = PartitionLog(tmp_path, segment_bytes=2048, tail_bytes=256)
    expected: list[records.Record] = []
    for batch_records in [1, 3, 7, 2, 11, 5] * 20:
        base = len(expected)
        value_bytes = 30 + base % 50
        log.append(make_entries(base, batch_records, value_bytes))
        expected.extend(expected_record(n, value_bytes) for n in range(base, base + batch_records))
    assert len(segment_paths(tmp_path)) > 2 * log_module.MAX_OPEN_SEALED_SEGMENTS

    for max_records, max_bytes in [(1, 1 << 20), (7, 1 << 20), (1000, 100), (1000, 700), (5, 300)]:
        assert read_all(log, max_records, max_bytes) == expected
    log.close()

    log = PartitionLog(tmp_path, segment_bytes=2048, tail_bytes=256)
    assert read_all(log, 13, 1000) == expected
    assert len(log._open_sealed) <= log_module.MAX_OPEN_SEALED_SEGMENTS
    log.close()


def test_disk_read_beyond_first_block(tmp_path: Path) -> None:
    # About 66 KiB of small records, then a 20 KiB record that crosses the end of the
    # first 68 KiB block a disk read fetches, then more small records.
    log = PartitionLog(tmp_path)
    log.append(make_entries(0, 600, value_bytes=80))
    log.append(make_entries(600, 1, value_bytes=20 * 1024))
    log.append(make_entries(601, 10, value_bytes=80))
    log.close()
    log = PartitionLog(tmp_path)

    data, count = log.read(0, 10_000, 1 << 20)
    assert count == 611
    decoded = list(records.decode(data))
    assert decoded[600] == expected_record(600, 20 * 1024)
    assert decoded[-1] == expected_record(610, 80)

    # Keys differ in length, so sum the encoded sizes of the first 500 records.
    first_500_bytes = sum(len(records.encode(*expected_record(n, 80))) for n in range(500))
    _, count = log.read(0, 10_000, first_500_bytes)
    assert count == 500
    _, count = log.read(0, 10_000, first_500_bytes - 1)
    assert count == 499
    log.close()


def test_disk_read_stops_at_segment_end(tmp_path: Path) -> None:
    log = PartitionLog(tmp_path, segment_bytes=1000, tail_bytes=0)
    for start in range(0, 40, 4):
        log.append(make_entries(start, 4))
    second_base = int(segment_paths(tmp_path)[1].stem)
    _, count = log.read(second_base - 2, 100, 1 << 20)
    assert count == 2
    log.close()


# ---------------------------------------------------------------- recovery


@pytest.mark.parametrize("cut", ["half", "last_byte"])
def test_torn_tail_truncated(tmp_path: Path, cut: str, caplog: pytest.LogCaptureFixture) -> None:
    log = PartitionLog(tmp_path)
    for n in range(5):
        log.append(make_entries(n, 1))
    log.close()
    path = segment_paths(tmp_path)[-1]
    size_bytes = path.stat().st_size
    last_start = record_positions(path)[-1][1]
    cut_at = last_start + (size_bytes - last_start) // 2 if cut == "half" else size_bytes - 1
    os.truncate(path, cut_at)

    caplog.set_level(logging.WARNING, logger="evp.log")
    log = PartitionLog(tmp_path, name="events/7")
    assert log.next_offset == 4
    assert read_all(log) == [expected_record(n) for n in range(4)]
    assert path.stat().st_size == last_start
    warnings = [r for r in caplog.records if r.name == "evp.log" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert str(path) in message
    assert f"at byte {last_start}" in message
    assert f"dropping {cut_at - last_start} bytes" in message

    assert log.append(make_entries(4, 1)) == 4
    log.close()
    caplog.clear()
    log = PartitionLog(tmp_path)
    assert read_all(log) == [expected_record(n) for n in range(5)]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    log.close()


def test_recovery_offset_gap_truncated(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = PartitionLog(tmp_path, segment_bytes=500)
    for start in range(0, 12, 3):
        log.append(make_entries(start, 3))
    next_offset = log.next_offset
    log.close()
    active = segment_paths(tmp_path)[-1]
    # A valid record whose offset skips one, after the last stored record.
    kept_bytes = active.stat().st_size
    with open(active, "ab") as file:
        file.write(records.encode(next_offset + 1, 0, b"k", b"v"))

    caplog.set_level(logging.WARNING, logger="evp.log")
    log = PartitionLog(tmp_path, segment_bytes=500)
    assert log.next_offset == next_offset
    assert active.stat().st_size == kept_bytes
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(messages) == 1
    assert "expected" in messages[0]
    assert log.append(make_entries(next_offset, 1)) == next_offset
    assert read_all(log) == [expected_record(n) for n in range(next_offset + 1)]
    log.close()


MID_SEGMENT_DAMAGE = ["value_byte", "length_field", "crc_field", "wrong_offset"]


@pytest.mark.parametrize("damage", MID_SEGMENT_DAMAGE)
def test_recovery_keeps_records_after_damage(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    log = PartitionLog(tmp_path)
    for n in range(10):
        log.append(make_entries(n, 1))
    log.close()
    path = segment_paths(tmp_path)[-1]
    size_bytes = path.stat().st_size
    bad_offset, bad_start = record_positions(path)[4]
    data = bytearray(path.read_bytes())
    if damage == "value_byte":
        data[bad_start + records.HEADER_BYTES + 10] ^= 0x01
    elif damage == "length_field":
        data[bad_start + 4] ^= 0x40  # the record now runs far past the end of the file
    elif damage == "crc_field":
        data[bad_start] ^= 0x80
    else:
        data[bad_start + 15] ^= 0x02  # low byte of the offset field
    path.write_bytes(bytes(data))

    caplog.set_level(logging.WARNING, logger="evp.log")
    log = PartitionLog(tmp_path, name="events/3")
    assert log.next_offset == 10
    assert path.stat().st_size == size_bytes
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert f"corrupt record in {path} at byte {bad_start} (offset {bad_offset})" in errors[0]
    assert f"offsets {bad_offset} to {bad_offset} are unreadable" in errors[0]
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]

    assert read_all_until(log, bad_offset) == [expected_record(n) for n in range(bad_offset)]
    with pytest.raises(CorruptLog) as caught:
        log.read(bad_offset, 10, 1 << 20)
    assert caught.value.offset == bad_offset
    after = []
    for offset in range(bad_offset + 1, 10):
        data_after, _ = log.read(offset, 1, 1 << 20)
        after.extend(records.decode(data_after))
    assert after == [expected_record(n) for n in range(bad_offset + 1, 10)]

    assert log.append(make_entries(10, 1)) == 10
    log.close()
    log = PartitionLog(tmp_path)
    assert log.next_offset == 11
    data_new, _ = log.read(10, 1, 1 << 20)
    assert list(records.decode(data_new)) == [expected_record(10)]
    log.close()


def test_recovery_damage_then_torn_tail(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = PartitionLog(tmp_path)
    for n in range(8):
        log.append(make_entries(n, 1))
    log.close()
    path = segment_paths(tmp_path)[-1]
    positions = record_positions(path)
    _, bad_start = positions[2]
    _, last_start = positions[-1]
    data = bytearray(path.read_bytes())
    data[bad_start + records.HEADER_BYTES + 3] ^= 0x10
    path.write_bytes(bytes(data[: last_start + 20]))

    caplog.set_level(logging.WARNING, logger="evp.log")
    log = PartitionLog(tmp_path)
    assert log.next_offset == 7
    assert path.stat().st_size == last_start
    levels = sorted(r.levelname for r in caplog.records if r.levelno >= logging.WARNING)
    assert levels == ["ERROR", "WARNING"]
    log.close()


def test_recovery_zeroed_tail_truncated(tmp_path: Path) -> None:
    # As after a power loss that extended the file without writing its data.
    log = PartitionLog(tmp_path)
    for n in range(5):
        log.append(make_entries(n, 1))
    log.close()
    path = segment_paths(tmp_path)[-1]
    size_bytes = path.stat().st_size
    with open(path, "ab") as file:
        file.write(b"\0" * 8192)
    log = PartitionLog(tmp_path)
    assert log.next_offset == 5
    assert path.stat().st_size == size_bytes
    log.close()


def test_unknown_files_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "notes.txt").write_text("not a segment")
    (tmp_path / "123.log").write_bytes(b"")
    (tmp_path / "subdir").mkdir()
    caplog.set_level(logging.WARNING, logger="evp.log")
    log = PartitionLog(tmp_path)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 1
    assert "123.log, notes.txt, subdir" in messages[0]
    log.append(make_entries(0, 1))
    assert read_all(log) == [expected_record(0)]
    log.close()


def test_start_offset_from_first_segment(tmp_path: Path) -> None:
    (tmp_path / "00000000000000000100.log").write_bytes(b"")
    log = PartitionLog(tmp_path)
    assert log.start_offset == 100
    assert log.next_offset == 100
    assert log.append(make_entries(100, 3)) == 100
    assert read_all(log) == [expected_record(n) for n in range(100, 103)]
    log.close()


# ---------------------------------------------------------------- errors on read


@pytest.mark.parametrize("offset", [99, 0, -1, 103, 104, 10**9])
def test_offset_out_of_range(tmp_path: Path, offset: int) -> None:
    (tmp_path / "00000000000000000100.log").write_bytes(b"")
    log = PartitionLog(tmp_path, name="events/7")
    log.append(make_entries(100, 3))
    with pytest.raises(OffsetOutOfRange) as caught:
        log.read(offset, 10, 1000)
    assert str(caught.value) == (
        f"offset {offset} is out of range for log events/7: valid offsets are 100 to 102"
    )
    assert caught.value.offset == offset
    assert caught.value.start_offset == 100
    assert caught.value.next_offset == 103
    log.close()


@pytest.mark.parametrize("damage", ["value_byte", "length_field"])
def test_corrupt_sealed_segment(tmp_path: Path, damage: str) -> None:
    log = PartitionLog(tmp_path, segment_bytes=2000)
    for start in range(0, 120, 4):
        log.append(make_entries(start, 4))
    log.close()
    sealed = segment_paths(tmp_path)[1]
    base = int(sealed.stem)
    positions = record_positions(sealed)
    bad_offset, bad_start = positions[len(positions) // 2]
    data = bytearray(sealed.read_bytes())
    if damage == "value_byte":
        data[bad_start + records.HEADER_BYTES + 10] ^= 0x01
    else:
        data[bad_start + 4] ^= 0x40  # high byte of the length: the record runs far past
    sealed.write_bytes(bytes(data))

    log = PartitionLog(tmp_path, segment_bytes=2000)
    with pytest.raises(CorruptLog) as caught:
        log.read(bad_offset, 10, 1 << 20)
    assert caught.value.segment == sealed
    assert caught.value.offset == bad_offset
    assert caught.value.position == bad_start
    assert f"{sealed} at byte {bad_start} (offset {bad_offset})" in str(caught.value)

    # A read that starts before the damage returns the good records before it.
    data_before, count = log.read(base, 1000, 1 << 20)
    assert count == bad_offset - base
    expected_before = [expected_record(n) for n in range(base, bad_offset)]
    assert list(records.decode(data_before)) == expected_before
    for offset in range(base, bad_offset):
        _, count = log.read(offset, 1, 1000)
        assert count == 1
    # Later segments are untouched.
    third_base = int(segment_paths(tmp_path)[2].stem)
    data_after, _ = log.read(third_base, 1, 1000)
    assert list(records.decode(data_after)) == [expected_record(third_base)]
    log.close()


@pytest.mark.parametrize("missing_index", [0, 1], ids=["first_missing", "second_missing"])
def test_sealed_segment_missing_records(tmp_path: Path, missing_index: int) -> None:
    # As after a power loss: the segment lost its last records, and the next segment's
    # name still counts them.
    log = PartitionLog(tmp_path, segment_bytes=2000)
    for start in range(0, 60, 4):
        log.append(make_entries(start, 4))
    log.close()
    sealed = segment_paths(tmp_path)[0]
    positions = record_positions(sealed)
    first_missing, cut_at = positions[-2]
    os.truncate(sealed, cut_at)

    log = PartitionLog(tmp_path, segment_bytes=2000)
    assert read_all_until(log, first_missing) == [expected_record(n) for n in range(first_missing)]
    with pytest.raises(CorruptLog, match="the segment ends here") as caught:
        log.read(first_missing + missing_index, 10, 1 << 20)
    assert caught.value.segment == sealed
    assert caught.value.position == cut_at
    assert caught.value.offset == first_missing
    log.close()


def test_corrupt_length_fails_later_reads(tmp_path: Path) -> None:
    log = PartitionLog(tmp_path, segment_bytes=2000)
    for start in range(0, 120, 4):
        log.append(make_entries(start, 4))
    log.close()
    sealed = segment_paths(tmp_path)[1]
    positions = record_positions(sealed)
    bad_offset, bad_start = positions[len(positions) // 2]
    data = bytearray(sealed.read_bytes())
    data[bad_start + 4] ^= 0x40
    sealed.write_bytes(bytes(data))

    log = PartitionLog(tmp_path, segment_bytes=2000)
    with pytest.raises(CorruptLog) as caught:
        log.read(bad_offset + 1, 10, 1 << 20)
    assert caught.value.offset == bad_offset
    assert caught.value.position == bad_start
    log.close()


def test_closed_log_rejects_calls(tmp_path: Path) -> None:
    log = PartitionLog(tmp_path)
    log.append(make_entries(0, 1))
    log.close()
    log.close()
    with pytest.raises(ValueError, match="is closed"):
        log.append(make_entries(1, 1))
    with pytest.raises(ValueError, match="is closed"):
        log.read(0, 1, 100)
    with pytest.raises(ValueError, match="is closed"):
        log.sync()


# ---------------------------------------------------------------- sync


def test_sync_clears_dirty(tmp_path: Path) -> None:
    log = PartitionLog(tmp_path)
    assert not log.dirty
    log.append(make_entries(0, 1))
    assert log.dirty
    log.sync()
    assert not log.dirty
    log.close()


def test_sync_covers_rolled_segments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = PartitionLog(tmp_path, segment_bytes=500)
    log.sync()
    fsynced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        fsynced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    for start in range(0, 40, 4):
        log.append(make_entries(start, 4))
    log.sync()
    monkeypatch.undo()

    paths = segment_paths(tmp_path)
    assert len(paths) > 2
    for path in paths:
        assert str(path) in fsynced
    assert str(tmp_path) in fsynced
    log.close()


def test_failed_fsync_stops_appends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = PartitionLog(tmp_path)
    log.append(make_entries(0, 2))

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "simulated writeback failure")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="simulated writeback failure"):
        log.sync()
    monkeypatch.undo()
    with pytest.raises(OSError, match="fsync failed") as raised:
        log.append(make_entries(2, 1))
    assert raised.value.errno == errno.EIO
    with pytest.raises(OSError, match="restart the queue"):
        log.check_writable()
    assert log.next_offset == 2
    log.close()

    reopened = PartitionLog(tmp_path)
    assert reopened.next_offset == 2
    reopened.append(make_entries(2, 1))
    assert reopened.next_offset == 3
    reopened.close()


def test_sync_thread_stress(tmp_path: Path) -> None:
    log = PartitionLog(tmp_path, segment_bytes=4096, tail_bytes=2048)
    stop = threading.Event()
    errors: list[BaseException] = []
    syncs = 0

    def sync_loop() -> None:
        nonlocal syncs
        while not stop.is_set():
            try:
                log.sync()
            except BaseException as error:  # reported by the main thread
                errors.append(error)
                return
            syncs += 1

    thread = threading.Thread(target=sync_loop)
    thread.start()
    try:
        offset = 0
        for i in range(3000):
            batch_records = 1 + i % 4
            log.append(make_entries(offset, batch_records))
            offset += batch_records
            if i % 97 == 0:
                # Reads from disk open and evict sealed segments while sync() runs.
                log.read(i, 5, 1000)
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert syncs > 0
    assert len(segment_paths(tmp_path)) > 50
    log.sync()
    assert not log.dirty
    assert read_all(log) == [expected_record(n) for n in range(offset)]
    log.close()


# ---------------------------------------------------------------- append failure


@pytest.fixture
def small_tmpfs() -> Iterator[Path]:
    """A 256 KiB tmpfs mounted on a new directory under /tmp; skips without mount rights."""
    with mounted_tmpfs("256k") as mount_point:
        yield mount_point


def test_append_enospc_tmpfs(small_tmpfs: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = small_tmpfs / "log"
    filler = small_tmpfs / "filler"
    filler.write_bytes(b"\0" * (200 * 1024))
    log = PartitionLog(directory)
    try:
        offset = 0
        with pytest.raises(OSError) as caught:
            while True:
                log.append(make_entries(offset, 3, value_bytes=3000))
                offset += 3
        assert caught.value.errno == errno.ENOSPC
        assert offset > 0
        assert log.next_offset == offset
        assert segment_paths(directory)[-1].stat().st_size == log.size_bytes
        assert read_all(log) == [expected_record(n, 3000) for n in range(offset)]
    finally:
        log.close()

    caplog.set_level(logging.WARNING, logger="evp.log")
    log = PartitionLog(directory)
    try:
        assert log.next_offset == offset
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        filler.unlink()
        assert log.append(make_entries(offset, 3, value_bytes=3000)) == offset
    finally:
        log.close()
    log = PartitionLog(directory)
    try:
        assert read_all(log) == [expected_record(n, 3000) for n in range(offset + 3)]
    finally:
        log.close()


def test_append_partial_write_undone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = PartitionLog(tmp_path)
    log.append(make_entries(0, 2))
    size_bytes = log.size_bytes
    target_fd = log._segments[-1].fd
    real_write = os.write
    calls = 0

    def failing_write(fd: int, data: bytes) -> int:
        # Writes half of the first buffer, then fails as a full disk does.
        nonlocal calls
        if fd != target_fd:
            return real_write(fd, data)
        calls += 1
        if calls == 1:
            return real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(OSError) as caught:
        log.append(make_entries(2, 3))
    monkeypatch.undo()

    assert caught.value.errno == errno.ENOSPC
    assert calls == 2
    assert log.next_offset == 2
    assert log.size_bytes == size_bytes
    assert segment_paths(tmp_path)[-1].stat().st_size == size_bytes
    assert log.append(make_entries(2, 3)) == 2
    log.close()

    log = PartitionLog(tmp_path)
    assert read_all(log) == [expected_record(n) for n in range(5)]
    log.close()


# ---------------------------------------------------------------- memory bound


def test_tail_bounded(tmp_path: Path) -> None:
    tail_bytes = 10_000
    log = PartitionLog(tmp_path, segment_bytes=64 * 1024, tail_bytes=tail_bytes)
    offset = 0
    for i in range(3000):
        batch_records = 1 + (i * 7) % 20
        log.append(make_entries(offset, batch_records, value_bytes=100))
        offset += batch_records
        last_batch_bytes = len(log._tail_batches[-1][0])  # type: ignore[index]
        assert log._tail_size_bytes <= tail_bytes + last_batch_bytes
    live = [batch for batch in log._tail_batches[log._tail_head :] if batch is not None]
    assert sum(len(data) for data, _ in live) == log._tail_size_bytes
    assert len(log._tail_batches) < 200

    # A batch larger than tail_bytes stays alone in the tail and reads from it.
    base = log.append(make_entries(offset, 200, value_bytes=100))
    assert log._tail_size_bytes == len(log._tail_batches[-1][0])  # type: ignore[index]
    assert log._tail_bases[log._tail_head] == base

    # Reading the whole backlog from disk keeps the open sealed segments capped.
    assert read_all(log, 50, 8000)[-1] == expected_record(offset + 199, 100)
    assert len(log._open_sealed) <= log_module.MAX_OPEN_SEALED_SEGMENTS
    for segment in log._segments:
        if segment.index is not None:
            max_entries = segment.size_bytes // log_module.INDEX_INTERVAL_BYTES + 1
            assert len(segment.index.offsets) <= max_entries
    log.close()


@pytest.mark.parametrize("reopen", [False, True])
def test_offset_for_time(tmp_path: Path, reopen: bool) -> None:
    # Timestamps are 1_000_000 + offset, in batches of 7 over many small segments.
    log = PartitionLog(tmp_path, segment_bytes=1024, tail_bytes=0)
    for start in range(0, 210, 7):
        log.append(make_entries(start, 7))
    assert len(log.segments()) > 5
    if reopen:
        log.close()
        log = PartitionLog(tmp_path, segment_bytes=1024, tail_bytes=0)
    cases = {0: 0, 1_000_000: 0, 1_000_001: 1, 1_000_050: 50, 1_000_209: 209, 1_000_210: 210, 2**63: 210}
    for timestamp_us, offset in cases.items():
        assert log.offset_for_time(timestamp_us) == offset, timestamp_us
    # Every segment's first offset, where a search can go wrong by one.
    for segment in log.segments():
        assert log.offset_for_time(1_000_000 + segment.base_offset) == segment.base_offset
    log.close()


def test_offset_for_time_after_retention(tmp_path: Path) -> None:
    log = PartitionLog(tmp_path, segment_bytes=1024)
    for start in range(0, 100, 5):
        log.append(make_entries(start, 5))
    log.delete_oldest_segment()
    log.delete_oldest_segment()
    assert log.start_offset > 0
    assert log.offset_for_time(0) == log.start_offset
    assert log.offset_for_time(1_000_000 + log.start_offset + 3) == log.start_offset + 3
    log.close()


def test_offset_for_time_empty(tmp_path: Path) -> None:
    log = PartitionLog(tmp_path)
    assert log.offset_for_time(0) == 0
    log.close()
