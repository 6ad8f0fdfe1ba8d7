"""A mergeable latency histogram with fixed log-scale buckets.

Bucket `i` (for i >= 1) holds values v in microseconds with
`2 ** ((i - 1) / 16) <= v < 2 ** (i / 16)`; bucket 0 holds values below 1 µs. So a
percentile read from the histogram is within 4.4 % (2 ** (1/16) - 1) of the true
value, the histograms of many shards merge by adding counts, and a histogram of any
number of samples takes at most a few hundred integers (600 buckets reach 2**37 µs,
about 38 hours).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

BUCKETS_PER_DOUBLING = 16
MAX_BUCKET = 600
RELATIVE_PRECISION = 2 ** (1 / BUCKETS_PER_DOUBLING) - 1


def bucket_of(value_us: float) -> int:
    if value_us < 1:
        return 0
    return min(int(math.log2(value_us) * BUCKETS_PER_DOUBLING) + 1, MAX_BUCKET)


def bucket_upper_us(bucket: int) -> float:
    return 2 ** (bucket / BUCKETS_PER_DOUBLING)


class LatencyHistogram:
    def __init__(self, counts: dict[int, int] | None = None) -> None:
        self.counts: dict[int, int] = dict(counts or {})
        self.total = sum(self.counts.values())

    def record(self, value_us: float, count: int = 1) -> None:
        bucket = bucket_of(value_us)
        self.counts[bucket] = self.counts.get(bucket, 0) + count
        self.total += count

    def record_bucket(self, bucket: int, count: int) -> None:
        self.counts[bucket] = self.counts.get(bucket, 0) + count
        self.total += count

    def record_many(self, values_us: Iterable[float]) -> None:
        counts = self.counts
        added = 0
        log2 = math.log2
        for value in values_us:
            bucket = 0 if value < 1 else min(int(log2(value) * BUCKETS_PER_DOUBLING) + 1, MAX_BUCKET)
            counts[bucket] = counts.get(bucket, 0) + 1
            added += 1
        self.total += added

    def merge(self, other: LatencyHistogram) -> None:
        for bucket, count in other.counts.items():
            self.counts[bucket] = self.counts.get(bucket, 0) + count
        self.total += other.total

    def percentile_us(self, quantile: float) -> float | None:
        """Return the upper bound of the bucket holding the `quantile` (0..1) sample."""
        if not self.total:
            return None
        rank = max(1, math.ceil(quantile * self.total))
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return bucket_upper_us(bucket)
        return bucket_upper_us(max(self.counts))

    def to_dict(self) -> dict[str, int]:
        return {str(bucket): count for bucket, count in self.counts.items()}

    @classmethod
    def from_dict(cls, data: dict[str, int]) -> LatencyHistogram:
        counts = {}
        for bucket, count in data.items():
            index = int(bucket)
            if not 0 <= index <= MAX_BUCKET or not isinstance(count, int) or count < 0:
                raise ValueError(f"invalid histogram bucket {bucket!r}: {count!r}")
            counts[index] = count
        return cls(counts)

    def summary_ms(self) -> dict[str, float | None]:
        """Return p50, p99 and p99.9 in milliseconds (None when empty)."""
        result: dict[str, float | None] = {}
        for name, quantile in (("p50_ms", 0.5), ("p99_ms", 0.99), ("p999_ms", 0.999)):
            value = self.percentile_us(quantile)
            result[name] = None if value is None else round(value / 1000, 3)
        return result
