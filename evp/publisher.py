"""`evp publish`: send generated events or JSON lines to the queue at a held rate."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from evp import events, heap
from evp.client import Producer

logger = logging.getLogger("evp.publisher")

# The publisher computes how many events are due at most this often. At 100 events/s
# that is one event per tick, and at 100,000 events/s about 100 per batch.
TICK_S = 0.001
# Events generated between two yields to the event loop, so acknowledgements are read
# while a fast or unlimited publish runs.
MAX_EVENTS_PER_STEP = 1000
# Falling this far behind the schedule is reported (once per report interval).
BEHIND_REPORT_S = 1.0
ACK_WAIT_S = 30.0
# After Ctrl-C, how long the publisher waits for acknowledgements of what it sent. A
# second Ctrl-C stops the wait at once.
INTERRUPTED_ACK_WAIT_S = 5.0
# How often the progress callback runs. Five times a second keeps a progress bar smooth.
PROGRESS_INTERVAL_S = 0.2


@dataclass
class PublishConfig:
    queue: str = "127.0.0.1:8000"
    topic: str = "events"
    rate: float = 100.0
    count: int | None = None
    duration_s: float | None = None
    file: str | None = None
    key_field: str | None = None
    keys: int = 1000
    token: str | None = None
    seed: int | None = None
    # Wrap each event in a CloudEvents 1.0 envelope with this source and type.
    cloudevents: bool = False
    cloudevents_source: str = field(default_factory=events.default_cloudevent_source)
    cloudevents_type: str = "evp.event"


@dataclass
class PublishReport:
    read: int = 0
    sent: int = 0
    acked: int = 0
    rejected: int = 0
    invalid_lines: int = 0
    unacked: int = 0
    elapsed_s: float = 0.0
    max_behind_s: float = 0.0
    input_error: str | None = None
    # Set when SIGINT (Ctrl-C) or SIGTERM stopped the publish before its end.
    interrupted: bool = False
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.unacked == 0 and self.rejected == 0 and self.input_error is None


@dataclass
class PublishProgress:
    """Counts of a publish in progress, passed to the `on_progress` callback."""

    sent: int
    acked: int
    rejected: int
    invalid_lines: int
    elapsed_s: float
    # Seconds behind the --rate schedule, or 0 when on time or without a rate.
    behind_s: float
    rate: float
    count: int | None
    duration_s: float | None
    reconnects: int
    # True once the source, --count or --duration has ended and only acknowledgements remain.
    finished_sending: bool


def _generated(config: PublishConfig) -> Iterator[tuple[bytes, bytes]]:
    generator = events.EventGenerator(config.keys, config.seed)
    if not config.cloudevents:
        while True:
            yield generator.next()
    paths = events.key_path("user")
    while True:
        _, value = generator.next()
        yield events.to_cloudevent(
            orjson.loads(value), paths, config.cloudevents_source, config.cloudevents_type
        )


def _from_file(
    config: PublishConfig,
    report: PublishReport,
    on_invalid_line: Callable[[str], None] | None,
    max_line_bytes: int | None,
) -> Iterator[tuple[bytes, bytes]]:
    paths = events.key_path(config.key_field)
    assert config.file is not None
    source = events.open_source(config.file)
    name = "stdin" if config.file == "-" else config.file
    try:
        for number, line in events.read_lines(source, name, max_line_bytes):
            report.read += 1
            try:
                if line is None:
                    raise events.InvalidEvent(
                        f"the line is longer than the queue's limit of {max_line_bytes} bytes "
                        f"per event (--max-event-bytes); split the event or raise the limit"
                    )
                event, value = events.parse_line(line)
                if config.cloudevents:
                    key, value = events.to_cloudevent(
                        event, paths, config.cloudevents_source, config.cloudevents_type
                    )
                else:
                    key = events.extract_key(event, paths)
            except events.InvalidEvent as exc:
                report.invalid_lines += 1
                message = f"{name}:{number}: skipped: {exc}"
                if len(report.errors) < 1000:
                    report.errors.append(message)
                if on_invalid_line is not None:
                    on_invalid_line(message)
                else:
                    logger.warning("%s", message)
                continue
            yield key, value
    finally:
        if source is not None and config.file != "-":
            source.close()


async def publish(
    config: PublishConfig,
    on_invalid_line: Callable[[str], None] | None = None,
    on_progress: Callable[[PublishProgress], None] | None = None,
    handle_signals: bool = False,
) -> PublishReport:
    """Publish until the source, --count or --duration ends, then wait for acknowledgements.

    `on_progress`, when given, is called every PROGRESS_INTERVAL_S from the event loop
    and once more at the end. With `handle_signals`, SIGINT and SIGTERM end the publish
    early and set `interrupted` in the report, which is still returned.
    """
    report = PublishReport()

    def on_rejected(message: str, count: int) -> None:
        report.errors.append(f"the queue rejected {count} events: {message}")
        logger.error("the queue rejected %d events: %s", count, message)

    producer = Producer(config.queue, token=config.token, on_rejected=on_rejected)
    await producer.start()
    max_event_bytes = producer.max_event_bytes
    if config.file:
        source = _from_file(config, report, on_invalid_line, max_event_bytes or None)
    else:
        source = _generated(config)
    if config.count is not None:
        source = itertools.islice(source, config.count)
    started = time.monotonic()
    deadline = started + config.duration_s if config.duration_s else None
    sent = 0
    last_behind_report = started
    finished_sending = False

    def progress() -> PublishProgress:
        elapsed_s = time.monotonic() - started
        behind_s = 0.0
        if config.rate > 0 and not finished_sending:
            behind_s = max(0.0, elapsed_s - sent / config.rate)
        return PublishProgress(
            sent=producer.sent,
            acked=producer.acked,
            rejected=report.rejected + producer.rejected,
            invalid_lines=report.invalid_lines,
            elapsed_s=elapsed_s,
            behind_s=behind_s,
            rate=config.rate,
            count=config.count,
            duration_s=config.duration_s,
            reconnects=producer.reconnects,
            finished_sending=finished_sending,
        )

    async def report_progress() -> None:
        assert on_progress is not None
        while True:
            on_progress(progress())
            await asyncio.sleep(PROGRESS_INTERVAL_S)

    progress_task = asyncio.create_task(report_progress()) if on_progress else None
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    stop_waiting = asyncio.Event()

    def on_interrupt() -> None:
        if report.interrupted:
            stop_waiting.set()
            return
        report.interrupted = True
        interrupted.set()
        logger.warning("interrupted; waiting up to %.0f s for acknowledgements", INTERRUPTED_ACK_WAIT_S)

    signals = (signal.SIGINT, signal.SIGTERM) if handle_signals else ()
    for signum in signals:
        loop.add_signal_handler(signum, on_interrupt)
    try:
        exhausted = False
        while not exhausted and not report.interrupted:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            if config.rate > 0:
                due = int((now - started) * config.rate) + 1 - sent
                if due <= 0:
                    await asyncio.sleep(max(TICK_S, sent / config.rate - (now - started)))
                    continue
                due = min(due, MAX_EVENTS_PER_STEP)
            else:
                due = MAX_EVENTS_PER_STEP
            for _ in range(due):
                try:
                    key, value = next(source)
                except StopIteration:
                    exhausted = True
                    break
                except events.InputError as exc:
                    # What was read before stays published; the caller reports the rest.
                    report.input_error = str(exc)
                    exhausted = True
                    break
                if max_event_bytes and len(value) > max_event_bytes:
                    report.rejected += 1
                    where = f"line {report.read}" if config.file else f"event {sent + 1}"
                    message = (
                        f"{where}: rejected: the event is {len(value)} bytes, over the "
                        f"queue's limit of {max_event_bytes} bytes (--max-event-bytes)"
                    )
                    report.errors.append(message)
                    if on_invalid_line is not None:
                        on_invalid_line(message)
                    else:
                        logger.error("%s", message)
                    continue
                producer.publish(config.topic, key, value)
                sent += 1
            if config.rate > 0:
                behind_s = (time.monotonic() - started) - sent / config.rate
                report.max_behind_s = max(report.max_behind_s, behind_s)
                if behind_s > BEHIND_REPORT_S and now - last_behind_report > 5:
                    last_behind_report = now
                    logger.warning(
                        "publisher is %.1f s behind its rate of %g events/s (queue or input too slow)",
                        behind_s,
                        config.rate,
                    )
            if not producer.has_capacity:
                await _wait_or_interrupted(producer.wait_for_capacity(), interrupted)
            elif config.rate > 0:
                # Sleep until the next event is due, at least one tick, so that events
                # due within a tick share a batch. Behind the rate, only yield.
                await asyncio.sleep(max(TICK_S, -behind_s) if behind_s < 0 else 0)
            else:
                await asyncio.sleep(0)
        finished_sending = True
        wait_s = INTERRUPTED_ACK_WAIT_S if report.interrupted else ACK_WAIT_S
        if not await _wait_or_interrupted(producer.flush(wait_s), stop_waiting):
            logger.error("%d events were not acknowledged within %.0f s", producer.unacked, wait_s)
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        if progress_task is not None:
            progress_task.cancel()
            finished_sending = True
            assert on_progress is not None
            on_progress(progress())
        report.sent = producer.sent
        report.acked = producer.acked
        report.rejected += producer.rejected
        report.unacked = producer.unacked
        report.elapsed_s = time.monotonic() - started
        await producer.close()
    return report


async def _wait_or_interrupted(waiting: Any, stop_waiting: asyncio.Event) -> Any:
    """Await `waiting` unless `stop_waiting` is set first; then return False."""
    task = asyncio.ensure_future(waiting)
    stopper = asyncio.create_task(stop_waiting.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False


def run(
    config: PublishConfig,
    on_invalid_line: Callable[[str], None] | None = None,
    on_progress: Callable[[PublishProgress], None] | None = None,
) -> PublishReport:
    import uvloop

    heap.freeze_startup_objects()
    return uvloop.run(publish(config, on_invalid_line, on_progress, handle_signals=True))
