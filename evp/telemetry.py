"""The queue's statistics: the snapshot behind `evp stats` and the Prometheus metrics.

Hot paths only increment integers. Once a second the queue's event loop calls
`Telemetry.sample`, which turns counters into per-second rates with a short history and
finds hot keys. `/metrics` reads the snapshot built by that sample, so a scrape from
the metrics thread never walks the queue's live state. `evp stats` gets a snapshot
built on request, with current counts and the sampled rates.
docs/stats.md lists the snapshot's fields.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import TYPE_CHECKING, Any

from evp import __version__, records
from evp.log import CorruptLog, OffsetOutOfRange
from evp.metrics import LatencyHistogram, bucket_upper_us

if TYPE_CHECKING:
    from evp.groups import Group
    from evp.server import QueueServer
    from evp.storage import Topic

logger = logging.getLogger("evp.telemetry")

HISTORY_SAMPLES = 60
# A key is hot when it takes at least this share of its partition's events in one
# sampling interval, with at least HOT_KEY_MIN_EVENTS events, so a quiet partition with
# two events does not report its keys as hot.
HOT_KEY_SHARE = 0.2
HOT_KEY_MIN_EVENTS = 20
HOT_KEYS_REPORTED = 5
# Distinct keys counted per topic and interval. Past this, only keys already counted
# are updated, which bounds memory when a topic has millions of keys. A key that
# becomes hot late in an interval is then found in the next one.
MAX_KEYS_COUNTED = 10_000
# A longer key is counted under its first this many bytes, so the counts of a topic
# take at most about MAX_KEYS_COUNTED * MAX_COUNTED_KEY_BYTES bytes (2.5 MB).
MAX_COUNTED_KEY_BYTES = 256
# A member that sent nothing for this many heartbeat intervals is reported as missing
# its heartbeats. It is declared dead later, at the session timeout.
HEARTBEAT_MISSED_INTERVALS = 3


class RateTracker:
    """Per-second rates of monotonic counters, with a history of recent samples."""

    def __init__(self) -> None:
        self._last: dict[Any, tuple[float, int]] = {}
        self._rates: dict[Any, float] = {}
        self._history: dict[Any, collections.deque[float]] = {}

    def sample(self, key: Any, total: int, now: float) -> float:
        previous = self._last.get(key)
        self._last[key] = (now, total)
        if previous is None or now <= previous[0]:
            rate = 0.0
        else:
            rate = round((total - previous[1]) / (now - previous[0]), 1)
        self._rates[key] = rate
        history = self._history.get(key)
        if history is None:
            history = self._history[key] = collections.deque(maxlen=HISTORY_SAMPLES)
        history.append(rate)
        return rate

    def rate(self, key: Any) -> float:
        return self._rates.get(key, 0.0)

    def history(self, key: Any) -> list[float]:
        return list(self._history.get(key, ()))

    def forget(self, keep: set[Any]) -> None:
        """Drop counters whose keys are not in `keep`, e.g. members that left."""
        for table in (self._last, self._rates, self._history):
            for key in [key for key in table if key not in keep]:
                del table[key]


class KeyCounter:
    """Counts events per key and per partition of one topic during an interval."""

    def __init__(self, partitions: int) -> None:
        self.keys: dict[bytes, list[int]] = {}  # key -> [partition, count]
        self.partition_counts = [0] * partitions

    def add(self, key: bytes, partition: int) -> None:
        self.partition_counts[partition] += 1
        if len(key) > MAX_COUNTED_KEY_BYTES:
            key = key[:MAX_COUNTED_KEY_BYTES]
        entry = self.keys.get(key)
        if entry is not None:
            entry[1] += 1
        elif len(self.keys) < MAX_KEYS_COUNTED:
            self.keys[key] = [partition, 1]

    def hot_keys(self, interval_s: float) -> list[dict[str, Any]]:
        hot = []
        for key, (partition, count) in self.keys.items():
            partition_count = self.partition_counts[partition]
            if count >= HOT_KEY_MIN_EVENTS and count >= HOT_KEY_SHARE * partition_count:
                hot.append(
                    {
                        "key": key.decode(errors="replace"),
                        "partition": partition,
                        "events_per_s": round(count / interval_s, 1),
                        "share": round(count / partition_count, 3),
                    }
                )
        hot.sort(key=lambda item: item["events_per_s"], reverse=True)
        return hot[:HOT_KEYS_REPORTED]

    def reset(self) -> None:
        self.keys.clear()
        self.partition_counts = [0] * len(self.partition_counts)


def oldest_unacked_age_s(group: Group, now_us: int) -> float:
    """Return the age of the oldest event the group has not acknowledged, in seconds."""
    oldest_us: int | None = None
    for log, cursor in zip(group.topic.logs, group.cursors, strict=True):
        if cursor.committed >= log.next_offset:
            continue
        try:
            data, _ = log.read(max(cursor.committed, log.start_offset), 1, 1)
        except (OffsetOutOfRange, CorruptLog):
            continue
        record = next(records.decode(data, verify=False))
        if oldest_us is None or record.timestamp_us < oldest_us:
            oldest_us = record.timestamp_us
    if oldest_us is None:
        return 0.0
    return round(max(0.0, (now_us - oldest_us) / 1e6), 3)


def stall_reason(group: Group, acked_per_s: float, lag: int, heartbeat_s: float) -> str | None:
    """Explain in one line why a group with lag acknowledged nothing in the last interval."""
    if lag == 0 or acked_per_s > 0:
        return None
    members = list(group.members.values())
    active = [member for member in members if not member.leaving]
    if not active:
        if members:
            return "every shard of the group is leaving; no shard takes new events"
        return "no shards are connected to this group; start `evp process`"
    now = time.monotonic()
    silent = [m for m in active if now - m.last_seen > HEARTBEAT_MISSED_INTERVALS * heartbeat_s]
    if silent:
        member = silent[0]
        return (
            f"shard {member.id} has sent no heartbeat for {now - member.last_seen:.1f} s "
            f"(stopped or overloaded); it is declared dead at the session timeout"
        )
    retrying = [m for m in active if m.retrying]
    if retrying:
        member = retrying[0]
        info = member.retrying
        return (
            f"shard {member.id} is retrying offset {info.get('offset')} of partition "
            f"{info.get('partition')} (attempt {info.get('attempt')}): {info.get('error')}"
        )
    if all(member.in_flight >= member.max_in_flight for member in active if member.partitions):
        return "every shard is at its in-flight limit; the handlers are slow or blocked"
    if any(cursor.moving for cursor in group.cursors):
        return "partitions are moving between shards; waiting for their old owners to acknowledge"
    blocked = [index for index, cursor in enumerate(group.cursors) if cursor.blocked]
    if blocked:
        return f"partitions {blocked} are blocked by a corrupt record; see the queue's log"
    return "no acknowledgements in the last second; the shards may be busy with long events"


class Telemetry:
    def __init__(self, server: QueueServer) -> None:
        self.server = server
        self.rates = RateTracker()
        self.key_counters: dict[str, KeyCounter] = {}
        self.hot_keys: dict[str, list[dict[str, Any]]] = {}
        self.group_latency: dict[tuple[str, str], LatencyHistogram] = {}
        self.latest: dict[str, Any] = {}
        self._last_sample = time.monotonic()

    def key_counter(self, topic: Topic) -> KeyCounter:
        counter = self.key_counters.get(topic.name)
        if counter is None:
            counter = self.key_counters[topic.name] = KeyCounter(topic.partition_count)
        return counter

    def sample(self) -> dict[str, Any]:
        """Update rates, histories and hot keys, then build and keep the snapshot."""
        now = time.monotonic()
        interval_s = max(now - self._last_sample, 1e-3)
        self._last_sample = now
        server = self.server
        keep: set[Any] = set()
        for name, topic in server.store.topics.items():
            keep.add(("in", name))
            self.rates.sample(("in", name), topic.events_in, now)
            counter = self.key_counters.get(name)
            if counter is not None:
                self.hot_keys[name] = counter.hot_keys(interval_s)
                counter.reset()
        for (topic_name, group_name), group in server.groups.items():
            keep.add(("acked", topic_name, group_name))
            self.rates.sample(("acked", topic_name, group_name), group.acked_total, now)
            for member in group.members.values():
                key = ("member", topic_name, group_name, member.id)
                keep.add(key)
                self.rates.sample(key, member.acked_total, now)
        self.rates.forget(keep)
        self.latest = self.build()
        return self.latest

    def build(self) -> dict[str, Any]:
        server = self.server
        rates = self.rates
        now_us = time.time_ns() // 1000
        heartbeat_s = server.config.heartbeat_interval_ms / 1000
        topics = []
        for name, topic in sorted(server.store.topics.items()):
            topics.append(
                {
                    "name": name,
                    "partitions": topic.partition_count,
                    "events": topic.stored_events(),
                    "bytes": topic.size_bytes(),
                    "events_in": topic.events_in,
                    "duplicates_dropped": topic.duplicates_dropped,
                    "events_in_per_s": rates.rate(("in", name)),
                    "events_in_history": rates.history(("in", name)),
                    "hot_keys": self.hot_keys.get(name, []),
                }
            )
        groups = []
        for (topic_name, group_name), group in sorted(server.groups.items()):
            group_latency = LatencyHistogram()
            members = []
            for member in sorted(group.members.values(), key=lambda m: m.id):
                group_latency.merge(member.latency)
                members.append(self._member(topic_name, group_name, member))
            # A copy: the metrics thread reads it while the loop adds to the original.
            self.group_latency[(topic_name, group_name)] = LatencyHistogram(
                group.latency_total.counts
            )
            lag = group.lag()
            acked_per_s = rates.rate(("acked", topic_name, group_name))
            groups.append(
                {
                    "topic": topic_name,
                    "group": group_name,
                    "members": members,
                    "generation": group.generation,
                    "lag": lag,
                    "lag_seconds": oldest_unacked_age_s(group, now_us) if lag else 0.0,
                    "delivered": group.delivered_total,
                    "acked": group.acked_total,
                    "acked_per_s": acked_per_s,
                    "acked_history": rates.history(("acked", topic_name, group_name)),
                    "redelivered": group.redelivered_total,
                    "rebalances": group.rebalances,
                    "lost_to_retention": group.lost_to_retention,
                    "latency": group_latency.summary_ms(),
                    "stall": stall_reason(group, acked_per_s, lag, heartbeat_s),
                    "committed": [cursor.committed for cursor in group.cursors],
                    "partition_lag": [
                        max(0, log.next_offset - cursor.committed)
                        for log, cursor in zip(group.topic.logs, group.cursors, strict=True)
                    ],
                }
            )
        return {
            "version": __version__,
            "uptime_s": round(time.time() - server.started_at, 3),
            "time": time.time(),
            "connections": len(server.connections),
            "topics": topics,
            "groups": groups,
        }

    def _member(self, topic_name: str, group_name: str, member: Any) -> dict[str, Any]:
        return {
            "id": member.id,
            "node": member.id.rpartition("/")[0] or member.id,
            "pid": member.pid,
            "partitions": list(member.partitions),
            "in_flight": member.in_flight,
            "max_in_flight": member.max_in_flight,
            "delivered": member.delivered_total,
            "acked": member.acked_total,
            "acked_per_s": self.rates.rate(("member", topic_name, group_name, member.id)),
            "processed": member.processed,
            "failed": member.failed,
            "latency": member.latency.summary_ms(),
            "leaving": member.leaving,
            "last_seen_s": round(time.monotonic() - member.last_seen, 3),
            "retrying": member.retrying,
        }


# Prometheus exposition: bucket bounds in seconds for the latency histogram. Each of
# the shards' finer log-scale buckets is counted in the first bound at or above its
# upper edge.
PROMETHEUS_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)


def prometheus_buckets(histogram: LatencyHistogram) -> tuple[list[tuple[str, int]], float]:
    """Convert a latency histogram to cumulative Prometheus buckets and an estimated sum."""
    counts = [0] * (len(PROMETHEUS_BUCKETS_S) + 1)
    total_s = 0.0
    for bucket, count in histogram.counts.items():
        upper_s = bucket_upper_us(bucket) / 1e6
        index = next(
            (i for i, bound in enumerate(PROMETHEUS_BUCKETS_S) if upper_s <= bound),
            len(PROMETHEUS_BUCKETS_S),
        )
        counts[index] += count
        total_s += count * upper_s
    cumulative = []
    running = 0
    for bound, count in zip((*PROMETHEUS_BUCKETS_S, float("inf")), counts, strict=True):
        running += count
        cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
    return cumulative, total_s


class SnapshotCollector:
    """A prometheus_client collector that reads the queue's latest snapshot."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry

    def collect(self) -> Any:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        snapshot = self.telemetry.latest
        if not snapshot:
            return
        connections = GaugeMetricFamily("evp_connections", "Open client connections.")
        connections.add_metric([], snapshot["connections"])
        yield connections

        events_in = CounterMetricFamily("evp_events_in", "Events published.", labels=["topic"])
        stored = GaugeMetricFamily("evp_topic_events", "Events stored.", labels=["topic"])
        size = GaugeMetricFamily("evp_topic_bytes", "Bytes of segment files.", labels=["topic"])
        duplicates = CounterMetricFamily(
            "evp_duplicates_dropped",
            "Events sent again by their producer and skipped because the log held them.",
            labels=["topic"],
        )
        for topic in snapshot["topics"]:
            events_in.add_metric([topic["name"]], topic["events_in"])
            stored.add_metric([topic["name"]], topic["events"])
            size.add_metric([topic["name"]], topic["bytes"])
            duplicates.add_metric([topic["name"]], topic["duplicates_dropped"])
        yield from (events_in, stored, size, duplicates)

        group_labels = ["topic", "group"]
        lag = GaugeMetricFamily("evp_group_lag_events", "Events not yet acknowledged.", labels=group_labels)
        lag_s = GaugeMetricFamily(
            "evp_group_lag_seconds", "Age of the oldest unacknowledged event.", labels=group_labels
        )
        acked = CounterMetricFamily("evp_group_acked", "Events acknowledged.", labels=group_labels)
        delivered = CounterMetricFamily("evp_group_delivered", "Events sent to shards.", labels=group_labels)
        redelivered = CounterMetricFamily(
            "evp_group_redelivered", "Events sent again after a shard died.", labels=group_labels
        )
        rebalances = CounterMetricFamily("evp_group_rebalances", "Rebalances.", labels=group_labels)
        lost = CounterMetricFamily(
            "evp_group_lost_events",
            "Unacknowledged events deleted by the queue's disk limits.",
            labels=group_labels,
        )
        members = GaugeMetricFamily("evp_group_members", "Connected shards.", labels=group_labels)
        partition_lag = GaugeMetricFamily(
            "evp_partition_lag_events",
            "Events not yet acknowledged, per partition.",
            labels=["topic", "group", "partition"],
        )
        shard_labels = ["topic", "group", "member"]
        in_flight = GaugeMetricFamily("evp_shard_in_flight", "Unacknowledged events at the shard.", labels=shard_labels)
        shard_acked = CounterMetricFamily("evp_shard_acked", "Events the shard acknowledged.", labels=shard_labels)
        latency = HistogramMetricFamily(
            "evp_processing_latency_seconds",
            "Time from publish to the end of processing, of every event the group's shards reported.",
            labels=group_labels,
        )
        for group in snapshot["groups"]:
            labels = [group["topic"], group["group"]]
            lag.add_metric(labels, group["lag"])
            lag_s.add_metric(labels, group["lag_seconds"])
            acked.add_metric(labels, group["acked"])
            delivered.add_metric(labels, group["delivered"])
            redelivered.add_metric(labels, group["redelivered"])
            rebalances.add_metric(labels, group["rebalances"])
            lost.add_metric(labels, group["lost_to_retention"])
            members.add_metric(labels, len(group["members"]))
            for partition, events in enumerate(group["partition_lag"]):
                partition_lag.add_metric([*labels, str(partition)], events)
            for member in group["members"]:
                member_labels = [*labels, member["id"]]
                in_flight.add_metric(member_labels, member["in_flight"])
                shard_acked.add_metric(member_labels, member["acked"])
            histogram = self.telemetry.group_latency.get((group["topic"], group["group"]))
            if histogram is not None:
                buckets, total_s = prometheus_buckets(histogram)
                latency.add_metric(labels, buckets, total_s)
        yield from (lag, lag_s, acked, delivered, redelivered, rebalances, lost, members)
        yield from (partition_lag, in_flight, shard_acked, latency)
