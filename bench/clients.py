"""Command-line plumbing of the peers' publisher and consumer processes.

Each peer module (bench/redis_peer.py, bench/nats_peer.py) runs as
`python -m bench.<peer> publish|consume ...`. The orchestrator starts the consumers,
waits for each one's ready file, starts the publisher, and reads the JSON result file
that every process writes when it ends.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import workload


def cpu_s() -> float:
    """CPU seconds (user and system) this process has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    roles = parser.add_subparsers(dest="role", required=True)
    publish = roles.add_parser("publish", help="Publish events, then one end marker per partition.")
    publish.add_argument("--address", required=True, help="Server address, HOST:PORT.")
    publish.add_argument("--partitions", type=int, default=8, help="Streams or subjects.")
    publish.add_argument("--events", type=int, required=True, help="Events to publish.")
    publish.add_argument("--rate", type=float, default=0, help="Events per second; 0 for full speed.")
    publish.add_argument("--keys", type=int, default=10_000, help="Distinct keys of generated events.")
    publish.add_argument("--seed", type=int, default=1, help="Seed of the event generator.")
    publish.add_argument("--file", help="JSON-lines file to publish instead of generated events.")
    publish.add_argument("--key-field", default="page", help="Key field of --file events.")
    publish.add_argument("--result", type=Path, required=True, help="JSON file to write at the end.")
    publish.add_argument("--mode", default="", help="Peer-specific variant, e.g. core or jetstream.")
    consume = roles.add_parser("consume", help="Consume until the end marker(s) arrive.")
    consume.add_argument("--address", required=True, help="Server address, HOST:PORT.")
    consume.add_argument("--partition", type=int, default=0, help="Stream or subject index to read.")
    consume.add_argument("--ready", type=Path, required=True, help="File created once subscribed.")
    consume.add_argument("--result", type=Path, required=True, help="JSON file to write at the end.")
    consume.add_argument("--mode", default="", help="Peer-specific variant, e.g. core or jetstream.")
    return parser


def event_source(args: argparse.Namespace) -> Iterator[tuple[bytes, bytes]]:
    """The first `args.events` events of the file or of the generator."""
    if args.file:
        source = workload.file_events(args.file, args.key_field)
    else:
        source = workload.generated_events(args.keys, args.seed)
    for index, item in enumerate(source):
        if index >= args.events:
            return
        yield item


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Write the result atomically, so the orchestrator never reads half a file."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(result))
    partial.replace(path)


def publisher_result(
    sent: int,
    acked: int,
    errors: list[str],
    first_send_unix: float,
    last_ack_unix: float,
    started_monotonic: float,
) -> dict[str, Any]:
    return {
        "sent": sent,
        "acked": acked,
        "errors": errors[:20],
        "first_send_unix": first_send_unix,
        "last_ack_unix": last_ack_unix,
        "elapsed_s": time.monotonic() - started_monotonic,
        # The whole process, start-up included, as for `evp publish`.
        "cpu_s": cpu_s(),
    }


class ConsumerState:
    """Counts, latencies and CPU of one consumer process, from ready to done."""

    def __init__(self, ready_path: Path, result_path: Path) -> None:
        self.ready_path = ready_path
        self.result_path = result_path
        self.latency = workload.LatencyRecorder()
        self.received = 0
        self.expected = 0
        self.end_markers = 0
        self.dropped = 0
        self.errors: list[str] = []
        self.first_unix: float | None = None
        self._cpu_at_ready = 0.0

    def ready(self) -> None:
        self._cpu_at_ready = cpu_s()
        self.ready_path.touch()

    def on_event(self, value: bytes) -> bool:
        """Record one event; return True when it is an end marker."""
        event = workload.orjson.loads(value)
        if workload.END_FIELD in event:
            self.end_markers += 1
            self.expected += event["count"]
            return True
        if self.first_unix is None:
            self.first_unix = time.time()
        self.latency.record(event)
        self.received += 1
        return False

    def finish(self) -> None:
        done_unix = time.time()
        samples_path = self.result_path.with_suffix(".latency")
        self.latency.save(samples_path)
        write_result(
            self.result_path,
            {
                "received": self.received,
                "expected": self.expected,
                "end_markers": self.end_markers,
                "dropped": self.dropped,
                "errors": self.errors[:20],
                "first_unix": self.first_unix,
                "done_unix": done_unix,
                "cpu_s": cpu_s() - self._cpu_at_ready,
                "samples": str(samples_path),
            },
        )
