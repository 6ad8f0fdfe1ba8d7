"""Fixtures that run real evp processes on 127.0.0.1 with temporary data directories."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
WIKITICKER = SHARED_DATA / "wikiticker-2015-09-12.jsonl.gz"
GHARCHIVE = SHARED_DATA / "gharchive-2021-07-21.jsonl"


def require_data(path: Path) -> Path:
    """Skip the calling test when a real data file is absent."""
    if not path.exists():
        pytest.skip(f"real data file {path} is absent; it is expected in ../shared/data/")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen[bytes] | None = None, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with code {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on port {port} within {timeout_s} s")


def evp_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "evp", *args]


class Evp:
    """Starts evp processes for one test and stops every one of them afterwards."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.processes: list[subprocess.Popen[bytes]] = []
        self._logs: list[Any] = []

    def start(self, *args: str, log_name: str | None = None, **kwargs: Any) -> subprocess.Popen[bytes]:
        name = log_name or f"{args[0]}-{len(self.processes)}"
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115
        self._logs.append(log)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        process = subprocess.Popen(
            evp_command(*args), stdout=log, stderr=subprocess.STDOUT, env=env, **kwargs
        )
        self.processes.append(process)
        return process

    def start_command(
        self, command: list[str], log_name: str
    ) -> subprocess.Popen[bytes] | None:
        """Start a command that wraps an evp process; return None if it is not installed."""
        log = open(self.workdir / f"{log_name}.log", "ab")  # noqa: SIM115
        self._logs.append(log)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        try:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        except FileNotFoundError:
            return None
        self.processes.append(process)
        return process

    def queue(
        self, data_dir: Path | None = None, port: int | None = None, *extra: str
    ) -> tuple[subprocess.Popen[bytes], str]:
        """Start `evp queue` and wait until it listens; return it and its address."""
        port = port or free_port()
        data_dir = data_dir or self.workdir / "data"
        process = self.start(
            "queue", "--port", str(port), "--data-dir", str(data_dir), *extra, log_name="queue"
        )
        wait_for_port(port, process)
        return process, f"127.0.0.1:{port}"

    def run(self, *args: str, timeout_s: float = 120.0, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            evp_command(*args), capture_output=True, timeout=timeout_s, input=input
        )

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for log in self._logs:
            log.close()


@pytest.fixture
def evp(tmp_path: Path) -> Iterator[Evp]:
    runner = Evp(tmp_path)
    try:
        yield runner
    finally:
        runner.stop_all()


def snapshot(address: str) -> dict[str, Any]:
    """Fetch one statistics snapshot from a running queue."""
    from evp.stats import fetch_snapshot

    return asyncio.run(fetch_snapshot(address))


def wait_until(predicate: Any, timeout_s: float = 60.0, interval_s: float = 0.2, message: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(message or f"condition not met within {timeout_s} s")
        time.sleep(interval_s)


def read_output(directory: Path) -> list[dict[str, Any]]:
    """Read the rows of every shard output file, each file in the order it was written."""
    rows = []
    for path in sorted(directory.glob("shard-*.jsonl")):
        with path.open("rb") as file:
            rows.extend(orjson.loads(line) for line in file)
    return rows


def group_state(address: str, topic: str = "events", group: str = "default") -> dict[str, Any] | None:
    """Return the snapshot of one group of a running queue, or None before it exists."""
    for state in snapshot(address)["groups"]:
        if state["topic"] == topic and state["group"] == group:
            return state
    return None


def wait_for_node(
    evp: Evp,
    process: subprocess.Popen[bytes],
    log_name: str,
    address: str,
    node: str,
    shards: int,
    topic: str = "events",
    group: str = "default",
    timeout_s: float = 60.0,
) -> None:
    """Wait until the `shards` shards of processor `node` are members of the group."""

    def joined() -> bool:
        assert process.poll() is None, evp.log(log_name)
        state = group_state(address, topic, group)
        if state is None:
            return False
        ours = [member for member in state["members"] if member["id"].startswith(f"{node}/")]
        return len(ours) == shards

    wait_until(joined, timeout_s, message=f"the {shards} shards of {node} did not join")


def read_events(path: Path) -> list[dict[str, Any]]:
    """Read every line of a JSON-lines file (gzip when it ends in .gz) as an event."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as file:
        return [orjson.loads(line) for line in file if line.strip()]


async def consume(address: str, topic: str, count: int, timeout_s: float = 20.0) -> list[Any]:
    """Read `count` records of `topic` through a consumer group and return what arrived."""
    from evp.client import Consumer

    received: list[Any] = []
    done = asyncio.Event()

    async def process(partition: int, batch: list[Any]) -> None:
        received.extend(batch)
        if len(received) >= count:
            done.set()

    consumer = Consumer(address, topic=topic, group="check", member="check-0", process=process)
    task = asyncio.create_task(consumer.run())
    try:
        await asyncio.wait_for(done.wait(), timeout_s)
    except TimeoutError:
        pass
    finally:
        consumer.stop()
        await asyncio.wait_for(task, 10)
    return received


@contextlib.contextmanager
def mounted_tmpfs(size: str) -> Iterator[Path]:
    """Mount a tmpfs of `size` (e.g. "256k") on a new directory under /tmp.

    Skips the calling test when not root or when the mount is refused, and unmounts
    when the block ends. Stop every process using the mount before that.
    """
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = Path(tempfile.mkdtemp(prefix="evp-test-tmpfs-", dir="/tmp"))
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        mount_point.rmdir()
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)
        mount_point.rmdir()


@contextlib.contextmanager
def background_publish(*args: str) -> Iterator[subprocess.Popen[bytes]]:
    """Run `evp publish *args` with its stderr piped; kill it if the block leaves it running."""
    publisher = subprocess.Popen(
        [*evp_command("publish"), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        yield publisher
    finally:
        if publisher.poll() is None:
            publisher.kill()
            publisher.wait()


def stop_cleanly(process: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    """Send SIGTERM and check that the process exits 0 within `timeout_s`."""
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=timeout_s) == 0
