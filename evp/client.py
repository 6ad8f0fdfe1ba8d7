"""Asynchronous clients of the queue: a batching Producer and a group Consumer.

Both speak the protocol of evp.protocol over one TCP connection and reconnect after
the queue restarts. The Producer keeps every batch until the queue acknowledges it
and sends the unacknowledged ones again on a new connection, so an acknowledged
event is stored and an unacknowledged one is retried (at-least-once publishing).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from evp import __version__, protocol, records

logger = logging.getLogger("evp.client")

RECONNECT_INITIAL_S = 0.1
RECONNECT_MAX_S = 2.0
# How long leaving `async with Producer(...)` waits for acknowledgements. The same
# 30 s that `evp publish` waits at its end.
EXIT_FLUSH_TIMEOUT_S = 30.0


class ClientError(Exception):
    """A failure talking to the queue."""


class ServerError(ClientError):
    """An ERROR frame the queue sent in response."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message


def parse_address(address: str) -> tuple[str, int]:
    """Split "HOST:PORT" (or "[v6]:PORT"); raise ValueError naming the bad value."""
    host, separator, port_text = address.rpartition(":")
    if not separator or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"invalid queue address {address!r}: expected HOST:PORT, e.g. 127.0.0.1:8000")
    return host.strip("[]"), int(port_text)


class FrameConnection(asyncio.Protocol):
    """A client connection that decodes frames and passes each to `on_frame`."""

    def __init__(self, on_frame: Callable[[protocol.Frame], None], max_frame_bytes: int) -> None:
        self.on_frame = on_frame
        self.decoder = protocol.Decoder(max_frame_bytes)
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self._writable = asyncio.Event()
        self._writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.decoder.feed(data)
        except protocol.ProtocolError as exc:
            logger.error("protocol error from the queue: %s", exc)
            self.close()
            return
        for frame in frames:
            self.on_frame(frame)
        if self.decoder.error is not None:
            logger.error("protocol error from the queue: %s", self.decoder.error)
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._writable.set()
        if not self.closed.done():
            self.closed.set_result(exc)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    async def drain(self) -> None:
        await self._writable.wait()

    @property
    def is_closed(self) -> bool:
        return self.closed.done()

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


_default_tls: ssl.SSLContext | None = None


def configure_tls(ca_file: str | None) -> None:
    """Make every later connection of this process use TLS, trusting `ca_file`.

    The CLI calls it once per process from `--tls-ca`; library users can pass `tls=`
    to `connect` instead. The queue's certificate must name the host of the address
    the client connects to (an IP address SAN for 127.0.0.1).
    """
    global _default_tls
    if ca_file is None:
        _default_tls = None
        return
    try:
        _default_tls = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ClientError(f"cannot load the CA certificates in --tls-ca {ca_file!r}: {exc}") from exc


async def connect(
    address: str,
    on_frame: Callable[[protocol.Frame], None],
    *,
    token: str | None = None,
    producer_id: str | None = None,
    timeout_s: float = 10.0,
    tls: ssl.SSLContext | None = None,
) -> tuple[FrameConnection, protocol.Welcome]:
    """Open a connection and complete the handshake. Frames after WELCOME go to `on_frame`."""
    host, port = parse_address(address)
    tls = tls or _default_tls
    loop = asyncio.get_running_loop()
    welcome: asyncio.Future[protocol.Frame] = loop.create_future()

    def first_frame(frame: protocol.Frame) -> None:
        if not welcome.done():
            welcome.set_result(frame)
        else:
            on_frame(frame)

    try:
        _, connection = await asyncio.wait_for(
            loop.create_connection(
                lambda: FrameConnection(first_frame, protocol.DEFAULT_MAX_FRAME_BYTES),
                host,
                port,
                ssl=tls,
                server_hostname=host if tls is not None else None,
            ),
            timeout_s,
        )
    except ssl.SSLError as exc:
        raise ClientError(
            f"TLS handshake with the queue at {address} failed: {exc.reason or exc}; check "
            f"--tls-ca and that the queue runs with --tls-cert"
        ) from exc
    except (OSError, TimeoutError) as exc:
        raise ClientError(f"cannot connect to the queue at {address}: {exc}") from exc
    connection.send(
        protocol.encode(
            protocol.Hello(client=f"evp/{__version__}", token=token, producer_id=producer_id)
        )
    )
    done, _ = await asyncio.wait([welcome, connection.closed], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    if welcome in done:
        frame = welcome.result()
        if isinstance(frame, protocol.Welcome):
            connection.on_frame = on_frame
            connection.decoder.max_frame_bytes = frame.max_frame_bytes
            return connection, frame
        connection.close()
        if isinstance(frame, protocol.Error):
            raise ServerError(frame.code, frame.message)
        raise ClientError(f"the queue at {address} responded to HELLO with {type(frame).__name__}")
    connection.close()
    if connection.closed in done:
        raise ClientError(f"the queue at {address} closed the connection during the handshake")
    raise ClientError(f"the queue at {address} did not respond to the handshake within {timeout_s} s")


@dataclass
class _Batch:
    seq: int
    topic: str
    entries: list[tuple[bytes, bytes, int]]
    size_bytes: int
    sent: bool = False


class Producer:
    """Publish events in batches and track the queue's acknowledgements.

    `publish` only queues an event; batches go out when the event loop next runs, so
    everything published in one loop iteration shares a frame. `flush` waits until
    every queued event is acknowledged or rejected.

    Every batch stays in memory until the queue acknowledges it. After a lost
    connection the Producer reconnects (0.1 s doubling to 2 s between tries) and sends
    the unacknowledged batches again, so an event may be stored twice but an
    acknowledged one is never lost. Memory is bounded by `max_unacked_events` and
    `max_unacked_bytes`: call `wait_for_capacity` between publishes to wait while the
    queue is behind or unreachable.

    Use it as an async context manager, which connects on entry and flushes and closes
    on exit, or call `start`, `flush` and `close` yourself::

        async with Producer("127.0.0.1:8000") as producer:
            producer.publish_event("orders", "customer-7", {"id": 1, "total": 9.5})
            await producer.wait_for_capacity()

    Args:
        address: the queue as "HOST:PORT".
        token: the queue's shared secret, if it requires one.
        max_batch_events, max_batch_bytes: when a batch is sent before the loop runs
            again. The byte limit is also lowered to fit the queue's frame limit.
        max_unacked_events, max_unacked_bytes: the backpressure bounds above.
        on_rejected: called with the queue's message and the batch size when the queue
            rejects a batch as invalid; without it the rejection is logged.

    Counters: `sent`, `acked`, `rejected` (events) and `reconnects`.
    """

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        max_batch_events: int = 2000,
        max_batch_bytes: int = 1024 * 1024,
        max_unacked_events: int = 100_000,
        max_unacked_bytes: int = 32 * 1024 * 1024,
        on_rejected: Callable[[str, int], None] | None = None,
    ) -> None:
        self.address = address
        self.token = token
        self.max_batch_events = max_batch_events
        self.max_batch_bytes = max_batch_bytes
        self.max_unacked_events = max_unacked_events
        # Both bounds hold while the queue is unreachable, so a publisher's memory
        # stays bounded however long the outage.
        self.max_unacked_bytes = max_unacked_bytes
        self._unacked_bytes = 0
        self.on_rejected = on_rejected
        self.sent = 0
        self.acked = 0
        self.rejected = 0
        self.reconnects = 0
        self.max_event_bytes = 0
        # A random id and a number for every event let the queue skip a batch it
        # already stored when this producer sends it again after a lost acknowledgement.
        self.producer_id = f"{secrets.randbits(64) or 1:016x}"
        self._next_sequence = 1
        self._open: dict[str, _Batch] = {}
        self._unacked: collections.OrderedDict[int, _Batch] = collections.OrderedDict()
        self._unacked_events = 0
        self._connection: FrameConnection | None = None
        self._capacity = asyncio.Event()
        self._capacity.set()
        self._all_acked = asyncio.Event()
        self._all_acked.set()
        self._flush_scheduled = False
        self._runner: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._closing = False
        self.last_error: str | None = None

    async def start(self) -> None:
        """Connect and start reconnecting in the background when the connection drops.

        Raises ClientError when the first connection fails (queue unreachable, wrong
        token, TLS failure), so a wrong address is reported at once.
        """
        await self._connect()
        self._runner = asyncio.create_task(self._keep_connected())

    async def _connect(self) -> None:
        connection, welcome = await connect(
            self.address, self._on_frame, token=self.token, producer_id=self.producer_id
        )
        self.max_event_bytes = welcome.max_event_bytes
        # A batch must fit in one frame under the queue's limit, with room for the
        # frame and batch headers.
        self.max_batch_bytes = min(self.max_batch_bytes, welcome.max_frame_bytes - 1024)
        self._connection = connection
        self._connected.set()
        for batch in self._unacked.values():
            batch.sent = False
        self._send_unsent()

    async def _keep_connected(self) -> None:
        delay = RECONNECT_INITIAL_S
        while not self._closing:
            assert self._connection is not None
            await self._connection.closed
            self._connected.clear()
            if self._closing:
                return
            logger.warning(
                "connection to the queue at %s lost; %d events unacknowledged, reconnecting",
                self.address,
                self._unacked_events,
            )
            while not self._closing:
                await asyncio.sleep(delay)
                try:
                    await self._connect()
                except ClientError as exc:
                    self.last_error = str(exc)
                    delay = min(delay * 2, RECONNECT_MAX_S)
                    logger.debug("reconnect failed: %s", exc)
                    continue
                self.reconnects += 1
                delay = RECONNECT_INITIAL_S
                logger.info("reconnected to the queue at %s", self.address)
                break

    def publish(self, topic: str, key: bytes, value: bytes, timestamp_us: int | None = None) -> None:
        """Queue one event: `key` decides its partition, `value` is a JSON object's bytes.

        Returns at once; the batch goes out when the event loop next runs. The queue
        checks the event, and `on_rejected` hears about an invalid one. `timestamp_us`
        (µs since the epoch) defaults to now and is what `evp replay --from-time`
        searches. Raises ValueError for a key over 65,535 bytes, which the queue
        could never store.
        """
        if len(key) > records.MAX_KEY_BYTES:
            # Checked here, before the event joins a batch: the frame cannot encode
            # it, and a batch that cannot be encoded would stop every later publish.
            raise ValueError(
                f"the key is {len(key)} bytes, over the limit of {records.MAX_KEY_BYTES} bytes per "
                f"key; publish the event under a shorter key"
            )
        if timestamp_us is None:
            timestamp_us = time.time_ns() // 1000
        batch = self._open.get(topic)
        if batch is None:
            batch = self._open[topic] = _Batch(0, topic, [], 0)
        size_bytes = len(key) + len(value) + 14
        if batch.entries and batch.size_bytes + size_bytes > self.max_batch_bytes:
            # Seal first, so no batch grows past the queue's frame limit.
            self._seal(topic)
            batch = self._open[topic] = _Batch(0, topic, [], 0)
        batch.entries.append((key, value, timestamp_us))
        batch.size_bytes += size_bytes
        self._unacked_events += 1
        self._unacked_bytes += size_bytes
        self.sent += 1
        self._all_acked.clear()
        if (
            self._unacked_events >= self.max_unacked_events
            or self._unacked_bytes >= self.max_unacked_bytes
        ):
            self._capacity.clear()
        if len(batch.entries) >= self.max_batch_events or batch.size_bytes >= self.max_batch_bytes:
            self._seal(topic)
            self._send_unsent()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_open)

    def publish_event(self, topic: str, key: str, event: dict[str, Any]) -> None:
        """Queue a dict as one event, keyed by `key`; see `publish`."""
        from evp.events import dumps_event

        self.publish(topic, key.encode(), dumps_event(event))

    async def __aenter__(self) -> Producer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Flush (unless the block raised) and close; raise ClientError on a flush timeout."""
        try:
            if exc_info[0] is None and not await self.flush(EXIT_FLUSH_TIMEOUT_S):
                raise ClientError(
                    f"{self.unacked} events were not acknowledged within "
                    f"{EXIT_FLUSH_TIMEOUT_S:.0f} s (last error: {self.last_error})"
                )
        finally:
            await self.close()

    @property
    def has_capacity(self) -> bool:
        """False while too many events are unacknowledged; see `wait_for_capacity`."""
        return self._capacity.is_set()

    async def wait_for_capacity(self) -> None:
        """Wait while too many events are unacknowledged (backpressure from the queue)."""
        await self._capacity.wait()

    def _seal(self, topic: str) -> None:
        batch = self._open.pop(topic)
        # A batch's seq is the sequence number of its first event; event i has seq + i.
        batch.seq = self._next_sequence
        self._next_sequence += len(batch.entries)
        self._unacked[batch.seq] = batch

    def _flush_open(self) -> None:
        self._flush_scheduled = False
        for topic in list(self._open):
            self._seal(topic)
        self._send_unsent()

    def _send_unsent(self) -> None:
        connection = self._connection
        if connection is None or connection.is_closed:
            return
        for batch in self._unacked.values():
            if not batch.sent:
                connection.send(protocol.encode_publish(batch.seq, batch.topic, batch.entries))
                batch.sent = True

    def _on_frame(self, frame: protocol.Frame) -> None:
        if isinstance(frame, protocol.Published):
            batch = self._unacked.pop(frame.seq, None)
            if batch is not None:
                self.acked += len(batch.entries)
                self._settle(batch)
        elif isinstance(frame, protocol.Error):
            self._on_error(frame)
        else:
            logger.debug("producer ignored a %s frame", type(frame).__name__)

    def _on_error(self, frame: protocol.Error) -> None:
        self.last_error = f"{frame.message} ({frame.code})"
        batch = self._unacked.get(frame.seq) if frame.seq is not None else None
        if batch is None:
            logger.error("the queue reported an error: %s", self.last_error)
            return
        if frame.code == "invalid_event":
            del self._unacked[batch.seq]
            self.rejected += len(batch.entries)
            self._settle(batch)
            if self.on_rejected is not None:
                self.on_rejected(frame.message, len(batch.entries))
            else:
                logger.error(
                    "the queue rejected a batch of %d events: %s", len(batch.entries), frame.message
                )
            return
        # Storage errors and the like are temporary: send the batch again shortly.
        logger.warning("the queue could not store batch %d: %s; retrying in 1 s", batch.seq, frame.message)
        batch.sent = False
        asyncio.get_running_loop().call_later(1.0, self._send_unsent)

    def _settle(self, batch: _Batch) -> None:
        self._unacked_events -= len(batch.entries)
        self._unacked_bytes -= batch.size_bytes
        if (
            self._unacked_events < self.max_unacked_events
            and self._unacked_bytes < self.max_unacked_bytes
        ):
            self._capacity.set()
        if self._unacked_events == 0:
            self._all_acked.set()

    @property
    def unacked(self) -> int:
        """Events published and not yet acknowledged or rejected."""
        return self._unacked_events

    async def flush(self, timeout_s: float | None = None) -> bool:
        """Send what is queued and wait for the acknowledgements; False on timeout."""
        self._flush_open()
        try:
            await asyncio.wait_for(self._all_acked.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Close the connection. Events not acknowledged by now are dropped: flush first."""
        self._closing = True
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        if self._connection is not None:
            self._connection.close()


# Returns None to acknowledge the whole batch, or the next offset to acknowledge when
# some of its events are not finished yet.
ProcessBatch = Callable[[int, list[records.Record]], Awaitable[int | None]]


class Consumer:
    """A member of a consumer group: receives its partitions' events and acknowledges them.

    `process(partition, records)` is awaited for each DELIVER frame in arrival order;
    when it returns, the records are acknowledged, up to the offset it returns if it
    returns one. Each record is an `evp.records.Record` with `offset`, `timestamp_us`,
    `key` (bytes) and `value` (the event's JSON bytes). `acknowledge` moves a
    partition's position later, for events finished outside `process`. After a
    reconnect, frames received on the old connection are dropped unprocessed, because
    the queue sends them again. Processing is at-least-once: an event whose batch was
    not acknowledged before a crash or a rebalance is delivered again.

    Members of one group share the topic's partitions. Give each a stable, unique
    `member` id, so that a restarted member gets its partitions back::

        async def process(partition, batch):
            for record in batch:
                print(partition, record.offset, orjson.loads(record.value))

        consumer = Consumer("127.0.0.1:8000", topic="orders", group="billing",
                            member="billing-1", process=process)
        task = asyncio.create_task(consumer.run())
        ...
        await consumer.leave()   # finish and acknowledge the events it has
        await task

    Args:
        address: the queue as "HOST:PORT".
        topic, group: what to consume, and the group whose positions advance.
        member: this member's id, 1 to 200 characters; a second live connection with
            the same id is rejected (`member_id_in_use`).
        process: the coroutine function called per batch. If it raises, the Consumer
            stops without acknowledging the batch, so it is delivered again later.
        max_in_flight: unacknowledged events the queue may send at once (the queue
            caps it with its own --max-in-flight).
        token: the queue's shared secret, if it requires one.
        report, before_ack: hooks used by `evp process`: a REPORT frame to send with
            each heartbeat, and a function called before each ACK goes out.
        on_session: called at each new connection, so the caller can drop its own
            state of the old one.
        has_unfinished: returns True while events that `process` returned before
            finishing are still unfinished; a leave waits for them.
    """

    def __init__(
        self,
        address: str,
        *,
        topic: str,
        group: str,
        member: str,
        process: ProcessBatch,
        max_in_flight: int = 1000,
        token: str | None = None,
        report: Callable[[], protocol.Report] | None = None,
        before_ack: Callable[[], None] | None = None,
        on_session: Callable[[], None] | None = None,
        has_unfinished: Callable[[], bool] | None = None,
    ) -> None:
        self.address = address
        self.on_session = on_session
        # True while events that `process` returned before finishing are still
        # unfinished; a leave waits for them.
        self.has_unfinished = has_unfinished
        self.report = report
        # Called before each ACK goes out, e.g. to flush output the ACK vouches for.
        self.before_ack = before_ack
        self.topic = topic
        self.group = group
        self.member = member
        self.process = process
        self.max_in_flight = max_in_flight
        self.token = token
        self.partitions: list[int] = []
        self.generation = 0
        self.reconnects = 0
        self._frames: collections.deque[tuple[int, protocol.Deliver]] = collections.deque()
        self._pending_acks: dict[int, int] = {}
        self._frame_ready = asyncio.Event()
        self._epoch = 0
        self._processing_epoch = 0
        self.failed_error = False
        self._connection: FrameConnection | None = None
        self._heartbeat_ms = 1000
        self._leaving = False
        self._left = asyncio.Event()
        self._stopped = False
        self.fatal_error: ServerError | None = None
        # Set while the queue rejects this member id as in use by a live connection;
        # monotonic time of the first rejection in a row.
        self._in_use: ServerError | None = None
        self._in_use_since: float | None = None
        # Next offset to acknowledge per partition, sent by _flush_acks.
        self._pending_acks: dict[int, int] = {}

    def _on_frame(self, frame: protocol.Frame) -> None:
        if isinstance(frame, protocol.Deliver):
            self._frames.append((self._epoch, frame))
            self._frame_ready.set()
        elif isinstance(frame, protocol.Assigned):
            self._in_use_since = None
            self.partitions = list(frame.partitions)
            self.generation = frame.generation
            logger.info(
                "member=%s assigned %d partitions (generation %d)",
                self.member,
                len(frame.partitions),
                frame.generation,
            )
            if self._leaving and not frame.partitions:
                self._left.set()
                self._frame_ready.set()
        elif isinstance(frame, protocol.Error):
            logger.error("the queue reported an error to member=%s: %s", self.member, frame.message)
            if frame.fatal and frame.code in ("authentication_failed", "invalid_name", "invalid_member"):
                self.fatal_error = ServerError(frame.code, frame.message)
            elif frame.code == "member_id_in_use":
                self._in_use = ServerError(frame.code, frame.message)
        elif isinstance(frame, protocol.Pong):
            pass

    async def run(self) -> None:
        """Connect, join and process until `stop` or `leave` completes.

        Reconnects after a lost connection. Raises ServerError when the queue rejects
        the member for good: wrong token, invalid names, or its id still in use by a live
        connection after the session timeout.
        """
        worker = asyncio.create_task(self._work())
        try:
            await self._session_loop()
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker

    async def _session_loop(self) -> None:
        delay = RECONNECT_INITIAL_S
        while not self._stopped:
            try:
                connection, welcome = await connect(self.address, self._on_frame, token=self.token)
            except ClientError as exc:
                # ServerError is a ClientError; only a wrong token is final.
                if isinstance(exc, ServerError) and exc.code == "authentication_failed":
                    raise
                logger.warning("member=%s: %s; retrying in %.1f s", self.member, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)
                continue
            delay = RECONNECT_INITIAL_S
            self._epoch += 1
            self._frames.clear()
            self._pending_acks.clear()
            if self.on_session is not None:
                self.on_session()
            self._connection = connection
            self._heartbeat_ms = welcome.heartbeat_interval_ms
            connection.send(
                protocol.encode(
                    protocol.Join(self.topic, self.group, self.member, self.max_in_flight)
                )
            )
            heartbeat = asyncio.create_task(self._heartbeat(connection))
            try:
                await connection.closed
            finally:
                heartbeat.cancel()
            self.partitions = []
            if self.fatal_error is not None:
                raise self.fatal_error
            if self._in_use is not None:
                await self._wait_for_member_id(
                    self._in_use,
                    welcome.session_timeout_ms / 1000,
                    welcome.heartbeat_interval_ms / 1000,
                )
                self._in_use = None
                continue
            if self._stopped or self._left.is_set() or self._leaving:
                # A member that asked to leave does not come back: its unacknowledged
                # events go to the other members.
                return
            self.reconnects += 1
            logger.warning("member=%s lost its connection to the queue; reconnecting", self.member)

    async def _wait_for_member_id(self, error: ServerError, timeout_s: float, delay_s: float) -> None:
        """Wait one heartbeat interval before joining again under an id in use.

        The id's old connection may be dead without the queue knowing yet, for example
        after a network failure. The queue frees the id once that connection misses
        three heartbeats. An id still in use after the session timeout belongs to
        another live processor, so ServerError is raised.
        """
        now = time.monotonic()
        if self._in_use_since is None:
            self._in_use_since = now
        if now - self._in_use_since > timeout_s:
            raise error
        logger.warning(
            "member=%s: its id is in use by a live connection; joining again in %.1f s",
            self.member,
            delay_s,
        )
        await asyncio.sleep(delay_s)

    async def _heartbeat(self, connection: FrameConnection) -> None:
        nonce = 0
        while not connection.is_closed:
            await asyncio.sleep(self._heartbeat_ms / 1000)
            nonce += 1
            connection.send(protocol.encode(protocol.Ping(nonce)))
            if self.report is not None:
                connection.send(protocol.encode(self.report()))

    @property
    def epoch(self) -> int:
        """The number of the current connection; it grows by one on each reconnect."""
        return self._epoch

    def acknowledge(self, partition: int, next_offset: int, epoch: int) -> None:
        """Acknowledge `partition` up to `next_offset` soon, unless the connection of
        `epoch` is gone (the queue then delivers those events again anyway)."""
        if epoch != self._epoch:
            return
        self._pending_acks[partition] = max(next_offset, self._pending_acks.get(partition, 0))
        self._frame_ready.set()

    async def _work(self) -> None:
        pending_acks = self._pending_acks
        while True:
            if not self._frames:
                self._flush_acks(pending_acks)
                if self._leaving and self._left.is_set() and not self._unfinished():
                    self._finish_leave()
                self._frame_ready.clear()
                await self._frame_ready.wait()
                continue
            epoch, frame = self._frames.popleft()
            if epoch != self._epoch:
                continue
            batch = list(records.decode(frame.records, verify=False))
            self._processing_epoch = epoch
            try:
                position = await self.process(frame.partition, batch)
            except Exception:
                # Not a handler failure (those are retried inside `process`), so the
                # shard cannot go on: stop, and let the supervisor restart it.
                logger.exception("member=%s failed processing a batch; stopping", self.member)
                self.failed_error = True
                self.stop()
                return
            if epoch != self._epoch:
                continue
            if position is not None:
                # Sent even when it did not move, because the queue dispatches more
                # events to a member on each ACK.
                pending_acks[frame.partition] = position
            elif batch:
                pending_acks[frame.partition] = batch[-1].offset + 1
            # Acknowledge each frame before the next one runs. A handler that awaits
            # lets other code run, and code that then blocks the event loop for
            # seconds would otherwise hold back the acknowledgement of finished
            # events, so the queue would deliver them again after a session timeout.
            self._flush_acks(pending_acks)

    def _unfinished(self) -> bool:
        return self.has_unfinished is not None and self.has_unfinished()

    def session_open(self, epoch: int) -> bool:
        """Return True while the connection of `epoch` is the current one and open.

        Work started on a connection that is gone is delivered again by the queue,
        possibly to another member, so it should stop.
        """
        return (
            epoch == self._epoch
            and self._connection is not None
            and not self._connection.is_closed
        )

    def superseded(self) -> bool:
        """Return True when the batch being processed came on a connection now closed."""
        return self._processing_epoch != self._epoch or (
            self._connection is not None and self._connection.is_closed
        )

    def ack_progress(self, partition: int, next_offset: int) -> None:
        """Acknowledge now the events of `partition` below `next_offset`, mid-batch.

        For `process` to call before it lets other code run, e.g. before awaiting a
        handler, so that code which then blocks the event loop cannot hold back the
        acknowledgement of events already finished. Ignored when the batch came on a
        connection that is gone, because the queue sends those events again.
        """
        if self.superseded():
            return
        self._pending_acks[partition] = next_offset
        self._flush_acks(self._pending_acks)

    def _flush_acks(self, pending: dict[int, int]) -> None:
        if pending and self._connection is not None:
            if self.before_ack is not None:
                self.before_ack()
            self._connection.send(protocol.encode_ack(list(pending.items())))
        pending.clear()

    def _finish_leave(self) -> None:
        self._stopped = True
        if self._connection is not None:
            self._connection.close()

    async def leave(self, timeout_s: float = 30.0) -> bool:
        """Stop taking new events, finish and acknowledge the buffered ones, then disconnect.

        Returns False if the drain did not finish within `timeout_s`; the queue then
        delivers the unacknowledged events to another member.
        """
        self._leaving = True
        connection = self._connection
        if connection is None or connection.is_closed:
            self._stopped = True
            self._frame_ready.set()
            return True
        connection.send(protocol.encode(protocol.Leave()))
        self._frame_ready.set()
        try:
            # shield: on timeout wait_for cancels what it waits on, and the session
            # loop waits on the same future.
            await asyncio.wait_for(asyncio.shield(connection.closed), timeout_s)
        except TimeoutError:
            self.stop()
            return False
        return True

    def stop(self) -> None:
        """Disconnect at once; unacknowledged events go to other members."""
        self._stopped = True
        if self._connection is not None:
            self._connection.close()


async def request(
    address: str,
    frame: protocol.Frame,
    expected: type,
    *,
    token: str | None = None,
    timeout_s: float = 10.0,
) -> Any:
    """Open a connection, send one request frame and return the response of type `expected`.

    Raises ServerError when the queue responds with an ERROR frame and ClientError on
    a timeout or a response of another type.
    """
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[protocol.Frame] = loop.create_future()
    name = type(frame).__name__.upper()

    def on_frame(response: protocol.Frame) -> None:
        if not answer.done():
            answer.set_result(response)

    connection, _ = await connect(address, on_frame, token=token, timeout_s=timeout_s)
    try:
        connection.send(protocol.encode(frame))
        try:
            response = await asyncio.wait_for(answer, timeout_s)
        except TimeoutError:
            raise ClientError(
                f"the queue at {address} sent no response to {name} within {timeout_s} s"
            ) from None
    finally:
        connection.close()
    if isinstance(response, protocol.Error):
        raise ServerError(response.code, response.message)
    if not isinstance(response, expected):
        raise ClientError(f"the queue responded to {name} with {type(response).__name__}")
    return response


async def admin_request(
    address: str,
    operation: str,
    args: dict[str, Any] | None = None,
    *,
    token: str | None = None,
    timeout_s: float = 10.0,
) -> Any:
    """Send one ADMIN request and return its result; raise ServerError when it fails."""
    frame = protocol.Admin(operation, args or {})
    response = await request(address, frame, protocol.AdminResult, token=token, timeout_s=timeout_s)
    return response.result
