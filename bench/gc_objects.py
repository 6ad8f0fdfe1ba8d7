"""Objects the garbage collector tracks in a queue fed small publishes, and the cost
of one full collection.

The script starts a QueueServer in this process on a temporary data directory. It
publishes `--publishes` batches of one generated event each, the shape of a slow
publisher, whose every publish makes one small batch per partition. Then it prints
the number of objects the collector tracks after start and after the publishes, and
the time of one full collection, which stops the queue's event loop for that long.

Usage: python bench/gc_objects.py [--publishes 100000]
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from evp import protocol  # noqa: E402
from evp.events import EventGenerator  # noqa: E402
from evp.server import QueueConfig, QueueServer  # noqa: E402


async def measure(publishes: int, data_dir: Path) -> dict:
    server = QueueServer(QueueConfig(data_dir=data_dir, port=0))
    await server.start()
    try:
        gc.collect()
        after_start = len(gc.get_objects())
        generator = EventGenerator(keys=10_000, seed=1)
        for sequence in range(1, publishes + 1):
            key, value = generator.next()
            server.publish(protocol.Publish(sequence, "events", [(key, value, 1)]), producer=5)
        gc.collect()
        after_publishes = len(gc.get_objects())
        started = time.perf_counter()
        gc.collect()
        collection_ms = (time.perf_counter() - started) * 1000
    finally:
        await server.stop()
    return {
        "publishes": publishes,
        "tracked_after_start": after_start,
        "tracked_after_publishes": after_publishes,
        "full_collection_ms": round(collection_ms, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--publishes", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="evp-gc-") as tmp:
        print(json.dumps(asyncio.run(measure(args.publishes, Path(tmp)))))


if __name__ == "__main__":
    main()
