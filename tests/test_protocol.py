"""Tests for evp.protocol, the sans-I/O wire codec: bytes in, frames out, no sockets."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evp import protocol, records
from evp.protocol import (
    LENGTH,
    Decoder,
    FrameTooLarge,
    FrameType,
    MalformedFrame,
    ProtocolError,
    TruncatedFrame,
    UnknownFrameType,
)

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1


def frame_type_of(frame: protocol.Frame) -> FrameType:
    return FrameType(protocol.encode(frame)[4])


def raw_frame(frame_type: int, payload: bytes) -> bytes:
    """Build a frame by hand, so tests can send payloads that `encode` never makes."""
    return LENGTH.pack(len(payload) + 1) + bytes((frame_type,)) + payload


def publish_payload(
    seq: int, topic: bytes, count: int, entries: list[tuple[bytes, bytes, int]]
) -> bytes:
    """Build a PUBLISH payload whose declared count may differ from its entries."""
    parts = [protocol.PUBLISH_HEADER.pack(seq, len(topic), count), topic]
    for key, value, timestamp_us in entries:
        parts.append(protocol.PUBLISH_ENTRY.pack(len(key), len(value), timestamp_us))
        parts.append(key)
        parts.append(value)
    return b"".join(parts)


def decode_all(data: bytes, max_frame_bytes: int = protocol.DEFAULT_MAX_FRAME_BYTES) -> list:
    decoder = Decoder(max_frame_bytes)
    frames = decoder.feed(data)
    decoder.close()
    return frames


# One or more instances of every frame class, with edge values: empty lists and keys,
# the smallest and largest integers each field holds, and non-ASCII text.
SAMPLES: list[tuple[str, protocol.Frame]] = [
    ("hello-default", protocol.Hello()),
    (
        "hello-full",
        protocol.Hello(protocol=1, client="évp/0.1 客户端", token="s3cret", producer_id="p-1"),
    ),
    ("hello-version-99", protocol.Hello(protocol=99)),
    ("welcome-default", protocol.Welcome()),
    (
        "welcome-full",
        protocol.Welcome(
            protocol=1,
            server="evp/0.1.0",
            max_frame_bytes=U32_MAX,
            max_event_bytes=0,
            heartbeat_interval_ms=1,
            session_timeout_ms=U64_MAX,
        ),
    ),
    ("error-fatal", protocol.Error("frame_too_large", "frame length 9 exceeds the limit")),
    ("error-seq-0", protocol.Error("invalid_event", "event 0 is invalid", seq=0, fatal=False)),
    ("error-seq-max", protocol.Error("storage_error", "disk full ✗", seq=U64_MAX, fatal=False)),
    ("ping-0", protocol.Ping(0)),
    ("ping-max", protocol.Ping(U64_MAX)),
    ("pong-0", protocol.Pong(0)),
    ("pong-max", protocol.Pong(U64_MAX)),
    ("publish-empty", protocol.Publish(0, "events", [])),
    ("publish-empty-topic", protocol.Publish(1, "", [(b"k", b"{}", 1)])),
    (
        "publish-edges",
        protocol.Publish(
            U64_MAX,
            "tópico-事件-🚀",
            [
                (b"", b'{"a":1}', 0),
                ("ключ".encode(), "{\"é\":\"✓\"}".encode(), U64_MAX),
                (b"k" * 300, b"", 1_700_000_000_000_000),
            ],
        ),
    ),
    ("published-0", protocol.Published(0, 0)),
    ("published-max", protocol.Published(U64_MAX, U32_MAX)),
    ("join", protocol.Join("events", "default", "node-ü/shard-0", 1)),
    ("join-max", protocol.Join("t", "g", "m", U64_MAX)),
    ("assigned-empty", protocol.Assigned([], 0, 1)),
    ("assigned", protocol.Assigned([0, 5, 4095], 7, 4096)),
    ("deliver-empty", protocol.Deliver(0, 0, b"")),
    (
        "deliver-records",
        protocol.Deliver(
            U32_MAX,
            2,
            records.encode(0, 1, b"", b"{}") + records.encode(U64_MAX, U64_MAX, b"k", b'{"a":1}'),
        ),
    ),
    ("ack-empty", protocol.Ack([])),
    ("ack", protocol.Ack([(0, 0), (U32_MAX, U64_MAX), (7, 42)])),
    ("leave", protocol.Leave()),
    ("stats-request", protocol.StatsRequest()),
    ("stats-empty", protocol.Stats({})),
    ("stats", protocol.Stats({"topics": [{"name": "ü", "events": U64_MAX}], "time": 1.5})),
    ("report-empty", protocol.Report()),
    (
        "report",
        protocol.Report(
            processed=U64_MAX,
            failed=0,
            pid=1,
            latency={"p50": 3, "ü": 0},
            retrying={"partition": 1, "offset": 2, "key": "k", "attempt": 1, "error": "E"},
        ),
    ),
    ("admin", protocol.Admin("topics.describe", {"name": "events"})),
    ("admin-no-args", protocol.Admin("topics.list")),
    ("admin-result", protocol.AdminResult([{"name": "ü", "partitions": 64}])),
    ("admin-result-empty", protocol.AdminResult()),
]

SAMPLE_IDS = [name for name, _ in SAMPLES]
SAMPLE_FRAMES = [frame for _, frame in SAMPLES]


# Round trips.


def test_samples_cover_every_frame_type():
    sampled = {frame_type_of(frame) for frame in SAMPLE_FRAMES}
    assert sampled == set(FrameType)


@pytest.mark.parametrize("frame", SAMPLE_FRAMES, ids=SAMPLE_IDS)
def test_round_trip_whole(frame):
    decoder = Decoder()
    assert decoder.feed(protocol.encode(frame)) == [frame]
    assert decoder.buffered_bytes == 0


@pytest.mark.parametrize("frame", SAMPLE_FRAMES, ids=SAMPLE_IDS)
def test_length_prefix_counts_type_and_payload(frame):
    data = protocol.encode(frame)
    (length,) = LENGTH.unpack_from(data)
    assert length == len(data) - 4


@pytest.mark.parametrize("frame", SAMPLE_FRAMES, ids=SAMPLE_IDS)
def test_round_trip_split_everywhere(frame):
    data = protocol.encode(frame)
    for split in range(len(data)):
        decoder = Decoder()
        assert decoder.feed(data[:split]) == [], f"frame completed early at split {split}"
        assert decoder.buffered_bytes == split
        assert decoder.feed(data[split:]) == [frame], f"wrong frame at split {split}"
        assert decoder.buffered_bytes == 0


@pytest.mark.parametrize("frame", SAMPLE_FRAMES, ids=SAMPLE_IDS)
def test_round_trip_byte_by_byte(frame):
    data = protocol.encode(frame)
    decoder = Decoder()
    frames = []
    for index in range(len(data)):
        frames.extend(decoder.feed(data[index : index + 1]))
    assert frames == [frame]
    assert decoder.buffered_bytes == 0
    decoder.close()


@pytest.mark.parametrize("frame", SAMPLE_FRAMES, ids=SAMPLE_IDS)
def test_trailing_bytes_stay_buffered(frame):
    data = protocol.encode(frame)
    following = protocol.Publish(3, "next", [(b"key", b'{"n":1}', 9)])
    next_data = protocol.encode(following)
    for cut in range(1, len(next_data)):
        decoder = Decoder()
        assert decoder.feed(data + next_data[:cut]) == [frame]
        assert decoder.buffered_bytes == cut, f"wrong buffer after {cut} trailing bytes"
        assert decoder.feed(next_data[cut:]) == [following]
        assert decoder.buffered_bytes == 0


def test_many_frames_in_one_feed():
    data = b"".join(protocol.encode(frame) for frame in SAMPLE_FRAMES)
    assert decode_all(data) == SAMPLE_FRAMES


def test_many_frames_byte_by_byte():
    data = b"".join(protocol.encode(frame) for frame in SAMPLE_FRAMES)
    decoder = Decoder()
    frames = []
    for index in range(len(data)):
        frames.extend(decoder.feed(data[index : index + 1]))
    assert frames == SAMPLE_FRAMES


def test_encode_rejects_non_frame():
    with pytest.raises(TypeError, match="cannot encode str: not a protocol frame"):
        protocol.encode("HELLO")  # type: ignore[arg-type]


# Framing errors.


@pytest.mark.parametrize("frame_type", [0x00, 0x06, 0x7F, 0xFF])
def test_unknown_frame_type(frame_type):
    with pytest.raises(UnknownFrameType, match=f"unknown frame type 0x{frame_type:02x}"):
        Decoder().feed(raw_frame(frame_type, b"payload"))


def test_unknown_frame_type_code():
    assert UnknownFrameType.code == "unknown_frame_type"


def test_length_zero():
    with pytest.raises(MalformedFrame, match="frame length 0"):
        Decoder().feed(b"\x00\x00\x00\x00")


def test_too_large_before_body():
    decoder = Decoder(max_frame_bytes=1024)
    with pytest.raises(FrameTooLarge, match="frame length 1025 exceeds the limit of 1024 bytes"):
        decoder.feed(LENGTH.pack(1025))


def test_too_large_prefix_byte_by_byte():
    decoder = Decoder(max_frame_bytes=1024)
    prefix = LENGTH.pack(U32_MAX)
    for byte in prefix[:3]:
        assert decoder.feed(bytes((byte,))) == []
    with pytest.raises(FrameTooLarge, match=f"frame length {U32_MAX} exceeds the limit of 1024"):
        decoder.feed(prefix[3:])


def test_too_large_default_limit():
    limit = protocol.DEFAULT_MAX_FRAME_BYTES
    with pytest.raises(FrameTooLarge, match=f"exceeds the limit of {limit} bytes"):
        Decoder().feed(LENGTH.pack(limit + 1))


def test_too_large_after_valid_frame():
    decoder = Decoder(max_frame_bytes=1024)
    frames = decoder.feed(protocol.encode(protocol.Ping(1)) + LENGTH.pack(4096))
    assert frames == [protocol.Ping(1)]
    assert isinstance(decoder.error, FrameTooLarge)
    with pytest.raises(FrameTooLarge, match="frame length 4096"):
        decoder.feed(b"")


def test_first_frame_limit():
    decoder = Decoder(max_frame_bytes=4096, first_frame_max_bytes=64)
    with pytest.raises(FrameTooLarge, match="limit of 64 bytes for the first frame"):
        decoder.feed(LENGTH.pack(65))


def test_first_frame_limit_then_full_limit():
    decoder = Decoder(max_frame_bytes=4096, first_frame_max_bytes=64)
    big = protocol.Deliver(1, 0, b"r" * 1000)
    # The first frame fits the small limit; the frames after it get the full limit.
    data = protocol.encode(protocol.Ping(1)) + protocol.encode(big)
    assert decoder.feed(data) == [protocol.Ping(1), big]
    assert decoder.first_frame_max_bytes is None


def test_frame_of_exactly_max_bytes():
    limit = 1024
    # A DELIVER frame's length field counts the type byte, the 8-byte header and records.
    frame = protocol.Deliver(1, 0, b"r" * (limit - 1 - protocol.DELIVER_HEADER.size))
    data = protocol.encode(frame)
    assert LENGTH.unpack_from(data) == (limit,)
    assert decode_all(data, max_frame_bytes=limit) == [frame]


def test_frame_one_over_max_bytes():
    limit = 1024
    frame = protocol.Deliver(1, 0, b"r" * (limit - protocol.DELIVER_HEADER.size))
    with pytest.raises(FrameTooLarge, match=f"frame length {limit + 1} exceeds"):
        Decoder(max_frame_bytes=limit).feed(protocol.encode(frame))


def test_truncated_frame_on_close():
    data = protocol.encode(protocol.Publish(1, "t", [(b"k", b"{}", 0)]))
    decoder = Decoder()
    assert decoder.feed(data[:-1]) == []
    with pytest.raises(TruncatedFrame, match=rf"\({len(data) - 1} bytes of it received\)"):
        decoder.close()


def test_truncated_prefix_on_close():
    decoder = Decoder()
    decoder.feed(b"\x00\x00")
    with pytest.raises(TruncatedFrame, match="in the middle of a frame"):
        decoder.close()


def test_close_after_whole_frames():
    decoder = Decoder()
    decoder.feed(protocol.encode(protocol.Ping(5)))
    decoder.close()
    assert decoder.buffered_bytes == 0


def test_error_codes_are_distinct():
    classes = [ProtocolError, FrameTooLarge, UnknownFrameType, MalformedFrame, TruncatedFrame]
    codes = [cls.code for cls in classes]
    assert len(set(codes)) == len(codes)


# Binary payload errors.


def test_publish_shorter_than_header():
    data = raw_frame(FrameType.PUBLISH, b"\x00" * 5)
    with pytest.raises(MalformedFrame, match="PUBLISH payload of 5 bytes is shorter"):
        decode_all(data)


def test_publish_topic_past_end():
    payload = protocol.PUBLISH_HEADER.pack(1, 50, 0) + b"short"
    with pytest.raises(MalformedFrame, match="PUBLISH topic length 50 runs past the end"):
        decode_all(raw_frame(FrameType.PUBLISH, payload))


def test_publish_count_over_bytes():
    payload = publish_payload(1, b"t", 5, [(b"k", b"{}", 0)])
    with pytest.raises(MalformedFrame, match="PUBLISH declares 5 events but has only"):
        decode_all(raw_frame(FrameType.PUBLISH, payload))


def test_publish_count_huge():
    payload = publish_payload(1, b"t", U32_MAX, [])
    with pytest.raises(MalformedFrame, match=f"PUBLISH declares {U32_MAX} events"):
        decode_all(raw_frame(FrameType.PUBLISH, payload))


def test_publish_count_one_too_many():
    # Room for the second entry's header by byte count, but the first entry's value
    # uses those bytes, so the second header runs past the end.
    payload = publish_payload(1, b"t", 2, [(b"", b"x" * 30, 0)])
    with pytest.raises(MalformedFrame, match="PUBLISH event 1 header runs past the end"):
        decode_all(raw_frame(FrameType.PUBLISH, payload))


def test_publish_count_too_small():
    payload = publish_payload(1, b"t", 1, [(b"a", b"{}", 0), (b"b", b"{}", 0)])
    with pytest.raises(MalformedFrame, match=r"PUBLISH has \d+ bytes after its last event"):
        decode_all(raw_frame(FrameType.PUBLISH, payload))


def test_publish_entry_past_end():
    header = protocol.PUBLISH_HEADER.pack(1, 1, 1) + b"t"
    entry = protocol.PUBLISH_ENTRY.pack(3, 100, 0) + b"key" + b"{}"
    with pytest.raises(
        MalformedFrame, match="PUBLISH event 0 declares 3 key bytes and 100 value bytes"
    ):
        decode_all(raw_frame(FrameType.PUBLISH, header + entry))


def test_publish_trailing_bytes():
    payload = publish_payload(1, b"t", 1, [(b"k", b"{}", 0)]) + b"xy"
    with pytest.raises(MalformedFrame, match="PUBLISH has 2 bytes after its last event"):
        decode_all(raw_frame(FrameType.PUBLISH, payload))


def test_publish_topic_invalid_utf8():
    payload = publish_payload(1, b"\xff\xfe", 0, [])
    with pytest.raises(MalformedFrame, match="PUBLISH topic is not valid UTF-8"):
        decode_all(raw_frame(FrameType.PUBLISH, payload))


def test_ack_shorter_than_count():
    with pytest.raises(MalformedFrame, match="ACK payload is shorter than its 4-byte count"):
        decode_all(raw_frame(FrameType.ACK, b"\x00\x00"))


@pytest.mark.parametrize(
    ("count", "body_bytes"),
    [(2, 12), (1, 0), (0, 12), (1, 11), (1, 13)],
    ids=["count-over", "no-positions", "count-under", "short-position", "long-position"],
)
def test_ack_wrong_size(count, body_bytes):
    # Each position is 12 bytes: a u32 partition and a u64 next offset.
    payload = protocol.ACK_COUNT.pack(count) + b"\x00" * body_bytes
    expected = 4 + count * 12
    with pytest.raises(
        MalformedFrame,
        match=rf"ACK declares {count} positions \({expected} bytes\) but has {len(payload)} bytes",
    ):
        decode_all(raw_frame(FrameType.ACK, payload))


@pytest.mark.parametrize("frame_type", [FrameType.PING, FrameType.PONG, FrameType.PUBLISHED])
@pytest.mark.parametrize("delta", [-1, 1])
def test_fixed_frame_wrong_size(frame_type, delta):
    size = {FrameType.PING: 8, FrameType.PONG: 8, FrameType.PUBLISHED: 12}[frame_type]
    payload = b"\x00" * (size + delta)
    with pytest.raises(
        MalformedFrame, match=f"{frame_type.name} payload must be {size} bytes, got {size + delta}"
    ):
        decode_all(raw_frame(frame_type, payload))


@pytest.mark.parametrize("frame_type", [FrameType.LEAVE, FrameType.STATS_REQUEST])
def test_empty_frame_with_payload(frame_type):
    with pytest.raises(MalformedFrame, match=f"{frame_type.name} must have an empty payload"):
        decode_all(raw_frame(frame_type, b"x"))


def test_deliver_shorter_than_header():
    with pytest.raises(MalformedFrame, match="DELIVER payload of 7 bytes is shorter"):
        decode_all(raw_frame(FrameType.DELIVER, b"\x00" * 7))


# JSON control frame errors.

# Frame types whose payload is a JSON object with typed fields.
CONTROL_TYPES = [
    FrameType.HELLO,
    FrameType.WELCOME,
    FrameType.ERROR,
    FrameType.JOIN,
    FrameType.ASSIGNED,
]
if hasattr(FrameType, "REPORT"):
    CONTROL_TYPES.append(FrameType.REPORT)
JSON_TYPES = [*CONTROL_TYPES, FrameType.STATS]


@pytest.mark.parametrize("frame_type", JSON_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize(
    "payload", [b"", b"{", b'{"protocol": 1,}', b"\xff\xfe", b"NaN"], ids=repr
)
def test_json_invalid(frame_type, payload):
    with pytest.raises(MalformedFrame, match=f"{frame_type.name} payload is not valid JSON"):
        decode_all(raw_frame(frame_type, payload))


@pytest.mark.parametrize("frame_type", JSON_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize(
    ("payload", "type_name"),
    [(b"[]", "list"), (b"1", "int"), (b'"hello"', "str"), (b"null", "NoneType")],
)
def test_json_not_object(frame_type, payload, type_name):
    with pytest.raises(
        MalformedFrame, match=f"{frame_type.name} payload must be a JSON object, got {type_name}"
    ):
        decode_all(raw_frame(frame_type, payload))


@pytest.mark.parametrize(
    ("frame_type", "obj", "field", "expected", "got"),
    [
        (FrameType.HELLO, {"protocol": "1"}, "protocol", "int", "str"),
        (FrameType.HELLO, {"protocol": 1.0}, "protocol", "int", "float"),
        (FrameType.HELLO, {"token": 12345}, "token", "str", "int"),
        (FrameType.HELLO, {"client": ["evp"]}, "client", "str", "list"),
        (FrameType.WELCOME, {"max_frame_bytes": "16M"}, "max_frame_bytes", "int", "str"),
        (FrameType.ERROR, {"code": "x", "message": "y", "fatal": 1}, "fatal", "bool", "int"),
        (FrameType.ERROR, {"code": 3, "message": "y"}, "code", "str", "int"),
        (
            FrameType.JOIN,
            {"topic": "t", "group": "g", "member": "m", "max_in_flight": "10"},
            "max_in_flight",
            "int",
            "str",
        ),
        (
            FrameType.ASSIGNED,
            {"partitions": {}, "generation": 1, "partition_count": 1},
            "partitions",
            "list",
            "dict",
        ),
    ],
    ids=lambda value: value.name if isinstance(value, FrameType) else None,
)
def test_json_field_wrong_type(frame_type, obj, field, expected, got):
    with pytest.raises(
        MalformedFrame,
        match=f"{frame_type.name} field '{field}' must be {expected}, got {got}",
    ):
        decode_all(raw_frame(frame_type, orjson.dumps(obj)))


@pytest.mark.parametrize(
    ("frame_type", "obj"),
    [
        (FrameType.HELLO, {"protocol": True}),
        (FrameType.WELCOME, {"max_frame_bytes": False}),
        (FrameType.JOIN, {"topic": "t", "group": "g", "member": "m", "max_in_flight": True}),
        (FrameType.ASSIGNED, {"partitions": [], "generation": True, "partition_count": 1}),
    ],
    ids=["hello-protocol", "welcome-max-frame", "join-max-in-flight", "assigned-generation"],
)
def test_json_bool_for_int_field(frame_type, obj):
    # JSON true is not a number. Python's bool is an int subclass, so an isinstance check
    # alone lets HELLO {"protocol": true} pass as protocol version 1.
    with pytest.raises(MalformedFrame, match=f"{frame_type.name} field '.+' must be int, got bool"):
        decode_all(raw_frame(frame_type, orjson.dumps(obj)))


@pytest.mark.parametrize(
    ("frame_type", "obj"),
    [
        (FrameType.ERROR, {"code": None, "message": None}),
        (FrameType.JOIN, {"topic": None, "group": "g", "member": "m", "max_in_flight": 1}),
        (FrameType.JOIN, {"topic": "t", "group": "g", "member": "m", "max_in_flight": None}),
        (FrameType.ASSIGNED, {"partitions": None, "generation": 1, "partition_count": 1}),
    ],
    ids=["error-code", "join-topic", "join-max-in-flight", "assigned-partitions"],
)
def test_json_null_for_required_field(frame_type, obj):
    # Only HELLO's token and producer_id and ERROR's seq may be null. A JOIN with a null
    # topic must fail here, in the codec, and not later inside the queue.
    with pytest.raises(MalformedFrame, match=f"{frame_type.name} field '.+' must be"):
        decode_all(raw_frame(frame_type, orjson.dumps(obj)))


@pytest.mark.parametrize(
    ("frame_type", "obj", "missing"),
    [
        (FrameType.ERROR, {"code": "x"}, ["message"]),
        (FrameType.ERROR, {}, ["code", "message"]),
        (FrameType.JOIN, {"topic": "t", "group": "g"}, ["member", "max_in_flight"]),
        (FrameType.ASSIGNED, {"partitions": [1]}, ["generation", "partition_count"]),
    ],
    ids=["error-message", "error-empty", "join", "assigned"],
)
def test_json_missing_fields(frame_type, obj, missing):
    with pytest.raises(MalformedFrame, match=f"{frame_type.name} is missing fields") as caught:
        decode_all(raw_frame(frame_type, orjson.dumps(obj)))
    for name in missing:
        assert repr(name) in str(caught.value)


def test_missing_fields_omits_optional():
    # ERROR's seq and fatal have defaults, so the message must not call them missing.
    with pytest.raises(MalformedFrame, match=r"ERROR is missing fields \['message'\]$"):
        decode_all(raw_frame(FrameType.ERROR, b'{"code": "x"}'))


def test_json_optional_fields_default():
    frame = decode_all(raw_frame(FrameType.HELLO, b"{}"))[0]
    assert frame == protocol.Hello()


def test_json_unknown_fields_ignored():
    payload = orjson.dumps({"protocol": 1, "client": "c", "compression": "zstd"})
    frame = decode_all(raw_frame(FrameType.HELLO, payload))[0]
    assert frame == protocol.Hello(protocol=1, client="c")


def test_assigned_partitions_not_ints():
    payload = orjson.dumps({"partitions": [1, "2"], "generation": 1, "partition_count": 4})
    with pytest.raises(
        MalformedFrame, match="ASSIGNED field 'partitions' must be a list of integers"
    ):
        decode_all(raw_frame(FrameType.ASSIGNED, payload))


def test_json_integer_over_64_bits():
    payload = b'{"code": "x", "message": "y", "seq": 18446744073709551616}'
    # orjson 3.13 reads such an integer as a float. Either way it is not a valid u64 seq.
    with pytest.raises(
        MalformedFrame, match=r"^ERROR (payload is not valid JSON|field 'seq' must be int)"
    ):
        decode_all(raw_frame(FrameType.ERROR, payload))


def test_json_deeply_nested():
    payload = b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}"
    with pytest.raises(MalformedFrame, match="STATS payload is not valid JSON"):
        decode_all(raw_frame(FrameType.STATS, payload))


# Property: any input ends in frames or a ProtocolError, never another exception.

ENCODED_SAMPLES = [protocol.encode(frame) for frame in SAMPLE_FRAMES]


@st.composite
def mutated_stream(draw: st.DrawFn) -> bytes:
    """Concatenate valid frames, then change them by byte flips, insertions and deletions."""
    frames = draw(st.lists(st.sampled_from(ENCODED_SAMPLES), min_size=1, max_size=4))
    data = bytearray(b"".join(frames))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "insert", "delete"]))
        if kind == "insert" or not data:
            position = draw(st.integers(0, len(data)))
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "flip":
            position = draw(st.integers(0, len(data) - 1))
            data[position] ^= 1 << draw(st.integers(0, 7))
        else:
            position = draw(st.integers(0, len(data) - 1))
            del data[position : position + draw(st.integers(1, 4))]
    return bytes(data)


def feed_in_pieces(data: bytes, splits: list[int], max_frame_bytes: int) -> list:
    """Feed `data` cut at `splits` and return the frames. Raises ProtocolError."""
    decoder = Decoder(max_frame_bytes)
    frames = []
    start = 0
    for end in [*sorted(split % (len(data) + 1) for split in splits), len(data)]:
        frames.extend(decoder.feed(data[start:end]))
        start = max(start, end)
    decoder.close()
    return frames


SPLITS = st.lists(st.integers(0, 10_000), max_size=8)
LIMITS = st.sampled_from([16, 256, protocol.DEFAULT_MAX_FRAME_BYTES])
PROPERTY_SETTINGS = settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY_SETTINGS
@given(data=st.binary(max_size=300), splits=SPLITS, limit=LIMITS)
def test_decoder_arbitrary_bytes(data, splits, limit):
    try:
        frames = feed_in_pieces(data, splits, limit)
    except ProtocolError:
        return
    assert all(isinstance(frame, protocol.Frame) for frame in frames)


@PROPERTY_SETTINGS
@given(data=mutated_stream(), splits=SPLITS, limit=LIMITS)
def test_decoder_mutated_frames(data, splits, limit):
    try:
        frames = feed_in_pieces(data, splits, limit)
    except ProtocolError:
        return
    assert all(isinstance(frame, protocol.Frame) for frame in frames)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), U64_MAX)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec="utf-8"), max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(
        st.sampled_from(["protocol", "token", "code", "message", "seq", "topic", "partitions"])
        | st.text(st.characters(codec="utf-8"), max_size=6),
        children,
        max_size=5,
    ),
    max_leaves=12,
)


@PROPERTY_SETTINGS
@given(
    frame_type=st.integers(0, 255),
    payload=st.binary(max_size=64) | JSON_VALUES.map(orjson.dumps),
)
def test_parse_any_payload(frame_type, payload):
    try:
        frame = protocol.parse(frame_type, payload)
    except ProtocolError:
        return
    assert isinstance(frame, protocol.Frame)


CONTROL_SAMPLES = [frame for frame in SAMPLE_FRAMES if frame_type_of(frame) in CONTROL_TYPES]


@PROPERTY_SETTINGS
@given(frame=st.sampled_from(CONTROL_SAMPLES), data=st.data())
def test_control_field_replaced(frame, data):
    """Parse a valid control frame with one field replaced by any JSON value, or removed."""
    fields = {name: getattr(frame, name) for name in frame.__slots__}
    name = data.draw(st.sampled_from(sorted(fields)))
    if data.draw(st.booleans()):
        del fields[name]
    else:
        fields[name] = data.draw(st.none() | JSON_VALUES)
    payload = orjson.dumps(fields)
    try:
        parsed = protocol.parse(frame_type_of(frame), payload)
    except ProtocolError:
        return
    assert isinstance(parsed, protocol.Frame)
