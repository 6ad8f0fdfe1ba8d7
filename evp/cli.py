"""The `evp` command: one typer app with a subcommand per role.

Each command parses its options (every option also reads an `EVP_` environment
variable) and calls the role's `run`. Nothing here holds logic of its own.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from evp import __version__

app = typer.Typer(
    help="evp: a durable event queue with key-ordered, sharded processing.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

def _add_admin_commands() -> None:
    from evp.cli_admin import groups_app, topics_app

    from evp.cli_dlq import dlq_app
    from evp.cli_tools import replay, route, tail

    app.add_typer(topics_app, name="topics")
    app.add_typer(groups_app, name="groups")
    app.add_typer(dlq_app, name="dlq")
    app.command()(replay)
    app.command()(tail)
    app.command()(route)


QueueAddress = Annotated[
    str,
    typer.Option("--queue", envvar="EVP_QUEUE", help="Address of the queue, HOST:PORT."),
]
Token = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="EVP_TOKEN",
        help="Shared secret the queue requires in the handshake; never logged.",
        show_default=False,
    ),
]
TlsCa = Annotated[
    str | None,
    typer.Option(
        "--tls-ca",
        envvar="EVP_TLS_CA",
        help="Connect with TLS, trusting the CA certificates in this PEM file.",
        show_default=False,
    ),
]
Topic = Annotated[str, typer.Option("--topic", envvar="EVP_TOPIC", help="Topic name.")]
LogLevel = Annotated[
    str,
    typer.Option("--log-level", envvar="EVP_LOG_LEVEL", help="Logging level: DEBUG, INFO, WARNING or ERROR."),
]


class FsyncPolicy(str, Enum):
    always = "always"
    batch = "batch"
    never = "never"


def _setup_logging(level: str) -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise typer.BadParameter(f"invalid log level {level!r}: use DEBUG, INFO, WARNING or ERROR")
    logging.basicConfig(
        level=numeric,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _version(value: bool) -> None:
    if value:
        typer.echo(f"evp {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """evp: a durable event queue with key-ordered, sharded processing."""


def _check_output_dir(path: Path) -> None:
    """Create the --output directory, or raise ValueError saying why it is unusable."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot use --output {str(path)!r}: {exc.strerror}") from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"cannot use --output {str(path)!r}: the directory is not writable")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def queue(
    host: Annotated[str, typer.Option(envvar="EVP_HOST", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="EVP_PORT", min=0, max=65535, help="TCP port to listen on (0 picks a free one).")] = 8000,
    data_dir: Annotated[Path, typer.Option(envvar="EVP_DATA_DIR", help="Directory for the event log and group positions.")] = Path("evp-data"),
    partitions: Annotated[int, typer.Option(envvar="EVP_PARTITIONS", min=1, max=4096, help="Partitions of each new topic; fixed once the topic exists.")] = 64,
    fsync: Annotated[FsyncPolicy, typer.Option(envvar="EVP_FSYNC", help="always: acknowledge after fsync; batch: after write, fsync every --fsync-interval-ms; never: leave it to the OS.")] = FsyncPolicy.batch,
    fsync_interval_ms: Annotated[int, typer.Option(envvar="EVP_FSYNC_INTERVAL_MS", min=1, help="fsync period of the batch policy, in milliseconds.")] = 200,
    max_event_bytes: Annotated[int, typer.Option(envvar="EVP_MAX_EVENT_BYTES", min=64, help="Largest event accepted, in bytes.")] = 1024 * 1024,
    max_frame_bytes: Annotated[int, typer.Option(envvar="EVP_MAX_FRAME_BYTES", min=1024, help="Largest wire frame accepted, in bytes.")] = 16 * 1024 * 1024,
    max_in_flight: Annotated[int, typer.Option(envvar="EVP_MAX_IN_FLIGHT", min=1, help="Upper bound on unacknowledged events per shard, in events.")] = 10000,
    session_timeout_ms: Annotated[int, typer.Option(envvar="EVP_SESSION_TIMEOUT_MS", min=100, help="A shard silent this long is declared dead, in milliseconds.")] = 10000,
    handshake_timeout: Annotated[float, typer.Option(envvar="EVP_HANDSHAKE_TIMEOUT", min=0.1, help="A connection that sends no HELLO within this many seconds is closed.")] = 10.0,
    frame_timeout: Annotated[float, typer.Option(envvar="EVP_FRAME_TIMEOUT", min=0.1, help="A connection that leaves a frame unfinished and sends nothing more for this many seconds is closed.")] = 30.0,
    max_connections: Annotated[int, typer.Option(envvar="EVP_MAX_CONNECTIONS", min=1, help="Client connections served at once; more are rejected with an error.")] = 1000,
    segment_bytes: Annotated[int, typer.Option(envvar="EVP_SEGMENT_BYTES", min=4096, help="Size at which a partition starts a new log segment, in bytes.")] = 64 * 1024 * 1024,
    retention_hours: Annotated[float | None, typer.Option(envvar="EVP_RETENTION_HOURS", min=0, help="Default retention of topics, in hours: older segments are deleted once every group has processed them.", show_default=False)] = None,
    retention_bytes: Annotated[int | None, typer.Option(envvar="EVP_RETENTION_BYTES", min=0, help="Default size limit per partition, in bytes: older segments beyond it are deleted once every group has processed them.", show_default=False)] = None,
    max_disk_bytes: Annotated[int | None, typer.Option(envvar="EVP_MAX_DISK_BYTES", min=0, help="Hard limit on all segments, in bytes: above it the oldest segments are deleted even if unprocessed (counted as lost).", show_default=False)] = None,
    min_free_disk_bytes: Annotated[int, typer.Option(envvar="EVP_MIN_FREE_DISK_BYTES", min=0, help="Hard floor of free space on the data directory's file system, in bytes; enforced like --max-disk-bytes.")] = 256 * 1024 * 1024,
    metrics_port: Annotated[int | None, typer.Option(envvar="EVP_METRICS_PORT", min=0, max=65535, help="Serve Prometheus metrics at /metrics on this TCP port, on the --host address.", show_default=False)] = None,
    token: Token = None,
    tls_cert: Annotated[str | None, typer.Option(envvar="EVP_TLS_CERT", help="Serve TLS with this PEM certificate chain (with --tls-key).", show_default=False)] = None,
    tls_key: Annotated[str | None, typer.Option(envvar="EVP_TLS_KEY", help="PEM private key of --tls-cert.", show_default=False)] = None,
    log_level: LogLevel = "INFO",
) -> None:
    """Run the queue server: store events durably and hand them to shards."""
    from evp import server
    from evp.storage import StorageError

    _setup_logging(log_level)
    if max_event_bytes + 64 > max_frame_bytes:
        _fail(
            f"--max-event-bytes {max_event_bytes} does not fit in --max-frame-bytes "
            f"{max_frame_bytes}; raise the frame limit or lower the event limit"
        )
    config = server.QueueConfig(
        host=host,
        port=port,
        data_dir=data_dir,
        partitions=partitions,
        fsync=fsync.value,
        fsync_interval_ms=fsync_interval_ms,
        max_event_bytes=max_event_bytes,
        max_frame_bytes=max_frame_bytes,
        max_in_flight=max_in_flight,
        session_timeout_ms=session_timeout_ms,
        handshake_timeout_s=handshake_timeout,
        max_connections=max_connections,
        frame_timeout_s=frame_timeout,
        segment_bytes=segment_bytes,
        metrics_port=metrics_port,
        retention_hours=retention_hours,
        retention_bytes=retention_bytes,
        max_disk_bytes=max_disk_bytes,
        min_free_disk_bytes=min_free_disk_bytes,
        tls_cert=tls_cert,
        tls_key=tls_key,
        token=token,
    )
    try:
        server.run(config)
    except (StorageError, ValueError) as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")


@app.command()
def process(
    queue: QueueAddress = "127.0.0.1:8000",
    shards: Annotated[int, typer.Option(envvar="EVP_SHARDS", min=1, max=1024, help="Number of shard worker processes.")] = 8,
    group: Annotated[str, typer.Option(envvar="EVP_GROUP", help="Consumer group; processors in one group share the work.")] = "default",
    topic: Topic = "events",
    handler: Annotated[str | None, typer.Option(envvar="EVP_HANDLER", help="MODULE:FUNCTION or MODULE:CLASS called on each event, or a built-in: evp:passthrough, evp:print, evp:count, evp:jsonl. Events pass through unchanged without it.", show_default=False)] = None,
    handler_arg: Annotated[list[str] | None, typer.Option("--handler-arg", envvar="EVP_HANDLER_ARG", help="NAME=VALUE keyword argument of a handler class's constructor, e.g. path=out.jsonl for evp:jsonl; repeat for more.", show_default=False)] = None,
    output_topic: Annotated[str | None, typer.Option(envvar="EVP_OUTPUT_TOPIC", help="Publish the handler's results to this topic, keyed like their input event.", show_default=False)] = None,
    max_retries: Annotated[int, typer.Option(envvar="EVP_MAX_RETRIES", min=0, max=100, help="Retries of a failed event, with exponential backoff, before it goes to the topic <topic>.dlq.")] = 3,
    output: Annotated[Path | None, typer.Option(envvar="EVP_OUTPUT", help="Directory for one JSON-lines file of results per shard.", show_default=False)] = None,
    node: Annotated[str | None, typer.Option(envvar="EVP_NODE", help="Node name in member ids (<node>/shard-<n>); defaults to the host name. Give each processor on one host its own.", show_default=False)] = None,
    max_in_flight: Annotated[int, typer.Option(envvar="EVP_MAX_IN_FLIGHT", min=1, help="Unacknowledged events each shard accepts at once.")] = 1000,
    drain_timeout: Annotated[float, typer.Option(envvar="EVP_DRAIN_TIMEOUT", min=0, help="Seconds a shard may take to finish its events on shutdown.")] = 30.0,
    token: Token = None,
    tls_ca: TlsCa = None,
    log_level: LogLevel = "INFO",
) -> None:
    """Run shard worker processes that process events with a handler."""
    from evp import processor
    from evp.client import ClientError, configure_tls, parse_address
    from evp.deadletter import dlq_topic
    from evp.handlers import HandlerError, check_handler, parse_handler_args
    from evp.storage import StorageError, check_name

    _setup_logging(log_level)
    try:
        parse_address(queue)
        configure_tls(tls_ca)
        check_name("topic", topic)
        check_name("group", group)
        check_name("dead-letter topic", dlq_topic(topic))
        if output_topic is not None:
            check_name("output topic", output_topic)
            if output_topic == topic:
                raise ValueError(
                    f"--output-topic {output_topic!r} is the input topic, so every result "
                    f"would be processed again; give another topic"
                )
        handler_args = parse_handler_args(handler_arg)
        if handler:
            check_handler(handler, handler_args)
        elif handler_args:
            raise ValueError("--handler-arg needs --handler; give a handler class to pass it to")
        if output is not None:
            _check_output_dir(output)
    except (ValueError, StorageError, ClientError, HandlerError) as exc:
        _fail(str(exc))
    config = processor.ProcessorConfig(
        queue=queue,
        tls_ca=tls_ca,
        shards=shards,
        group=group,
        topic=topic,
        handler=handler,
        handler_args=handler_args,
        output_topic=output_topic,
        max_retries=max_retries,
        output=output,
        max_in_flight=max_in_flight,
        drain_timeout_s=drain_timeout,
        token=token,
        log_level=log_level.upper(),
    )
    if node:
        config.node = node
    from rich.console import Console

    from evp import views

    # evp:print writes events to stdout, where the live view would overwrite them.
    console = Console(force_terminal=False) if handler == "evp:print" else Console()
    code = views.process_with_view(config, console)
    raise typer.Exit(code)


@app.command()
def publish(
    queue: QueueAddress = "127.0.0.1:8000",
    topic: Topic = "events",
    rate: Annotated[float, typer.Option(envvar="EVP_RATE", min=0, help="Events per second; 0 sends as fast as the queue accepts.")] = 100.0,
    count: Annotated[int | None, typer.Option(envvar="EVP_COUNT", min=0, help="Stop after this many events.", show_default=False)] = None,
    duration: Annotated[float | None, typer.Option(envvar="EVP_DURATION", min=0, help="Stop after this many seconds; 0 or unset runs until the input ends or Ctrl-C.", show_default=False)] = None,
    file: Annotated[str | None, typer.Option("--file", envvar="EVP_FILE", help="JSON-lines file to publish (.gz is decompressed); - for standard input. Without it, random events are generated.", show_default=False)] = None,
    key_field: Annotated[str | None, typer.Option(envvar="EVP_KEY_FIELD", help="Dotted path of the key in each event, e.g. repo.name; default partitionkey, then id. A CloudEvent's partitionkey always wins.", show_default=False)] = None,
    keys: Annotated[int, typer.Option(envvar="EVP_KEYS", min=1, help="Distinct user ids (keys) of generated events.")] = 1000,
    cloudevents: Annotated[bool, typer.Option("--cloudevents", envvar="EVP_CLOUDEVENTS", help="Wrap each event in a CloudEvents 1.0 envelope (structured JSON) with its key as partitionkey.")] = False,
    cloudevents_source: Annotated[str | None, typer.Option("--cloudevents-source", envvar="EVP_CLOUDEVENTS_SOURCE", help="CloudEvents source of wrapped events; default evp://<host name>/publish.", show_default=False)] = None,
    cloudevents_type: Annotated[str, typer.Option("--cloudevents-type", envvar="EVP_CLOUDEVENTS_TYPE", help="CloudEvents type of wrapped events.")] = "evp.event",
    token: Token = None,
    tls_ca: TlsCa = None,
    log_level: LogLevel = "WARNING",
) -> None:
    """Publish generated events, or JSON lines from a file or stdin, at a held rate."""
    from evp import events, publisher
    from evp.client import ClientError, configure_tls, parse_address
    from evp.storage import StorageError, check_name

    _setup_logging(log_level)
    try:
        parse_address(queue)
        configure_tls(tls_ca)
        check_name("topic", topic)
        events.key_path(key_field)
        if cloudevents_source is not None and not cloudevents_source.strip():
            raise ValueError("invalid --cloudevents-source '': give a non-empty URI reference")
        if not cloudevents_type.strip():
            raise ValueError("invalid --cloudevents-type '': give a non-empty type")
        if not math.isfinite(rate):
            raise ValueError(f"invalid --rate {rate}: use a finite number of events per second, or 0 for no limit")
        if file is not None and file != "-":
            if Path(file).is_dir():
                raise ValueError(f"input file {file!r} is a directory; give a JSON-lines file")
            if not Path(file).is_file():
                raise ValueError(f"input file {file!r} not found")
    except (ValueError, StorageError, ClientError) as exc:
        _fail(str(exc))
    config = publisher.PublishConfig(
        queue=queue,
        topic=topic,
        rate=rate,
        count=count,
        duration_s=duration,
        file=file,
        key_field=key_field,
        keys=keys,
        token=token,
        cloudevents=cloudevents,
        cloudevents_source=cloudevents_source or events.default_cloudevent_source(),
        cloudevents_type=cloudevents_type,
    )
    if file is None and count is None and duration is None:
        typer.echo("publishing generated events until Ctrl-C (set --count or --duration to stop)", err=True)
    from rich.console import Console

    from evp import views

    # On a terminal, progress bars and a summary table. Elsewhere one summary line, which
    # scripts and tests parse, so its format stays fixed.
    console = Console(stderr=True)
    try:
        if console.is_terminal:
            report = views.publish_with_progress(config, console)
        else:
            report = publisher.run(
                config, on_invalid_line=lambda message: typer.echo(message, err=True)
            )
    except ClientError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if not console.is_terminal:
        rate_done = report.sent / report.elapsed_s if report.elapsed_s else 0.0
        typer.echo(
            f"sent={report.sent} acknowledged={report.acked} rejected={report.rejected} "
            f"invalid_lines={report.invalid_lines} unacknowledged={report.unacked} "
            f"elapsed_s={report.elapsed_s:.2f} rate_per_s={rate_done:.0f}",
            err=True,
        )
    if report.interrupted:
        typer.echo(
            f"interrupted: {report.acked} events acknowledged, {report.unacked} not "
            f"acknowledged",
            err=True,
        )
        raise typer.Exit(130)
    if report.input_error is not None:
        _fail(f"{report.input_error}; the {report.acked} events before it were acknowledged", code=1)
    if not report.ok:
        _fail(
            f"{report.unacked} events were not acknowledged and {report.rejected} were rejected",
            code=1,
        )
    if report.invalid_lines:
        _fail(
            f"{report.invalid_lines} invalid input lines were skipped (listed above); "
            f"the other {report.acked} events were acknowledged",
            code=1,
        )


@app.command()
def stats(
    queue: QueueAddress = "127.0.0.1:8000",
    json_output: Annotated[bool, typer.Option("--json", envvar="EVP_STATS_JSON", help="Print JSON lines instead of the live view.")] = False,
    once: Annotated[bool, typer.Option("--once", envvar="EVP_STATS_ONCE", help="Print one snapshot and exit.")] = False,
    plain: Annotated[bool, typer.Option("--plain", envvar="EVP_STATS_PLAIN", help="Print one plain line per interval (the default when stdout is not a terminal).")] = False,
    interval: Annotated[float, typer.Option(envvar="EVP_STATS_INTERVAL", min=0.1, help="Seconds between refreshes.")] = 1.0,
    token: Token = None,
    tls_ca: TlsCa = None,
) -> None:
    """Show the queue's throughput, lag and shards, live."""
    from evp import stats as stats_view
    from evp.cli_admin import run_async

    run_async(
        lambda: stats_view.watch(
            queue, as_json=json_output, once=once, plain=plain, interval_s=interval, token=token
        ),
        queue,
        tls_ca,
    )


@app.command()
def demo(
    shards: Annotated[int, typer.Option(envvar="EVP_SHARDS", min=1, max=64, help="Number of shard worker processes.")] = 8,
    count: Annotated[int, typer.Option(envvar="EVP_COUNT", min=1, help="Events to publish.")] = 20000,
    rate: Annotated[float, typer.Option(envvar="EVP_RATE", min=0, help="Events per second; 0 for as fast as possible.")] = 5000.0,
    partitions: Annotated[int, typer.Option(envvar="EVP_PARTITIONS", min=1, max=4096, help="Partitions of the demo topic.")] = 64,
    keep: Annotated[bool, typer.Option("--keep", envvar="EVP_DEMO_KEEP", help="Keep the temporary directory with the data, logs and outputs.")] = False,
) -> None:
    """Run a queue, shards and a publisher together on a temporary directory, then check the result."""
    from evp import demo as demo_run

    code = demo_run.run(shards=shards, count=count, rate=rate, partitions=partitions, keep=keep)
    raise typer.Exit(code)


_add_admin_commands()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
