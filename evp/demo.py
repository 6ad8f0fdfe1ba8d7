"""`evp demo`: a queue, a processor and a publisher on a temporary directory.

The queue and the processor run as child processes (`python -m evp ...`), exactly as
a user would start them; the publisher runs in this process. While events flow the
live view shows the queue's statistics. At the end the demo reads every shard's
output file and checks it against the queue: each stored event processed at least
once (lost must be 0), and each key seen by exactly one shard.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import orjson
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from evp import publisher, stats
from evp.client import ClientError

START_TIMEOUT_S = 20.0
CATCH_UP_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the queue exited with code {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"the queue did not listen on port {port} within {timeout_s} s")


def check_outputs(output_dir: Path) -> dict[str, object]:
    """Read the shards' output files and count processed, duplicate and per-shard events."""
    seen: set[tuple[int, int]] = set()
    lines = 0
    per_shard: dict[int, int] = defaultdict(int)
    key_shards: dict[str, set[int]] = defaultdict(set)
    for path in sorted(output_dir.glob("shard-*.jsonl")):
        with open(path, "rb") as file:
            for line in file:
                row = orjson.loads(line)
                lines += 1
                seen.add((row["partition"], row["offset"]))
                per_shard[row["shard"]] += 1
                key_shards[row["key"]].add(row["shard"])
    return {
        "lines": lines,
        "distinct": len(seen),
        "duplicates": lines - len(seen),
        "per_shard": dict(sorted(per_shard.items())),
        "keys_on_several_shards": sum(1 for shards in key_shards.values() if len(shards) > 1),
    }


async def _run_publisher_with_view(address: str, count: int, rate: float, console: Console) -> publisher.PublishReport:
    config = publisher.PublishConfig(queue=address, rate=rate, count=count)
    task = asyncio.create_task(publisher.publish(config))
    with Live(console=console, auto_refresh=False, transient=False) as live:
        while True:
            done = task.done()
            try:
                snapshot = await stats.fetch_snapshot(address)
                caught_up = done and all(group["lag"] == 0 for group in snapshot["groups"])
                if not done:
                    status = "publishing…"
                elif caught_up:
                    status = "done"
                else:
                    status = "processing the backlog…"
                header = Text(status, style="bold")
                live.update(Group(header, stats.render(snapshot)), refresh=True)
            except ClientError:
                caught_up = False
            if done and (caught_up or task.exception() is not None):
                break
            await asyncio.sleep(0.5)
    return task.result()


async def _wait_for_members(address: str, members: int, timeout_s: float) -> None:
    """Wait until every shard has joined, so that keys do not move while events flow."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        snapshot = await stats.fetch_snapshot(address)
        if any(len(group["members"]) >= members for group in snapshot["groups"]):
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the {members} shards did not all join within {timeout_s} s")


async def _wait_caught_up(address: str, timeout_s: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while True:
        snapshot = await stats.fetch_snapshot(address)
        groups = snapshot["groups"]
        if groups and all(group["lag"] == 0 for group in groups):
            return snapshot
        if time.monotonic() > deadline:
            return snapshot
        await asyncio.sleep(0.2)


def run(shards: int, count: int, rate: float, partitions: int, keep: bool) -> int:
    console = Console(stderr=False)
    workdir = Path(tempfile.mkdtemp(prefix="evp-demo-"))
    port = free_port()
    address = f"127.0.0.1:{port}"
    console.print(f"evp demo in {workdir}: queue on {address}, {shards} shards, {count} events")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    queue_log = open(workdir / "queue.log", "wb")  # noqa: SIM115
    process_log = open(workdir / "process.log", "wb")  # noqa: SIM115
    queue = subprocess.Popen(
        [sys.executable, "-m", "evp", "queue", "--port", str(port), "--data-dir", str(workdir / "data"), "--partitions", str(partitions)],
        stdout=queue_log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    processor: subprocess.Popen[bytes] | None = None
    code = 0
    try:
        wait_for_port(port, queue, START_TIMEOUT_S)
        processor = subprocess.Popen(
            [sys.executable, "-m", "evp", "process", "--queue", address, "--shards", str(shards), "--output", str(workdir / "out"), "--node", "demo"],
            stdout=process_log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        import uvloop

        uvloop.run(_wait_for_members(address, shards, START_TIMEOUT_S))
        report = uvloop.run(_run_publisher_with_view(address, count, rate, console))
        snapshot = uvloop.run(_wait_caught_up(address, CATCH_UP_TIMEOUT_S))
        processor.send_signal(signal.SIGTERM)
        processor.wait(timeout=60)
        stored = sum(topic["events"] for topic in snapshot["topics"])
        result = check_outputs(workdir / "out")
        lost = stored - int(result["distinct"])  # type: ignore[arg-type]
        console.print()  # off a terminal, the live view's last frame ends without a newline
        table = Table(title="evp demo summary", title_justify="left")
        table.add_column("measure")
        table.add_column("value", justify="right")
        table.add_row("published (acknowledged)", f"{report.acked:,}")
        table.add_row("stored by the queue", f"{stored:,}")
        table.add_row("processed (distinct)", f"{result['distinct']:,}")
        table.add_row("duplicates", f"{result['duplicates']:,}")
        table.add_row("lost", f"{lost:,}")
        table.add_row("keys seen by more than one shard", f"{result['keys_on_several_shards']:,}")
        for shard, events in result["per_shard"].items():  # type: ignore[union-attr]
            table.add_row(f"  events on shard-{shard}", f"{events:,}")
        table.add_row("publish time", f"{report.elapsed_s:.2f} s")
        console.print(table)
        if lost or report.acked != count or not report.ok:
            console.print("[red]the demo found lost or unacknowledged events[/]")
            code = 1
    except (RuntimeError, ClientError, subprocess.TimeoutExpired) as exc:
        console.print(f"[red]demo failed: {exc}[/]; logs are in {workdir}")
        keep = True
        code = 1
    except KeyboardInterrupt:
        code = 130
    finally:
        for child in (processor, queue):
            if child is not None and child.poll() is None:
                child.send_signal(signal.SIGTERM)
                try:
                    child.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    child.kill()
        queue_log.close()
        process_log.close()
        if keep:
            console.print(f"kept {workdir} (data, queue.log, process.log, out/)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return code
