"""The queue's data directory on a full file system: a small tmpfs mounted by the test.

The tests need root to mount the tmpfs and are skipped, with the reason, without it.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import background_publish, mounted_tmpfs, snapshot, wait_until
from test_faults import (
    FAULT_RATE,
    group_snapshot,
    output_ids,
    print_figures,
    publish_file,
    start_processor,
    wait_for_lag_zero,
    write_events,
)


@pytest.fixture
def full_disk() -> Iterator[Path]:
    # Requested before `evp`, so the processes stop before the tmpfs is unmounted.
    with mounted_tmpfs("32m") as mount_point:
        yield mount_point


def fill(path: Path) -> int:
    """Write zeros to `path` until the file system is full; return the bytes written."""
    written = 0
    with path.open("wb", buffering=0) as file:
        for chunk_bytes in (1024 * 1024, 4096, 1):
            chunk = b"\0" * chunk_bytes
            while True:
                try:
                    written += file.write(chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    return written


def stored(address: str) -> int:
    return sum(topic["events"] for topic in snapshot(address)["topics"])


@pytest.mark.timeout(180)
def test_disk_full_then_space_returns(full_disk, evp, tmp_path):
    first = write_events(tmp_path / "first.jsonl", 2000, "early")
    second = write_events(tmp_path / "second.jsonl", 3000, "late")
    data_dir = full_disk / "data"
    # --min-free-disk-bytes 0: the hard floor would otherwise delete segments to make
    # room, which is a different test.
    queue, address = evp.queue(
        data_dir, None, "--partitions", "2", "--min-free-disk-bytes", "0"
    )
    publish_file(evp, address, tmp_path / "first.jsonl", FAULT_RATE)
    assert stored(address) == len(first)

    filler = full_disk / "filler"
    assert fill(filler) > 0

    # Reads go on while the disk is full: a processor started now works off the
    # first events. The output directory is not on the full file system.
    output = tmp_path / "out"
    start_processor(evp, address, output, 1, "full")
    wait_until(
        lambda: group_snapshot(address)["acked"] == len(first),
        60,
        message="the processor did not work off the stored events while the disk was full",
    )

    with background_publish(
        "--queue", address,
        "--file", str(tmp_path / "second.jsonl"),
        "--key-field", "user",
        "--rate", FAULT_RATE,
    ) as publisher:
        wait_until(
            lambda: "appending to topic=events failed" in evp.log("queue")
            or publisher.poll() is not None,
            30,
            message="the queue accepted writes on a full disk",
        )
        assert publisher.poll() is None, "the publisher ended while the disk was full"
        full_stored = stored(address)
        assert "No space left on device" in evp.log("queue")
        filler.unlink()
        _, stderr_bytes = publisher.communicate(timeout=90)
    stderr = stderr_bytes.decode()
    assert publisher.returncode == 0, stderr
    assert "the queue could not write the batch: No space left on device" in stderr
    assert "it was not acknowledged, retry later" in stderr
    assert f"acknowledged={len(second)} " in stderr
    assert queue.poll() is None

    wait_for_lag_zero(address)
    processed = output_ids(output)
    assert set(processed) == set(first) | set(second)
    print_figures(
        "test_disk_full_then_space_returns",
        published=len(first) + len(second),
        acknowledged=len(first) + len(second),
        stored_while_full=full_stored,
        processed=len(set(processed)),
        lost=len(set(first) | set(second)) - len(set(processed)),
        duplicated=len(processed) - len(set(processed)),
    )
