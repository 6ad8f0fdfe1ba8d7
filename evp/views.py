"""Terminal output of `evp publish` and `evp process`, and formatting shared with `evp stats`.

On a terminal `evp publish` shows progress bars and ends with a summary table, and
`evp process` shows a live table of its shards and ends with a summary table. Off a
terminal each keeps to plain lines. The helpers at the top format numbers with their
units and draw sparklines for the statistics view in evp.stats.

Colour marks state only: red for a stalled group, a failed start, rejected or lost
events, and yellow for a warning (handler retries, a late heartbeat, a full in-flight
window, falling behind the publish schedule).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import re
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from evp.processor import ProcessorConfig, ShardSlot, Supervisor
    from evp.publisher import PublishConfig, PublishProgress, PublishReport

# Formatting.

SPARK_BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float | None], width: int) -> str:
    """Draw per-second rates (oldest first) as block characters, newest at the right.

    Consecutive samples are averaged so that the whole history fits in `width`
    characters, and the result is padded on the left to exactly `width`. The scale runs
    from zero to the largest value shown, so a steady rate draws full-height bars and
    zero draws the lowest block.
    """
    samples = [float(value or 0.0) for value in values]
    if not samples or width <= 0:
        return " " * max(width, 0)
    per_character = max(1, math.ceil(len(samples) / width))
    averages: list[float] = []
    end = len(samples)
    # Group from the newest end, so the last character always contains the latest samples.
    while end > 0 and len(averages) < width:
        chunk = samples[max(0, end - per_character) : end]
        averages.append(sum(chunk) / len(chunk))
        end -= per_character
    averages.reverse()
    top = max(averages)
    if top <= 0:
        drawn = SPARK_BLOCKS[0] * len(averages)
    else:
        last = len(SPARK_BLOCKS) - 1
        drawn = "".join(SPARK_BLOCKS[min(last, round(value / top * last))] for value in averages)
    return drawn.rjust(width)


def format_count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int | float) else "–"


def format_rate(per_s: Any) -> str:
    """Format an events-per-second rate, e.g. `1,998/s`."""
    if not isinstance(per_s, int | float):
        return "–"
    if 0 < per_s < 10:
        return f"{per_s:.1f}/s"
    return f"{per_s:,.0f}/s"


def format_ms(value: Any) -> str:
    if not isinstance(value, int | float):
        return "–"
    if value < 10:
        return f"{value:.1f} ms"
    return f"{value:,.0f} ms"


def format_seconds(value: Any) -> str:
    """Format a duration: `0.4 s`, `42 s`, `12m 05s` or `3h 04m`."""
    if not isinstance(value, int | float):
        return "–"
    if value < 10:
        return f"{value:.1f} s"
    if value < 100:
        return f"{value:.0f} s"
    minutes, seconds = divmod(int(value), 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def format_bytes(count: Any) -> str:
    if not isinstance(count, int | float):
        return "–"
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"


def natural_key(text: str) -> list[Any]:
    """Sort key that orders `node/shard-2` before `node/shard-10`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def section_table(title: str) -> Table:
    """Return an empty table in the style of every section: bold title, rule under the header."""
    return Table(
        title=title,
        title_justify="left",
        title_style="bold",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        # Two spaces between columns, so the groups table fits in 120 columns.
        collapse_padding=True,
    )


def styled(text: str, style: str) -> Text:
    return Text(text, style=style) if style else Text(text)


@contextlib.contextmanager
def logging_through_live() -> Iterator[None]:
    """Send the root logger's stream handlers to the current `sys.stderr` for a while.

    Inside a rich Live context on a terminal, `sys.stderr` is rich's proxy, which prints
    each line above the live display. A handler keeps the stream it was created with,
    so without this a log line would be written into the middle of a frame.
    """
    handlers = [
        handler
        for handler in logging.getLogger().handlers
        if type(handler) is logging.StreamHandler
    ]
    saved = [handler.setStream(sys.stderr) for handler in handlers]
    try:
        yield
    finally:
        for handler, stream in zip(handlers, saved, strict=True):
            if stream is not None:
                handler.setStream(stream)


# `evp publish` progress.


class PublishProgressView:
    """A progress display for `evp publish` on a terminal: sent, acknowledged, rate, schedule.

    Use it as a context manager around the publish, pass `update` as the progress
    callback and `print_line` for the skipped-line messages, which then print above the
    bars instead of through them.
    """

    # The rates shown are measured over the progress reports of the last two seconds.
    RATE_WINDOW_S = 2.0

    def __init__(self, console: Console, config: PublishConfig) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}", style="bold"),
            BarColumn(bar_width=40),
            TextColumn("{task.fields[counts]}", justify="right"),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]}", justify="right"),
            console=console,
            auto_refresh=False,
            transient=False,
        )
        self.progress.get_renderables = self._renderables  # type: ignore[method-assign]
        total = float(config.count) if config.count is not None else None
        self.sent_task = self.progress.add_task("sent", total=total, counts="0", rate="")
        self.acked_task = self.progress.add_task(
            "acknowledged", total=total, counts="0", rate=""
        )
        self.status = Text("connecting…", style="dim")
        self._samples: deque[tuple[float, int, int]] = deque()
        self._logging: contextlib.ExitStack | None = None

    def __enter__(self) -> PublishProgressView:
        self.progress.start()
        self._logging = contextlib.ExitStack()
        self._logging.enter_context(logging_through_live())
        self.progress.refresh()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if exc_type is KeyboardInterrupt:
            self.status = Text(
                "interrupted: events not yet acknowledged may not be stored", style="yellow"
            )
            self.progress.refresh()
        if self._logging is not None:
            self._logging.close()
        self.progress.stop()

    def _renderables(self) -> Iterator[RenderableType]:
        yield self.progress.make_tasks_table(self.progress.tasks)
        yield self.status

    def print_line(self, message: str) -> None:
        """Print one message above the progress bars."""
        self.console.print(Text(message), highlight=False)

    def update(self, progress: PublishProgress) -> None:
        """Redraw the bars and the status line from one progress report."""
        now = time.monotonic()
        self._samples.append((now, progress.sent, progress.acked))
        while len(self._samples) > 2 and now - self._samples[0][0] > self.RATE_WINDOW_S:
            self._samples.popleft()
        first_time, first_sent, first_acked = self._samples[0]
        span = now - first_time
        sent_rate = (progress.sent - first_sent) / span if span > 0 else 0.0
        acked_rate = (progress.acked - first_acked) / span if span > 0 else 0.0
        total = f" / {progress.count:,}" if progress.count is not None else ""
        self.progress.update(
            self.sent_task,
            completed=progress.sent,
            counts=f"{progress.sent:,}{total}",
            rate=format_rate(sent_rate),
        )
        self.progress.update(
            self.acked_task,
            completed=progress.acked,
            counts=f"{progress.acked:,}{total}",
            rate=format_rate(acked_rate),
        )
        self.status = self._status(progress)
        self.progress.refresh()

    def _status(self, progress: PublishProgress) -> Text:
        items = [f"{format_seconds(progress.elapsed_s)} elapsed"]
        if progress.duration_s:
            items[0] += f" of {format_seconds(progress.duration_s)}"
        style = ""
        if progress.finished_sending:
            waiting = progress.sent - progress.acked - progress.rejected
            items.insert(0, f"waiting for {waiting:,} acknowledgements" if waiting > 0 else "done")
        elif progress.rate <= 0:
            items.insert(0, "no rate limit")
        elif progress.behind_s > 1.0:
            items.insert(
                0,
                f"{progress.behind_s:.1f} s behind the schedule of {progress.rate:,g} events/s "
                "(the queue or the input is slower)",
            )
            style = "yellow"
        else:
            items.insert(0, f"on schedule at {progress.rate:,g} events/s")
        if progress.rejected:
            items.append(f"{progress.rejected:,} rejected")
            style = "red"
        if progress.invalid_lines:
            items.append(f"{progress.invalid_lines:,} invalid lines skipped")
            style = style or "yellow"
        if progress.reconnects:
            items.append(f"reconnected {progress.reconnects} times")
        return Text("  ·  ".join(items), style=style)


def publish_summary(report: PublishReport) -> Table:
    """Build the table printed when `evp publish` ends on a terminal."""
    table = section_table("Published")
    table.add_column("measure")
    table.add_column("value", justify="right", no_wrap=True)
    rate = report.sent / report.elapsed_s if report.elapsed_s else 0.0
    table.add_row("sent", format_count(report.sent))
    table.add_row("acknowledged", format_count(report.acked))
    table.add_row(
        "rejected by the queue",
        styled(format_count(report.rejected), "red" if report.rejected else ""),
    )
    table.add_row(
        "unacknowledged", styled(format_count(report.unacked), "red" if report.unacked else "")
    )
    table.add_row(
        "invalid lines skipped",
        styled(format_count(report.invalid_lines), "yellow" if report.invalid_lines else ""),
    )
    table.add_row("elapsed", format_seconds(report.elapsed_s))
    table.add_row("average rate", format_rate(rate))
    if report.max_behind_s >= 0.1:
        table.add_row("most behind schedule", format_seconds(report.max_behind_s))
    return table


def publish_with_progress(config: PublishConfig, console: Console) -> PublishReport:
    """Run the publish with the progress display on `console`, then print the summary table."""
    from evp import publisher

    with PublishProgressView(console, config) as view:
        report = publisher.run(config, on_invalid_line=view.print_line, on_progress=view.update)
    console.print()
    console.print(publish_summary(report))
    return report


# `evp process` shard table.


class ProcessView:
    """A live table of the supervisor's shards for `evp process` on a terminal.

    Use it as a context manager around `processor.run` and pass `update` as the
    supervisor's tick callback. The supervisor's loop redraws the table once per
    `refresh_interval_s`, and auto-refresh is off, so the Live display starts no thread.
    When stderr is the terminal too, log lines of the supervisor and of its shards are
    printed above the table; otherwise they go to stderr as before.
    """

    # A shard's rate is measured over its status reports of the last five seconds.
    RATE_WINDOW_S = 5.0

    def __init__(
        self, console: Console, config: ProcessorConfig, refresh_interval_s: float = 1.0
    ) -> None:
        self.console = console
        self.config = config
        self.refresh_interval_s = refresh_interval_s
        self.stderr_is_terminal = os.isatty(2)
        # Transient: at the end the summary table takes the place of the last frame.
        self.live = Live(
            console=console,
            auto_refresh=False,
            transient=True,
            redirect_stderr=self.stderr_is_terminal,
        )
        self.supervisor: Supervisor | None = None
        self._last_refresh = 0.0
        # Per shard: (pid, time, processed) of the status that the rate is measured from.
        self._rate_base: dict[int, deque[tuple[int, float, int]]] = {}
        self._relay: ChildStderrRelay | None = None
        self._logging: contextlib.ExitStack | None = None

    def __enter__(self) -> ProcessView:
        self.live.start()
        if self.stderr_is_terminal:
            self._logging = contextlib.ExitStack()
            self._logging.enter_context(logging_through_live())
            # Shard processes write their log lines straight to file descriptor 2, the
            # terminal the table is drawn on, so they have to pass through the console.
            self._relay = ChildStderrRelay(self.console)
            self._relay.start()
        self.live.update(self._render(), refresh=True)
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            if self._relay is not None:
                self._relay.stop()
        finally:
            if self._logging is not None:
                self._logging.close()
            self.live.stop()

    def update(self, supervisor: Supervisor) -> None:
        """Take in the supervisor's state; redraw when the refresh interval has passed."""
        self.supervisor = supervisor
        if self._relay is not None:
            self._relay.pump()
        now = time.monotonic()
        self._record_rates(now)
        if now - self._last_refresh >= self.refresh_interval_s:
            self._last_refresh = now
            self.live.update(self._render(), refresh=True)

    def _record_rates(self, now: float) -> None:
        assert self.supervisor is not None
        for slot in self.supervisor.slots:
            status = slot.last_status
            pid, processed = status.get("pid"), status.get("processed")
            if not isinstance(pid, int) or not isinstance(processed, int):
                continue
            samples = self._rate_base.setdefault(slot.index, deque())
            if samples and samples[-1][0] != pid:
                samples.clear()  # a restarted shard counts from zero again
            if not samples or samples[-1][2] != processed or now - samples[-1][1] >= 1.0:
                samples.append((pid, now, processed))
            while len(samples) > 2 and now - samples[0][1] > self.RATE_WINDOW_S:
                samples.popleft()

    def _rate(self, index: int) -> float | None:
        samples = self._rate_base.get(index)
        if not samples or len(samples) < 2:
            return None
        _, first_time, first_count = samples[0]
        _, last_time, last_count = samples[-1]
        span = last_time - first_time
        return (last_count - first_count) / span if span > 0 else None

    def _render(self) -> RenderableType:
        config = self.config
        header = Text(
            f"evp process  ·  group {config.group}  ·  topic {config.topic}  ·  "
            f"queue {config.queue}  ·  node {config.node}  ·  {config.shards} shards",
            style="dim",
        )
        if self.supervisor is None:
            return Group(header, Text("starting shards…", style="dim"))
        table = section_table("Shards")
        table.add_column("shard", justify="right", no_wrap=True)
        table.add_column("member", no_wrap=True, overflow="fold")
        table.add_column("state", no_wrap=True)
        for name in ("pid", "partitions", "processed", "out", "failed", "reconnects", "restarts"):
            table.add_column(name, justify="right", no_wrap=True)

        total_processed = 0
        total_rate = 0.0
        for slot in self.supervisor.slots:
            status = slot.last_status
            state, style = _slot_state(slot, self.supervisor.stopping)
            rate = self._rate(slot.index) if slot.process is not None else None
            processed = status.get("processed", 0)
            total_processed += processed
            total_rate += rate or 0.0
            failed = status.get("failed", 0)
            pid = slot.process.pid if slot.process is not None else status.get("pid")
            table.add_row(
                str(slot.index),
                status.get("member", f"{config.node}/shard-{slot.index}"),
                styled(state, style),
                str(pid or "–"),
                format_count(len(status.get("partitions") or [])),
                format_count(processed),
                format_rate(rate),
                styled(format_count(failed), "red" if failed else ""),
                format_count(status.get("reconnects", 0)),
                styled(format_count(slot.restarts), "yellow" if slot.restarts else ""),
            )
        table.add_section()
        table.add_row(
            "all", "", "", "", "", format_count(total_processed), format_rate(total_rate)
        )

        if not self.supervisor.stopping:
            footer = "Ctrl-C drains the shards and stops"
        elif any(slot.process is not None for slot in self.supervisor.slots):
            footer = "draining: each shard finishes the events it holds, then exits"
        else:
            footer = "all shards stopped"
        return Group(header, table, Text(footer, style="dim"))


def _slot_state(slot: ShardSlot, stopping: bool) -> tuple[str, str]:
    """Describe a shard slot in a word or two, with its colour."""
    if slot.process is not None:
        if stopping:
            return "draining", ""
        return ("running", "") if slot.last_status else ("starting", "dim")
    if slot.restart_at is not None:
        wait_s = max(0.0, slot.restart_at - time.monotonic())
        return f"restarting in {wait_s:.1f} s", "yellow"
    if stopping:
        return "stopped", ""
    return "failed to start", "red"


def process_with_view(config: ProcessorConfig, console: Console) -> int:
    """Run the processor, with the live shard table when `console` is a terminal.

    At the end the summary is printed as a table on a terminal, or otherwise as plain
    key=value lines. Return the supervisor's exit code.
    """
    from evp import processor

    latest: list[Supervisor] = []

    def remember(supervisor: Supervisor) -> None:
        latest[:] = [supervisor]

    if console.is_terminal:
        with ProcessView(console, config) as view:
            code = processor.run(config, on_tick=view.update)
        rows = view.supervisor.summary() if view.supervisor is not None else []
        console.print()
        console.print(process_summary(rows))
    else:
        code = processor.run(config, on_tick=remember)
        rows = latest[0].summary() if latest else []
        for line in process_summary_lines(rows):
            print(line, flush=True)
    return code


def process_summary(rows: list[dict[str, Any]]) -> Table:
    """Build the table printed when `evp process` ends on a terminal, from Supervisor.summary()."""
    table = section_table("Processed")
    table.add_column("shard", justify="right", no_wrap=True)
    table.add_column("member", no_wrap=True, overflow="fold")
    for name in ("processed", "emitted", "failed", "restarts"):
        table.add_column(name, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(
            str(row["shard"]),
            row["member"],
            format_count(row["processed"]),
            format_count(row["emitted"]),
            styled(format_count(row["failed"]), "red" if row["failed"] else ""),
            styled(format_count(row["restarts"]), "yellow" if row["restarts"] else ""),
        )
    table.add_section()
    table.add_row(
        "all",
        "",
        format_count(sum(row["processed"] for row in rows)),
        format_count(sum(row["emitted"] for row in rows)),
        format_count(sum(row["failed"] for row in rows)),
        format_count(sum(row["restarts"] for row in rows)),
    )
    return table


def process_summary_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Return the plain form of `process_summary`: one key=value line per shard and a total."""
    lines = [
        f"shard={row['shard']} member={row['member']} processed={row['processed']} "
        f"emitted={row['emitted']} failed={row['failed']} restarts={row['restarts']}"
        for row in rows
    ]
    lines.append(
        f"shards={len(rows)} processed={sum(row['processed'] for row in rows)} "
        f"emitted={sum(row['emitted'] for row in rows)} "
        f"failed={sum(row['failed'] for row in rows)} "
        f"restarts={sum(row['restarts'] for row in rows)}"
    )
    return lines


class ChildStderrRelay:
    """Route file descriptor 2 through a pipe whose lines this process prints via a console.

    Child processes started after `start` inherit the pipe as their stderr, and `pump`
    (called from the supervisor's loop) prints each complete line through the console,
    above its live display. This process's own log handlers must not write to the pipe,
    because only this process reads it: `logging_through_live` points them at the console.
    `stop` puts the original stderr back and prints what is left.
    """

    # Room for a burst of shard log lines between two supervisor ticks (0.2 s). Linux
    # allows up to /proc/sys/fs/pipe-max-size, 1 MiB by default, and a larger request fails
    # and leaves the default of 64 KiB.
    PIPE_BYTES = 1024 * 1024

    def __init__(self, console: Console) -> None:
        self.console = console
        self._saved_fd: int | None = None
        self._read_fd: int | None = None
        self._partial = b""

    def start(self) -> None:
        read_fd, write_fd = os.pipe()
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, self.PIPE_BYTES)
        os.set_blocking(read_fd, False)
        sys.stderr.flush()
        self._saved_fd = os.dup(2)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._read_fd = read_fd

    def pump(self) -> None:
        """Print every complete line waiting in the pipe."""
        if self._read_fd is None:
            return
        chunks = []
        while True:
            try:
                chunk = os.read(self._read_fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        if not chunks:
            return
        data = self._partial + b"".join(chunks)
        *lines, self._partial = data.split(b"\n")
        for line in lines:
            self.console.print(Text(line.decode(errors="replace")), highlight=False)

    def stop(self) -> None:
        if self._saved_fd is None or self._read_fd is None:
            return
        os.dup2(self._saved_fd, 2)
        os.close(self._saved_fd)
        self._saved_fd = None
        self.pump()
        if self._partial:
            self.console.print(Text(self._partial.decode(errors="replace")), highlight=False)
            self._partial = b""
        os.close(self._read_fd)
        self._read_fd = None
