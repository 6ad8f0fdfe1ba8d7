"""What `evp stats`, `evp publish` and `evp process` show, on a terminal and off one.

The terminal tests run the real command under a pseudo-terminal (pty.fork), so rich
detects a terminal of 120 columns, and press Ctrl-C by writing it to the terminal.
"""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
from typing import Any

from conftest import evp_command, snapshot, wait_until
from rich.console import Console

from evp import stats, views

ESCAPE_SEQUENCE = re.compile(rb"\x1b(\[[0-9;?]*[A-Za-z]|\][^\x07]*\x07|[()][A-Z0-9])")
SHOW_CURSOR = b"\x1b[?25h"
SCREEN_COLUMNS = 120
SCREEN_ROWS = 40
READ_TIMEOUT_S = 20.0
LONG_MEMBER_ID = "ingest-worker-17.eu-west-1.compute.internal/shard-12"


# Helpers.


def screen_text(output: bytes) -> str:
    """Return terminal output with its escape sequences removed."""
    return ESCAPE_SEQUENCE.sub(b"", output).replace(b"\r", b"").decode(errors="replace")


def terminal_env() -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")
    }
    env.update(TERM="xterm-256color", COLUMNS=str(SCREEN_COLUMNS), LINES=str(SCREEN_ROWS))
    return env


class PtyProcess:
    """An evp command running with a pseudo-terminal as its controlling terminal."""

    def __init__(self, *args: str) -> None:
        command = evp_command(*args)
        env = terminal_env()
        pid, fd = pty.fork()
        if pid == 0:  # the child: size the terminal, then become the command
            try:
                size = struct.pack("HHHH", SCREEN_ROWS, SCREEN_COLUMNS, 0, 0)
                fcntl.ioctl(1, termios.TIOCSWINSZ, size)
                os.execve(command[0], command, env)
            finally:
                os._exit(127)
        self.pid = pid
        self.fd = fd
        self.output = b""
        self.returncode: int | None = None

    def read_until(self, predicate: Any, timeout_s: float = READ_TIMEOUT_S) -> bool:
        """Read output until predicate(screen text) is true or the terminal closes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate(screen_text(self.output)):
                return True
            if not self._read_some(deadline - time.monotonic()):
                return predicate(screen_text(self.output))
        return False

    def _read_some(self, timeout_s: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], max(0.0, min(timeout_s, 0.5)))
        if not ready:
            return True
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # EIO: every process holding the terminal has closed it
            return False
        if not chunk:
            return False
        self.output += chunk
        return True

    def press_ctrl_c(self) -> None:
        os.write(self.fd, b"\x03")

    def wait(self, timeout_s: float = READ_TIMEOUT_S) -> int:
        """Read the rest of the output and return the exit status (-N for signal N)."""
        deadline = time.monotonic() + timeout_s
        while self._read_some(deadline - time.monotonic()) and time.monotonic() < deadline:
            pass
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                return self.returncode
            time.sleep(0.05)
        raise TimeoutError(f"pid {self.pid} did not exit within {timeout_s} s")

    def close(self) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        os.close(self.fd)


def read_line(process: subprocess.Popen[bytes], timeout_s: float = READ_TIMEOUT_S) -> bytes:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout_s)
    assert ready, f"no line on stdout within {timeout_s} s"
    return process.stdout.readline()


def snapshot_with_new_fields() -> dict[str, Any]:
    member = {
        "id": LONG_MEMBER_ID,
        "node": LONG_MEMBER_ID.rpartition("/")[0],
        "pid": 4242,
        "partitions": [3, 9, 12],
        "in_flight": 1000,
        "max_in_flight": 1000,
        "delivered": 5000,
        "acked": 4000,
        "acked_per_s": 0.0,
        "processed": 4000,
        "failed": 2,
        "latency": {"p50_ms": 1.25, "p99_ms": 48.0, "p999_ms": 90.0},
        "leaving": False,
        "last_seen_s": 4.5,
        "retrying": {
            "partition": 9,
            "offset": 1234,
            "key": "user-7",
            "attempt": 2,
            "error": "ValueError: amount is negative",
        },
    }
    return {
        "version": "0.1.0",
        "uptime_s": 754.2,
        "time": time.time(),
        "connections": 3,
        "topics": [
            {
                "name": "payments",
                "partitions": 16,
                "events": 1_250_000,
                "bytes": 3 * 1024 * 1024 + 512 * 1024,
                "events_in": 1_250_000,
                "events_in_per_s": 1998.4,
                "events_in_history": [0, 0, 500, 1000, 2000, 2000, 1990, 2010, 2000, 1998],
                "hot_keys": [
                    {"key": "merchant-42", "partition": 9, "events_per_s": 640.0, "share": 0.81}
                ],
            }
        ],
        "groups": [
            {
                "topic": "payments",
                "group": "ledger",
                "members": [member],
                "generation": 7,
                "lag": 52_310,
                "lag_seconds": 26.4,
                "delivered": 5000,
                "acked": 4000,
                "acked_per_s": 0.0,
                "acked_history": [1000, 1000, 900, 0, 0],
                "redelivered": 17,
                "rebalances": 4,
                "latency": {"p50_ms": 1.25, "p99_ms": 48.0, "p999_ms": 90.0},
                "stall": (
                    "every member's in-flight window is full and no acknowledgement "
                    "arrived for 5 s"
                ),
                "committed": [0] * 16,
            }
        ],
    }


def record(renderable: Any, width: int = 160) -> Console:
    console = Console(
        file=io.StringIO(), record=True, width=width, color_system="standard", force_terminal=True
    )
    console.print(renderable)
    return console


# Rendering.


def test_sparkline_newest_at_right():
    line = views.sparkline([0, 1, 2, 4, 8], width=8)
    assert len(line) == 8
    assert line == "   ▁▂▃▅█"


def test_sparkline_fits_long_history():
    history = [100.0] * 57 + [0.0] * 3
    line = views.sparkline(history, width=20)
    assert len(line) == 20
    assert line[-1] == "▁"
    assert set(line[:-1]) == {"█"}


def test_sparkline_empty_and_zero():
    assert views.sparkline([], width=5) == "     "
    assert views.sparkline([0, 0, None], width=3) == "▁▁▁"


def test_render_new_fields():
    console = record(stats.render(snapshot_with_new_fields(), address="127.0.0.1:18200"))
    text = console.export_text()
    for title in ("Topics", "Groups", "Hot keys", "Shards"):
        assert title in text
    assert f"81%  {LONG_MEMBER_ID}" in text
    assert "payments/ledger is stalled: every member's in-flight window is full" in text
    assert "merchant-42" in text
    assert "81%" in text
    assert "3.5 MiB" in text
    assert "1,998/s" in text
    assert "26 s" in text
    assert "1.2 ms" in text
    assert "48 ms" in text
    assert "4.5 s ago" in text
    assert "1,000 / 1,000" in text
    assert "up 12m 34s" in text
    assert "is retrying partition 9 offset 1,234 key 'user-7' (attempt 2)" in text
    assert "▁▁▃▄██████" in text


def test_render_stall_in_red():
    console = record(stats.render(snapshot_with_new_fields()))
    styled = console.export_text(styles=True)
    assert "\x1b[31mpayments/ledger is stalled" in styled


def test_render_without_new_fields():
    old = snapshot_with_new_fields()
    for topic in old["topics"]:
        for name in ("events_in_history", "hot_keys"):
            del topic[name]
    for group in old["groups"]:
        for name in ("lag_seconds", "acked_history", "stall"):
            del group[name]
        for member in group["members"]:
            for name in ("node", "retrying"):
                del member[name]
    text = record(stats.render(old)).export_text()
    assert LONG_MEMBER_ID in text
    assert "Hot keys" not in text
    assert "stalled" not in text


def test_render_120_columns_keeps_member_id():
    text = record(stats.render(snapshot_with_new_fields()), width=120).export_text()
    shard_rows = [line for line in text.splitlines() if line.startswith(LONG_MEMBER_ID + "  ")]
    assert len(shard_rows) == 1, text
    assert "1,000 / 1,000" in shard_rows[0]
    assert "4.5 s ago" in shard_rows[0]


def test_plain_line_has_one_line():
    line = stats.plain_line(snapshot_with_new_fields())
    assert "\n" not in line
    assert "\x1b" not in line
    assert "topic=payments stored=1250000 bytes=3670016 in_per_s=1998 hot_keys=1" in line
    assert "group=payments/ledger members=1 acked=4000 acked_per_s=0 lag=52310 lag_s=26.4" in line
    assert 'stall="every member\'s in-flight window is full' in line


def test_plain_line_error():
    line = stats.plain_line({}, error='cannot connect to the queue at 127.0.0.1:1: "refused"')
    assert line.endswith(' error="cannot connect to the queue at 127.0.0.1:1: \\"refused\\""')


# `evp stats`.


def test_stats_plain_through_pipe(evp, tmp_path):
    _, address = evp.queue(tmp_path / "data")
    published = evp.run("publish", "--queue", address, "--count", "20", "--rate", "0")
    assert published.returncode == 0, published.stderr.decode()
    # Without PYTHONUNBUFFERED, so that a line shows up only if the command flushes it.
    env = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    process = subprocess.Popen(
        evp_command("stats", "--queue", address, "--interval", "0.5"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        first = read_line(process)
        first_at = time.monotonic()
        second = read_line(process)
        gap_s = time.monotonic() - first_at
        assert process.poll() is None, "evp stats exited instead of printing every interval"
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=READ_TIMEOUT_S)
    for line in (first, second):
        assert b"\x1b" not in line
        assert b"topic=events stored=20 " in line
    assert gap_s > 0.2
    assert process.returncode == 130
    assert b"Traceback" not in stderr


def test_stats_live_view_ctrl_c(evp, tmp_path):
    _, address = evp.queue(tmp_path / "data")
    published = evp.run("publish", "--queue", address, "--count", "20", "--rate", "0")
    assert published.returncode == 0, published.stderr.decode()
    terminal = PtyProcess("stats", "--queue", address, "--interval", "0.3")
    try:
        drew = terminal.read_until(lambda text: text.count("Shards") >= 2)
        assert drew, f"no frame with every section: {screen_text(terminal.output)[-2000:]}"
        terminal.press_ctrl_c()
        code = terminal.wait()
    finally:
        terminal.close()
    text = screen_text(terminal.output)
    for title in ("Topics", "Groups", "Shards", "no shards connected"):
        assert title in text
    assert "Traceback" not in text
    assert code == 130
    assert terminal.output.endswith(SHOW_CURSOR)


# `evp publish`.


SUMMARY_LINE = re.compile(
    r"^sent=(\d+) acknowledged=(\d+) rejected=(\d+) invalid_lines=(\d+) "
    r"unacknowledged=(\d+) elapsed_s=\d+\.\d\d rate_per_s=\d+$"
)


def test_publish_summary_line_unchanged(evp, tmp_path):
    _, address = evp.queue(tmp_path / "data")
    source = tmp_path / "events.jsonl"
    lines = [f'{{"id": {number}, "user": "u{number % 3}"}}' for number in range(20)]
    lines.insert(2, "not json")
    source.write_text("\n".join(lines) + "\n")
    result = evp.run(
        "publish", "--queue", address, "--file", str(source), "--key-field", "user", "--rate", "0"
    )
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert "\x1b" not in stderr
    assert f"{source}:3: skipped: invalid JSON" in stderr
    summaries = [match for line in stderr.splitlines() if (match := SUMMARY_LINE.match(line))]
    assert len(summaries) == 1, stderr
    assert summaries[0].groups() == ("20", "20", "0", "1", "0")


def test_publish_progress_on_terminal(evp, tmp_path):
    _, address = evp.queue(tmp_path / "data")
    terminal = PtyProcess("publish", "--queue", address, "--count", "300", "--rate", "600")
    try:
        code = terminal.wait()
    finally:
        terminal.close()
    text = screen_text(terminal.output)
    assert code == 0, text
    assert "acknowledged" in text
    assert "300 / 300" in text
    assert "on schedule at 600 events/s" in text
    assert "Published" in text
    assert SUMMARY_LINE.search(text) is None
    assert SHOW_CURSOR in terminal.output


# `evp process`.


def test_process_summary_off_terminal(evp, tmp_path):
    _, address = evp.queue(tmp_path / "data")
    processor = evp.start(
        "process", "--queue", address, "--shards", "2", "--node", "plain", log_name="process"
    )
    wait_until(
        lambda: any(len(group["members"]) == 2 for group in snapshot(address)["groups"]),
        timeout_s=30,
        message="the two shards did not join",
    )
    published = evp.run("publish", "--queue", address, "--count", "50", "--rate", "0")
    assert published.returncode == 0, published.stderr.decode()
    wait_until(
        lambda: all(group["lag"] == 0 for group in snapshot(address)["groups"]),
        timeout_s=30,
        message="the shards did not process the 50 events",
    )
    processor.send_signal(signal.SIGTERM)
    assert processor.wait(timeout=30) == 0
    log = evp.log("process")
    assert "\x1b" not in log
    shard_line = r"^shard=0 member=plain/shard-0 processed=\d+ emitted=\d+ failed=0 restarts=0$"
    assert re.search(shard_line, log, re.MULTILINE), log
    total_line = r"^shards=2 processed=50 emitted=50 failed=0 restarts=0$"
    assert re.search(total_line, log, re.MULTILINE), log


def test_process_live_table_on_terminal(evp, tmp_path):
    _, address = evp.queue(tmp_path / "data")
    terminal = PtyProcess("process", "--queue", address, "--shards", "2", "--node", "tty")
    try:
        shown = terminal.read_until(lambda text: text.count("running") >= 2)
        assert shown, screen_text(terminal.output)[-2000:]
        terminal.press_ctrl_c()
        code = terminal.wait(timeout_s=40)
    finally:
        terminal.close()
    text = screen_text(terminal.output)
    assert code == 0, text
    assert "tty/shard-1" in text
    # Shard log lines pass through the console, whole, above the table.
    stopped = "INFO shard-1 evp.processor: member=tty/shard-1 stopped after processing 0 events"
    assert stopped in text
    assert "Processed" in text
    assert SHOW_CURSOR in terminal.output
    assert "Traceback" not in text
