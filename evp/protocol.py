"""The evp wire protocol: frames to bytes and bytes to frames, with no I/O.

Every frame is::

    u32  length   bytes after this field (1 + payload length), big-endian
    u8   type     one of the FrameType values
    ...  payload

Control frames (HELLO, WELCOME, ERROR, JOIN, ASSIGNED, STATS) carry a JSON object,
because they are rare and their fields grow over versions. Data frames (PUBLISH,
PUBLISHED, DELIVER, ACK) are binary, because they carry every event and their cost is
paid per event. A connection starts with HELLO from the client and WELCOME from the
server; the HELLO names the protocol version, and a server that does not support it
responds with an ERROR and closes.

The decoder enforces a maximum frame size before it buffers a frame, so a peer cannot
make the other side allocate more than that by announcing a large length. Any
malformed input raises a ProtocolError subclass; the caller sends an ERROR frame and
closes that connection only.

docs/protocol.md describes every frame field by field.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from dataclasses import dataclass, field
from typing import Any

import orjson

PROTOCOL_VERSION = 2

# 16 MiB: room for a batch of many events, and a bound on what one peer can make the
# other buffer. Kafka's default message.max.bytes is about 1 MiB per batch; evp batches
# more events per frame, so it allows more.
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024

LENGTH = struct.Struct(">I")
PUBLISH_HEADER = struct.Struct(">QHI")  # seq, topic_len, count
PUBLISH_ENTRY = struct.Struct(">HIQ")  # key_len, value_len, timestamp_us
PUBLISHED = struct.Struct(">QI")  # seq, count
DELIVER_HEADER = struct.Struct(">II")  # partition, count
ACK_COUNT = struct.Struct(">I")
ACK_ENTRY = struct.Struct(">IQ")  # partition, next offset
PING = struct.Struct(">Q")


class FrameType(enum.IntEnum):
    HELLO = 0x01
    WELCOME = 0x02
    ERROR = 0x03
    PING = 0x04
    PONG = 0x05
    PUBLISH = 0x10
    PUBLISHED = 0x11
    JOIN = 0x20
    ASSIGNED = 0x21
    DELIVER = 0x22
    ACK = 0x23
    LEAVE = 0x24
    REPORT = 0x25
    STATS_REQUEST = 0x30
    STATS = 0x31
    ADMIN = 0x32
    ADMIN_RESULT = 0x33


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid frame. The connection must close."""

    code = "protocol_error"


class FrameTooLarge(ProtocolError):
    code = "frame_too_large"


class UnknownFrameType(ProtocolError):
    code = "unknown_frame_type"


class MalformedFrame(ProtocolError):
    code = "malformed_frame"


class TruncatedFrame(ProtocolError):
    code = "truncated_frame"


# Frames. Each is a small dataclass; `encode` and `Decoder` convert them to and from
# bytes.


@dataclass(slots=True)
class Hello:
    protocol: int = PROTOCOL_VERSION
    client: str = ""
    token: str | None = None
    producer_id: str | None = None


@dataclass(slots=True)
class Welcome:
    protocol: int = PROTOCOL_VERSION
    server: str = ""
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_event_bytes: int = 0
    heartbeat_interval_ms: int = 1000
    session_timeout_ms: int = 10000


@dataclass(slots=True)
class Error:
    code: str
    message: str
    seq: int | None = None
    fatal: bool = True


@dataclass(slots=True)
class Ping:
    nonce: int = 0


@dataclass(slots=True)
class Pong:
    nonce: int = 0


@dataclass(slots=True)
class Publish:
    seq: int
    topic: str
    # (key, value, timestamp_us) per event; value is the event's JSON text.
    entries: list[tuple[bytes, bytes, int]]


@dataclass(slots=True)
class Published:
    seq: int
    count: int


@dataclass(slots=True)
class Join:
    topic: str
    group: str
    member: str
    max_in_flight: int


@dataclass(slots=True)
class Assigned:
    partitions: list[int]
    generation: int
    partition_count: int


@dataclass(slots=True)
class Deliver:
    partition: int
    count: int
    # Records in the format of evp.records, exactly as the log stores them.
    records: bytes


@dataclass(slots=True)
class Ack:
    # (partition, next offset): every offset below it in that partition is done.
    positions: list[tuple[int, int]]


@dataclass(slots=True)
class Leave:
    pass


@dataclass(slots=True)
class Report:
    """A shard's own counters, sent periodically so the queue can show them."""

    processed: int = 0
    failed: int = 0
    pid: int = 0
    # Latency from publish to processing: evp.metrics.LatencyHistogram.to_dict().
    latency: dict[str, int] = field(default_factory=dict)
    # The event the handler is retrying: partition, offset, key, attempt and error.
    retrying: dict[str, Any] | None = None
    # Every latency since the shard started, so the queue can keep monotonic counters.
    latency_total: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class Admin:
    """A topic or group administration request, e.g. operation "topics.list"."""

    operation: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class AdminResult:
    result: Any = None


@dataclass(slots=True)
class StatsRequest:
    pass


@dataclass(slots=True)
class Stats:
    snapshot: dict[str, Any] = field(default_factory=dict)


Frame = (
    Hello | Welcome | Error | Ping | Pong | Publish | Published | Join | Assigned | Deliver
    | Ack | Leave | Report | StatsRequest | Stats | Admin | AdminResult
)


# Encoding.


def _frame(frame_type: FrameType, payload: bytes) -> bytes:
    return LENGTH.pack(len(payload) + 1) + bytes((frame_type,)) + payload


def _json(frame_type: FrameType, obj: dict[str, Any]) -> bytes:
    return _frame(frame_type, orjson.dumps(obj))


def encode_publish(seq: int, topic: str, entries: list[tuple[bytes, bytes, int]]) -> bytes:
    topic_bytes = topic.encode()
    parts = [PUBLISH_HEADER.pack(seq, len(topic_bytes), len(entries)), topic_bytes]
    pack_entry = PUBLISH_ENTRY.pack
    for key, value, timestamp_us in entries:
        parts.append(pack_entry(len(key), len(value), timestamp_us))
        parts.append(key)
        parts.append(value)
    return _frame(FrameType.PUBLISH, b"".join(parts))


def encode_deliver(partition: int, count: int, records: bytes) -> bytes:
    header = DELIVER_HEADER.pack(partition, count)
    return LENGTH.pack(len(records) + 1 + DELIVER_HEADER.size) + b"\x22" + header + records


def encode_ack(positions: list[tuple[int, int]]) -> bytes:
    parts = [ACK_COUNT.pack(len(positions))]
    parts.extend(ACK_ENTRY.pack(partition, offset) for partition, offset in positions)
    return _frame(FrameType.ACK, b"".join(parts))


def encode(frame: Frame) -> bytes:
    """Encode any frame to its bytes on the wire."""
    match frame:
        case Publish(seq, topic, entries):
            return encode_publish(seq, topic, entries)
        case Deliver(partition, count, records):
            return encode_deliver(partition, count, records)
        case Ack(positions):
            return encode_ack(positions)
        case Published(seq, count):
            return _frame(FrameType.PUBLISHED, PUBLISHED.pack(seq, count))
        case Ping(nonce):
            return _frame(FrameType.PING, PING.pack(nonce))
        case Pong(nonce):
            return _frame(FrameType.PONG, PING.pack(nonce))
        case Hello():
            return _json(FrameType.HELLO, _fields(frame))
        case Welcome():
            return _json(FrameType.WELCOME, _fields(frame))
        case Error():
            return _json(FrameType.ERROR, _fields(frame))
        case Join():
            return _json(FrameType.JOIN, _fields(frame))
        case Assigned():
            return _json(FrameType.ASSIGNED, _fields(frame))
        case Report():
            return _json(FrameType.REPORT, _fields(frame))
        case Leave():
            return _frame(FrameType.LEAVE, b"")
        case StatsRequest():
            return _frame(FrameType.STATS_REQUEST, b"")
        case Stats(snapshot):
            return _json(FrameType.STATS, snapshot)
        case Admin():
            return _json(FrameType.ADMIN, _fields(frame))
        case AdminResult(result):
            return _json(FrameType.ADMIN_RESULT, {"result": result})
    raise TypeError(f"cannot encode {type(frame).__name__}: not a protocol frame")


def _fields(frame: Any) -> dict[str, Any]:
    return {name: getattr(frame, name) for name in frame.__slots__}


# Decoding.


def _parse_json(frame_type: FrameType, payload: bytes) -> dict[str, Any]:
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise MalformedFrame(f"{frame_type.name} payload is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise MalformedFrame(
            f"{frame_type.name} payload must be a JSON object, got {type(obj).__name__}"
        )
    return obj


def _build(cls: type, frame_type: FrameType, obj: dict[str, Any], types: dict[str, type]) -> Any:
    """Build a control frame from JSON, checking each field's presence and type.

    A field without a default is required and may not be null; a field whose default
    is None may be null; unknown fields are ignored, so later versions can add some.
    """
    kwargs = {}
    missing = []
    for spec in dataclasses.fields(cls):
        name = spec.name
        required = spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING
        if name not in obj:
            if required:
                missing.append(name)
            continue
        value = obj[name]
        expected = types[name]
        if value is None:
            if spec.default is not None:
                raise MalformedFrame(
                    f"{frame_type.name} field {name!r} must be {expected.__name__}, got null"
                )
        elif not isinstance(value, expected) or (expected is int and type(value) is bool):
            raise MalformedFrame(
                f"{frame_type.name} field {name!r} must be {expected.__name__}, "
                f"got {type(value).__name__}"
            )
        kwargs[name] = value
    if missing:
        raise MalformedFrame(f"{frame_type.name} is missing fields {missing}")
    return cls(**kwargs)


_CONTROL_FIELDS: dict[FrameType, tuple[type, dict[str, type]]] = {
    FrameType.HELLO: (
        Hello,
        {"protocol": int, "client": str, "token": str, "producer_id": str},
    ),
    FrameType.WELCOME: (
        Welcome,
        {
            "protocol": int,
            "server": str,
            "max_frame_bytes": int,
            "max_event_bytes": int,
            "heartbeat_interval_ms": int,
            "session_timeout_ms": int,
        },
    ),
    FrameType.ERROR: (Error, {"code": str, "message": str, "seq": int, "fatal": bool}),
    FrameType.JOIN: (
        Join,
        {"topic": str, "group": str, "member": str, "max_in_flight": int},
    ),
    FrameType.REPORT: (
        Report,
        {
            "processed": int,
            "failed": int,
            "pid": int,
            "latency": dict,
            "retrying": dict,
            "latency_total": dict,
        },
    ),
    FrameType.ADMIN: (Admin, {"operation": str, "args": dict}),
    FrameType.ASSIGNED: (
        Assigned,
        {"partitions": list, "generation": int, "partition_count": int},
    ),
}


def _parse_publish(payload: bytes) -> Publish:
    if len(payload) < PUBLISH_HEADER.size:
        raise MalformedFrame(
            f"PUBLISH payload of {len(payload)} bytes is shorter than its "
            f"{PUBLISH_HEADER.size}-byte header"
        )
    seq, topic_len, count = PUBLISH_HEADER.unpack_from(payload)
    position = PUBLISH_HEADER.size
    end = len(payload)
    if position + topic_len > end:
        raise MalformedFrame(f"PUBLISH topic length {topic_len} runs past the end of the frame")
    try:
        topic = str(payload[position : position + topic_len], "utf-8")
    except UnicodeDecodeError:
        raise MalformedFrame("PUBLISH topic is not valid UTF-8") from None
    position += topic_len
    # Each entry takes at least its header, so a count larger than that is a lie that
    # would otherwise make the loop below allocate for nothing.
    if count * PUBLISH_ENTRY.size > end - position:
        raise MalformedFrame(
            f"PUBLISH declares {count} events but has only {end - position} bytes for them"
        )
    entries: list[tuple[bytes, bytes, int]] = []
    append = entries.append
    unpack_entry = PUBLISH_ENTRY.unpack_from
    entry_size = PUBLISH_ENTRY.size
    for index in range(count):
        if position + entry_size > end:
            raise MalformedFrame(f"PUBLISH event {index} header runs past the end of the frame")
        key_len, value_len, timestamp_us = unpack_entry(payload, position)
        position += entry_size
        key_end = position + key_len
        value_end = key_end + value_len
        if value_end > end:
            raise MalformedFrame(
                f"PUBLISH event {index} declares {key_len} key bytes and {value_len} "
                f"value bytes, which run past the end of the frame"
            )
        append(
            (
                payload[position:key_end],
                payload[key_end:value_end],
                timestamp_us,
            )
        )
        position = value_end
    if position != end:
        raise MalformedFrame(f"PUBLISH has {end - position} bytes after its last event")
    return Publish(seq, topic, entries)


def _parse_deliver(payload: bytes) -> Deliver:
    if len(payload) < DELIVER_HEADER.size:
        raise MalformedFrame(
            f"DELIVER payload of {len(payload)} bytes is shorter than its "
            f"{DELIVER_HEADER.size}-byte header"
        )
    partition, count = DELIVER_HEADER.unpack_from(payload)
    return Deliver(partition, count, payload[DELIVER_HEADER.size :])


def _parse_ack(payload: bytes) -> Ack:
    if len(payload) < ACK_COUNT.size:
        raise MalformedFrame("ACK payload is shorter than its 4-byte count")
    (count,) = ACK_COUNT.unpack_from(payload)
    expected = ACK_COUNT.size + count * ACK_ENTRY.size
    if len(payload) != expected:
        raise MalformedFrame(
            f"ACK declares {count} positions ({expected} bytes) but has {len(payload)} bytes"
        )
    positions = [
        ACK_ENTRY.unpack_from(payload, ACK_COUNT.size + index * ACK_ENTRY.size)
        for index in range(count)
    ]
    return Ack(positions)


def _parse_fixed(frame_type: FrameType, payload: bytes, layout: struct.Struct) -> tuple:
    if len(payload) != layout.size:
        raise MalformedFrame(
            f"{frame_type.name} payload must be {layout.size} bytes, got {len(payload)}"
        )
    return layout.unpack(payload)


_DELIVER, _ACK, _PUBLISH = int(FrameType.DELIVER), int(FrameType.ACK), int(FrameType.PUBLISH)


def parse(frame_type: int, payload: bytes) -> Frame:
    """Parse one frame's payload. Raises a ProtocolError subclass when it is invalid."""
    # The frames of the event path first, without building the enum member.
    if frame_type == _DELIVER:
        return _parse_deliver(payload)
    if frame_type == _ACK:
        return _parse_ack(payload)
    if frame_type == _PUBLISH:
        return _parse_publish(payload)
    try:
        kind = FrameType(frame_type)
    except ValueError:
        raise UnknownFrameType(
            f"unknown frame type 0x{frame_type:02x}; this side speaks protocol "
            f"version {PROTOCOL_VERSION}"
        ) from None
    if kind is FrameType.PUBLISH:
        return _parse_publish(payload)
    if kind is FrameType.DELIVER:
        return _parse_deliver(payload)
    if kind is FrameType.ACK:
        return _parse_ack(payload)
    if kind is FrameType.PUBLISHED:
        return Published(*_parse_fixed(kind, payload, PUBLISHED))
    if kind is FrameType.PING:
        return Ping(*_parse_fixed(kind, payload, PING))
    if kind is FrameType.PONG:
        return Pong(*_parse_fixed(kind, payload, PING))
    if kind in (FrameType.LEAVE, FrameType.STATS_REQUEST):
        if len(payload):
            raise MalformedFrame(f"{kind.name} must have an empty payload, got {len(payload)} bytes")
        return Leave() if kind is FrameType.LEAVE else StatsRequest()
    obj = _parse_json(kind, payload)
    if kind is FrameType.STATS:
        return Stats(obj)
    if kind is FrameType.ADMIN_RESULT:
        return AdminResult(obj.get("result"))
    cls, types = _CONTROL_FIELDS[kind]
    frame = _build(cls, kind, obj, types)
    if kind is FrameType.ASSIGNED and not all(type(p) is int for p in frame.partitions):
        raise MalformedFrame("ASSIGNED field 'partitions' must be a list of integers")
    return frame


class Decoder:
    """Split a byte stream into frames.

    Feed it bytes as they arrive, in pieces of any size; `feed` returns every frame
    completed so far. At the end of the stream call `close`, which raises
    TruncatedFrame if a frame was cut off.
    """

    def __init__(
        self,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        first_frame_max_bytes: int | None = None,
    ) -> None:
        self.max_frame_bytes = max_frame_bytes
        # A lower limit for the first frame only. The queue sets it, because the first
        # frame must be HELLO, and an unauthenticated peer should not make it buffer
        # a full-size frame.
        self.first_frame_max_bytes = first_frame_max_bytes
        self._buffer = bytearray()
        self._error: ProtocolError | None = None

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer)

    @property
    def error(self) -> ProtocolError | None:
        """The error found after the frames the last `feed` returned, if any."""
        return self._error

    def feed(self, data: bytes) -> list[Frame]:
        """Return the frames completed by `data`.

        When the stream turns invalid after some valid frames, those frames are
        returned first and the error is raised by the next call (and kept in `error`),
        so a peer's last valid frames are not lost to its first invalid one.
        """
        if self._error is not None:
            raise self._error
        buffer = self._buffer
        buffer += data
        frames: list[Frame] = []
        position = 0
        try:
            position = self._split(buffer, frames)
        except ProtocolError as exc:
            self._error = exc
            buffer.clear()
            if not frames:
                raise
            return frames
        if position:
            del buffer[:position]
        return frames

    def _split(self, buffer: bytearray, frames: list[Frame]) -> int:
        position = 0
        available = len(buffer)
        while available - position >= 4:
            (length,) = LENGTH.unpack_from(buffer, position)
            if length == 0:
                raise MalformedFrame("frame length 0: a frame needs at least its type byte")
            if self.first_frame_max_bytes is not None and length > self.first_frame_max_bytes:
                raise FrameTooLarge(
                    f"frame length {length} exceeds the limit of {self.first_frame_max_bytes} "
                    f"bytes for the first frame of a connection, which must be HELLO"
                )
            if length > self.max_frame_bytes:
                raise FrameTooLarge(
                    f"frame length {length} exceeds the limit of {self.max_frame_bytes} bytes"
                )
            end = position + 4 + length
            if end > available:
                break
            frame_type = buffer[position + 4]
            payload = bytes(buffer[position + 5 : end])
            frames.append(parse(frame_type, payload))
            self.first_frame_max_bytes = None
            position = end
        return position

    def close(self) -> None:
        """Declare the end of the stream; raise TruncatedFrame if bytes are left over."""
        if self._buffer:
            left = len(self._buffer)
            self._buffer.clear()
            raise TruncatedFrame(
                f"connection closed in the middle of a frame ({left} bytes of it received)"
            )
