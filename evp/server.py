"""`evp queue`: the queue server.

One asyncio process on uvloop. Each connection is a thin asyncio.Protocol that feeds
the wire codec and acts on the frames it yields. Publishers send PUBLISH batches;
the server checks every event, routes it to its partition by the hash of its key,
appends it to that partition's log and acknowledges the batch under the fsync
policy. Consumers JOIN a group and receive DELIVER frames for the partitions the
group assigns them, acknowledging with ACK.

fsync policies:

- ``always``: a publish is acknowledged after the log files it touched are fsynced.
  Publishes arriving while one fsync round runs share the next round (group commit).
- ``batch`` (default): a publish is acknowledged once written to the operating
  system, so it survives a crash of the queue process; a background task fsyncs
  every `fsync_interval_ms`, so a power loss or kernel crash loses at most that
  window of acknowledged events.
- ``never``: acknowledged once written; the kernel flushes when it chooses.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import os
import re
import signal
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from evp import __version__, admin, events, hashing, heap, protocol, retention
from evp.groups import Group, Member
from evp.log import OffsetOutOfRange, PartitionLog
from evp.metrics import LatencyHistogram
from evp.records import MAX_KEY_BYTES
from evp.storage import Retention, StorageError, Store, Topic, check_name
from evp.telemetry import SnapshotCollector, Telemetry

logger = logging.getLogger("evp.server")

FSYNC_POLICIES = ("always", "batch", "never")

# Stop reading a client's requests and stop delivering to it while this many bytes
# wait in its send buffer, until the buffer drains below the low mark. asyncio's own default high-water mark is 64 KiB; a DELIVER frame can be up to
# 1 MiB, so the marks are set higher to keep a frame or two queued per connection.
WRITE_HIGH_WATER_BYTES = 4 * 1024 * 1024
WRITE_LOW_WATER_BYTES = 1024 * 1024

# Largest first frame of a connection, which must be HELLO: a JSON object of a few
# short fields and a token. Bytes from a peer that has not yet authenticated stay
# under this bound, not under --max-frame-bytes.
HELLO_MAX_FRAME_BYTES = 64 * 1024
# Keys per topic whose partition the queue remembers. Past this count the table
# starts over. Longer keys than MAX_ROUTED_KEY_BYTES are hashed on every publish, so
# a topic's table stays under about 10 MB (an estimate of the dict's overhead).
MAX_ROUTES = 65_536
MAX_ROUTED_KEY_BYTES = 64

# Connections served at once. Each costs a file descriptor and up to
# WRITE_HIGH_WATER_BYTES of send buffer, so the default keeps the worst case near
# 4 GiB; Linux's default soft limit of 1024 open files would cap it too. A guess sized
# for hundreds of shards, not measured.
DEFAULT_MAX_CONNECTIONS = 1000


@dataclass
class QueueConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path("evp-data")
    partitions: int = 64
    fsync: str = "batch"
    fsync_interval_ms: int = 200
    max_frame_bytes: int = protocol.DEFAULT_MAX_FRAME_BYTES
    max_event_bytes: int = 1024 * 1024
    max_in_flight: int = 10000
    heartbeat_interval_ms: int = 1000
    session_timeout_ms: int = 10000
    handshake_timeout_s: float = 10.0
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    # A connection that leaves a frame unfinished and sends nothing more for this long
    # is closed, so a stalled or hostile peer does not hold its buffer forever.
    frame_timeout_s: float = 30.0
    commit_interval_ms: int = 200
    segment_bytes: int = 64 * 1024 * 1024
    token: str | None = None
    health_interval_s: float = 10.0
    metrics_port: int | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    retention_hours: float | None = None
    retention_bytes: int | None = None
    max_disk_bytes: int | None = None
    min_free_disk_bytes: int = 256 * 1024 * 1024
    retention_check_interval_s: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)


class _FullCheckNeeded(Exception):
    """An event the one-pass check of a PUBLISH leaves to `QueueServer.validate`."""


def _preview(data: bytes, limit: int = 40) -> str:
    """Return `data` as an error message shows it: its start only, when it is long."""
    if len(data) <= limit:
        return repr(data)
    return f"{data[:limit]!r}... ({len(data)} bytes)"


class InvalidEvent(Exception):
    """An event in a PUBLISH batch that the queue will not store."""


class StorageErrorLog:
    """Log failed appends at most once per interval, with the count of those not logged.

    A full disk fails every batch of every publisher, which can be many per second.
    """

    interval_s = 5.0

    def __init__(self) -> None:
        self._last_logged = -self.interval_s
        self._not_logged = 0

    def report(self, topic: str, exc: OSError) -> None:
        now = time.monotonic()
        if now - self._last_logged < self.interval_s:
            self._not_logged += 1
            return
        logger.error(
            "appending to topic=%s failed: %s; the batch was not acknowledged "
            "(%d more failed appends not logged in the last %.0f s)",
            topic,
            exc,
            self._not_logged,
            self.interval_s,
        )
        self._last_logged = now
        self._not_logged = 0


class QueueServer:
    def __init__(self, config: QueueConfig) -> None:
        if config.fsync not in FSYNC_POLICIES:
            raise ValueError(
                f"invalid fsync policy {config.fsync!r}: use one of {', '.join(FSYNC_POLICIES)}"
            )
        self.config = config
        self.store = Store(config.data_dir, config.partitions, segment_bytes=config.segment_bytes)
        self.groups: dict[tuple[str, str], Group] = {}
        self.connections: set[ServerConnection] = set()
        self.connections_rejected = 0
        self.storage_errors = StorageErrorLog()
        self.started_at = time.time()
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._sync_waiters: list[tuple[ServerConnection, int, int]] = []
        self._sync_wakeup = asyncio.Event()
        self._stopping = False
        self._save_lock = asyncio.Lock()
        # Admin operations that run as tasks; kept so they are not garbage collected.
        self._admin_tasks: set[asyncio.Task[None]] = set()
        self._metrics_server: Any = None
        self.telemetry = Telemetry(self)
        self.default_retention = Retention(
            config.retention_hours * 3600 if config.retention_hours is not None else None,
            config.retention_bytes,
        )
        self.disk_limits = retention.DiskLimits(config.max_disk_bytes, config.min_free_disk_bytes)
        for topic_name, group_name in self.store.saved_groups():
            if topic_name in self.store.topics:
                self.group(topic_name, group_name)

    # Groups.

    def group(self, topic_name: str, group_name: str) -> Group:
        key = (topic_name, group_name)
        group = self.groups.get(key)
        if group is None:
            topic = self.store.topic(topic_name)
            committed, lost = self.store.load_offsets(topic_name, group_name)
            group = Group(topic, group_name, committed)
            group.lost_to_retention = lost
            self.groups[key] = group
        return group

    def track(self, task: asyncio.Task[None]) -> None:
        """Keep a reference to a task until it finishes."""
        self._admin_tasks.add(task)
        task.add_done_callback(self._admin_tasks.discard)

    # Publishing.

    def validate(self, entries: list[tuple[bytes, bytes, int]]) -> None:
        """Raise InvalidEvent naming the first event the queue must not store."""
        limit = self.config.max_event_bytes
        check_object = events.check_object
        for index, (key, value, _) in enumerate(entries):
            if len(value) > limit:
                raise InvalidEvent(
                    f"event {index} is {len(value)} bytes, over the limit of {limit} bytes "
                    f"(queue option --max-event-bytes): {_preview(value)}"
                )
            if len(key) > MAX_KEY_BYTES:
                raise InvalidEvent(
                    f"event {index} has a key of {len(key)} bytes; the limit is {MAX_KEY_BYTES}: "
                    f"{_preview(key)}"
                )
            try:
                key.decode()
            except UnicodeDecodeError:
                raise InvalidEvent(
                    f"event {index} has a key that is not valid UTF-8: {_preview(key)}; "
                    f"keys are UTF-8 text"
                ) from None
            try:
                check_object(value)
            except events.InvalidEvent as exc:
                raise InvalidEvent(
                    f"event {index} is invalid: {exc}: {_preview(value)}; each event must be "
                    f"a JSON object"
                ) from None

    def _route_and_check(self, topic: Topic, entries: list[tuple[bytes, bytes, int]]) -> list[int]:
        """Return the partition of each entry, or raise InvalidEvent like `validate`.

        One pass does both, and a key seen before skips its checks and its hash:
        `topic.routes` remembers the partition of up to MAX_ROUTES valid keys of at
        most MAX_ROUTED_KEY_BYTES each.
        Anything unusual goes to `validate`: a key not seen before that fails its
        checks, an event over the size limit, one orjson cannot read or one that is
        not an object. `validate` names the first bad event, or accepts what orjson
        alone cannot read, such as integers beyond 64 bits.
        """
        limit = self.config.max_event_bytes
        routes = topic.routes
        count = topic.partition_count
        partition_for = hashing.partition_for
        loads = orjson.loads
        partitions: list[int] = []
        append = partitions.append
        try:
            for key, value, _ in entries:
                partition = routes.get(key)
                if partition is None:
                    if len(key) > MAX_KEY_BYTES:
                        raise _FullCheckNeeded
                    key.decode()
                    partition = partition_for(key, count)
                    if len(key) <= MAX_ROUTED_KEY_BYTES:
                        if len(routes) >= MAX_ROUTES:
                            routes.clear()
                        routes[key] = partition
                if len(value) > limit or type(loads(value)) is not dict:
                    raise _FullCheckNeeded
                append(partition)
        except (_FullCheckNeeded, UnicodeDecodeError, orjson.JSONDecodeError):
            self.validate(entries)
            return [partition_for(key, count) for key, _, _ in entries]
        return partitions

    def publish(self, frame: protocol.Publish, producer: int = 0) -> list[PartitionLog]:
        """Validate, route and append one batch. Returns the logs of its partitions.

        With a `producer` id, entry i carries sequence number ``frame.seq + i`` and an
        entry at or below the last sequence its partition stored for that producer is
        skipped: it is a resend of an event already in the log.
        """
        try:
            check_name("topic", frame.topic)
        except StorageError as exc:
            raise InvalidEvent(str(exc)) from None
        topic = self.store.topics.get(frame.topic)
        if topic is None:
            # A batch the queue rejects must not create its topic.
            self.validate(frame.entries)
            topic = self.store.topic(frame.topic)
        routes = self._route_and_check(topic, frame.entries)
        by_partition: dict[int, tuple[list[tuple[bytes, bytes, int]], list[int]]] = {}
        count_key = self.telemetry.key_counter(topic).add
        sequence = frame.seq
        for entry, partition in zip(frame.entries, routes, strict=True):
            count_key(entry[0], partition)
            batch = by_partition.get(partition)
            if batch is None:
                by_partition[partition] = ([entry], [sequence])
            else:
                batch[0].append(entry)
                batch[1].append(sequence)
            sequence += 1
        written: list[int] = []
        touched: list[PartitionLog] = []
        # When the disk fails part-way, the partitions before the failure keep their
        # events while the batch is reported as not stored. The producer sends it again
        # and, with a producer id, those partitions skip what they already hold.
        try:
            for partition, (entries, sequences) in by_partition.items():
                log = topic.logs[partition]
                touched.append(log)
                if producer:
                    # A resend is acknowledged only by a log that can still store it.
                    log.check_writable()
                    last = log.last_sequence(producer)
                    if sequences[0] <= last:
                        kept = [i for i, number in enumerate(sequences) if number > last]
                        topic.duplicates_dropped += len(sequences) - len(kept)
                        if not kept:
                            continue
                        entries = [entries[i] for i in kept]
                        sequences = [sequences[i] for i in kept]
                    log.append(entries, producer, sequences)
                else:
                    log.append(entries)
                written.append(partition)
                topic.events_in += len(entries)
        finally:
            # Partitions appended before a failure hold events too: dispatch them.
            if written:
                for (topic_name, _), group in self.groups.items():
                    if topic_name == frame.topic:
                        group.on_append(written)
        return touched

    def request_sync(
        self, connection: ServerConnection, seq: int, count: int, logs: list[PartitionLog]
    ) -> None:
        """Acknowledge batch `seq` after the next fsync round, unless one of `logs` (the
        partitions the batch was written to or found in) has failed by then."""
        self._sync_waiters.append((connection, seq, count, logs))
        self._sync_wakeup.set()

    async def _group_commit(self) -> None:
        """Under `--fsync always`, fsync dirty logs and then acknowledge the waiters.

        A failed fsync means the batches may not be on disk, so their publishers get a
        storage error instead of an acknowledgement and send them again. A failed log
        stays failed, which also covers a batch written just before a failing fsync
        and synced, apparently with success, in a later round.
        """
        while True:
            await self._sync_wakeup.wait()
            self._sync_wakeup.clear()
            waiters, self._sync_waiters = self._sync_waiters, []
            try:
                await asyncio.to_thread(self._sync_logs, self._dirty_logs())
            except Exception:  # the task must outlive any failure
                logger.exception("the fsync round failed; its batches are checked one by one")
            for connection, seq, count, logs in waiters:
                failed = next((log for log in logs if log.failed), None)
                if failed is None:
                    connection.send(protocol.encode(protocol.Published(seq, count)))
                    continue
                connection.send_error(
                    "storage_error",
                    f"the queue could not fsync the batch (partition {failed.name} failed); "
                    f"it was not acknowledged, retry later",
                    seq=seq,
                    fatal=False,
                )

    def _dirty_logs(self) -> list[Any]:
        """List the logs with unsynced appends; call it on the event loop's thread.

        A failed log is left out, because nothing in it can be acknowledged any more and
        fsyncing it again each round would only repeat its error.
        """
        return [
            log
            for topic in self.store.topics.values()
            for log in topic.logs
            if log.dirty and not log.failed
        ]

    @staticmethod
    def _sync_logs(logs: list[Any]) -> None:
        for log in logs:
            try:
                log.sync()
            except ValueError:
                # The log was closed, e.g. its topic deleted, after the list was made.
                continue
            except OSError as exc:
                # The log marked itself failed and logged why; the others still sync.
                logger.error("fsync of partition %s failed: %s", log.name, exc)

    async def _periodic_sync(self) -> None:
        interval = self.config.fsync_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            dirty = self._dirty_logs()
            if not dirty:
                continue
            try:
                await asyncio.to_thread(self._sync_logs, dirty)
            except Exception as exc:  # the task must outlive any failure
                logger.error("periodic fsync of %d logs failed: %s", len(dirty), exc)

    async def _save_offsets(self) -> None:
        interval = self.config.commit_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            await self._save_dirty_groups()

    async def save_groups(self) -> None:
        """Save every group whose positions changed, and return once they are on disk.

        Raises OSError when a save fails; the group stays marked for the next try.
        """
        async with self._save_lock:
            failed = await self._save_dirty_groups_locked()
        if failed is not None:
            raise failed

    async def _save_dirty_groups(self) -> None:
        async with self._save_lock:
            await self._save_dirty_groups_locked()

    async def _save_dirty_groups_locked(self) -> OSError | None:
        # One save at a time, so an older set of positions written by the periodic
        # task can never land after a newer one written for `evp replay`.
        failed = None
        for (topic_name, group_name), group in list(self.groups.items()):
            if not group.dirty or self.groups.get((topic_name, group_name)) is not group:
                continue
            group.dirty = False
            offsets = group.committed_offsets()
            lost = group.lost_to_retention
            try:
                await asyncio.to_thread(
                    self.store.save_offsets, topic_name, group_name, offsets, lost
                )
            except OSError as exc:
                group.dirty = True
                logger.error(
                    "saving positions of group=%s topic=%s failed: %s", group_name, topic_name, exc
                )
                failed = exc
        return failed

    async def _retention(self) -> None:
        """Apply retention and the disk limits in the background, once per interval."""
        while True:
            await asyncio.sleep(self.config.retention_check_interval_s)
            try:
                retention.apply_retention(self, self.default_retention)
                retention.apply_disk_limits(self, self.disk_limits)
            except Exception:  # the task must outlive any failure
                logger.exception("retention failed")

    async def _reap_members(self) -> None:
        """Declare dead every member that has sent nothing for the session timeout."""
        timeout_s = self.config.session_timeout_ms / 1000
        while True:
            await asyncio.sleep(min(1.0, timeout_s / 4))
            try:
                self._reap_silent(timeout_s)
            except Exception:  # the task must outlive any failure
                logger.exception("declaring silent members dead failed")

    async def _reap_partial_frames(self) -> None:
        """Close every connection that sent part of a frame and then nothing for a while."""
        timeout_s = self.config.frame_timeout_s
        while True:
            await asyncio.sleep(min(1.0, timeout_s / 4))
            now = time.monotonic()
            try:
                for connection in list(self.connections):
                    silent_s = now - connection.last_data_at
                    if connection.decoder.buffered_bytes and silent_s > timeout_s:
                        connection.close_partial_frame(silent_s)
            except Exception:  # the task must outlive any failure
                logger.exception("closing connections with unfinished frames failed")

    def _reap_silent(self, timeout_s: float) -> None:
        now = time.monotonic()
        for group in list(self.groups.values()):
            for member in list(group.members.values()):
                silent_s = now - member.last_seen
                if silent_s > timeout_s:
                    logger.warning(
                        "member=%s of group=%s sent nothing for %.1f s (session timeout "
                        "%.1f s); declaring it dead",
                        member.id,
                        group.name,
                        silent_s,
                        timeout_s,
                    )
                    group.remove(member, reason="session timeout")

    async def _health(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            try:
                self._log_health()
            except Exception:  # the task must outlive any failure
                logger.exception("logging the health line failed")

    def _log_health(self) -> None:
        snapshot = self.snapshot()
        groups = snapshot["groups"]
        logger.info(
            "health connections=%d topics=%d events_stored=%d events_in_per_s=%.0f "
            "groups=%d members=%d acked_per_s=%.0f lag=%d lag_seconds=%.1f",
            len(self.connections),
            len(snapshot["topics"]),
            sum(topic["events"] for topic in snapshot["topics"]),
            sum(topic["events_in_per_s"] for topic in snapshot["topics"]),
            len(groups),
            sum(len(group["members"]) for group in groups),
            sum(group["acked_per_s"] for group in groups),
            sum(group["lag"] for group in groups),
            max((group["lag_seconds"] for group in groups), default=0.0),
        )
        for group in groups:
            if group["stall"]:
                logger.warning(
                    "group=%s topic=%s is stalled with lag=%d: %s",
                    group["group"],
                    group["topic"],
                    group["lag"],
                    group["stall"],
                )

    # Statistics.

    def snapshot(self) -> dict[str, Any]:
        """Build a statistics snapshot (docs/stats.md lists the fields).

        Counts are current; rates come from the last one-second sample.
        """
        return self.telemetry.build()

    async def _sample(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                self.telemetry.sample()
            except Exception:  # a bug in statistics must not stop the queue
                logger.exception("sampling statistics failed")

    # Lifecycle.

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ServerConnection(self),
            self.config.host,
            self.config.port,
            reuse_address=True,
            ssl=self._tls_context(),
        )
        port = self._server.sockets[0].getsockname()[1]
        self.config.port = port
        if self.config.fsync == "always":
            self._tasks.append(asyncio.create_task(self._group_commit()))
        elif self.config.fsync == "batch":
            self._tasks.append(asyncio.create_task(self._periodic_sync()))
        self._tasks.append(asyncio.create_task(self._save_offsets()))
        self._tasks.append(asyncio.create_task(self._reap_members()))
        self._tasks.append(asyncio.create_task(self._reap_partial_frames()))
        self._tasks.append(asyncio.create_task(self._health()))
        self._tasks.append(asyncio.create_task(self._sample()))
        self._tasks.append(asyncio.create_task(self._retention()))
        self.telemetry.sample()
        if self.config.metrics_port is not None:
            self._start_metrics()
        logger.info(
            "queue listening on %s:%d tls=%s data_dir=%s partitions=%d fsync=%s version=%s",
            self.config.host,
            port,
            "on" if self.config.tls_cert else "off",
            self.config.data_dir,
            self.config.partitions,
            self.config.fsync,
            __version__,
        )
        if self.config.host not in ("127.0.0.1", "localhost", "::1") and not self.config.token:
            logger.warning(
                "listening on %s without a token: any host that reaches this port can "
                "publish and consume; set --token or EVP_TOKEN",
                self.config.host,
            )

    def _tls_context(self) -> ssl.SSLContext | None:
        cert, key = self.config.tls_cert, self.config.tls_key
        if cert is None and key is None:
            return None
        if cert is None or key is None:
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load --tls-cert {cert!r} with --tls-key {key!r}: {exc}") from exc
        return context

    def _start_metrics(self) -> None:
        """Serve Prometheus metrics at /metrics on the queue's host, in a thread."""
        import prometheus_client

        registry = prometheus_client.CollectorRegistry()
        registry.register(SnapshotCollector(self.telemetry))
        port = self.config.metrics_port
        assert port is not None
        try:
            server, _ = prometheus_client.start_http_server(
                port, addr=self.config.host, registry=registry
            )
        except OSError as exc:
            raise ValueError(
                f"cannot serve metrics on {self.config.host}:{port} (--metrics-port): "
                f"{exc.strerror or exc}"
            ) from exc
        self._metrics_server = server
        logger.info(
            "metrics at http://%s:%d/metrics", self.config.host, server.server_address[1]
        )

    async def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        logger.info("queue stopping")
        if self._server is not None:
            self._server.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        for connection in list(self.connections):
            connection.close("queue shutting down")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for group in self.groups.values():
            group.dirty = True
        await self._save_dirty_groups()
        self._sync_logs([log for topic in self.store.topics.values() for log in topic.logs])
        self.store.close()
        logger.info("queue stopped")


PRODUCER_ID = re.compile(r"[0-9A-Fa-f]{1,16}")


def _parse_producer_id(text: str) -> int | None:
    """Return the producer id HELLO carries as an integer, or None if it is malformed."""
    if PRODUCER_ID.fullmatch(text) is None:
        return None
    return int(text, 16) or None


class ServerConnection(asyncio.Protocol):
    """One client connection: feeds the codec, acts on frames, owns flow control."""

    def __init__(self, server: QueueServer) -> None:
        self.server = server
        self.decoder = protocol.Decoder(
            server.config.max_frame_bytes,
            first_frame_max_bytes=min(HELLO_MAX_FRAME_BYTES, server.config.max_frame_bytes),
        )
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.ready = False  # handshake done
        self.producer = 0  # producer id from HELLO; 0 means resends are not detected
        self.member: Member | None = None
        self.group: Group | None = None
        self.closed = False
        self._paused_writing = False
        self._handshake_timer: asyncio.TimerHandle | None = None
        self.last_data_at = time.monotonic()

    # asyncio.Protocol callbacks.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(WRITE_HIGH_WATER_BYTES, WRITE_LOW_WATER_BYTES)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        limit = self.server.config.max_connections
        if len(self.server.connections) >= limit:
            self.server.connections_rejected += 1
            logger.warning(
                "rejected connection from %s: the queue serves its limit of %d connections "
                "(--max-connections); %d rejected since start",
                self.peer,
                limit,
                self.server.connections_rejected,
            )
            self.send_error(
                "too_many_connections",
                f"the queue serves its limit of {limit} connections (--max-connections); "
                f"retry later, or raise the limit on the queue",
            )
            self.close("too many connections")
            return
        self.server.connections.add(self)
        loop = asyncio.get_running_loop()
        self._handshake_timer = loop.call_later(
            self.server.config.handshake_timeout_s, self._handshake_timed_out
        )
        logger.debug("connection from %s", self.peer)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_data_at = time.monotonic()
        if self.member is not None:
            self.member.last_seen = self.last_data_at
        try:
            frames = self.decoder.feed(data)
            for frame in frames:
                self.handle(frame)
                if self.closed:
                    return
            if self.decoder.error is not None:
                raise self.decoder.error
        except protocol.ProtocolError as exc:
            logger.warning("protocol error from %s: %s", self.peer, exc)
            self.send_error(exc.code, str(exc))
            self.close(f"protocol error: {exc}")
        except Exception as exc:
            # A bug in the queue, not bad input: this connection ends, the others and
            # the log are unaffected.
            logger.exception("internal error while serving %s", self.peer)
            self.send_error("internal_error", f"internal error in the queue: {type(exc).__name__}")
            self.close("internal error")

    def eof_received(self) -> bool:
        try:
            self.decoder.close()
        except protocol.TruncatedFrame as exc:
            logger.warning("connection from %s: %s", self.peer, exc)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        if self.member is not None and self.group is not None:
            self.group.remove(self.member, reason="connection closed")
        logger.debug("connection from %s closed", self.peer)

    def pause_writing(self) -> None:
        # A client that does not read its responses (PUBLISHED, PONG, STATS) would make
        # the send buffer grow without bound, so stop reading its requests too.
        self._paused_writing = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()
        if self.member is not None and self.group is not None:
            self.group.dispatch(self.member)

    # MemberConnection.

    @property
    def writable(self) -> bool:
        return not self._paused_writing and not self.closed

    def send(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def send_frames(self, frames: list[bytes]) -> None:
        self.send(frames[0] if len(frames) == 1 else b"".join(frames))

    def send_assigned(self, partitions: list[int], generation: int, partition_count: int) -> None:
        self.send(protocol.encode(protocol.Assigned(partitions, generation, partition_count)))

    def send_error(self, code: str, message: str, seq: int | None = None, fatal: bool = True) -> None:
        self.send(protocol.encode(protocol.Error(code, message, seq, fatal)))

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        logger.debug("closing connection from %s: %s", self.peer, reason)
        if self.transport is not None:
            self.transport.close()

    # Frames.

    def close_partial_frame(self, silent_s: float) -> None:
        buffered = self.decoder.buffered_bytes
        logger.warning(
            "connection from %s sent %d bytes of a frame and then nothing for %.1f s; closing it",
            self.peer,
            buffered,
            silent_s,
        )
        self.send_error(
            "frame_timeout",
            f"{buffered} bytes of an unfinished frame and nothing more for "
            f"{self.server.config.frame_timeout_s:g} s (queue option --frame-timeout)",
        )
        self.close("frame timeout")

    def _handshake_timed_out(self) -> None:
        if not self.ready and not self.closed:
            logger.warning(
                "connection from %s sent no HELLO within %.1f s; closing it",
                self.peer,
                self.server.config.handshake_timeout_s,
            )
            self.send_error("handshake_timeout", "no HELLO received in time")
            self.close("handshake timeout")

    def handle(self, frame: protocol.Frame) -> None:
        if not self.ready:
            self._handshake(frame)
            return
        match frame:
            case protocol.Publish():
                self._publish(frame)
            case protocol.Ack(positions):
                if self.member is None or self.group is None:
                    raise protocol.ProtocolError("ACK before JOIN")
                for partition, next_offset in positions:
                    self.group.ack(self.member, partition, next_offset)
            case protocol.Ping(nonce):
                self.send(protocol.encode(protocol.Pong(nonce)))
            case protocol.Join():
                self._join(frame)
            case protocol.Report():
                if self.member is None:
                    raise protocol.ProtocolError("REPORT before JOIN")
                try:
                    self.member.latency = LatencyHistogram.from_dict(frame.latency)
                    total = LatencyHistogram.from_dict(frame.latency_total)
                except ValueError as exc:
                    raise protocol.MalformedFrame(f"REPORT latency histogram: {exc}") from None
                if self.group is not None:
                    self.group.add_latency(self.member, total)
                self.member.retrying = frame.retrying
                self.member.processed = frame.processed
                self.member.failed = frame.failed
                self.member.pid = frame.pid
            case protocol.Leave():
                if self.member is not None and self.group is not None:
                    self.group.leave(self.member)
            case protocol.StatsRequest():
                self.send(protocol.encode(protocol.Stats(self.server.snapshot())))
            case protocol.Admin(operation, args):
                try:
                    result = admin.run(self.server, operation, args)
                except admin.AdminError as exc:
                    self._admin_failed(operation, exc)
                    return
                if inspect.iscoroutine(result):
                    task = asyncio.get_running_loop().create_task(
                        self._admin_later(operation, args, result)
                    )
                    self.server.track(task)
                    return
                self._admin_done(operation, args, result)
            case protocol.Hello():
                raise protocol.ProtocolError("HELLO sent twice on one connection")
            case _:
                raise protocol.ProtocolError(
                    f"a client may not send {type(frame).__name__.upper()} frames"
                )

    def _admin_failed(self, operation: str, error: Exception) -> None:
        logger.info("admin %s from %s failed: %s", operation, self.peer, error)
        self.send_error("admin_error", str(error), fatal=False)

    def _admin_done(self, operation: str, args: dict[str, Any], result: Any) -> None:
        if operation == "records.read":
            # Followers poll this every fraction of a second.
            logger.debug("admin %s %s from %s", operation, args, self.peer)
        else:
            logger.info("admin %s %s from %s", operation, args, self.peer)
        self.send(protocol.encode(protocol.AdminResult(result)))

    async def _admin_later(self, operation: str, args: dict[str, Any], pending: Any) -> None:
        """Send the result of an operation that waits, e.g. for positions to be saved."""
        try:
            result = await pending
        except admin.AdminError as exc:
            self._admin_failed(operation, exc)
            return
        except Exception as exc:
            logger.exception("admin %s from %s failed", operation, self.peer)
            self.send_error("internal_error", f"internal error in the queue: {type(exc).__name__}")
            self.close("internal error")
            return
        self._admin_done(operation, args, result)

    def _handshake(self, frame: protocol.Frame) -> None:
        if not isinstance(frame, protocol.Hello):
            raise protocol.ProtocolError(
                f"the first frame must be HELLO, got {type(frame).__name__.upper()}"
            )
        config = self.server.config
        if frame.protocol != protocol.PROTOCOL_VERSION:
            self.send_error(
                "unsupported_version",
                f"protocol version {frame.protocol} is not supported; this queue speaks "
                f"version {protocol.PROTOCOL_VERSION}",
            )
            self.close("unsupported protocol version")
            return
        if config.token is not None:
            offered = (frame.token or "").encode()
            if not hmac.compare_digest(offered, config.token.encode()):
                logger.warning("authentication failed for %s", self.peer)
                self.send_error(
                    "authentication_failed",
                    "missing or wrong token; pass the queue's token with --token or EVP_TOKEN",
                )
                self.close("authentication failed")
                return
        if frame.producer_id:
            producer = _parse_producer_id(frame.producer_id)
            if producer is None:
                self.send_error(
                    "invalid_producer_id",
                    f"producer id {frame.producer_id[:40]!r} is not 1 to 16 hexadecimal "
                    f"digits with a value above 0; let the client generate it",
                )
                self.close("invalid producer id")
                return
            self.producer = producer
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self.ready = True
        welcome = protocol.Welcome(
            server=f"evp/{__version__}",
            max_frame_bytes=config.max_frame_bytes,
            max_event_bytes=config.max_event_bytes,
            heartbeat_interval_ms=config.heartbeat_interval_ms,
            session_timeout_ms=config.session_timeout_ms,
        )
        self.send(protocol.encode(welcome))
        logger.debug("handshake with %s client=%s", self.peer, frame.client)

    def _publish(self, frame: protocol.Publish) -> None:
        server = self.server
        try:
            logs = server.publish(frame, self.producer)
        except InvalidEvent as exc:
            self.send_error("invalid_event", str(exc), seq=frame.seq, fatal=False)
            return
        except OSError as exc:
            server.storage_errors.report(frame.topic, exc)
            # A producer's later batches must not be stored before this one is: their
            # higher sequence numbers would make the queue skip this one's resend.
            # Closing drops the frames already read, and the producer resends them all,
            # in order, on its next connection.
            self.send_error(
                "storage_error",
                f"the queue could not write the batch: {os.strerror(exc.errno or 0)}; "
                f"it was not acknowledged, retry later",
                seq=frame.seq,
                fatal=bool(self.producer),
            )
            if self.producer:
                self.close("storage error with a producer id")
            return
        except OffsetOutOfRange as exc:  # pragma: no cover - a bug, not an input error
            logger.exception("offset out of range while publishing: %s", exc)
            raise
        if server.config.fsync == "always":
            server.request_sync(self, frame.seq, len(frame.entries), logs)
        else:
            self.send(protocol.encode(protocol.Published(frame.seq, len(frame.entries))))

    def _join(self, frame: protocol.Join) -> None:
        if self.member is not None:
            raise protocol.ProtocolError("JOIN sent twice on one connection")
        try:
            check_name("topic", frame.topic)
            check_name("group", frame.group)
        except StorageError as exc:
            self.send_error("invalid_name", str(exc))
            self.close("invalid name in JOIN")
            return
        if not frame.member or len(frame.member) > 200:
            self.send_error("invalid_member", f"invalid member id {frame.member!r}: use 1 to 200 characters")
            self.close("invalid member id")
            return
        limit = self.server.config.max_in_flight
        max_in_flight = min(max(1, frame.max_in_flight), limit)
        if frame.max_in_flight > limit:
            logger.warning(
                "member=%s from %s requested max_in_flight=%d, above the queue's "
                "--max-in-flight %d; it gets %d",
                frame.member,
                self.peer,
                frame.max_in_flight,
                limit,
                max_in_flight,
            )
        group = self.server.group(frame.topic, frame.group)
        existing = group.members.get(frame.member)
        live_s = 3 * self.server.config.heartbeat_interval_ms / 1000
        if existing is not None and time.monotonic() - existing.last_seen < live_s:
            # Two processors with the same --node would otherwise replace each other
            # on every reconnect. A restarted shard whose old connection is dead gets
            # in once that connection closes or goes silent.
            peer = getattr(existing.connection, "peer", "?")
            logger.warning(
                "rejected JOIN of member=%s from %s: the id is in use by a live connection from %s",
                frame.member,
                self.peer,
                peer,
            )
            self.send_error(
                "member_id_in_use",
                f"member id {frame.member!r} is in use by a live connection from {peer}; "
                f"give each processor on one host its own --node",
            )
            self.close("member id in use")
            return
        self.member = Member(frame.member, self, max_in_flight)
        self.group = group
        group.join(self.member)


async def serve(config: QueueConfig) -> None:
    """Run the queue until SIGINT or SIGTERM."""
    server = QueueServer(config)
    await server.start()
    heap.freeze_startup_objects()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop()


def run(config: QueueConfig) -> None:
    import uvloop

    uvloop.run(serve(config))
