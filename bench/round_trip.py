"""The cost of one message between two processes on this machine, without evp's code.

Two uvloop processes bounce a 300-byte message back and forth over TCP on 127.0.0.1,
then over a Unix socket, and the script prints the wall time and the client's CPU
time (user plus system) per round trip. A round trip is one write, one wake-up and
one read on each side: the least work any hop of an event (publisher to queue, queue
to shard, the shard's acknowledgement) can cost. At low event rates most hops carry
one or two events, so this figure, times the hops per event, is the floor of evp's
CPU per event there.

Usage: python bench/round_trip.py [--trips 20000]
Prints one JSON line per transport.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import free_port  # noqa: E402

MESSAGE = b"x" * 300


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


class Bouncer(asyncio.Protocol):
    """Send MESSAGE, then echo each reply back until `trips` replies have arrived."""

    def __init__(self, trips: int, done: asyncio.Future[None]) -> None:
        self.trips = trips
        self.replies = 0
        self.done = done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.transport.write(MESSAGE)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.replies += 1
        if self.replies >= self.trips:
            self.done.set_result(None)
        else:
            self.transport.write(data)  # type: ignore[attr-defined]


async def serve(transport: str, where: str | int) -> None:
    loop = asyncio.get_running_loop()
    if transport == "unix":
        await loop.create_unix_server(Echo, str(where))
    else:
        await loop.create_server(Echo, "127.0.0.1", int(where))
    await asyncio.Event().wait()


async def bounce(transport: str, where: str | int, trips: int) -> float:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    if transport == "unix":
        await loop.create_unix_connection(lambda: Bouncer(trips, done), str(where))
    else:
        await loop.create_connection(lambda: Bouncer(trips, done), "127.0.0.1", int(where))
    started = time.perf_counter()
    await done
    return time.perf_counter() - started


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(transport: str, trips: int, workdir: Path) -> dict:
    where: str | int = str(workdir / "echo.sock") if transport == "unix" else free_port()
    pid = os.fork()
    if pid == 0:
        uvloop.run(serve(transport, where))
        os._exit(0)
    try:
        time.sleep(0.5)  # let the echo process listen
        before = cpu_s()
        elapsed_s = uvloop.run(bounce(transport, where, trips))
        used_s = cpu_s() - before
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
    return {
        "transport": transport,
        "trips": trips,
        "wall_us_per_trip": round(elapsed_s / trips * 1e6, 1),
        "client_cpu_us_per_trip": round(used_s / trips * 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trips", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="evp-trip-") as tmp:
        for transport in ("tcp", "unix"):
            print(json.dumps(measure(transport, args.trips, Path(tmp))))


if __name__ == "__main__":
    main()
