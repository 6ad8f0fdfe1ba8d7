"""Hostile and broken input sent to a real `evp queue` process over raw sockets.

Each test checks three things: the queue replies to the bad input as the protocol
requires (an ERROR frame, then a close only where the error is fatal), it keeps serving a
second, well-behaved client afterwards, and its log stores only acknowledged events.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import socket
from collections import deque
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import snapshot

from evp import protocol
from evp.client import ClientError, Consumer, Producer, ServerError, parse_address
from evp.protocol import LENGTH, FrameType
from evp.stats import fetch_snapshot

# The queue's handshake timeout: QueueConfig.handshake_timeout_s, which no CLI option
# sets. The socket timeout of the test that waits for it leaves a few seconds of slack.
HANDSHAKE_TIMEOUT_S = 10.0

TOKEN = "s3cret"
VALID_EVENT = b'{"user":"u-1","action":"click"}'


class RawConnection:
    """A blocking TCP connection that sends raw bytes and decodes the queue's frames."""

    def __init__(self, address: str, timeout_s: float = 5.0) -> None:
        self.sock = socket.create_connection(parse_address(address), timeout=timeout_s)
        self.decoder = protocol.Decoder()
        self.pending: deque[protocol.Frame] = deque()

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(self, frame: protocol.Frame) -> None:
        self.send(protocol.encode(frame))

    def _receive(self) -> bool:
        """Read once into the decoder. Return False when the queue closed the connection."""
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            # The queue closes with unread client bytes in its buffer, so Linux sends
            # RST in place of FIN. Both mean the connection is closed.
            return False
        if not data:
            return False
        self.pending.extend(self.decoder.feed(data))
        return True

    def read_frame(self) -> protocol.Frame:
        """Return the next frame. Fail if the connection closes first."""
        while not self.pending:
            if not self._receive():
                raise AssertionError("the queue closed the connection before sending a frame")
        return self.pending.popleft()

    def read_until_closed(self) -> list[protocol.Frame]:
        """Return every frame the queue sends until it closes the connection.

        Raises TimeoutError (socket.timeout) if the connection stays open.
        """
        while self._receive():
            pass
        frames = list(self.pending)
        self.pending.clear()
        return frames

    def handshake(self, **hello_fields: Any) -> protocol.Welcome:
        self.send_frame(protocol.Hello(client="test_queue_input", **hello_fields))
        welcome = self.read_frame()
        assert isinstance(welcome, protocol.Welcome), f"expected WELCOME, got {welcome!r}"
        return welcome


def raw_frame(frame_type: int, payload: bytes) -> bytes:
    return LENGTH.pack(len(payload) + 1) + bytes((frame_type,)) + payload


def only_error(frames: list[protocol.Frame]) -> protocol.Error:
    """Return the single ERROR frame in `frames`, failing on anything else."""
    assert len(frames) == 1, f"expected one ERROR frame, got {frames!r}"
    error = frames[0]
    assert isinstance(error, protocol.Error), f"expected an ERROR frame, got {error!r}"
    return error


async def _publish_one(address: str, topic: str, token: str | None) -> int:
    producer = Producer(address, token=token)
    await producer.start()
    try:
        producer.publish(topic, b"well-behaved", VALID_EVENT)
        await producer.flush(timeout_s=10)
        return producer.acked
    finally:
        await producer.close()


def stored_events(address: str, token: str | None = None) -> dict[str, int]:
    """Return the number of stored events of each topic, from a statistics snapshot."""
    if token is None:
        topics = snapshot(address)["topics"]
    else:
        topics = asyncio.run(fetch_snapshot(address, token=token))["topics"]
    return {topic["name"]: topic["events"] for topic in topics}


def assert_queue_serves(
    process: Any, address: str, stored: dict[str, int], token: str | None = None
) -> None:
    """Check the queue still runs, acknowledges a new client's event and stores only `stored`."""
    assert process.poll() is None, "the queue process exited"
    assert asyncio.run(_publish_one(address, "after", token)) == 1
    assert stored_events(address, token) == {**stored, "after": 1}


# Frame size limits.

SMALL_FRAME_LIMIT = ("--max-frame-bytes", "65536", "--max-event-bytes", "32768")


def test_oversized_frame_closes(evp):
    process, address = evp.queue(None, None, *SMALL_FRAME_LIMIT)
    value = b'{"a":"' + b"x" * 70_000 + b'"}'
    with RawConnection(address) as connection:
        welcome = connection.handshake()
        connection.send_frame(protocol.Publish(1, "big", [(b"k", value, 0)]))
        error = only_error(connection.read_until_closed())
    assert welcome.max_frame_bytes == 65536
    assert error.code == "frame_too_large"
    assert "exceeds the limit of 65536 bytes" in error.message
    assert error.fatal is True
    assert_queue_serves(process, address, {})


def test_oversized_prefix_rejected_early(evp):
    # Only the length prefix is sent, so the queue must reply without waiting for a body.
    process, address = evp.queue(None, None, *SMALL_FRAME_LIMIT)
    with RawConnection(address) as connection:
        connection.handshake()
        connection.send(LENGTH.pack(65537))
        error = only_error(connection.read_until_closed())
    assert error.code == "frame_too_large"
    assert "frame length 65537 exceeds the limit of 65536 bytes" in error.message
    assert_queue_serves(process, address, {})


def test_max_length_prefix_and_noise(evp):
    process, address = evp.queue()
    noise = random.Random(7).randbytes(64 * 1024)
    with RawConnection(address) as connection:
        connection.send(LENGTH.pack(2**32 - 1) + noise)
        error = only_error(connection.read_until_closed())
    assert error.code == "frame_too_large"
    assert "frame length 4294967295 exceeds the limit" in error.message
    assert_queue_serves(process, address, {})


def test_producer_fits_frame_limit(evp):
    # 200 events of about 900 bytes: every event fits the limits, but one batch of all
    # of them would not fit one 64 KiB frame.
    process, address = evp.queue(
        None, None, "--max-frame-bytes", "65536", "--max-event-bytes", "1024"
    )
    value = b'{"pad":"' + b"p" * 890 + b'"}'

    async def publish_all() -> tuple[int, bool]:
        producer = Producer(address)
        await producer.start()
        try:
            for index in range(200):
                producer.publish("fits", f"key-{index}".encode(), value)
            flushed = await producer.flush(timeout_s=5)
            return producer.acked, flushed
        finally:
            await producer.close()

    acked, flushed = asyncio.run(publish_all())
    assert flushed, "the producer's events were not all acknowledged within 5 s"
    assert acked == 200
    assert stored_events(address) == {"fits": 200}


# Protocol violations: each gets a fatal ERROR and a close of that connection only.

PUBLISH_COUNT_LIES = raw_frame(
    FrameType.PUBLISH,
    protocol.PUBLISH_HEADER.pack(1, 1, 5)
    + b"t"
    + protocol.PUBLISH_ENTRY.pack(1, len(VALID_EVENT), 0)
    + b"k"
    + VALID_EVENT,
)

VIOLATIONS = {
    # name: (send HELLO first, bytes sent, error code, message pattern)
    "unknown-type": (True, raw_frame(0x7F, b"junk"), "unknown_frame_type", "0x7f"),
    "unknown-type-zero": (True, raw_frame(0x00, b""), "unknown_frame_type", "0x00"),
    "publish-first": (
        False,
        protocol.encode(protocol.Publish(1, "t", [(b"k", VALID_EVENT, 0)])),
        "protocol_error",
        "the first frame must be HELLO, got PUBLISH",
    ),
    "stats-request-first": (
        False,
        protocol.encode(protocol.StatsRequest()),
        "protocol_error",
        "the first frame must be HELLO, got STATSREQUEST",
    ),
    "version-99": (
        False,
        protocol.encode(protocol.Hello(protocol=99)),
        "unsupported_version",
        "protocol version 99 is not supported",
    ),
    "version-0": (
        False,
        protocol.encode(protocol.Hello(protocol=0)),
        "unsupported_version",
        "protocol version 0 is not supported",
    ),
    "hello-invalid-json": (
        False,
        raw_frame(FrameType.HELLO, b'{"protocol":'),
        "malformed_frame",
        "HELLO payload is not valid JSON",
    ),
    "hello-twice": (
        True,
        protocol.encode(protocol.Hello()),
        "protocol_error",
        "HELLO sent twice",
    ),
    "welcome-from-client": (
        True,
        protocol.encode(protocol.Welcome()),
        "protocol_error",
        "a client may not send WELCOME frames",
    ),
    "ack-before-join": (
        True,
        protocol.encode(protocol.Ack([(0, 1)])),
        "protocol_error",
        "ACK before JOIN",
    ),
    "publish-count-lies": (
        True,
        PUBLISH_COUNT_LIES,
        "malformed_frame",
        "PUBLISH declares 5 events",
    ),
    "length-zero": (True, b"\x00\x00\x00\x00", "malformed_frame", "frame length 0"),
    "join-null-topic": (
        True,
        raw_frame(
            FrameType.JOIN,
            b'{"topic":null,"group":"g","member":"m","max_in_flight":1}',
        ),
        "malformed_frame",
        "JOIN field 'topic'",
    ),
}


@pytest.mark.parametrize("name", list(VIOLATIONS))
def test_protocol_violation_closes(evp, name):
    with_hello, data, code, pattern = VIOLATIONS[name]
    process, address = evp.queue()
    with RawConnection(address) as connection:
        if with_hello:
            connection.handshake()
        connection.send(data)
        error = only_error(connection.read_until_closed())
    assert error.code == code, error.message
    assert pattern in error.message
    assert error.fatal is True
    assert_queue_serves(process, address, {})


def test_publish_then_garbage_in_one_write(evp):
    # However the queue splits this write, what it stores must equal what it acknowledged.
    process, address = evp.queue()
    with RawConnection(address) as connection:
        connection.handshake()
        publish = protocol.Publish(1, "mixed", [(b"k", VALID_EVENT, 0)])
        connection.send(protocol.encode(publish) + raw_frame(0x7F, b"junk"))
        frames = connection.read_until_closed()
    acknowledged = sum(frame.count for frame in frames if isinstance(frame, protocol.Published))
    errors = [frame for frame in frames if isinstance(frame, protocol.Error)]
    assert [error.code for error in errors] == ["unknown_frame_type"]
    assert stored_events(address).get("mixed", 0) == acknowledged
    assert_queue_serves(process, address, {"mixed": 1} if acknowledged else {})


def test_half_frame_without_hello(evp):
    process, address = evp.queue()
    hello = protocol.encode(protocol.Hello())
    with RawConnection(address, timeout_s=HANDSHAKE_TIMEOUT_S + 5) as connection:
        connection.send(hello[: len(hello) // 2])
        error = only_error(connection.read_until_closed())
    assert error.code == "handshake_timeout"
    assert "no HELLO received" in error.message
    assert_queue_serves(process, address, {})


# Invalid events: a non-fatal ERROR for the batch, and the connection stays usable.

DEEP_JSON = b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}"

INVALID_EVENTS = {
    # name: ((key, value) of the second event in the batch, message pattern)
    "invalid-json": ((b"k", b'{"a":'), "invalid JSON"),
    "empty-value": ((b"k", b""), "invalid JSON"),
    "json-array": ((b"k", b"[1,2]"), "a JSON array, not an object"),
    "json-string": ((b"k", b'"text"'), "a JSON string, not an object"),
    "nan": ((b"k", b'{"a":NaN}'), "NaN is not valid JSON"),
    "infinity": ((b"k", b'{"a":-Infinity}'), "-Infinity is not valid JSON"),
    "over-max-event-bytes": (
        (b"k", b'{"a":"' + b"x" * 20_000 + b'"}'),
        "is 20008 bytes, over the limit of 16384 bytes",
    ),
    "key-invalid-utf8": ((b"\xff\xfe", VALID_EVENT), "key that is not valid UTF-8"),
    "value-invalid-utf8": ((b"k", b'{"a":"\xff"}'), "invalid JSON"),
    "lone-surrogate": ((b"k", b'{"a":"\\ud800"}'), "cannot encode the event as UTF-8"),
    "deeply-nested": ((b"k", DEEP_JSON), "is invalid"),
}


@pytest.mark.parametrize("name", list(INVALID_EVENTS))
def test_invalid_event_rejected(evp, name):
    (key, value), pattern = INVALID_EVENTS[name]
    # The limit leaves room for DEEP_JSON, which is 10006 bytes.
    process, address = evp.queue(None, None, "--max-event-bytes", "16384")
    with RawConnection(address) as connection:
        connection.handshake()
        batch = [(b"k0", VALID_EVENT, 1), (key, value, 2), (b"k2", VALID_EVENT, 3)]
        connection.send_frame(protocol.Publish(7, "rejected", batch))
        error = connection.read_frame()
        assert isinstance(error, protocol.Error), f"expected an ERROR frame, got {error!r}"
        assert error.code == "invalid_event", error.message
        assert error.seq == 7
        assert error.fatal is False
        assert "event 1 " in error.message
        assert pattern in error.message
        connection.send_frame(protocol.Publish(8, "accepted", [(b"k", VALID_EVENT, 4)]))
        assert connection.read_frame() == protocol.Published(8, 1)
    assert_queue_serves(process, address, {"accepted": 1})


@pytest.mark.parametrize(
    "topic",
    ["", "../escape", "a/b", ".hidden", "-dash", "x" * 201, "événements", "events\n"],
    ids=[
        "empty", "dot-dot", "slash", "dot-first", "dash-first", "too-long", "non-ascii", "newline"
    ],
)
def test_invalid_topic_rejected(evp, topic):
    process, address = evp.queue()
    with RawConnection(address) as connection:
        connection.handshake()
        connection.send_frame(protocol.Publish(3, topic, [(b"k", VALID_EVENT, 0)]))
        error = connection.read_frame()
        assert isinstance(error, protocol.Error), f"expected an ERROR frame, got {error!r}"
        assert error.code == "invalid_event"
        assert error.seq == 3
        assert error.fatal is False
        assert "invalid topic name" in error.message
        connection.send_frame(protocol.Publish(4, "accepted", [(b"k", VALID_EVENT, 0)]))
        assert connection.read_frame() == protocol.Published(4, 1)
    assert_queue_serves(process, address, {"accepted": 1})


# Keys.


async def consume(address: str, topic: str, count: int, timeout_s: float = 20.0) -> list[Any]:
    """Read `count` records of `topic` through a consumer group and return what arrived."""
    received: list[Any] = []
    done = asyncio.Event()

    async def process(partition: int, batch: list[Any]) -> None:
        received.extend(batch)
        if len(received) >= count:
            done.set()

    consumer = Consumer(address, topic=topic, group="check", member="check-0", process=process)
    task = asyncio.create_task(consumer.run())
    try:
        await asyncio.wait_for(done.wait(), timeout_s)
    except TimeoutError:
        pass
    finally:
        consumer.stop()
        await asyncio.wait_for(task, 10)
    return received


def test_integer_keys_stay_distinct(evp, tmp_path: Path):
    # 2**64 and 2**64 + 1 are equal as 64-bit floats, so any float step merges them.
    source = tmp_path / "events.jsonl"
    source.write_text(
        '{"id": 18446744073709551616, "n": 1}\n{"id": 18446744073709551617, "n": 2}\n'
    )
    process, address = evp.queue(None, None, "--partitions", "4")
    result = evp.run(
        "publish", "--queue", address, "--topic", "ints", "--file", str(source), "--rate", "0"
    )
    assert result.returncode == 0, result.stderr.decode()
    stored = asyncio.run(consume(address, "ints", 2))
    keys = sorted(record.key for record in stored)
    ids = sorted(json.loads(record.value)["id"] for record in stored)
    assert keys == [b"18446744073709551616", b"18446744073709551617"]
    assert ids == [2**64, 2**64 + 1]
    assert_queue_serves(process, address, {"ints": 2})


# Authentication.


@pytest.mark.parametrize(
    "token",
    [None, "", "wrong", "s3cre", "s3cret2", "S3CRET", " s3cret"],
    ids=["missing", "empty", "wrong", "prefix", "longer", "case", "space"],
)
def test_wrong_token_rejected(evp, token):
    process, address = evp.queue(None, None, "--token", TOKEN)
    with RawConnection(address) as connection:
        connection.send_frame(protocol.Hello(token=token))
        error = only_error(connection.read_until_closed())
    assert error.code == "authentication_failed"
    assert error.fatal is True
    assert_queue_serves(process, address, {}, token=TOKEN)


def test_correct_token_accepted(evp):
    process, address = evp.queue(None, None, "--token", TOKEN)
    with RawConnection(address) as connection:
        welcome = connection.handshake(token=TOKEN)
        connection.send_frame(protocol.Publish(1, "authed", [(b"k", VALID_EVENT, 0)]))
        reply = connection.read_frame()
    assert welcome.protocol == protocol.PROTOCOL_VERSION
    assert reply == protocol.Published(1, 1)
    assert_queue_serves(process, address, {"authed": 1}, token=TOKEN)


def test_stats_without_token_rejected(evp):
    _, address = evp.queue(None, None, "--token", TOKEN)
    with pytest.raises(ServerError, match=r"missing or wrong token.*\(authentication_failed\)"):
        asyncio.run(fetch_snapshot(address))


def test_token_not_logged(evp):
    wrong = "hunter2-wrong"
    process, address = evp.queue(None, None, "--token", TOKEN, "--log-level", "DEBUG")
    with RawConnection(address) as connection:
        connection.send_frame(protocol.Hello(token=wrong))
        connection.read_until_closed()
    with RawConnection(address) as connection:
        # A token of the wrong type: the type error must not echo the value.
        hello = orjson.dumps({"protocol": 1, "token": [TOKEN]})
        connection.send(raw_frame(FrameType.HELLO, hello))
        connection.read_until_closed()
    with RawConnection(address) as connection:
        connection.handshake(token=TOKEN, producer_id="00000000000000a1")
        connection.send(raw_frame(0x7F, TOKEN.encode()))
        connection.read_until_closed()
    assert_queue_serves(process, address, {}, token=TOKEN)
    with pytest.raises(ClientError):
        asyncio.run(fetch_snapshot(address, token=wrong))
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)
    log = evp.log("queue")
    assert "authentication failed" in log
    assert TOKEN not in log
    assert wrong not in log
