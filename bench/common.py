"""Process, port, memory and CPU helpers shared by the benchmark runs.

Every process a run starts goes through `Processes`, which stops each one by its pid
(SIGTERM, then SIGKILL after a timeout) when the run ends, fails or is interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
STOP_TIMEOUT_S = 30.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that the kernel reports free."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """Wait until something accepts connections on 127.0.0.1:`port`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{process.args[0]} exited with code {process.returncode} before listening "
                f"on port {port}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout_s} s")


class Processes:
    """The processes of one run, each logged to `<workdir>/<name>.log`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.running: list[subprocess.Popen] = []

    def start(self, name: str, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = (self.workdir / f"{name}.log").open("ab")
        try:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                env={**os.environ, **(env or {})},
            )
        finally:
            log.close()
        self.running.append(process)
        return process

    def python(self, name: str, *args: str) -> subprocess.Popen:
        return self.start(name, [sys.executable, *args])

    def stop(self, process: subprocess.Popen, signum: int = signal.SIGTERM) -> int:
        """Signal one process by its pid and wait for it; SIGKILL it after the timeout."""
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signum)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
        if process in self.running:
            self.running.remove(process)
        return process.returncode

    def stop_all(self) -> None:
        for process in reversed(list(self.running)):
            self.stop(process)


def wait_with_cpu(process: subprocess.Popen, timeout_s: float) -> tuple[int, float]:
    """Wait for a child to exit; return (exit code, CPU seconds it used in all).

    os.wait4 returns the child's resource usage, which is gone once Popen reaps it.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return process.returncode, usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            raise TimeoutError(f"{' '.join(map(str, process.args[:4]))} ran over {timeout_s:.0f} s")
        time.sleep(0.005)


def cpu_tree_s(pid: int) -> float:
    """Return the CPU seconds used so far by a process and its living descendants."""
    total = 0.0
    try:
        root = psutil.Process(pid)
        for process in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                total += times.user + times.system
    except psutil.Error:
        pass
    return total


class PeakRss:
    """Sample a process's RSS every 50 ms in a thread and keep the maximum."""

    INTERVAL_S = 0.05

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_bytes = max(self.peak_bytes, self.process.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(self.INTERVAL_S)

    def stop_mb(self) -> float:
        self._stop.set()
        self._thread.join()
        return round(self.peak_bytes / 2**20, 1)


def rss_mb(pid: int) -> float:
    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def wait_for_files(paths: list[Path], processes: list[subprocess.Popen], timeout_s: float) -> None:
    """Wait until every path exists; raise if a process exits first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not all(path.exists() for path in paths):
        for process in processes:
            code = process.poll()
            if code is not None and code != 0:
                raise RuntimeError(f"{' '.join(map(str, process.args[:4]))} exited with code {code}")
        if time.monotonic() > deadline:
            missing = [path.name for path in paths if not path.exists()]
            raise TimeoutError(f"{len(missing)} processes did not finish within {timeout_s:.0f} s: {missing[:4]}")
        time.sleep(0.01)


# The queue's statistics snapshot, over one connection per waiting phase: opening a
# connection per poll costs milliseconds of CPU on a machine the run is measuring.


async def _poll_snapshots(
    address: str,
    until: Callable[[dict[str, Any]], bool],
    interval_s: Callable[[dict[str, Any]], float],
    timeout_s: float,
) -> tuple[dict[str, Any], float]:
    from evp import protocol
    from evp.client import ClientError, connect

    loop = asyncio.get_running_loop()
    answers: asyncio.Queue[protocol.Frame] = asyncio.Queue()
    connection, _ = await connect(address, answers.put_nowait, timeout_s=10)
    deadline = loop.time() + timeout_s
    try:
        while True:
            connection.send(protocol.encode(protocol.StatsRequest()))
            frame = await asyncio.wait_for(answers.get(), 10)
            seen_at = time.monotonic()
            if not isinstance(frame, protocol.Stats):
                raise ClientError(f"the queue responded to a statistics request with {frame!r}")
            if until(frame.snapshot):
                return frame.snapshot, seen_at
            if loop.time() > deadline:
                raise TimeoutError(f"the queue's snapshot did not reach the condition within {timeout_s:.0f} s")
            await asyncio.sleep(interval_s(frame.snapshot))
    finally:
        connection.close()


def poll_snapshot(
    address: str,
    until: Callable[[dict[str, Any]], bool],
    interval_s: float | Callable[[dict[str, Any]], float] = 0.05,
    timeout_s: float = 600.0,
) -> tuple[dict[str, Any], float]:
    """Poll the queue's snapshot until `until(snapshot)`; return it and time.monotonic()."""
    interval = interval_s if callable(interval_s) else (lambda _snapshot: interval_s)
    return asyncio.run(_poll_snapshots(address, until, interval, timeout_s))


def snapshot(address: str) -> dict[str, Any]:
    return poll_snapshot(address, lambda _snapshot: True)[0]
