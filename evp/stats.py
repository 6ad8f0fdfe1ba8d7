"""`evp stats`: fetch the queue's statistics snapshot and show it."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import orjson
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from evp import protocol
from evp.client import ClientError, connect


async def fetch_snapshot(address: str, token: str | None = None, timeout_s: float = 5.0) -> dict[str, Any]:
    """Connect, request one snapshot and return it."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[protocol.Frame] = loop.create_future()

    def on_frame(frame: protocol.Frame) -> None:
        if not answer.done():
            answer.set_result(frame)

    connection, _ = await connect(address, on_frame, token=token, timeout_s=timeout_s)
    try:
        connection.send(protocol.encode(protocol.StatsRequest()))
        try:
            frame = await asyncio.wait_for(answer, timeout_s)
        except TimeoutError:
            raise ClientError(f"the queue at {address} sent no statistics within {timeout_s} s") from None
    finally:
        connection.close()
    if isinstance(frame, protocol.Error):
        raise ClientError(f"the queue rejected the statistics request: {frame.message}")
    if not isinstance(frame, protocol.Stats):
        raise ClientError(f"the queue responded to a statistics request with {type(frame).__name__}")
    return frame.snapshot


def render(snapshot: dict[str, Any]) -> Group:
    """Build the rich renderable of one snapshot."""
    topics = Table(title="Topics", title_justify="left", expand=False)
    for column in ("topic", "partitions", "events stored", "bytes on disk", "in/s"):
        topics.add_column(column, justify="left" if column == "topic" else "right")
    for topic in snapshot["topics"]:
        topics.add_row(
            topic["name"],
            str(topic["partitions"]),
            f"{topic['events']:,}",
            _bytes(topic["bytes"]),
            f"{topic['events_in_per_s']:,.0f}",
        )
    groups = Table(title="Groups", title_justify="left")
    for column in ("topic", "group", "members", "acked", "acked/s", "lag (events)", "redelivered"):
        groups.add_column(column, justify="left" if column in ("topic", "group") else "right")
    shards = Table(title="Shards", title_justify="left")
    for column in ("group", "member", "partitions", "in flight", "acked", "acked/s", "last seen"):
        shards.add_column(column, justify="left" if column in ("group", "member") else "right")
    for group in snapshot["groups"]:
        lag_style = "yellow" if group["lag"] and not group["members"] else ""
        groups.add_row(
            group["topic"],
            group["group"],
            str(len(group["members"])),
            f"{group['acked']:,}",
            f"{group['acked_per_s']:,.0f}",
            f"[{lag_style}]{group['lag']:,}[/]" if lag_style else f"{group['lag']:,}",
            f"{group['redelivered']:,}",
        )
        for member in group["members"]:
            shards.add_row(
                group["group"],
                member["id"],
                str(len(member["partitions"])),
                f"{member['in_flight']:,} / {member['max_in_flight']:,}",
                f"{member['acked']:,}",
                f"{member['acked_per_s']:,.0f}",
                f"{member['last_seen_s']:.1f} s",
            )
    return Group(topics, groups, shards)


def plain_line(snapshot: dict[str, Any]) -> str:
    """Return one line of key=value pairs summing up the snapshot."""
    parts = [time.strftime("%H:%M:%S")]
    for topic in snapshot["topics"]:
        parts.append(
            f"topic={topic['name']} stored={topic['events']} in_per_s={topic['events_in_per_s']:.0f}"
        )
    for group in snapshot["groups"]:
        parts.append(
            f"group={group['group']} members={len(group['members'])} acked={group['acked']} "
            f"acked_per_s={group['acked_per_s']:.0f} lag={group['lag']}"
        )
    return " ".join(parts)


def _bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{count} B"


async def watch(
    address: str, *, as_json: bool, once: bool, plain: bool, interval_s: float, token: str | None
) -> None:
    """Show snapshots until interrupted (or once)."""
    console = Console()
    live_view = not as_json and not plain and console.is_terminal and not once
    if once:
        snapshot = await fetch_snapshot(address, token)
        if as_json:
            sys.stdout.write(orjson.dumps(snapshot).decode() + "\n")
        elif plain or not console.is_terminal:
            print(plain_line(snapshot), flush=True)
        else:
            console.print(render(snapshot))
        return
    if not live_view:
        while True:
            snapshot = await fetch_snapshot(address, token)
            if as_json:
                print(orjson.dumps(snapshot).decode(), flush=True)
            else:
                print(plain_line(snapshot), flush=True)
            await asyncio.sleep(interval_s)
    with Live(console=console, auto_refresh=False, transient=False) as live:
        while True:
            snapshot = await fetch_snapshot(address, token)
            live.update(render(snapshot), refresh=True)
            await asyncio.sleep(interval_s)
