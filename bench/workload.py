"""The workload every system gets, and the latency arithmetic every run shares.

The peers' publisher and consumer processes import this module, so it imports only
the standard library, orjson, xxhash and `evp.events` (for the same event generator
that `evp publish` uses).
"""

from __future__ import annotations

import math
import time
from array import array
from collections.abc import Iterator
from pathlib import Path

import orjson
import xxhash

from evp import events

# The same pacing as `evp publish`: compute the events due at most once per tick, and
# send at most this many between two looks at the clock.
TICK_S = 0.001
MAX_BATCH_EVENTS = 1000

END_FIELD = "end"


def generated_events(keys: int, seed: int | None) -> Iterator[tuple[bytes, bytes]]:
    """Yield (key, JSON) of generated user actions, about 200 bytes each."""
    generator = events.EventGenerator(keys, seed)
    while True:
        yield generator.next()


def file_events(path: str | Path, key_field: str) -> Iterator[tuple[bytes, bytes]]:
    """Yield (key, JSON line) of a JSON-lines file (.gz is decompressed).

    Lines without a string or number at `key_field` are skipped, as `evp publish`
    skips them.
    """
    paths = events.key_path(key_field)
    source = events.open_source(str(path))
    try:
        for _number, line in events.read_lines(source):
            try:
                event = orjson.loads(line)
                key = events.extract_key(event, paths)
            except (orjson.JSONDecodeError, events.InvalidEvent):
                continue
            yield key, line
    finally:
        source.close()


def stamp(value: bytes, sent_ns: int) -> bytes:
    """Add the publish time to a JSON object's bytes without parsing them."""
    return b"%s,\"sent_ns\":%d}" % (value[:-1].rstrip(), sent_ns)


def end_marker(count: int) -> bytes:
    """Encode the event a publisher sends after its last one, with the count before it."""
    return orjson.dumps({END_FIELD: True, "count": count})


def partition_of(key: bytes, partitions: int) -> int:
    """Pick a stream or subject by key hash, as evp picks a partition."""
    return xxhash.xxh3_64_intdigest(key) % partitions


class Pacer:
    """Tells a publisher how many events are due, for a fixed rate or full speed."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.started = time.monotonic()

    def due(self, sent: int) -> tuple[int, float]:
        """Return (events to send now, seconds to sleep first when none are due)."""
        if self.rate <= 0:
            return MAX_BATCH_EVENTS, 0.0
        elapsed_s = time.monotonic() - self.started
        due = int(elapsed_s * self.rate) + 1 - sent
        if due <= 0:
            return 0, max(TICK_S, sent / self.rate - elapsed_s)
        return min(due, MAX_BATCH_EVENTS), 0.0


class LatencyRecorder:
    """Publish-to-processing latencies of one consumer, in milliseconds."""

    def __init__(self) -> None:
        self.samples_ms = array("d")

    def record(self, event: dict) -> None:
        self.samples_ms.append((time.time_ns() - event["sent_ns"]) / 1e6)

    def save(self, path: Path) -> None:
        with path.open("wb") as file:
            self.samples_ms.tofile(file)


def load_samples(paths: list[Path]) -> array:
    samples = array("d")
    for path in paths:
        if path.exists():
            samples.frombytes(path.read_bytes())
    return samples


def percentile(sorted_ms: list[float], quantile: float) -> float:
    """Nearest-rank percentile of sorted samples."""
    rank = max(1, math.ceil(quantile * len(sorted_ms)))
    return sorted_ms[rank - 1]


def latency_summary(samples_ms: array | list[float]) -> dict[str, float | None]:
    """Return p50, p99 and p99.9 in milliseconds, named as in evp's snapshot."""
    ordered = sorted(samples_ms)
    if not ordered:
        return {"p50_ms": None, "p99_ms": None, "p999_ms": None}
    return {
        "p50_ms": round(percentile(ordered, 0.5), 3),
        "p99_ms": round(percentile(ordered, 0.99), 3),
        "p999_ms": round(percentile(ordered, 0.999), 3),
    }


def cdf_points(samples_ms: array | list[float], points: int = 120) -> list[list[float]]:
    """Return [latency_ms, fraction] pairs for plotting, dense in the tail.

    Half the quantiles are evenly spaced, half approach 1 geometrically (down to
    1 - 1e-4), so both the median and the p99.9 region are drawn.
    """
    ordered = sorted(samples_ms)
    if not ordered:
        return []
    quantiles = {index / (points // 2) for index in range(1, points // 2 + 1)}
    quantiles |= {1 - 10 ** (-4 * index / (points // 2)) for index in range(1, points // 2 + 1)}
    quantiles.add(1.0)
    return [
        [round(percentile(ordered, quantile), 4), round(quantile, 6)]
        for quantile in sorted(quantiles)
    ]
