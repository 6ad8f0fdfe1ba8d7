"""Redis Streams as a Python developer would use it, with redis-py.

One publisher XADDs each event, in pipelines of up to 1,000 commands, to one of
`--partitions` streams chosen by key hash (so each key keeps its order), as fields
`k` (the key) and `v` (the JSON event). One consumer process per stream reads it in
consumer group `bench` with XREADGROUP (COUNT 1000, BLOCK 1000 ms) and acknowledges
each batch with one XACK. Streams are not trimmed, so the server keeps every event in
memory, as it would without a MAXLEN.

Run as `python -m bench.redis_peer publish|consume ...` (see bench/clients.py).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from bench import clients, workload

GROUP = "bench"
READ_COUNT = 1000
READ_BLOCK_MS = 1000
INSTALL_SERVER = "apt-get install redis-server"
INSTALL_CLIENT = "pip install -r bench/requirements.txt (redis and hiredis)"


def stream_name(partition: int) -> str:
    return f"events-{partition}"


def missing() -> str | None:
    """Return why Redis cannot be benchmarked here, or None when it can."""
    if shutil.which("redis-server") is None:
        return f"redis-server is not installed; install it with `{INSTALL_SERVER}`"
    try:
        import redis  # noqa: F401
    except ImportError:
        return f"redis-py is not installed; install it with `{INSTALL_CLIENT}`"
    return None


def server_command(port: int, data_dir: Path, durable: bool) -> list[str]:
    """redis-server on loopback, in the foreground, with RDB snapshots off."""
    command = [
        "redis-server",
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--daemonize", "no",
        "--dir", str(data_dir),
        "--logfile", "",
    ]
    if durable:
        command += ["--appendonly", "yes", "--appendfsync", "everysec"]
    else:
        command += ["--appendonly", "no"]
    return command


def _connect(address: str):  # noqa: ANN202 - redis is imported lazily
    import redis

    host, port = address.rsplit(":", 1)
    return redis.Redis(host=host, port=int(port))


def setup(address: str, partitions: int) -> None:
    """Create the streams and the consumer group, reading from the first entry."""
    client = _connect(address)
    for partition in range(partitions):
        client.xgroup_create(stream_name(partition), GROUP, id="0", mkstream=True)
    client.close()


def publish(args: argparse.Namespace) -> None:
    client = _connect(args.address)
    streams = [stream_name(partition) for partition in range(args.partitions)]
    counts = [0] * args.partitions
    source = clients.event_source(args)
    pacer = workload.Pacer(args.rate)
    started = time.monotonic()
    first_send_unix = 0.0
    sent = 0
    exhausted = False
    while not exhausted:
        due, sleep_s = pacer.due(sent)
        if not due:
            time.sleep(sleep_s)
            continue
        pipe = client.pipeline(transaction=False)
        batch = 0
        for _ in range(due):
            item = next(source, None)
            if item is None:
                exhausted = True
                break
            key, value = item
            partition = workload.partition_of(key, args.partitions)
            if not sent:
                first_send_unix = time.time()
            pipe.xadd(streams[partition], {b"k": key, b"v": workload.stamp(value, time.time_ns())})
            counts[partition] += 1
            sent += 1
            batch += 1
        if batch:
            pipe.execute()  # raises on the first failed XADD
    pipe = client.pipeline(transaction=False)
    for partition, stream in enumerate(streams):
        pipe.xadd(stream, {b"k": b"", b"v": workload.end_marker(counts[partition])})
    pipe.execute()
    last_ack_unix = time.time()
    result = clients.publisher_result(sent, sent, [], first_send_unix, last_ack_unix, started)
    clients.write_result(args.result, result)


def consume(args: argparse.Namespace) -> None:
    client = _connect(args.address)
    stream = stream_name(args.partition)
    consumer = f"consumer-{args.partition}"
    state = clients.ConsumerState(args.ready, args.result)
    client.ping()
    state.ready()
    done = False
    while not done:
        response = client.xreadgroup(
            GROUP, consumer, {stream: ">"}, count=READ_COUNT, block=READ_BLOCK_MS
        )
        if not response:
            continue
        ids = []
        for entry_id, fields in response[0][1]:
            ids.append(entry_id)
            if state.on_event(fields[b"v"]):
                done = True
        client.xack(stream, GROUP, *ids)
    state.finish()


def main() -> None:
    args = clients.parser(__doc__.splitlines()[0]).parse_args()
    if args.role == "publish":
        publish(args)
    else:
        consume(args)


if __name__ == "__main__":
    sys.exit(main())
