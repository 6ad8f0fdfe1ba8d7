"""`evp process`: a supervisor and its shard worker processes.

The supervisor is a plain loop: it starts N shard processes (multiprocessing, spawn
start method), waits on their sentinels, restarts one that exits unexpectedly with
exponential backoff, and on SIGINT or SIGTERM asks every shard to drain and waits for
them. Each shard has its own uvloop event loop and its own connection to the queue,
joins the group as member `<node>/shard-<index>`, runs the handler on each event and
acknowledges what it finished.

No shard outlives the supervisor: each shard asks the kernel for SIGTERM when its
parent dies (Linux PR_SET_PDEATHSIG), and drains on that signal like on any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import inspect
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from evp import protocol, records
from evp.client import ClientError, Consumer, ServerError, configure_tls
from evp.metrics import LatencyHistogram

logger = logging.getLogger("evp.processor")

RESTART_BACKOFF_INITIAL_S = 0.5
RESTART_BACKOFF_MAX_S = 30.0
# A shard that ran this long before exiting is restarted without delay again: the
# backoff is for crash loops, not for a crash after hours of work.
RESTART_BACKOFF_RESET_S = 30.0
HANDLER_ATTEMPTS = 3
STATUS_INTERVAL_S = 1.0
# Maximum time a shard runs handlers before it lets its event loop send heartbeats and
# read frames.
YIELD_INTERVAL_S = 0.1
LATENCY_WINDOW_S = 30.0
# Exit code of a shard that cannot start (bad handler, unusable output directory).
STARTUP_FAILED = 3


class HandlerError(Exception):
    """The --handler value cannot be loaded."""


@dataclass
class ProcessorConfig:
    queue: str = "127.0.0.1:8000"
    shards: int = 8
    group: str = "default"
    topic: str = "events"
    handler: str | None = None
    output: Path | None = None
    node: str = field(default_factory=socket.gethostname)
    max_in_flight: int = 1000
    drain_timeout_s: float = 30.0
    token: str | None = None
    tls_ca: str | None = None
    log_level: str = "INFO"


def load_handler(spec: str) -> Callable[[Any], Any]:
    """Import `module:function` (or `path/to/file.py:function`) and return the function."""
    module_name, separator, attribute = spec.partition(":")
    if not separator or not module_name or not attribute:
        raise HandlerError(
            f"invalid handler {spec!r}: expected MODULE:FUNCTION, e.g. myapp.handlers:enrich"
        )
    if module_name.endswith(".py"):
        path = Path(module_name).resolve()
        if not path.is_file():
            raise HandlerError(f"handler file {module_name!r} not found")
        sys.path.insert(0, str(path.parent))
        module_name = path.stem
    elif "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise HandlerError(f"cannot import handler module {module_name!r}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - any error while the user's module runs
        raise HandlerError(
            f"handler module {module_name!r} failed while importing: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    try:
        function = getattr(module, attribute)
    except AttributeError:
        raise HandlerError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if not callable(function):
        raise HandlerError(f"handler {spec!r} is a {type(function).__name__}, not a function")
    return function


def _encode_results(result: Any) -> list[bytes]:
    """Encode a handler's result: None, an event (dict) or a list of events.

    Raises TypeError for anything else, so a wrong result counts as a failure of the
    handler instead of a silent, malformed output line.
    """
    if result is None:
        return []
    items = result if isinstance(result, list) else [result]
    encoded = []
    for item in items:
        if not isinstance(item, dict):
            raise TypeError(
                f"handler returned a {type(item).__name__}; return None, an event (dict) "
                f"or a list of events"
            )
        encoded.append(orjson.dumps(item))
    return encoded


def _die_with_parent() -> None:
    """Ask Linux to send SIGTERM to this process when its parent exits."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except OSError:  # not Linux: the parent pipe check below still applies
        logger.debug("PR_SET_PDEATHSIG is not available")


class Shard:
    """One shard worker: consumes its partitions and runs the handler on each event."""

    def __init__(self, config: ProcessorConfig, index: int, status: Any) -> None:
        self.config = config
        self.index = index
        self.member = f"{config.node}/shard-{index}"
        self.status = status
        self.handler = load_handler(config.handler) if config.handler else None
        self.is_async = self.handler is not None and inspect.iscoroutinefunction(self.handler)
        self.processed = 0
        self.emitted = 0
        self.failed = 0
        self.retrying: dict[str, Any] | None = None
        self.output = None
        if config.output is not None:
            config.output.mkdir(parents=True, exist_ok=True)
            self.output = open(config.output / f"shard-{index}.jsonl", "ab")  # noqa: SIM115
        topic_json = orjson.dumps(config.topic)
        self._line_prefix = b'{"topic":' + topic_json + b',"shard":' + str(index).encode()
        self.consumer = Consumer(
            config.queue,
            topic=config.topic,
            group=config.group,
            member=self.member,
            process=self.process,
            max_in_flight=config.max_in_flight,
            token=config.token,
            report=self._queue_report,
            before_ack=self._flush_output,
        )
        # Latency is reported over a sliding window of the last LATENCY_WINDOW_S to
        # twice that, so a backlog worked off long ago stops showing in the percentiles.
        self.latency = LatencyHistogram()
        self._previous_latency = LatencyHistogram()
        self._retired_latency = LatencyHistogram()
        self._latency_window_start = time.monotonic()

    async def process(self, partition: int, batch: list[records.Record]) -> None:
        lines: list[bytes] = []
        prefix = self._line_prefix + b',"partition":' + str(partition).encode()
        last_yield = time.monotonic()
        for index, record in enumerate(batch):
            now = time.monotonic()
            yielding = now - last_yield > YIELD_INTERVAL_S
            if index and (yielding or self.is_async):
                # Other code runs while this shard awaits, and if it blocks the event
                # loop, an acknowledgement still waiting here would be held back.
                self._acknowledge_finished(partition, batch[index - 1], lines)
                lines = []
            if yielding:
                # A slow sync handler would otherwise hold the event loop for the whole
                # batch, so no heartbeat goes out and the queue declares the shard dead.
                await asyncio.sleep(0)
                last_yield = time.monotonic()
                if self.consumer.superseded():
                    # The connection this batch came on is gone: the queue sends these
                    # events again, possibly to another shard, so stop here.
                    batch = batch[:index]
                    break
            if self.handler is None:
                results: list[bytes] = [record.value]
            else:
                results = await self._run_handler(partition, record)
            if self.output is not None:
                head = (
                    prefix
                    + b',"offset":'
                    + str(record.offset).encode()
                    + b',"key":'
                    + orjson.dumps(record.key.decode())
                    + b',"event":'
                )
                for value in results:
                    lines.append(head + value + b"}\n")
            self.emitted += len(results)
        self.processed += len(batch)
        if not batch:
            return
        if self.output is not None and lines:
            self.output.write(b"".join(lines))
        # Latency from publish to the end of processing. The publisher's clock sets the
        # timestamp, so across machines the figure includes their clock offset.
        now_us = time.time_ns() // 1000
        self.latency.record_many([now_us - record.timestamp_us for record in batch])

    def _acknowledge_finished(
        self, partition: int, last: records.Record, lines: list[bytes]
    ) -> None:
        """Write the output of a batch's finished events and acknowledge them."""
        if self.output is not None and lines:
            self.output.write(b"".join(lines))
        self.consumer.ack_progress(partition, last.offset + 1)

    def _flush_output(self) -> None:
        # Flushed before the acknowledgement goes out, so an acknowledged event is in
        # the output file even if the shard is killed right after.
        if self.output is not None:
            self.output.flush()

    def _latency_window(self) -> LatencyHistogram:
        now = time.monotonic()
        if now - self._latency_window_start >= LATENCY_WINDOW_S:
            self._retired_latency.merge(self._previous_latency)
            self._previous_latency = self.latency
            self.latency = LatencyHistogram()
            self._latency_window_start = now
        merged = LatencyHistogram(self._previous_latency.counts)
        merged.merge(self.latency)
        return merged

    def _latency_total(self) -> LatencyHistogram:
        """Return every latency recorded since the shard started (for counters)."""
        total = LatencyHistogram(self._retired_latency.counts)
        total.merge(self._previous_latency)
        total.merge(self.latency)
        return total

    def _queue_report(self) -> protocol.Report:
        return protocol.Report(
            processed=self.processed,
            failed=self.failed,
            pid=os.getpid(),
            latency=self._latency_window().to_dict(),
            latency_total=self._latency_total().to_dict(),
            retrying=self.retrying,
        )

    async def _run_handler(self, partition: int, record: records.Record) -> list[bytes]:
        assert self.handler is not None
        event = orjson.loads(record.value)
        for attempt in range(1, HANDLER_ATTEMPTS + 1):
            try:
                result = self.handler(event)
                if self.is_async or inspect.isawaitable(result):
                    result = await result
                encoded = _encode_results(result)
                break
            # Any failure of the user's code is retried, including SystemExit and
            # KeyboardInterrupt raised by it, and a result that is not JSON events.
            except (Exception, SystemExit, KeyboardInterrupt) as exc:  # noqa: BLE001
                self.retrying = {
                    "partition": partition,
                    "offset": record.offset,
                    "key": record.key.decode(errors="replace"),
                    "attempt": attempt,
                    "error": f"{type(exc).__name__}: {exc}"[:200],
                }
                if attempt == HANDLER_ATTEMPTS:
                    self.retrying = None
                    self.failed += 1
                    logger.error(
                        "handler failed %d times on topic=%s partition=%d offset=%d key=%r; "
                        "skipping the event: %s: %s",
                        attempt,
                        self.config.topic,
                        partition,
                        record.offset,
                        record.key.decode(errors="replace"),
                        type(exc).__name__,
                        exc,
                    )
                    return []
                await asyncio.sleep(0.1 * 2 ** (attempt - 1))
        self.retrying = None
        return encoded

    def _report(self) -> None:
        if self.status is None:
            return
        with contextlib.suppress(OSError, ValueError):
            self.status.send(
                {
                    "index": self.index,
                    "pid": os.getpid(),
                    "member": self.member,
                    "processed": self.processed,
                    "emitted": self.emitted,
                    "failed": self.failed,
                    "partitions": list(self.consumer.partitions),
                    "reconnects": self.consumer.reconnects,
                }
            )

    async def _report_periodically(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL_S)
            self._report()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        draining = asyncio.Event()

        def on_signal() -> None:
            # The first signal drains; a second one (or the kernel's SIGTERM when the
            # supervisor dies during a drain) disconnects at once.
            if draining.is_set():
                logger.warning("member=%s stopping without finishing its drain", self.member)
                self.consumer.stop()
            draining.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal)
        consume = asyncio.create_task(self.consumer.run())
        reporter = asyncio.create_task(self._report_periodically())
        drain_wait = asyncio.create_task(draining.wait())
        exit_code = 0
        try:
            await asyncio.wait({consume, drain_wait}, return_when=asyncio.FIRST_COMPLETED)
            if draining.is_set() and not consume.done():
                logger.info("member=%s draining", self.member)
                if not await self.consumer.leave(self.config.drain_timeout_s):
                    logger.warning(
                        "member=%s did not drain within %.0f s; its unacknowledged events "
                        "go to other members",
                        self.member,
                        self.config.drain_timeout_s,
                    )
                await consume
            elif consume.done():
                consume.result()
            if self.consumer.failed_error:
                exit_code = 1
        except ServerError as exc:
            logger.error("member=%s stopped: %s", self.member, exc)
            # A wrong token or name fails the same way on every restart.
            exit_code = STARTUP_FAILED
        finally:
            drain_wait.cancel()
            reporter.cancel()
            self._report()
            if self.output is not None:
                self.output.close()
        logger.info("member=%s stopped after processing %d events", self.member, self.processed)
        return exit_code


def shard_main(config: ProcessorConfig, index: int, status: Any, parent_pid: int) -> None:
    """Entry point of a shard process."""
    _die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        sys.exit(1)
    logging.basicConfig(
        level=config.log_level,
        format=f"%(asctime)s %(levelname)s shard-{index} %(name)s: %(message)s",
    )
    import uvloop

    try:
        configure_tls(config.tls_ca)
        shard = Shard(config, index, status)
    except (HandlerError, OSError, ClientError) as exc:
        # A failure that a restart cannot fix: the supervisor does not restart on 3.
        logger.error("shard-%d cannot start: %s", index, exc)
        sys.exit(STARTUP_FAILED)
    sys.exit(uvloop.run(shard.run()))


@dataclass
class ShardSlot:
    index: int
    process: multiprocessing.process.BaseProcess | None = None
    status: Any = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = RESTART_BACKOFF_INITIAL_S
    restart_at: float | None = None
    last_status: dict[str, Any] = field(default_factory=dict)


class Supervisor:
    def __init__(
        self, config: ProcessorConfig, on_tick: Callable[[Supervisor], None] | None = None
    ) -> None:
        self.config = config
        self.context = multiprocessing.get_context("spawn")
        self.slots = [ShardSlot(index) for index in range(config.shards)]
        self.stopping = False
        # Called from the loop (0.2 s apart or less) and once more after the shards have
        # stopped, for a live view. It runs in the loop, so it must return quickly.
        self.on_tick = on_tick

    def _tick(self) -> None:
        if self.on_tick is None:
            return
        try:
            self.on_tick(self)
        except Exception:  # noqa: BLE001 - a broken view must not stop the shards
            logger.exception("the live view failed; the shards keep running without it")
            self.on_tick = None

    def _start(self, slot: ShardSlot) -> None:
        receiver, sender = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=shard_main,
            args=(self.config, slot.index, sender, os.getpid()),
            name=f"evp-shard-{slot.index}",
            daemon=False,
        )
        process.start()
        sender.close()
        slot.process = process
        slot.status = receiver
        slot.started_at = time.monotonic()
        slot.restart_at = None
        logger.info("started shard-%d pid=%d", slot.index, process.pid)

    def _on_exit(self, slot: ShardSlot) -> None:
        assert slot.process is not None
        code = slot.process.exitcode
        self._drain_status(slot)
        slot.process = None
        if self.stopping:
            logger.info("shard-%d stopped exit_code=%s", slot.index, code)
            return
        ran_s = time.monotonic() - slot.started_at
        if ran_s > RESTART_BACKOFF_RESET_S:
            slot.backoff_s = RESTART_BACKOFF_INITIAL_S
        if code == STARTUP_FAILED:
            logger.error("shard-%d cannot start (see its error above); not restarting it", slot.index)
            return
        slot.restarts += 1
        slot.restart_at = time.monotonic() + slot.backoff_s
        logger.warning(
            "shard-%d exited with code %s after %.1f s; restarting in %.1f s (restart %d)",
            slot.index,
            code,
            ran_s,
            slot.backoff_s,
            slot.restarts,
        )
        slot.backoff_s = min(slot.backoff_s * 2, RESTART_BACKOFF_MAX_S)

    def _drain_status(self, slot: ShardSlot) -> None:
        if slot.status is None:
            return
        try:
            while slot.status.poll():
                slot.last_status = slot.status.recv()
        except (EOFError, OSError):
            slot.status.close()
            slot.status = None

    def run(self) -> int:
        def request_stop(signum: int, _frame: Any) -> None:
            if not self.stopping:
                logger.info("received %s; draining shards", signal.Signals(signum).name)
            self.stopping = True

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        logger.info(
            "processor starting shards=%d group=%s topic=%s queue=%s node=%s",
            self.config.shards,
            self.config.group,
            self.config.topic,
            self.config.queue,
            self.config.node,
        )
        for slot in self.slots:
            self._start(slot)
        while not self.stopping:
            self._watch(timeout_s=0.2)
            now = time.monotonic()
            for slot in self.slots:
                if slot.process is None and slot.restart_at is not None and now >= slot.restart_at:
                    self._start(slot)
            self._tick()
            if all(slot.process is None and slot.restart_at is None for slot in self.slots):
                logger.error("every shard has stopped and none will be restarted")
                return 1
        self._stop_all()
        self._tick()
        return 0

    def _watch(self, timeout_s: float) -> None:
        waitables: list[Any] = []
        for slot in self.slots:
            if slot.process is not None:
                waitables.append(slot.process.sentinel)
            if slot.status is not None:
                waitables.append(slot.status)
        if not waitables:
            time.sleep(timeout_s)
            return
        try:
            multiprocessing.connection.wait(waitables, timeout_s)
        except InterruptedError:
            return
        for slot in self.slots:
            self._drain_status(slot)
            if slot.process is not None and not slot.process.is_alive():
                slot.process.join()
                self._on_exit(slot)

    def _stop_all(self) -> None:
        for slot in self.slots:
            if slot.process is not None and slot.process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.drain_timeout_s + 5
        while any(slot.process is not None for slot in self.slots):
            if time.monotonic() > deadline:
                for slot in self.slots:
                    if slot.process is not None:
                        logger.warning("shard-%d did not stop; killing pid=%d", slot.index, slot.process.pid)
                        slot.process.kill()
                        slot.process.join()
                        slot.process = None
                break
            self._watch(timeout_s=0.2)
            self._tick()

    def summary(self) -> list[dict[str, Any]]:
        rows = []
        for slot in self.slots:
            status = slot.last_status
            rows.append(
                {
                    "shard": slot.index,
                    "member": status.get("member", f"{self.config.node}/shard-{slot.index}"),
                    "processed": status.get("processed", 0),
                    "emitted": status.get("emitted", 0),
                    "failed": status.get("failed", 0),
                    "restarts": slot.restarts,
                }
            )
        return rows


def run(config: ProcessorConfig, on_tick: Callable[[Supervisor], None] | None = None) -> int:
    if config.handler:
        load_handler(config.handler)  # fail fast, in the supervisor, on a bad spec
    supervisor = Supervisor(config, on_tick)
    code = supervisor.run()
    supervisor.last_summary = supervisor.summary()  # type: ignore[attr-defined]
    return code
