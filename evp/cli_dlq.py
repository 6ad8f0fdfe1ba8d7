"""`evp dlq`: list, show, replay and purge the dead letters of a topic.

Dead letters of topic T live in topic `T.dlq` (see evp.deadletter). A dead letter is
named by its partition and offset in that topic, written PARTITION:OFFSET; a bare
OFFSET is enough when only one partition has a dead letter at that offset.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from evp import events
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
from evp.cli_tools import TopicName
from evp.deadletter import DeadLetter, dlq_topic

dlq_app = typer.Typer(
    help="List, show, replay and purge dead letters (events that failed processing).",
    no_args_is_help=True,
)

Ids = Annotated[
    list[str] | None,
    typer.Option(
        "--offset",
        help="Only the dead letter at this offset in the dlq topic, as OFFSET or "
        "PARTITION:OFFSET; repeatable.",
        show_default=False,
    ),
]
Key = Annotated[
    str | None,
    typer.Option("--key", help="Only dead letters of events with this key.", show_default=False),
]


@dataclass(frozen=True)
class Entry:
    """A record of the dlq topic and the dead letter in it, or why it is not one."""

    partition: int
    offset: int
    key: str
    value: str
    letter: DeadLetter | None
    problem: str | None

    @property
    def id(self) -> str:
        return f"{self.partition}:{self.offset}"

    def to_json(self) -> dict[str, Any]:
        return {
            "dlq_partition": self.partition,
            "dlq_offset": self.offset,
            "key": self.key,
            "dead_letter": self.letter.to_event() if self.letter is not None else None,
            "problem": self.problem,
        }


def _print_exact(value: Any) -> None:
    """Print JSON like `_print_json`, also for integers beyond 64 bits, which orjson rejects."""
    try:
        _print_json(value)
    except TypeError:
        sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


async def _read_entries(
    queue: str, topic: str, key: str | None, token: str | None
) -> list[Entry] | None:
    """Read every dead letter of `topic`, or return None when its dlq topic does not exist."""
    from evp import reader

    info = await reader.describe_topic(queue, dlq_topic(topic), token)
    if info is None:
        return None
    starts = {row["partition"]: row["first_offset"] for row in info["partitions"]}
    ends = {row["partition"]: row["next_offset"] for row in info["partitions"]}
    entries = []
    # NOTE: every dead letter is held in memory here. A dlq topic is expected to stay
    # small, because each entry is an event that needs a person's attention.
    records = reader.read_until(queue, dlq_topic(topic), starts, ends, key=key, token=token)
    async for record in records:
        letter = None
        problem = None
        try:
            # parse_line keeps integers beyond 64 bits exact, which orjson does not.
            value, _ = events.parse_line(record.value.encode())
            letter = DeadLetter.from_event(value)
        except (ValueError, events.InvalidEvent) as exc:
            problem = str(exc)
        entries.append(
            Entry(record.partition, record.offset, record.key, record.value, letter, problem)
        )
    return entries


def _load(
    queue: str, topic: str, key: str | None, token: str | None, tls_ca: str | None
) -> list[Entry]:
    entries = run_async(lambda: _read_entries(queue, topic, key, token), queue, tls_ca)
    if entries is None:
        typer.echo(f"no dead letters for topic {topic} (topic {dlq_topic(topic)} does not exist)")
        raise typer.Exit(0)
    return entries


def select(entries: list[Entry], ids: list[str]) -> list[Entry]:
    """Return the entries named by `ids` (OFFSET or PARTITION:OFFSET), in their order.

    Raises ValueError for an id that is malformed, matches nothing, or is a bare
    offset present in more than one partition.
    """
    chosen: dict[str, Entry] = {}
    for text in ids:
        partition_text, _, offset_text = text.rpartition(":")
        if not offset_text.isdigit() or (partition_text and not partition_text.isdigit()):
            raise ValueError(f"invalid dead letter id {text!r}: use OFFSET or PARTITION:OFFSET")
        offset = int(offset_text)
        partition = int(partition_text) if partition_text else None
        matches = [
            entry
            for entry in entries
            if entry.offset == offset and partition in (None, entry.partition)
        ]
        if not matches:
            raise ValueError(f"no dead letter at {text}; `evp dlq list` shows them")
        if len(matches) > 1:
            candidates = ", ".join(entry.id for entry in matches)
            raise ValueError(
                f"offset {offset} is in several partitions ({candidates}); give PARTITION:OFFSET"
            )
        chosen[matches[0].id] = matches[0]
    return [entry for entry in entries if entry.id in chosen]


@dlq_app.command("list")
def dlq_list(
    topic: TopicName = "events",
    key: Key = None,
    queue: QueueAddress = "127.0.0.1:8000",
    json_output: JsonOutput = False,
    token: Token = None,
    tls_ca: TlsCa = None,
) -> None:
    """List dead letters: dlq position, key, error, deliveries, original position, time."""
    entries = _load(queue, topic, key, token, tls_ca)
    if json_output:
        _print_exact([entry.to_json() for entry in entries])
        return
    table = Table(title=f"Dead letters of {topic} (topic {dlq_topic(topic)})", title_justify="left")
    for column in ("dlq id", "key", "error", "deliveries", "from partition:offset", "failed at"):
        table.add_column(column, justify="right" if column == "deliveries" else "left")
    for entry in entries:
        letter = entry.letter
        if letter is None:
            table.add_row(entry.id, entry.key, f"not a dead letter: {entry.problem}", "-", "-", "-")
            continue
        table.add_row(
            entry.id,
            entry.key,
            letter.error,
            str(letter.deliveries),
            f"{letter.partition}:{letter.offset}",
            letter.failed_at,
        )
    console = Console()
    console.print(table)
    console.print(f"{len(entries)} dead letters")


@dlq_app.command("show")
def dlq_show(
    ids: Annotated[list[str] | None, typer.Argument(help="Dead letters to show, as OFFSET or PARTITION:OFFSET in the dlq topic; all when omitted.", show_default=False)] = None,
    topic: TopicName = "events",
    key: Key = None,
    queue: QueueAddress = "127.0.0.1:8000",
    token: Token = None,
    tls_ca: TlsCa = None,
) -> None:
    """Print dead letters in full, as indented JSON."""
    entries = _load(queue, topic, key, token, tls_ca)
    try:
        shown = select(entries, ids) if ids else entries
    except ValueError as exc:
        fail(str(exc))
    for entry in shown:
        _print_exact(entry.to_json())


@dlq_app.command("replay")
def dlq_replay(
    topic: TopicName = "events",
    key: Key = None,
    ids: Ids = None,
    queue: QueueAddress = "127.0.0.1:8000",
    token: Token = None,
    tls_ca: TlsCa = None,
) -> None:
    """Publish the original events of dead letters back to the topic, with their keys.

    The dead letters stay in the dlq topic; `evp dlq purge` removes them.
    """
    entries = _load(queue, topic, key, token, tls_ca)
    try:
        chosen = select(entries, ids) if ids else entries
    except ValueError as exc:
        fail(str(exc))
    malformed = [entry for entry in chosen if entry.letter is None]
    for entry in malformed:
        typer.echo(f"skipped {entry.id}: not a dead letter: {entry.problem}", err=True)
    letters = [entry for entry in chosen if entry.letter is not None]
    if not letters:
        typer.echo(f"no dead letters to replay for topic {topic}")
        raise typer.Exit(1 if malformed else 0)
    acked = run_async(lambda: _publish_back(queue, topic, letters, token), queue, tls_ca)
    if acked != len(letters):
        fail(f"only {acked} of {len(letters)} events were acknowledged by the queue", code=1)
    typer.echo(f"replayed {acked} events to topic {topic}")
    if malformed:
        raise typer.Exit(1)


async def _publish_back(queue: str, topic: str, entries: list[Entry], token: str | None) -> int:
    from evp.client import Producer

    producer = Producer(queue, token=token)
    await producer.start()
    try:
        for entry in entries:
            assert entry.letter is not None
            producer.publish(topic, entry.key.encode(), events.dumps_event(entry.letter.event))
            await producer.wait_for_capacity()
        await producer.flush(30.0)
    finally:
        await producer.close()
    return producer.acked


@dlq_app.command("purge")
def dlq_purge(
    topic: TopicName = "events",
    yes: Annotated[bool, typer.Option("--yes", help="Purge without asking for confirmation.")] = False,
    queue: QueueAddress = "127.0.0.1:8000",
    token: Token = None,
    tls_ca: TlsCa = None,
) -> None:
    """Delete every dead letter of a topic by deleting its dlq topic.

    Rejected while processors consume the dlq topic. The next dead letter creates the
    topic again.
    """
    rows = {row["name"]: row for row in _request(queue, "topics.list", {}, token, tls_ca)}
    name = dlq_topic(topic)
    if name not in rows:
        typer.echo(f"no dead letters for topic {topic} (topic {name} does not exist)")
        return
    if not yes:
        if not sys.stdin.isatty():
            fail(f"purging the dead letters of topic {topic!r} needs confirmation; pass --yes")
        typer.confirm(f"Delete every dead letter of topic {topic!r} (topic {name})?", abort=True)
    result = _request(queue, "topics.delete", {"name": name}, token, tls_ca)
    typer.echo(
        f"purged {rows[name]['events']} dead letters of topic {topic} "
        f"(deleted topic {result['deleted']})"
    )
