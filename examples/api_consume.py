"""Consume events from Python with evp.Consumer, as one member of a group.

Usage: python examples/api_consume.py [QUEUE] [COUNT]

Joins group "billing" of topic "orders" on the queue at QUEUE (default $EVP_QUEUE
or 127.0.0.1:8000) and prints each order as a JSON line. After COUNT orders (default:
run until Ctrl-C) it leaves the group: it finishes and acknowledges what it holds,
so the group continues after them next time.
"""

from __future__ import annotations

import asyncio
import os
import sys

import orjson

from evp import Consumer, ServerError
from evp.records import Record


async def consume_orders(queue: str, count: int | None) -> int:
    seen = 0
    enough = asyncio.Event()

    async def process(partition: int, batch: list[Record]) -> None:
        nonlocal seen
        for record in batch:
            order = orjson.loads(record.value)
            line = {"partition": partition, "offset": record.offset, "order": order}
            print(orjson.dumps(line).decode(), flush=True)
            seen += 1
        # Returning acknowledges the batch.
        if count is not None and seen >= count:
            enough.set()

    consumer = Consumer(
        queue, topic="orders", group="billing", member="billing-example", process=process
    )
    running = asyncio.create_task(consumer.run())
    finished = asyncio.create_task(enough.wait())
    await asyncio.wait([running, finished], return_when=asyncio.FIRST_COMPLETED)
    if not running.done():
        await consumer.leave()
    await running
    finished.cancel()
    return seen


def main() -> int:
    queue = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("EVP_QUEUE", "127.0.0.1:8000")
    count = int(sys.argv[2]) if len(sys.argv) > 2 else None
    try:
        seen = asyncio.run(consume_orders(queue, count))
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(f"processed {seen} orders", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
