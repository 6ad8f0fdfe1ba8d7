"""Hostile and broken input sent to a real `evp queue` process over raw sockets.

Each test checks three things: the queue replies to the bad input as the protocol
requires (an ERROR frame, then a close only where the error is fatal), it keeps serving a
second, well-behaved client afterwards, and its log stores only acknowledged events.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import consume, free_port, snapshot, wait_until

from evp import protocol
from evp.client import ClientError, Producer, ServerError, parse_address
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


def assert_second_event_rejected(connection: RawConnection, batch: list, pattern: str) -> None:
    """Publish `batch` as seq 7 to "rejected", expect its event 1 named in a non-fatal
    error matching `pattern`, then check one event to "accepted" is acknowledged."""
    connection.send_frame(protocol.Publish(7, "rejected", batch))
    error = connection.read_frame()
    assert isinstance(error, protocol.Error), f"expected an ERROR frame, got {error!r}"
    assert error.code == "invalid_event", error.message
    assert error.seq == 7
    assert error.fatal is False
    assert "event 1 " in error.message
    assert pattern in error.message
    key, value, _ = batch[1]
    offending = key if "key" in pattern else value
    assert repr(offending[:40]) in error.message
    connection.send_frame(protocol.Publish(8, "accepted", [(b"k", VALID_EVENT, 7)]))
    assert connection.read_frame() == protocol.Published(8, 1)


@pytest.mark.parametrize("known_keys", [False, True], ids=["new-topic", "known-keys"])
@pytest.mark.parametrize("name", list(INVALID_EVENTS))
def test_invalid_event_rejected(evp, name, known_keys):
    (key, value), pattern = INVALID_EVENTS[name]
    # The limit leaves room for DEEP_JSON, which is 10006 bytes.
    process, address = evp.queue(None, None, "--max-event-bytes", "16384")
    stored = {"accepted": 1}
    with RawConnection(address) as connection:
        connection.handshake()
        if known_keys:
            # The queue remembers the partition of keys it stored before and skips
            # their checks, but never the checks of the event itself.
            known = [(b"k0", VALID_EVENT, 1), (b"k", VALID_EVENT, 2), (b"k2", VALID_EVENT, 3)]
            connection.send_frame(protocol.Publish(6, "rejected", known))
            assert connection.read_frame() == protocol.Published(6, 3)
            stored["rejected"] = 3
        batch = [(b"k0", VALID_EVENT, 4), (key, value, 5), (b"k2", VALID_EVENT, 6)]
        assert_second_event_rejected(connection, batch, pattern)
    assert_queue_serves(process, address, stored)


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


# Framing over a real socket.


def test_frame_split_across_writes(evp):
    process, address = evp.queue()
    frame = protocol.encode(protocol.Publish(5, "split", [(b"k", VALID_EVENT, 0)]))
    with RawConnection(address) as connection:
        connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection.handshake()
        for piece in (frame[:1], frame[1:3], frame[3:]):
            connection.send(piece)
            # Pauses between the writes make the queue read them separately.
            time.sleep(0.05)
        assert connection.read_frame() == protocol.Published(5, 1)
    assert_queue_serves(process, address, {"split": 1})


def publish_of_length(frame_length: int, events: int) -> bytes:
    """Encode a PUBLISH whose length prefix is exactly `frame_length`."""
    topic = "edge"
    empty = protocol.encode(protocol.Publish(1, topic, [(b"k", b"", 0)] * events))
    value_room = frame_length - (len(empty) - LENGTH.size)
    sizes = [value_room // events] * events
    sizes[0] += value_room - sum(sizes)
    entries = [(b"k", b'{"p":"' + b"x" * (size - 8) + b'"}', 0) for size in sizes]
    frame = protocol.encode(protocol.Publish(1, topic, entries))
    assert LENGTH.unpack_from(frame)[0] == frame_length
    return frame


def test_frame_of_exactly_max_bytes(evp):
    process, address = evp.queue(None, None, *SMALL_FRAME_LIMIT)
    with RawConnection(address) as connection:
        connection.handshake()
        connection.send(publish_of_length(65536, 4))
        assert connection.read_frame() == protocol.Published(1, 4)
    assert_queue_serves(process, address, {"edge": 4})


def test_frame_one_byte_over_max(evp):
    process, address = evp.queue(None, None, *SMALL_FRAME_LIMIT)
    with RawConnection(address) as connection:
        connection.handshake()
        connection.send(publish_of_length(65537, 4))
        error = only_error(connection.read_until_closed())
    assert error.code == "frame_too_large"
    assert "frame length 65537 exceeds the limit of 65536 bytes" in error.message
    assert_queue_serves(process, address, {})


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_random_bytes_rejected(evp, seed):
    process, address = evp.queue()
    noise = random.Random(seed).randbytes(4096)
    with RawConnection(address) as connection:
        connection.send(noise)
        error = only_error(connection.read_until_closed())
    assert error.fatal is True
    assert error.code in {"frame_too_large", "malformed_frame", "unknown_frame_type", "protocol_error"}
    assert_queue_serves(process, address, {})


def test_half_frame_after_hello_closed(evp):
    process, address = evp.queue(None, None, "--frame-timeout", "1")
    frame = protocol.encode(protocol.Publish(1, "half", [(b"k", VALID_EVENT, 0)]))
    with RawConnection(address) as connection:
        connection.handshake()
        connection.send(frame[: len(frame) // 2])
        error = only_error(connection.read_until_closed())
    assert error.code == "frame_timeout"
    assert f"{len(frame) // 2} bytes of an unfinished frame" in error.message
    assert "--frame-timeout" in error.message
    assert_queue_serves(process, address, {})
    assert "then nothing for" in evp.log("queue")


# Limits a client cannot push past.


def test_first_frame_capped_before_hello(evp):
    # The frame limit is 16 MiB, but before HELLO only a small frame is buffered.
    process, address = evp.queue()
    with RawConnection(address) as connection:
        connection.send(LENGTH.pack(1024 * 1024) + b"\x01" + b"{" * 1000)
        error = only_error(connection.read_until_closed())
    assert error.code == "frame_too_large"
    assert "limit of 65536 bytes for the first frame" in error.message
    assert_queue_serves(process, address, {})


def test_connection_limit(evp):
    process, address = evp.queue(None, None, "--max-connections", "3")
    held = [RawConnection(address) for _ in range(3)]
    try:
        for connection in held:
            connection.handshake()
        with RawConnection(address) as refused:
            error = only_error(refused.read_until_closed())
        assert error.code == "too_many_connections"
        assert "limit of 3 connections (--max-connections)" in error.message
        with pytest.raises(ServerError, match="too_many_connections"):
            asyncio.run(fetch_snapshot(address))
    finally:
        for connection in held:
            connection.sock.close()
    # Closed connections free their places.
    wait_until(lambda: process.poll() is None and _snapshot_ok(address), timeout_s=10)
    assert_queue_serves(process, address, {})
    assert "rejected connection from" in evp.log("queue")


def _snapshot_ok(address: str) -> bool:
    try:
        snapshot(address)
    except ServerError:
        return False
    return True


def test_max_in_flight_clamp_logged(evp):
    process, address = evp.queue(None, None, "--max-in-flight", "100")
    with RawConnection(address) as connection:
        connection.handshake()
        connection.send_frame(protocol.Join("events", "g", "greedy-0", 5000))
        assigned = connection.read_frame()
        assert isinstance(assigned, protocol.Assigned)
        members = snapshot(address)["groups"][0]["members"]
        assert [member["max_in_flight"] for member in members] == [100]
    assert process.poll() is None
    log = evp.log("queue")
    assert "member=greedy-0" in log
    assert "requested max_in_flight=5000, above the queue's --max-in-flight 100" in log


@pytest.mark.timeout(60)
def test_listen_elsewhere_without_token_warns(evp, tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("a network namespace for the queue needs root")
    port = free_port()
    data_dir = tmp_path / "ns-data"
    # A new network namespace has only its own loopback, so 0.0.0.0 reaches nothing else.
    script = (
        f"ip link set lo up && exec {sys.executable} -m evp queue --host 0.0.0.0 "
        f"--port {port} --data-dir {data_dir}"
    )
    unshared = evp.start_command(["unshare", "--net", "sh", "-c", script], log_name="ns-queue")
    if unshared is None:
        pytest.skip("unshare is not installed")
    wait_until(
        lambda: "queue listening" in evp.log("ns-queue") or unshared.poll() is not None,
        timeout_s=30,
    )
    log = evp.log("ns-queue")
    if "Operation not permitted" in log:
        pytest.skip(f"cannot create a network namespace: {log.strip()}")
    assert "listening on 0.0.0.0 without a token" in log
    assert "set --token or EVP_TOKEN" in log


def test_loopback_default_no_warning(evp):
    process, address = evp.queue()
    assert process.poll() is None
    log = evp.log("queue")
    assert f"queue listening on 127.0.0.1:{address.rsplit(':', 1)[1]}" in log
    assert "without a token" not in log


# An event of 20 MiB.

BIG_EVENT = b'{"pad":"' + b"x" * (20 * 1024 * 1024) + b'"}'


def test_big_event_over_frame_limit(evp):
    process, address = evp.queue()
    with RawConnection(address, timeout_s=30) as connection:
        connection.handshake()
        try:
            connection.send_frame(protocol.Publish(1, "big", [(b"k", BIG_EVENT, 0)]))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the queue may close before it has read the whole frame
        error = only_error(connection.read_until_closed())
    assert error.code == "frame_too_large"
    assert f"exceeds the limit of {protocol.DEFAULT_MAX_FRAME_BYTES} bytes" in error.message
    assert_queue_serves(process, address, {})


def test_big_event_then_normal_event(evp):
    process, address = evp.queue(None, None, "--max-frame-bytes", str(32 * 1024 * 1024))
    with RawConnection(address, timeout_s=30) as connection:
        connection.handshake()
        connection.send_frame(protocol.Publish(1, "big", [(b"k", BIG_EVENT, 0)]))
        error = connection.read_frame()
        assert isinstance(error, protocol.Error), f"expected an ERROR frame, got {error!r}"
        assert error.code == "invalid_event"
        assert error.fatal is False
        assert f"is {len(BIG_EVENT)} bytes, over the limit of 1048576 bytes" in error.message
        assert "--max-event-bytes" in error.message
        connection.send_frame(protocol.Publish(2, "big", [(b"k", VALID_EVENT, 0)]))
        assert connection.read_frame() == protocol.Published(2, 1)
    assert_queue_serves(process, address, {"big": 1})
