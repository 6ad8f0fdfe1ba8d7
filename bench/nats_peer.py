"""NATS as a Python developer would use it, with nats-py: JetStream and core.

JetStream (`--mode jetstream`): a file-backed stream `EVENTS` over subjects
`events.<n>`, one per partition, chosen by key hash. The publisher sends each event
with `publish_async` (up to 4,000 awaiting their acknowledgement) and waits for every
acknowledgement at the end. One consumer process per partition fetches from its own
durable pull consumer (explicit acknowledgement, batches of up to 500) and acknowledges
each message.

Core (`--mode core`): the same subjects without a stream. Eight consumer processes
share a queue group, so each message goes to one of them, in no key order, and
nothing is stored: a message that finds a consumer too slow is dropped. This is the
upper bound of a non-durable set-up.

Run as `python -m bench.nats_peer publish|consume --mode jetstream|core ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import time

from bench import clients, workload

STREAM = "EVENTS"
QUEUE_GROUP = "bench"
END_SUBJECT = "bench.end"
FETCH_BATCH = 500
FETCH_TIMEOUT_S = 1.0
PUBLISH_ASYNC_MAX_PENDING = 4000
# Waiting longer than this for outstanding acknowledgements means the server is stuck.
ACK_WAIT_S = 120.0
INSTALL_SERVER = "apt-get install nats-server"
INSTALL_CLIENT = "pip install -r bench/requirements.txt (nats-py)"


def subject(partition: int) -> str:
    return f"events.{partition}"


def durable_name(partition: int) -> str:
    return f"consumer-{partition}"


def missing() -> str | None:
    """Return why NATS cannot be benchmarked here, or None when it can."""
    if shutil.which("nats-server") is None:
        return f"nats-server is not installed; install it with `{INSTALL_SERVER}`"
    try:
        import nats  # noqa: F401
    except ImportError:
        return f"nats-py is not installed; install it with `{INSTALL_CLIENT}`"
    return None


def server_command(port: int, store_dir: str) -> list[str]:
    """nats-server with JetStream on loopback, storing under `store_dir`."""
    return ["nats-server", "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", store_dir]


async def _connect(address: str, **options):  # noqa: ANN202 - nats is imported lazily
    import nats

    return await nats.connect(f"nats://{address}", **options)


async def _setup(address: str, partitions: int) -> None:
    from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

    connection = await _connect(address)
    jetstream = connection.jetstream()
    await jetstream.add_stream(
        StreamConfig(name=STREAM, subjects=["events.*"], storage=StorageType.FILE)
    )
    for partition in range(partitions):
        await jetstream.add_consumer(
            STREAM,
            ConsumerConfig(
                durable_name=durable_name(partition),
                filter_subject=subject(partition),
                ack_policy=AckPolicy.EXPLICIT,
            ),
        )
    await connection.close()


def setup(address: str, partitions: int) -> None:
    """Create the JetStream stream and one durable pull consumer per partition."""
    asyncio.run(_setup(address, partitions))


async def _publish(args: argparse.Namespace) -> None:
    connection = await _connect(args.address)
    jetstream = connection.jetstream(publish_async_max_pending=PUBLISH_ASYNC_MAX_PENDING)
    subjects = [subject(partition) for partition in range(args.partitions)]
    counts = [0] * args.partitions
    errors: list[str] = []
    acked = 0

    def on_ack(future: asyncio.Future) -> None:
        nonlocal acked
        if future.cancelled():
            errors.append("publish cancelled")
        elif future.exception() is not None:
            errors.append(repr(future.exception()))
        else:
            acked += 1

    source = clients.event_source(args)
    pacer = workload.Pacer(args.rate)
    started = time.monotonic()
    first_send_unix = 0.0
    sent = 0
    exhausted = False
    core = args.mode == "core"
    while not exhausted:
        due, sleep_s = pacer.due(sent)
        if not due:
            await asyncio.sleep(sleep_s)
            continue
        for _ in range(due):
            item = next(source, None)
            if item is None:
                exhausted = True
                break
            key, value = item
            partition = workload.partition_of(key, args.partitions)
            if not sent:
                first_send_unix = time.time()
            payload = workload.stamp(value, time.time_ns())
            if core:
                await connection.publish(subjects[partition], payload)
            else:
                future = await jetstream.publish_async(subjects[partition], payload)
                future.add_done_callback(on_ack)
            counts[partition] += 1
            sent += 1
        await asyncio.sleep(0)  # let the acknowledgements be read
    if core:
        # A flush returns once the server has sent the PONG to a PING sent after every publish.
        await connection.flush(timeout=ACK_WAIT_S)
        acked = sent
        await connection.publish(END_SUBJECT, workload.end_marker(sent))
        await connection.flush(timeout=ACK_WAIT_S)
    else:
        try:
            await asyncio.wait_for(jetstream.publish_async_completed(), ACK_WAIT_S)
        except TimeoutError:
            errors.append(f"{sent - acked} publishes unacknowledged after {ACK_WAIT_S} s")
        for partition, name in enumerate(subjects):
            await jetstream.publish(name, workload.end_marker(counts[partition]))
    last_ack_unix = time.time()
    await connection.close()
    result = clients.publisher_result(sent, acked, errors, first_send_unix, last_ack_unix, started)
    clients.write_result(args.result, result)


async def _consume_jetstream(args: argparse.Namespace) -> None:
    import nats.errors

    connection = await _connect(args.address)
    jetstream = connection.jetstream()
    subscription = await jetstream.pull_subscribe_bind(
        durable=durable_name(args.partition), stream=STREAM
    )
    state = clients.ConsumerState(args.ready, args.result)
    state.ready()
    done = False
    while not done:
        try:
            messages = await subscription.fetch(FETCH_BATCH, timeout=FETCH_TIMEOUT_S)
        except nats.errors.TimeoutError:
            continue
        for message in messages:
            if state.on_event(message.data):
                done = True
            await message.ack()
    await connection.close()
    state.finish()


async def _consume_core(args: argparse.Namespace) -> None:
    import nats.errors

    state = clients.ConsumerState(args.ready, args.result)
    ended = asyncio.Event()

    async def on_error(error: Exception) -> None:
        if isinstance(error, nats.errors.SlowConsumerError):
            state.dropped += 1
        elif len(state.errors) < 20:
            state.errors.append(repr(error))

    async def on_message(message) -> None:  # noqa: ANN001 - nats.aio.msg.Msg
        state.on_event(message.data)

    async def on_end(_message) -> None:  # noqa: ANN001
        state.end_markers += 1
        ended.set()

    connection = await _connect(args.address, error_cb=on_error)
    data = await connection.subscribe("events.*", queue=QUEUE_GROUP, cb=on_message)
    await connection.subscribe(END_SUBJECT, cb=on_end)
    await connection.flush()  # both subscriptions are registered at the server
    state.ready()
    await ended.wait()
    # The end marker left the publisher after its last event, but each subscription
    # runs its callbacks from its own queue: finish the events still queued.
    while data.pending_msgs:
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.01)
    await connection.close()
    state.finish()


def main() -> None:
    args = clients.parser(__doc__.splitlines()[0]).parse_args()
    if args.mode not in ("jetstream", "core"):
        sys.exit(f"invalid --mode {args.mode!r}: use jetstream or core")
    if args.role == "publish":
        asyncio.run(_publish(args))
    elif args.mode == "core":
        asyncio.run(_consume_core(args))
    else:
        asyncio.run(_consume_jetstream(args))


if __name__ == "__main__":
    main()
