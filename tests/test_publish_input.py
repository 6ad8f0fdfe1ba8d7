"""`evp publish` against a real queue: bad JSON lines, over-long lines and Ctrl-C."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import orjson
import pytest
from conftest import background_publish, consume, snapshot, wait_until

from evp import events
from evp.client import Producer


def consume_values(address: str, topic: str, count: int) -> list[dict]:
    """Read `count` events of `topic` through a consumer group and return them parsed."""
    return [orjson.loads(record.value) for record in asyncio.run(consume(address, topic, count))]


def stored(address: str, topic: str) -> int:
    return sum(t["events"] for t in snapshot(address)["topics"] if t["name"] == topic)


# Lines that break a JSON rule: each is skipped with its line number and the rule, and
# the same rule applies whichever parser reads the line (integers beyond 64 bits make the
# publisher use the standard library's parser instead of orjson).
REJECTED_LINES = {
    2: (b'{"id": "nan", "v": NaN}', "NaN is not valid JSON"),
    3: (b'{"id": "inf", "v": Infinity}', "Infinity is not valid JSON"),
    4: (b'{"id": 18446744073709551616, "v": -Infinity}', "-Infinity is not valid JSON"),
    5: (b'{"id": "big", "v": 1e400}', "Out of range float values are not JSON compliant"),
    6: (b'{"id": "surrogate", "v": "\\ud800"}', "surrogates not allowed"),
    7: (b'{"id": 18446744073709551617, "v": "\\udfff"}', "surrogates not allowed"),
    8: (b'{"id": "' + b"k" * 65_536 + b'"}', "65536 bytes in UTF-8, over the limit of 65535 bytes"),
}


@pytest.mark.timeout(60)
def test_publish_rejects_non_json_values(evp, tmp_path: Path):
    _, address = evp.queue(None, None, "--partitions", "2")
    lines = [b'{"id": "first"}']
    lines += [REJECTED_LINES[number][0] for number in sorted(REJECTED_LINES)]
    lines.append(b'{"id": "last"}')
    path = tmp_path / "input.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    result = evp.run("publish", "--queue", address, "--topic", "rules", "--file", str(path), "--rate", "0")
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    for number, (_, rule) in REJECTED_LINES.items():
        line = next(text for text in stderr.splitlines() if f"{path}:{number}: skipped" in text)
        assert rule in line
    assert "acknowledged=2 " in stderr
    assert stored(address, "rules") == 2
    values = consume_values(address, "rules", 2)
    assert sorted(value["id"] for value in values) == ["first", "last"]


MIB = 1024 * 1024


@pytest.mark.timeout(120)
def test_publish_oversized_line_then_normal(evp, tmp_path: Path):
    _, address = evp.queue(None, None, "--partitions", "2")
    huge = b'{"id": "huge", "pad": "' + b"x" * (20 * MIB) + b'"}'
    path = tmp_path / "input.jsonl"
    path.write_bytes(b'{"id": "before"}\n' + huge + b'\n{"id": "after"}\n')
    result = evp.run("publish", "--queue", address, "--topic", "sizes", "--file", str(path), "--rate", "0")
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert f"{path}:2: skipped: the line is longer than the queue's limit of {MIB} bytes" in stderr
    assert "--max-event-bytes" in stderr
    assert "acknowledged=2 " in stderr
    values = consume_values(address, "sizes", 2)
    assert sorted(value["id"] for value in values) == ["after", "before"]


class ReadSizes:
    """A file wrapper that records the largest chunk any read returned."""

    def __init__(self, file) -> None:
        self.file = file
        self.largest = 0

    def readline(self, limit: int = -1) -> bytes:
        chunk = self.file.readline(limit)
        self.largest = max(self.largest, len(chunk))
        return chunk


def test_read_lines_bounds_memory(tmp_path: Path):
    path = tmp_path / "long.jsonl"
    with path.open("wb") as file:
        file.write(b'{"a": 1}\n')
        file.write(b"z" * (50 * MIB) + b"\n")
        file.write(b'{"b": 2}\r\n\n')
        file.write(b"q" * 1000)  # a long last line without a line ending
    with path.open("rb") as file:
        source = ReadSizes(file)
        lines = list(events.read_lines(source, "long.jsonl", max_line_bytes=100))
    assert lines == [(1, b'{"a": 1}'), (2, None), (3, b'{"b": 2}'), (5, None)]
    assert source.largest <= 64 * 1024


def test_read_lines_exact_limit(tmp_path: Path):
    path = tmp_path / "exact.jsonl"
    line = b'{"p": "' + b"e" * 91 + b'"}'
    assert len(line) == 100
    path.write_bytes(line + b"\r\n" + line + b"x\n")
    with path.open("rb") as file:
        lines = list(events.read_lines(file, "exact.jsonl", max_line_bytes=100))
    assert lines == [(1, line), (2, None)]


@pytest.mark.timeout(60)
def test_publish_ctrl_c_prints_summary(evp):
    _, address = evp.queue()
    with background_publish(
        "--queue", address,
        "--rate", "2000",
    ) as publisher:
        wait_until(lambda: stored(address, "events") > 500, timeout_s=30)
        publisher.send_signal(signal.SIGINT)
        _, stderr_bytes = publisher.communicate(timeout=30)
    stderr = stderr_bytes.decode()
    assert publisher.returncode == 130, stderr
    assert "Traceback" not in stderr
    summary = next(line for line in stderr.splitlines() if line.startswith("sent="))
    figures = dict(field.split("=") for field in summary.split())
    assert int(figures["sent"]) > 500
    assert int(figures["acknowledged"]) == int(figures["sent"])
    assert figures["unacknowledged"] == "0"
    assert f"interrupted: {figures['acknowledged']} events acknowledged, 0 not acknowledged" in stderr
    assert stored(address, "events") == int(figures["acknowledged"])


def test_producer_rejects_long_key_and_goes_on(evp):
    _, address = evp.queue(None, None, "--partitions", "2")

    async def run() -> tuple[str, int]:
        producer = Producer(address)
        await producer.start()
        try:
            producer.publish("keys", b"before", b'{"n": 1}')
            with pytest.raises(ValueError) as error:
                producer.publish("keys", b"k" * 65_536, b'{"n": 2}')
            producer.publish("keys", b"after", b'{"n": 3}')
            assert await producer.flush(timeout_s=10)
            return str(error.value), producer.acked
        finally:
            await producer.close()

    message, acked = asyncio.run(run())
    assert "65536 bytes, over the limit of 65535 bytes" in message
    assert acked == 2
    assert stored(address, "keys") == 2
