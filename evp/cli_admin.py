"""`evp topics` and `evp groups`: administration commands sent to a running queue."""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import orjson
import typer
from rich.console import Console
from rich.table import Table

topics_app = typer.Typer(help="List, describe, create and delete topics.", no_args_is_help=True)
groups_app = typer.Typer(
    help="List consumer groups and delete a group's positions.",
    invoke_without_command=True,
)

QueueAddress = Annotated[
    str, typer.Option("--queue", envvar="EVP_QUEUE", help="Address of the queue, HOST:PORT.")
]
Token = Annotated[
    str | None,
    typer.Option("--token", envvar="EVP_TOKEN", help="Shared secret the queue requires; never logged.", show_default=False),
]
TlsCa = Annotated[
    str | None,
    typer.Option("--tls-ca", envvar="EVP_TLS_CA", help="Connect with TLS, trusting the CA certificates in this PEM file.", show_default=False),
]
JsonOutput = Annotated[
    bool, typer.Option("--json", envvar="EVP_JSON", help="Print the result as JSON.")
]


T = TypeVar("T")


def fail(message: str, code: int = 2) -> None:
    """Print `message` as an error on stderr and exit with `code`."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def run_async(make: Callable[[], Awaitable[T]], queue: str, tls_ca: str | None) -> T:
    """Run a coroutine on uvloop and turn client errors into a clean exit 2."""
    import uvloop

    from evp.client import ClientError, configure_tls, parse_address

    try:
        parse_address(queue)
        configure_tls(tls_ca)
        return uvloop.run(make())  # type: ignore[arg-type]
    except (ValueError, ClientError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except BrokenPipeError:
        # The reader of stdout has gone, as in `evp tail | head -3`. Stop quietly, and point
        # stdout at /dev/null so that the flush at exit raises no second BrokenPipeError.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0) from None
    raise AssertionError("unreachable")


def _request(
    queue: str, operation: str, args: dict[str, Any], token: str | None, tls_ca: str | None
) -> Any:
    from evp.client import admin_request

    return run_async(lambda: admin_request(queue, operation, args, token=token), queue, tls_ca)


def _print_json(result: Any) -> None:
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return f"{count} B"


def _retention_text(retention: dict[str, Any]) -> str:
    parts = []
    if retention.get("max_age_s") is not None:
        parts.append(f"{retention['max_age_s'] / 3600:g} h")
    if retention.get("max_partition_bytes") is not None:
        parts.append(f"{_size(retention['max_partition_bytes'])}/partition")
    return ", ".join(parts) or "forever"


@topics_app.command("list")
def topics_list(
    queue: QueueAddress = "127.0.0.1:8000",
    json_output: JsonOutput = False,
    token: Token = None,
    tls_ca: TlsCa = None,
) -> None:
    """List topics: partitions, events, bytes on disk, oldest and newest event, groups."""
    rows = _request(queue, "topics.list", {}, token, tls_ca)
    if json_output:
        _print_json(rows)
        return
    table = Table(title="Topics", title_justify="left")
    for column in ("topic", "partitions", "events", "on disk", "oldest event", "newest event", "retention", "groups"):
        table.add_column(column, justify="right" if column in ("partitions", "events", "on disk") else "left")
    for row in rows:
        table.add_row(
            row["name"],
            str(row["partitions"]),
            f"{row['events']:,}",
            _size(row["bytes"]),
            row["oldest_event_time"] or "-",
            row["newest_event_time"] or "-",
            _retention_text(row["retention"]),
            ", ".join(row["groups"]) or "-",
        )
    Console().print(table)


@topics_app.command("describe")
def topics_describe(
    name: Annotated[str, typer.Argument(help="Topic name.")],
    queue: QueueAddress = "127.0.0.1:8000",
    json_output: JsonOutput = False,
    token: Token = None,
    tls_ca: TlsCa = None,
) -> None:
    """Show a topic's partitions (offsets, bytes, segments) and its groups' positions and lag."""
    result = _request(queue, "topics.describe", {"name": name}, token, tls_ca)
    if json_output:
        _print_json(result)
        return
    console = Console()
    table = Table(title=f"Topic {result['name']} (retention: {_retention_text(result['retention'])})", title_justify="left")
    for column in ("partition", "first offset", "next offset", "events", "on disk", "segments"):
        table.add_column(column, justify="right")
    for row in result["partitions"]:
        table.add_row(
            str(row["partition"]),
            f"{row['first_offset']:,}",
            f"{row['next_offset']:,}",
            f"{row['events']:,}",
            _size(row["bytes"]),
            str(row["segments"]),
        )
    console.print(table)
    groups = Table(title="Groups", title_justify="left")
    for column in ("group", "members", "lag (events)", "lost to retention"):
        groups.add_column(column, justify="left" if column == "group" else "right")
    for group in result["groups"]:
        groups.add_row(group["group"], str(len(group["members"])), f"{group['lag']:,}", f"{group['lost_to_retention']:,}")
    console.print(groups)


@topics_app.command("create")
def topics_create(
    name: Annotated[str, typer.Argument(help="Topic name.")],
    partitions: Annotated[int, typer.Option(min=1, max=4096, help="Partition count; fixed for the life of the topic.")] = 64,
    retention_hours: Annotated[float | None, typer.Option(min=0, help="Delete events older than this many hours (once every group has them).", show_default=False)] = None,
    retention_bytes: Annotated[int | None, typer.Option(min=0, help="Keep at most about this many bytes per partition.", show_default=False)] = None,
    queue: QueueAddress = "127.0.0.1:8000",
    token: Token = None,
    tls_ca: TlsCa = None,
) -> None:
    """Create a topic with a partition count and retention of its own."""
    args = {
        "name": name,
        "partitions": partitions,
        "retention_hours": retention_hours,
        "retention_bytes": retention_bytes,
    }
    result = _request(queue, "topics.create", args, token, tls_ca)
    typer.echo(f"created topic {result['name']} with {len(result['partitions'])} partitions")


@topics_app.command("delete")
def topics_delete(
    name: Annotated[str, typer.Argument(help="Topic name.")],
    yes: Annotated[bool, typer.Option("--yes", help="Delete without asking for confirmation.")] = False,
    queue: QueueAddress = "127.0.0.1:8000",
    token: Token = None,
    tls_ca: TlsCa = None,
) -> None:
    """Delete a topic, its events and its groups' positions."""
    if not yes:
        if not sys.stdin.isatty():
            fail(f"deleting topic {name!r} needs confirmation; pass --yes")
        typer.confirm(f"Delete topic {name!r} with all its events and group positions?", abort=True)
    result = _request(queue, "topics.delete", {"name": name}, token, tls_ca)
    groups = ", ".join(result["groups"]) or "none"
    typer.echo(f"deleted topic {result['deleted']} (groups removed: {groups})")


@groups_app.callback()
def groups_list(
    ctx: typer.Context,
    topic: Annotated[str | None, typer.Option("--topic", envvar="EVP_TOPIC", help="Only the groups of this topic.", show_default=False)] = None,
    queue: QueueAddress = "127.0.0.1:8000",
    json_output: JsonOutput = False,
    detail: Annotated[bool, typer.Option("--detail", help="Also print each group's position, end, lag and owner per partition.")] = False,
    token: Token = None,
    tls_ca: TlsCa = None,
) -> None:
    """List consumer groups, with or without members: positions, lag and losses."""
    if ctx.invoked_subcommand is not None:
        return
    args = {"topic": topic} if topic else {}
    rows = _request(queue, "groups.list", args, token, tls_ca)
    if json_output:
        _print_json(rows)
        return
    table = Table(title="Groups", title_justify="left")
    for column in ("topic", "group", "members", "acked", "lag (events)", "lost to retention"):
        table.add_column(column, justify="left" if column in ("topic", "group") else "right")
    for row in rows:
        table.add_row(
            row["topic"],
            row["group"],
            str(len(row["members"])),
            f"{row['acked']:,}",
            f"{row['lag']:,}",
            f"{row['lost_to_retention']:,}",
        )
    console = Console()
    console.print(table)
    if detail:
        for row in rows:
            console.print(_partition_table(row))


def _partition_table(group: dict[str, Any]) -> Table:
    table = Table(title=f"Group {group['group']} of topic {group['topic']}", title_justify="left")
    for column in ("partition", "position", "first offset", "next offset", "lag", "owner"):
        table.add_column(column, justify="left" if column == "owner" else "right")
    for row in group["partitions"]:
        table.add_row(
            str(row["partition"]),
            f"{row['position']:,}",
            f"{row['first_offset']:,}",
            f"{row['next_offset']:,}",
            f"{row['lag']:,}",
            row["owner"] or "-",
        )
    return table


@groups_app.command("delete")
def groups_delete(
    group: Annotated[str, typer.Argument(help="Group name.")],
    topic: Annotated[str, typer.Option("--topic", envvar="EVP_TOPIC", help="Topic of the group.")] = "events",
    queue: QueueAddress = "127.0.0.1:8000",
    token: Token = None,
    tls_ca: TlsCa = None,
) -> None:
    """Delete a group's positions; its processors must be stopped."""
    result = _request(queue, "groups.delete", {"topic": topic, "group": group}, token, tls_ca)
    typer.echo(f"deleted group {result['deleted']} of topic {result['topic']}")
