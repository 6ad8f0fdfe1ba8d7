"""`evp replay`, `evp tail` and `evp route`: inspect and rewind a running queue."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from evp.cli_admin import (
    JsonOutput,
    QueueAddress,
    TlsCa,
    Token,
    _print_json,
    _request,
    fail,
    run_async,
)
from evp.records import MAX_KEY_BYTES

TopicName = Annotated[str, typer.Option("--topic", envvar="EVP_TOPIC", help="Topic name.")]

def check_key(key: str) -> None:
    """Exit with a clear error unless `key` could be the key of a stored event."""
    try:
        size = len(key.encode())
    except UnicodeEncodeError:
        fail(f"the key {key!r} is not valid UTF-8; event keys are UTF-8 text")
    if size > MAX_KEY_BYTES:
        fail(
            f"the key is {size} bytes in UTF-8, over the limit of {MAX_KEY_BYTES} bytes per "
            f"key, so no event has it; give the key as the publisher extracts it"
        )


def parse_time(text: str) -> int:
    """Parse an ISO 8601 time into µs since the epoch; a time without offset is UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(
            f"invalid time {text!r}: use ISO 8601, e.g. 2026-12-04T19:00:00Z"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1_000_000)


def replay(
    topic: TopicName = "events",
    group: Annotated[str, typer.Option("--group", envvar="EVP_GROUP", help="Consumer group whose positions move.")] = "default",
    from_offset: Annotated[int | None, typer.Option("--from-offset", min=0, help="Move every partition to this offset (clamped to what the partition holds).", show_default=False)] = None,
    from_time: Annotated[str | None, typer.Option("--from-time", help="Move each partition to its first event published at or after this ISO 8601 time (UTC when no offset is given).", show_default=False)] = None,
    from_start: Annotated[bool, typer.Option("--from-start", help="Move every partition to its oldest retained event.")] = False,
    to_end: Annotated[bool, typer.Option("--to-end", help="Move every partition past its newest event, skipping the backlog.")] = False,
    partition: Annotated[int | None, typer.Option("--partition", min=0, help="Move only this partition.", show_default=False)] = None,
    queue: QueueAddress = "127.0.0.1:8000",
    json_output: JsonOutput = False,
    token: Token = None,
    tls_ca: TlsCa = None,
) -> None:
    """Move a group's positions so its processors process events again, or skip them.

    The group's processors must be stopped. The new positions are saved before the
    command returns, so they survive a restart of the queue.
    """
    chosen = [
        name
        for name, given in (
            ("--from-offset", from_offset is not None),
            ("--from-time", from_time is not None),
            ("--from-start", from_start),
            ("--to-end", to_end),
        )
        if given
    ]
    if len(chosen) != 1:
        fail(
            "give exactly one of --from-offset, --from-time, --from-start or --to-end"
            + (f" (got {', '.join(chosen)})" if chosen else "")
        )
    args: dict[str, Any] = {"topic": topic, "group": group, "partition": partition}
    if from_offset is not None:
        args["offset"] = from_offset
    elif from_time is not None:
        args["time_us"] = parse_time(from_time)
    elif from_start:
        args["start"] = True
    else:
        args["end"] = True
    result = _request(queue, "groups.reset", args, token, tls_ca)
    if json_output:
        _print_json(result)
        return
    if result["created"]:
        typer.echo(f"group {group} of topic {topic} is new; created it with these positions")
    moved = 0
    for row in result["partitions"]:
        if row["note"]:
            typer.echo(f"partition {row['partition']}: {row['note']}")
        if row["old"] != row["new"]:
            moved += 1
            typer.echo(f"partition {row['partition']}: {row['old']} -> {row['new']}")
    unchanged = len(result["partitions"]) - moved
    typer.echo(f"group {group} of topic {topic}: {moved} partitions moved, {unchanged} unchanged")


def route(
    key: Annotated[str, typer.Argument(help="The event key, as the publisher extracts it.")],
    topic: TopicName = "events",
    group: Annotated[str | None, typer.Option("--group", envvar="EVP_GROUP", help="Only this consumer group; default all groups of the topic.", show_default=False)] = None,
    queue: QueueAddress = "127.0.0.1:8000",
    json_output: JsonOutput = False,
    token: Token = None,
    tls_ca: TlsCa = None,
) -> None:
    """Print the partition that owns a key, and the shard that owns that partition now."""
    check_key(key)
    args = {"topic": topic, "key": key, "group": group}
    result = _request(queue, "keys.route", args, token, tls_ca)
    if json_output:
        _print_json(result)
        return
    typer.echo(
        f"key {key!r} -> partition {result['partition']} of {result['partition_count']} "
        f"(topic {topic})"
    )
    if not result["groups"]:
        typer.echo("no group consumes this topic yet")
    for row in result["groups"]:
        if row["owner"] is None and row["moving_to"] is None:
            owner = "no member owns it now (no processor is running)"
        elif row["moving_to"] is not None:
            owner = f"{row['owner']}, moving to {row['moving_to']} once it acknowledges"
        else:
            owner = row["owner"]
        typer.echo(f"group {row['group']}: {owner}")


def tail(
    topic: TopicName = "events",
    key: Annotated[str | None, typer.Option("--key", help="Only events with this key (reads only its partition).", show_default=False)] = None,
    partition: Annotated[int | None, typer.Option("--partition", min=0, help="Only this partition.", show_default=False)] = None,
    from_start: Annotated[bool, typer.Option("--from-start", help="Start at the oldest retained event.")] = False,
    from_offset: Annotated[int | None, typer.Option("--from-offset", min=0, help="Start at this offset in each partition read.", show_default=False)] = None,
    last: Annotated[int | None, typer.Option("--last", min=0, help="Start with the newest N events (the default is 10).", show_default=False)] = None,
    follow_new: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events until Ctrl-C.")] = False,
    events_only: Annotated[bool, typer.Option("--events-only", help="Print each event alone, without topic, partition, offset, key and timestamp.")] = False,
    interval: Annotated[float, typer.Option("--interval", min=0.05, help="Seconds between polls with --follow once caught up.")] = 0.5,
    queue: QueueAddress = "127.0.0.1:8000",
    token: Token = None,
    tls_ca: TlsCa = None,
) -> None:
    """Print a topic's events as JSON lines without joining a group.

    Each line is {"topic", "partition", "offset", "key", "timestamp", "event"}, or the
    event alone with --events-only. Events of one partition come in offset order.
    """
    starts = [given for given in (from_start, from_offset is not None, last is not None) if given]
    if len(starts) > 1:
        fail("give at most one of --from-start, --from-offset and --last")
    if last is None and not from_start and from_offset is None:
        last = 10
    if key is not None:
        check_key(key)

    from evp import tail as tail_run

    plan = tail_run.TailPlan(
        queue=queue,
        topic=topic,
        key=key,
        partition=partition,
        from_start=from_start,
        from_offset=from_offset,
        last=last,
        follow=follow_new,
        events_only=events_only,
        interval_s=interval,
        token=token,
    )
    code = run_async(lambda: tail_run.run(plan), queue, tls_ca)
    raise typer.Exit(code)
