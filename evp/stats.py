"""`evp stats`: fetch the queue's statistics snapshot and show it.

On a terminal it is a live view, one rich Live object redrawn from each snapshot:
topics, groups with the reason a lagging group is stalled, hot keys and shards.
Elsewhere, or with --plain, it prints one `key=value` line per interval, and with
--json the snapshots themselves. Fields a queue does not send yet are shown as `–`,
so the view works against an older queue too.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from evp import protocol, views
from evp.client import ClientError, request

# The queue keeps 60 one-second rates. Drawn as 20 characters of 3 s each, they fit the
# groups table in 120 columns next to its ten other columns.
SPARKLINE_WIDTH = 20
# Shards send a heartbeat every second by default, so three missed ones are worth a look.
LATE_HEARTBEAT_S = 3.0


async def fetch_snapshot(address: str, token: str | None = None, timeout_s: float = 5.0) -> dict[str, Any]:
    """Connect, request one snapshot and return it."""
    frame = protocol.StatsRequest()
    response = await request(address, frame, protocol.Stats, token=token, timeout_s=timeout_s)
    return response.snapshot


# Rendering.


def _latency(item: dict[str, Any], name: str) -> Any:
    latency = item.get("latency")
    return latency.get(name) if isinstance(latency, dict) else None


def _members(group: dict[str, Any]) -> list[dict[str, Any]]:
    """Return a group's members in natural order of their ids (shard-2 before shard-10)."""
    members = group.get("members") or []
    return sorted(members, key=lambda member: views.natural_key(member.get("id", "")))


def render(
    snapshot: dict[str, Any], *, address: str | None = None, error: str | None = None
) -> Group:
    """Build the live view of one statistics snapshot (the fields are in docs/stats.md).

    `error` is shown in red above the tables, for a snapshot that could not be renewed.
    Fields a queue does not send yet are shown as `–`.
    """
    groups = sorted(
        snapshot.get("groups") or [],
        key=lambda group: (group.get("topic", ""), group.get("group", "")),
    )
    parts: list[RenderableType] = [_header(snapshot, address)]
    if error:
        parts.append(Text(error, style="red"))
    parts += [Text(), _topics_table(snapshot.get("topics") or [])]
    parts += [Text(), _groups_table(groups), *_group_problems(groups)]
    hot_keys = _hot_keys_table(snapshot.get("topics") or [], groups)
    if hot_keys is not None:
        parts += [Text(), hot_keys]
    parts += [Text(), _shards_table(groups), *_member_problems(groups)]
    return Group(*parts)


def _header(snapshot: dict[str, Any], address: str | None) -> Text:
    items = [f"evp queue at {address}" if address else "evp queue"]
    if snapshot.get("version"):
        items.append(f"version {snapshot['version']}")
    if "uptime_s" in snapshot:
        items.append(f"up {views.format_seconds(snapshot['uptime_s'])}")
    connections = snapshot.get("connections")
    if isinstance(connections, int):
        items.append(f"{connections:,} connection" + ("" if connections == 1 else "s"))
    if isinstance(snapshot.get("time"), int | float):
        items.append("snapshot " + time.strftime("%H:%M:%S", time.localtime(snapshot["time"])))
    return Text("  ·  ".join(items), style="dim")


def _topics_table(topics: list[dict[str, Any]]) -> RenderableType:
    table = views.section_table("Topics")
    table.add_column("topic", overflow="fold")
    table.add_column("partitions", justify="right", no_wrap=True)
    table.add_column("stored", justify="right", no_wrap=True)
    table.add_column("on disk", justify="right", no_wrap=True)
    table.add_column("in", justify="right", no_wrap=True)
    table.add_column("in, last 60 s", no_wrap=True)
    for topic in sorted(topics, key=lambda topic: topic.get("name", "")):
        table.add_row(
            topic.get("name", "?"),
            views.format_count(topic.get("partitions")),
            views.format_count(topic.get("events")),
            views.format_bytes(topic.get("bytes")),
            views.format_rate(topic.get("events_in_per_s")),
            views.sparkline(topic.get("events_in_history") or [], SPARKLINE_WIDTH),
        )
    if not topics:
        table.add_row(Text("no topics yet: the first publish creates one", style="dim"))
    return table


def _groups_table(groups: list[dict[str, Any]]) -> RenderableType:
    table = views.section_table("Groups")
    table.add_column("topic", overflow="fold")
    table.add_column("group", overflow="fold")
    table.add_column("members", justify="right", no_wrap=True)
    table.add_column("out", justify="right", no_wrap=True)
    table.add_column("out, last 60 s", no_wrap=True)
    table.add_column("lag", justify="right", no_wrap=True)
    table.add_column("lag time", justify="right", no_wrap=True)
    table.add_column("redelivered", justify="right", no_wrap=True)
    table.add_column("rebalances", justify="right", no_wrap=True)
    table.add_column("p50", justify="right", no_wrap=True)
    table.add_column("p99", justify="right", no_wrap=True)

    for group in groups:
        members = group.get("members") or []
        lag = group.get("lag") or 0
        # Lag is only a problem when it is not being worked off.
        lag_style = "yellow" if lag and (group.get("stall") or not members) else ""
        table.add_row(
            group.get("topic", "?"),
            group.get("group", "?"),
            views.format_count(len(members)),
            views.format_rate(group.get("acked_per_s")),
            views.sparkline(group.get("acked_history") or [], SPARKLINE_WIDTH),
            views.styled(views.format_count(group.get("lag")), lag_style),
            views.styled(views.format_seconds(group.get("lag_seconds")), lag_style),
            views.format_count(group.get("redelivered")),
            views.format_count(group.get("rebalances")),
            views.format_ms(_latency(group, "p50_ms")),
            views.format_ms(_latency(group, "p99_ms")),
        )
    if not groups:
        table.add_row(Text("no consumer groups yet: start `evp process`", style="dim"))
    return table


def _group_problems(groups: list[dict[str, Any]]) -> Iterator[Text]:
    for group in groups:
        name = f"{group.get('topic', '?')}/{group.get('group', '?')}"
        if group.get("stall"):
            yield Text(f"{name} is stalled: {group['stall']}", style="red")
        elif group.get("lag") and not group.get("members"):
            yield Text(
                f"{name} has {group['lag']:,} events waiting and no members to process them",
                style="yellow",
            )


def _hot_keys_table(topics: list[dict[str, Any]], groups: list[dict[str, Any]]) -> Table | None:
    """List keys that take a large share of their partition's rate, with the owning shards."""
    rows = []
    for topic in topics:
        for hot in topic.get("hot_keys") or []:
            rows.append((topic.get("name", "?"), hot))
    if not rows:
        return None
    table = views.section_table("Hot keys")
    table.add_column("topic", overflow="fold")
    table.add_column("key", overflow="fold")
    table.add_column("partition", justify="right", no_wrap=True)
    table.add_column("events", justify="right", no_wrap=True)
    table.add_column("share", justify="right", no_wrap=True)
    table.add_column("owned by", overflow="fold")

    for topic_name, hot in rows:
        partition = hot.get("partition")
        owners = [
            member.get("id", "?")
            for group in groups
            if group.get("topic") == topic_name
            for member in group.get("members") or []
            if partition in (member.get("partitions") or [])
        ]
        share = hot.get("share")
        table.add_row(
            topic_name,
            str(hot.get("key", "?")),
            views.format_count(partition),
            views.format_rate(hot.get("events_per_s")),
            f"{share * 100:.0f}%" if isinstance(share, int | float) else "–",
            ", ".join(owners) or "–",
        )
    return table


def _shards_table(groups: list[dict[str, Any]]) -> RenderableType:
    several_groups = len(groups) > 1
    table = views.section_table("Shards")
    if several_groups:
        table.add_column("topic/group", overflow="fold")
    # Member ids are never shortened, because they are what an operator searches the logs
    # for: a narrow terminal shortens the node (also part of the id) first, and only a
    # very narrow one folds the id onto several lines.
    table.add_column("member", no_wrap=True, overflow="fold")
    table.add_column("node", overflow="ellipsis")
    table.add_column("pid", justify="right", no_wrap=True)
    table.add_column("partitions", justify="right", no_wrap=True)
    table.add_column("in flight", justify="right", no_wrap=True)
    table.add_column("out", justify="right", no_wrap=True)
    table.add_column("p50", justify="right", no_wrap=True)
    table.add_column("p99", justify="right", no_wrap=True)
    table.add_column("last seen", justify="right", no_wrap=True)

    count = 0
    for group in groups:
        for member in _members(group):
            count += 1
            member_id = member.get("id", "?")
            in_flight = member.get("in_flight")
            limit = member.get("max_in_flight")
            full = isinstance(in_flight, int) and isinstance(limit, int) and 0 < limit <= in_flight
            last_seen = member.get("last_seen_s")
            late = isinstance(last_seen, int | float) and last_seen > LATE_HEARTBEAT_S
            row: list[RenderableType] = []
            if several_groups:
                row.append(f"{group.get('topic', '?')}/{group.get('group', '?')}")
            row += [
                member_id,
                member.get("node") or member_id.rpartition("/")[0] or "–",
                str(member.get("pid") or "–"),
                views.format_count(len(member.get("partitions") or [])),
                views.styled(
                    f"{views.format_count(in_flight)} / {views.format_count(limit)}",
                    "yellow" if full else "",
                ),
                views.format_rate(member.get("acked_per_s")),
                views.format_ms(_latency(member, "p50_ms")),
                views.format_ms(_latency(member, "p99_ms")),
                views.styled(f"{views.format_seconds(last_seen)} ago", "yellow" if late else ""),
            ]
            table.add_row(*row)
    if not count:
        table.add_row(Text("no shards connected", style="dim"))
    return table


def _member_problems(groups: list[dict[str, Any]]) -> Iterator[Text]:
    for group in groups:
        for member in _members(group):
            member_id = member.get("id", "?")
            retrying = member.get("retrying")
            if isinstance(retrying, dict):
                yield Text(
                    f"{member_id} is retrying partition {retrying.get('partition', '?')} "
                    f"offset {views.format_count(retrying.get('offset'))} "
                    f"key {retrying.get('key', '?')!r} (attempt {retrying.get('attempt', '?')}): "
                    f"{retrying.get('error', '')}",
                    style="yellow",
                )
            if member.get("leaving"):
                in_flight = views.format_count(member.get("in_flight"))
                yield Text(f"{member_id} is leaving: finishing {in_flight} events in flight")


def _quote(text: str) -> str:
    """Return `text` as a JSON string, so a plain line stays one line and splits on spaces."""
    return orjson.dumps(text).decode()


def plain_line(snapshot: dict[str, Any], *, error: str | None = None) -> str:
    """Sum up one snapshot as a single line of key=value pairs, without escape codes.

    A topic contributes `topic=NAME` and the keys after it, and a group contributes
    `group=TOPIC/GROUP` and the keys after it, so one line covers every topic and group.
    """
    parts = [f"time={time.strftime('%H:%M:%S')}"]
    if error:
        parts.append(f"error={_quote(error)}")
        return " ".join(parts)
    if isinstance(snapshot.get("uptime_s"), int | float):
        parts.append(f"uptime_s={snapshot['uptime_s']:.0f}")
    for topic in sorted(snapshot.get("topics") or [], key=lambda topic: topic.get("name", "")):
        parts.append(f"topic={topic.get('name', '?')}")
        parts.append(f"stored={topic.get('events', 0)}")
        if "bytes" in topic:
            parts.append(f"bytes={topic['bytes']}")
        parts.append(f"in_per_s={topic.get('events_in_per_s') or 0:.0f}")
        if topic.get("hot_keys"):
            parts.append(f"hot_keys={len(topic['hot_keys'])}")
    for group in snapshot.get("groups") or []:
        parts.append(f"group={group.get('topic', '?')}/{group.get('group', '?')}")
        parts.append(f"members={len(group.get('members') or [])}")
        parts.append(f"acked={group.get('acked', 0)}")
        parts.append(f"acked_per_s={group.get('acked_per_s') or 0:.0f}")
        parts.append(f"lag={group.get('lag', 0)}")
        if isinstance(group.get("lag_seconds"), int | float):
            parts.append(f"lag_s={group['lag_seconds']:.1f}")
        parts.append(f"redelivered={group.get('redelivered', 0)}")
        p99 = _latency(group, "p99_ms")
        if isinstance(p99, int | float):
            parts.append(f"p99_ms={p99:.1f}")
        if group.get("stall"):
            parts.append(f"stall={_quote(str(group['stall']))}")
    return " ".join(parts)


# Fetching and showing.


async def _every(interval_s: float) -> AsyncIterator[None]:
    """Yield now and then every `interval_s` seconds, without drift from slow fetches."""
    next_at = time.monotonic()
    while True:
        yield
        next_at += interval_s
        delay_s = next_at - time.monotonic()
        if delay_s < 0:  # a fetch took longer than the interval, so skip the missed turns
            next_at = time.monotonic()
            delay_s = 0
        await asyncio.sleep(delay_s)


async def _fetch_or_error(
    address: str, token: str | None
) -> tuple[dict[str, Any] | None, str | None]:
    try:
        return await fetch_snapshot(address, token), None
    except (ClientError, OSError) as exc:
        return None, str(exc)


async def watch(
    address: str, *, as_json: bool, once: bool, plain: bool, interval_s: float, token: str | None
) -> None:
    """Show snapshots until interrupted (or once).

    The first snapshot must arrive, or ClientError is raised. After that a failed fetch
    is shown (a red line in the live view, `error=` in plain lines, a message on stderr
    with --json) and retried at the next interval, so the view outlives a queue restart.
    """
    console = Console()
    snapshot = await fetch_snapshot(address, token)
    if once:
        if as_json:
            sys.stdout.write(orjson.dumps(snapshot).decode() + "\n")
        elif plain or not console.is_terminal:
            print(plain_line(snapshot), flush=True)
        else:
            console.print(render(snapshot, address=address))
        return
    if as_json:
        await _print_json_lines(address, token, interval_s, snapshot)
    elif plain or not console.is_terminal:
        await _print_plain_lines(address, token, interval_s, snapshot)
    else:
        await _show_live(console, address, token, interval_s, snapshot)


async def _print_json_lines(
    address: str, token: str | None, interval_s: float, first: dict[str, Any]
) -> None:
    snapshot: dict[str, Any] | None = first
    async for _ in _every(interval_s):
        if snapshot is None:
            snapshot, error = await _fetch_or_error(address, token)
            if error:
                message = f"warning: {error}; retrying in {interval_s:g} s"
                print(message, file=sys.stderr, flush=True)
                continue
        print(orjson.dumps(snapshot).decode(), flush=True)
        snapshot = None


async def _print_plain_lines(
    address: str, token: str | None, interval_s: float, first: dict[str, Any]
) -> None:
    snapshot: dict[str, Any] | None = first
    async for _ in _every(interval_s):
        error = None
        if snapshot is None:
            snapshot, error = await _fetch_or_error(address, token)
        print(plain_line(snapshot or {}, error=error), flush=True)
        snapshot = None


async def _show_live(
    console: Console, address: str, token: str | None, interval_s: float, first: dict[str, Any]
) -> None:
    # One Live object for the whole run, redrawn from this loop only (no refresh thread).
    # On Ctrl-C asyncio cancels this task, and leaving the `with` block draws the last
    # frame in full and shows the cursor again before KeyboardInterrupt reaches the CLI.
    last_good = first
    snapshot: dict[str, Any] | None = first
    with Live(console=console, auto_refresh=False, transient=False) as live:
        async for _ in _every(interval_s):
            error = None
            if snapshot is None:
                snapshot, error = await _fetch_or_error(address, token)
            if snapshot is not None:
                last_good = snapshot
            else:
                error = f"{error}; showing the last snapshot, retrying every {interval_s:g} s"
            live.update(render(last_good, address=address, error=error), refresh=True)
            snapshot = None
