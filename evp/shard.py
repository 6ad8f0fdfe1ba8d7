"""One shard worker process: consumes its partitions and runs the handler on each event.

How a shard keeps its guarantees:

- Events of one partition reach the handler in offset order, one at a time, except
  that a key whose event failed waits: its later events queue behind the failed one
  (evp.ordering), while other keys of the partition go on.
- A failed event is retried after 0.1 s, doubling up to RETRY_BACKOFF_MAX_S, until
  it has been delivered `max_retries + 1` times. Then it is published to `<topic>.dlq`
  (evp.deadletter) and skipped.
- Results for `--output-topic` and dead letters are published through one Producer
  per shard, and the shard waits for the queue's PUBLISHED before it acknowledges the
  input events (at-least-once along a chain of processors).
- The acknowledgement of a partition never passes its oldest unfinished event.
- Before each handler call the shard notes the event in shared memory, so the
  supervisor can count the crash of a handler that kills the process (evp.crashes).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import os
import signal
import sys
import time
import traceback
from typing import TYPE_CHECKING, Any

import orjson

from evp import events, heap, protocol, records
from evp.client import ClientError, Consumer, Producer, ServerError
from evp.context import Context, Keyed, ShardInfo
from evp.crashes import CrashTable, InProgress, describe_exit
from evp.deadletter import DeadLetter, dlq_topic, utc_now
from evp.handlers import Handler, HandlerError
from evp.metrics import LatencyHistogram
from evp.ordering import PartitionWork

if TYPE_CHECKING:
    from evp.processor import ProcessorConfig

logger = logging.getLogger("evp.processor")

STATUS_INTERVAL_S = 1.0
# Maximum time a shard runs handlers before it lets its event loop send heartbeats and
# read frames.
YIELD_INTERVAL_S = 0.1
LATENCY_WINDOW_S = 30.0
# Exit code of a shard that cannot start (bad handler, unusable output directory).
STARTUP_FAILED = 3
# Delay before the first retry of a failed event; each later retry doubles it, up to
# the maximum. Short first retries get past brief faults (a dropped connection) quickly.
RETRY_BACKOFF_INITIAL_S = 0.1
RETRY_BACKOFF_MAX_S = 30.0
PRODUCER_RECONNECT_S = 1.0


def retry_delay_s(failures: int) -> float:
    """Return the wait before the retry that follows `failures` failed deliveries."""
    return min(RETRY_BACKOFF_INITIAL_S * 2 ** (failures - 1), RETRY_BACKOFF_MAX_S)


def _last_frame(exc: BaseException) -> str:
    """Return the traceback's last frame as "path/file.py:42 in handle", or ""."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f"{last.filename}:{last.lineno} in {last.name}"


class Shard:
    """One shard worker: consumes its partitions and runs the handler on each event."""

    def __init__(
        self,
        config: ProcessorConfig,
        index: int,
        status: Any,
        in_progress: InProgress | None = None,
        crash_table: CrashTable | None = None,
    ) -> None:
        self.config = config
        self.index = index
        self.member = f"{config.node}/shard-{index}"
        self.status = status
        self.in_progress = in_progress
        self.crash_table = crash_table
        self.handler = Handler(config.handler, config.handler_args) if config.handler else None
        self.handler_logger = logging.getLogger(f"evp.handler.shard-{index}")
        self.processed = 0
        self.emitted = 0
        self.failed = 0
        self.rejected = 0
        # The events whose handler is waiting for a retry, by (partition, key).
        self._retrying: dict[tuple[int, bytes], dict[str, Any]] = {}
        self._retry_tasks: set[asyncio.Task[None]] = set()
        self._works: dict[int, PartitionWork] = {}
        self._handler_lock: asyncio.Lock | None = None
        self._pending_lines: list[bytes] = []
        self.output = None
        if config.output is not None:
            config.output.mkdir(parents=True, exist_ok=True)
            self.output = open(config.output / f"shard-{index}.jsonl", "ab")  # noqa: SIM115
        topic_json = orjson.dumps(config.topic)
        self._line_prefix = b'{"topic":' + topic_json + b',"shard":' + str(index).encode()
        self.dlq_topic = dlq_topic(config.topic)
        self.producer: Producer | None = None
        if self.handler is not None or config.output_topic is not None:
            self.producer = Producer(config.queue, token=config.token, on_rejected=self._on_rejected)
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
            on_session=self._reset,
            has_unfinished=self._has_unfinished,
        )
        # Latency is reported over a sliding window of the last LATENCY_WINDOW_S to
        # twice that, so a backlog worked off long ago stops showing in the percentiles.
        self.latency = LatencyHistogram()
        self._previous_latency = LatencyHistogram()
        self._retired_latency = LatencyHistogram()
        self._latency_window_start = time.monotonic()

    @property
    def retrying(self) -> dict[str, Any] | None:
        """The oldest event waiting for a retry, as REPORT shows it, or None."""
        if not self._retrying:
            return None
        return next(iter(self._retrying.values()))

    def _shard_info(self) -> ShardInfo:
        return ShardInfo(
            index=self.index,
            member=self.member,
            topic=self.config.topic,
            group=self.config.group,
            logger=self.handler_logger,
        )

    # Processing.

    def _work(self, partition: int) -> PartitionWork:
        work = self._works.get(partition)
        if work is None:
            work = self._works[partition] = PartitionWork()
        return work

    def _has_unfinished(self) -> bool:
        return any(work.unfinished for work in self._works.values())

    def _reset(self) -> None:
        """Drop the state of the previous connection: the queue sends its events again."""
        for task in self._retry_tasks:
            task.cancel()
        self._retry_tasks.clear()
        self._works.clear()
        self._retrying.clear()

    async def process(self, partition: int, batch: list[records.Record]) -> int | None:
        epoch = self.consumer.epoch
        work = self._work(partition)
        if self.handler is None and self.output is None and self.producer is None:
            # Nothing to call or write: the whole batch is done at once.
            self.emitted += len(batch)
            return self._finish_batch(work, batch, len(batch))
        last_yield = time.monotonic()
        finished = 0
        # Without a handler nothing fails, so events skip the retry bookkeeping.
        passthrough = self.handler is None
        awaits_handler = self.handler is not None and self.handler.is_async
        for index, record in enumerate(batch):
            now = time.monotonic()
            yielding = now - last_yield > YIELD_INTERVAL_S
            if index and (yielding or awaits_handler):
                # Other code runs while this shard awaits, and if it blocks the event
                # loop, an acknowledgement still waiting here would be held back.
                self._acknowledge_finished(partition, work, batch[index - 1].offset)
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
            if passthrough:
                self._emit(partition, record, [(record.key, record.value)])
                finished += 1
                continue
            if work.is_blocked(record.key):
                work.block(record)
                continue
            if await self._attempt(partition, record, 1, epoch):
                finished += 1
            else:
                work.block(record)
                self._start_retry(partition, work, record.key, epoch)
        if not batch:
            return None
        await self._flush_outputs()
        # Only now is every event of the batch either done or in `unfinished`.
        return self._finish_batch(work, batch, finished)

    def _finish_batch(self, work: PartitionWork, batch: list[records.Record], finished: int) -> int | None:
        """Count a processed batch and return the offset to acknowledge."""
        if not batch:
            return None
        work.delivered(batch[-1].offset)
        self.processed += finished
        # Latency from publish to the end of processing. The publisher's clock sets the
        # timestamp, so across machines the figure includes their clock offset.
        now_us = time.time_ns() // 1000
        self.latency.record_many([now_us - record.timestamp_us for record in batch])
        return work.ack_position()

    def _acknowledge_finished(self, partition: int, work: PartitionWork, last_offset: int) -> None:
        """Acknowledge now what is finished of a batch, up to `last_offset`, mid-batch.

        Results published to an output topic must be acknowledged by the queue first,
        which takes a round trip, so with results still unacknowledged this waits for
        the end of the batch.
        """
        if self.producer is not None and self.producer.unacked:
            return
        self._write_pending_lines()
        work.delivered(last_offset)
        self.consumer.ack_progress(partition, work.ack_position())

    async def _attempt(
        self, partition: int, record: records.Record, attempt: int, epoch: int
    ) -> bool:
        """Deliver `record` to the handler once; return False when it should be retried.

        A success emits the results. A failure on the last allowed delivery, or an
        event that crashed its shard too often, is dead-lettered, which also counts as
        finished.
        """
        assert self.handler is not None, "events without a handler skip _attempt"
        crashes, exit_code = 0, None
        if self.crash_table is not None:
            crashed = self.crash_table.lookup(partition, record.offset)
            if crashed is not None:
                crashes, exit_code = crashed
        if crashes and crashes >= self.config.max_retries:
            error = (
                f"ShardCrashed: the shard process ended with {describe_exit(exit_code)} "
                f"while handling this event, {crashes} times"
            )
            self._dead_letter(partition, record, error, "", crashes + 1)
            return True
        delivery = crashes + attempt
        try:
            result = await self._call_handler(partition, record, delivery)
            outputs = self._encode(result, record.key)
        # Any failure of the user's code is retried, including SystemExit and
        # KeyboardInterrupt raised by it, and a result that is not JSON events.
        except (Exception, SystemExit, KeyboardInterrupt) as exc:  # noqa: BLE001
            return self._on_failure(partition, record, delivery, exc, epoch)
        if self._retrying:
            self._retrying.pop((partition, record.key), None)
        self._emit(partition, record, outputs)
        return True

    async def _call_handler(self, partition: int, record: records.Record, delivery: int) -> Any:
        handler = self.handler
        assert handler is not None and self._handler_lock is not None
        context = None
        if handler.takes_context:
            context = Context(
                topic=self.config.topic,
                partition=partition,
                offset=record.offset,
                key=record.key.decode(errors="replace"),
                shard=self.index,
                member=self.member,
                delivery=delivery,
                timestamp_us=record.timestamp_us,
                logger=self.handler_logger,
            )
        event = events.loads_event(record.value)
        in_progress = self.in_progress
        if not handler.is_async:
            # A synchronous call cannot interleave with another call, so it takes no lock.
            if in_progress is not None:
                in_progress.set(partition, record.offset)
            try:
                result = handler.call(event, context)
            finally:
                if in_progress is not None:
                    in_progress.clear(partition, record.offset)
            if not inspect.isawaitable(result):
                return result
            # A plain function that returns a coroutine (an async function behind a
            # decorator): from now on it is called under the lock, like an async one.
            handler.is_async = True
            handler_call = result
        else:
            handler_call = None
        # Retries run beside the main loop. The lock keeps one asynchronous handler call
        # at a time, because a handler is written for one event at a time.
        async with self._handler_lock:
            if in_progress is not None:
                in_progress.set(partition, record.offset)
            try:
                if handler_call is None:
                    handler_call = handler.call(event, context)
                return await handler_call
            finally:
                if in_progress is not None:
                    in_progress.clear(partition, record.offset)

    def _on_failure(
        self,
        partition: int,
        record: records.Record,
        delivery: int,
        exc: BaseException,
        epoch: int,
    ) -> bool:
        key_text = record.key.decode(errors="replace")
        error = f"{type(exc).__name__}: {exc}"
        if delivery > self.config.max_retries:
            self._retrying.pop((partition, record.key), None)
            self._dead_letter(partition, record, error, _last_frame(exc), delivery)
            return True
        if epoch != self.consumer.epoch:
            # The connection is gone, and with it this retry: the queue sends the event
            # again, and `_reset` dropped the state it would be reported in.
            return False
        self._retrying[(partition, record.key)] = {
            "partition": partition,
            "offset": record.offset,
            "key": key_text,
            "attempt": delivery,
            "error": error[:200],
        }
        logger.warning(
            "handler failed on topic=%s partition=%d offset=%d key=%r delivery=%d; "
            "retrying in %.1f s: %s",
            self.config.topic,
            partition,
            record.offset,
            key_text,
            delivery,
            retry_delay_s(delivery),
            error,
        )
        return False

    def _start_retry(self, partition: int, work: PartitionWork, key: bytes, epoch: int) -> None:
        task = asyncio.create_task(self._retry_key(partition, work, key, epoch))
        self._retry_tasks.add(task)
        task.add_done_callback(self._on_retry_done)

    def _on_retry_done(self, task: asyncio.Task[None]) -> None:
        self._retry_tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        # Not a handler failure (those are caught in `_attempt`): the key would stay
        # blocked for good, so stop like a failed batch and let the supervisor restart.
        logger.error(
            "member=%s failed retrying an event; stopping",
            self.member,
            exc_info=task.exception(),
        )
        self.consumer.failed_error = True
        self.consumer.stop()

    async def _retry_key(self, partition: int, work: PartitionWork, key: bytes, epoch: int) -> None:
        """Retry the failed head event of `key`, then release the events queued behind it."""
        attempt = 2
        while True:
            record = work.head(key)
            if record is None:
                return
            await asyncio.sleep(retry_delay_s(attempt - 1))
            if not self.consumer.session_open(epoch):
                # The queue delivers the event again once the connection is back, so a
                # retry now would only call the handler once more than --max-retries.
                return
            if not await self._attempt(partition, record, attempt, epoch):
                attempt += 1
                continue
            done = [record.offset]
            released = not work.pop_head(key)
            # The key's later events, in order, until one fails or none are left.
            while not released:
                if not self.consumer.session_open(epoch):
                    return
                record = work.head(key)
                assert record is not None
                if not await self._attempt(partition, record, 1, epoch):
                    break
                done.append(record.offset)
                released = not work.pop_head(key)
            await self._flush_outputs()
            work.finish(done)
            self.processed += len(done)
            self.consumer.acknowledge(partition, work.ack_position(), epoch)
            if released:
                # The key is free again; a later failure of it starts its own retry.
                return
            attempt = 2

    # Results, dead letters and their acknowledgements.

    def _encode(self, result: Any, input_key: bytes) -> list[tuple[bytes, bytes]]:
        """Encode a handler's result: None, an event, a Keyed event or a list of these.

        Raises TypeError or ValueError for anything else, or for an event the queue
        would reject, so a wrong result counts as a failure of the handler instead of
        a silent, malformed output.
        """
        if result is None:
            return []
        items = result if isinstance(result, list) else [result]
        encoded = []
        limit = self.producer.max_event_bytes if self.producer is not None else 0
        for item in items:
            key = input_key
            if isinstance(item, Keyed):
                if not isinstance(item.key, str) or not item.key:
                    raise TypeError(f"Keyed key {item.key!r} is not a non-empty string")
                key = item.key.encode()
                if len(key) > records.MAX_KEY_BYTES:
                    raise ValueError(
                        f"Keyed key is {len(key)} bytes, over the limit of "
                        f"{records.MAX_KEY_BYTES} bytes"
                    )
                item = item.event
            if not isinstance(item, dict):
                raise TypeError(
                    f"handler returned a {type(item).__name__}; return None, an event "
                    f"(dict), a Keyed event or a list of these"
                )
            value = events.dumps_event(item)
            if self.config.output_topic is not None and limit and len(value) > limit:
                raise ValueError(
                    f"handler returned an event of {len(value)} bytes, over the queue's "
                    f"limit of {limit} bytes (queue option --max-event-bytes)"
                )
            encoded.append((key, value))
        return encoded

    def _emit(self, partition: int, record: records.Record, outputs: list[tuple[bytes, bytes]]) -> None:
        if not outputs:
            return
        self.emitted += len(outputs)
        if self.config.output_topic is not None:
            assert self.producer is not None
            for key, value in outputs:
                self.producer.publish(self.config.output_topic, key, value)
        if self.output is not None:
            head = (
                self._line_prefix
                + b',"partition":'
                + str(partition).encode()
                + b',"offset":'
                + str(record.offset).encode()
                + b',"key":'
                + orjson.dumps(record.key.decode())
                + b',"event":'
            )
            for _, value in outputs:
                self._pending_lines.append(head + value + b"}\n")

    def _dead_letter(
        self, partition: int, record: records.Record, error: str, frame: str, deliveries: int
    ) -> None:
        assert self.producer is not None
        self.failed += 1
        try:
            event = events.loads_event(record.value)
        except events.InvalidEvent as exc:
            # The queue checked the event when it stored it, so this means a bug or a
            # damaged record. The dead letter still goes out, with an empty event.
            logger.error(
                "cannot decode the event at topic=%s partition=%d offset=%d for its dead "
                "letter: %s",
                self.config.topic,
                partition,
                record.offset,
                exc,
            )
            event = {}
        letter = DeadLetter(
            event=event if isinstance(event, dict) else {},
            error=error,
            frame=frame,
            deliveries=deliveries,
            topic=self.config.topic,
            partition=partition,
            offset=record.offset,
            group=self.config.group,
            failed_at=utc_now(),
        )
        try:
            value = events.dumps_event(letter.to_event())
        except events.InvalidEvent as exc:
            logger.error(
                "cannot encode the dead letter of topic=%s partition=%d offset=%d: %s; "
                "publishing it with an empty event",
                self.config.topic,
                partition,
                record.offset,
                exc,
            )
            letter = dataclasses.replace(letter, event={})
            value = events.dumps_event(letter.to_event())
        limit = self.producer.max_event_bytes
        if limit and len(value) > limit:
            # NOTE: the event itself stays readable in the input topic's log at this
            # offset until retention deletes it; the dead letter carries an empty event.
            logger.error(
                "dead letter of topic=%s partition=%d offset=%d is %d bytes, over the "
                "queue's limit of %d; publishing it with an empty event",
                self.config.topic,
                partition,
                record.offset,
                len(value),
                limit,
            )
            letter = dataclasses.replace(letter, event={})
            value = events.dumps_event(letter.to_event())
        logger.error(
            "handler failed on delivery %d of topic=%s partition=%d offset=%d key=%r; "
            "publishing a dead letter to topic=%s (the event is acknowledged once it is "
            "stored): %s",
            deliveries,
            self.config.topic,
            partition,
            record.offset,
            record.key.decode(errors="replace"),
            self.dlq_topic,
            error,
        )
        self.producer.publish(self.dlq_topic, record.key, value)

    def _on_rejected(self, message: str, count: int) -> None:
        # Results are checked against the queue's limits before they are published, so
        # this means the queue was started with other limits than it reported.
        self.rejected += count
        logger.error(
            "member=%s: the queue rejected a batch of %d results or dead letters: %s",
            self.member,
            count,
            message,
        )

    async def _flush_outputs(self) -> None:
        """Wait until the queue acknowledged every published result and dead letter."""
        if self.producer is not None and self.producer.unacked:
            await self.producer.flush()
        self._write_pending_lines()

    def _write_pending_lines(self) -> None:
        if self.output is not None and self._pending_lines:
            self.output.write(b"".join(self._pending_lines))
            self._pending_lines.clear()

    def _flush_output(self) -> None:
        # Flushed before the acknowledgement goes out, so an acknowledged event is in
        # the output file even if the shard is killed right after.
        if self.output is not None:
            self.output.flush()

    # Statistics.

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

    # Life cycle.

    async def _start_producer(self) -> None:
        assert self.producer is not None
        while True:
            try:
                await self.producer.start()
                return
            except ClientError as exc:
                # A wrong token or version stays wrong; a full queue frees up.
                if isinstance(exc, ServerError) and exc.code != "too_many_connections":
                    raise
                logger.warning(
                    "member=%s cannot connect its producer: %s; retrying in %.0f s",
                    self.member,
                    exc,
                    PRODUCER_RECONNECT_S,
                )
                await asyncio.sleep(PRODUCER_RECONNECT_S)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._handler_lock = asyncio.Lock()
        draining = asyncio.Event()

        def on_signal() -> None:
            # The first SIGTERM drains and a second one disconnects at once. The second
            # comes from the supervisor on a second Ctrl-C, or from the kernel when the
            # supervisor dies during a drain.
            if draining.is_set():
                logger.warning("member=%s stopping without finishing its drain", self.member)
                self.consumer.stop()
            draining.set()

        # Ctrl-C in a terminal reaches every process of the group. The supervisor turns
        # it into one SIGTERM per shard, so a shard that also acted on the SIGINT would
        # count two signals and skip its drain.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        loop.add_signal_handler(signal.SIGTERM, on_signal)
        drain_wait = asyncio.create_task(draining.wait())
        try:
            if self.handler is not None:
                await self.handler.setup(self._shard_info())
            if self.producer is not None:
                starting = asyncio.create_task(self._start_producer())
                await asyncio.wait({starting, drain_wait}, return_when=asyncio.FIRST_COMPLETED)
                if not starting.done():
                    starting.cancel()
                    logger.info("member=%s stopped before it could connect", self.member)
                    return 0
                starting.result()
        except HandlerError as exc:
            logger.error("shard-%d cannot start: %s", self.index, exc)
            drain_wait.cancel()
            return STARTUP_FAILED
        except ServerError as exc:
            logger.error("member=%s stopped: %s", self.member, exc)
            drain_wait.cancel()
            return STARTUP_FAILED
        heap.freeze_startup_objects()
        consume = asyncio.create_task(self.consumer.run())
        reporter = asyncio.create_task(self._report_periodically())
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
            self._reset()
            self._report()
            await self._stop_handler_and_producer()
            if self.output is not None:
                self.output.close()
        logger.info("member=%s stopped after processing %d events", self.member, self.processed)
        return exit_code

    async def _stop_handler_and_producer(self) -> None:
        if self.handler is not None:
            try:
                await self.handler.teardown(self._shard_info())
            except HandlerError as exc:
                logger.error("member=%s: %s", self.member, exc)
        if self.producer is not None:
            await self.producer.close()


def shard_main(
    config: ProcessorConfig,
    index: int,
    status: Any,
    parent_pid: int,
    in_progress: InProgress | None = None,
    crash_table: CrashTable | None = None,
) -> None:
    """Entry point of a shard process."""
    from evp.client import configure_tls
    from evp.processor import die_with_parent

    die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        sys.exit(1)
    logging.basicConfig(
        level=config.log_level,
        format=f"%(asctime)s %(levelname)s shard-{index} %(name)s: %(message)s",
    )
    import uvloop

    try:
        configure_tls(config.tls_ca)
        shard = Shard(config, index, status, in_progress, crash_table)
    except (HandlerError, OSError, ClientError) as exc:
        # A failure that a restart cannot fix: the supervisor does not restart on 3.
        logger.error("shard-%d cannot start: %s", index, exc)
        sys.exit(STARTUP_FAILED)
    sys.exit(uvloop.run(shard.run()))
