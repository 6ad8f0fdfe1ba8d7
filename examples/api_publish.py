"""Publish events from Python with evp.Producer.

Usage: python examples/api_publish.py [QUEUE] [COUNT]

Publishes COUNT (default 100) orders to topic "orders" on the queue at QUEUE
(default $EVP_QUEUE or 127.0.0.1:8000), keyed by customer, so that each customer's
orders are processed in order. Exits 1 unless every order is acknowledged.
"""

from __future__ import annotations

import asyncio
import os
import sys

from evp import ClientError, Producer


async def publish_orders(queue: str, count: int) -> int:
    rejected: list[str] = []

    def on_rejected(message: str, events: int) -> None:
        rejected.append(f"{events} events rejected: {message}")

    async with Producer(queue, on_rejected=on_rejected) as producer:
        for number in range(count):
            customer = f"customer-{number % 10}"
            order = {"id": number, "customer": customer, "total": round(number * 1.5, 2)}
            producer.publish_event("orders", customer, order)
            # Waits only while too many events are unacknowledged.
            await producer.wait_for_capacity()
    # Leaving the block flushed: every order is acknowledged or rejected by now.
    for message in rejected:
        print(message, file=sys.stderr)
    return producer.acked


def main() -> int:
    queue = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("EVP_QUEUE", "127.0.0.1:8000")
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    try:
        acked = asyncio.run(publish_orders(queue, count))
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"acknowledged {acked} of {count} orders")
    return 0 if acked == count else 1


if __name__ == "__main__":
    sys.exit(main())
