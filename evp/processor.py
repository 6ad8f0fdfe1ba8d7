"""`evp process`: a supervisor and its shard worker processes.

The supervisor is a plain loop: it starts N shard processes (multiprocessing, spawn
start method), waits on their sentinels, restarts one that exits unexpectedly with
exponential backoff, and on SIGINT or SIGTERM asks every shard to drain and waits for
them. When a shard dies during a handler call, the supervisor counts a crash of that
event in a table the shards share (evp.crashes), so an event that keeps killing its
shard is dead-lettered instead of crashing shards forever. The shards themselves are
in evp.shard. Each shard has its own uvloop event loop and its own connection to the queue,
joins the group as member `<node>/shard-<index>`, runs the handler on each event and
acknowledges what it finished.

No shard outlives the supervisor: each shard asks the kernel for SIGTERM when its
parent dies (Linux PR_SET_PDEATHSIG), and drains on that signal like on any other.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evp.crashes import CrashTable, InProgress, describe_exit
from evp.handlers import HandlerError, check_handler, load_handler
from evp.shard import STARTUP_FAILED, Shard, shard_main

__all__ = [
    "STARTUP_FAILED",
    "HandlerError",
    "ProcessorConfig",
    "Shard",
    "ShardSlot",
    "Supervisor",
    "load_handler",
    "run",
]

logger = logging.getLogger("evp.processor")

RESTART_BACKOFF_INITIAL_S = 0.5
RESTART_BACKOFF_MAX_S = 30.0
# A shard that ran this long before exiting is restarted without delay again: the
# backoff is for crash loops, not for a crash after hours of work.
RESTART_BACKOFF_RESET_S = 30.0


@dataclass
class ProcessorConfig:
    queue: str = "127.0.0.1:8000"
    shards: int = 8
    group: str = "default"
    topic: str = "events"
    handler: str | None = None
    # --handler-arg NAME=VALUE options, keyword arguments of a handler class.
    handler_args: dict[str, str] = field(default_factory=dict)
    output_topic: str | None = None
    # Retries of a failed event before it goes to the dead-letter topic.
    max_retries: int = 3
    output: Path | None = None
    node: str = field(default_factory=socket.gethostname)
    max_in_flight: int = 1000
    drain_timeout_s: float = 30.0
    token: str | None = None
    tls_ca: str | None = None
    log_level: str = "INFO"


def die_with_parent() -> None:
    """Ask Linux to send SIGTERM to this process when its parent exits."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except OSError:  # not Linux: the parent pipe check below still applies
        logger.debug("PR_SET_PDEATHSIG is not available")


@dataclass
class ShardSlot:
    index: int
    process: multiprocessing.process.BaseProcess | None = None
    status: Any = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = RESTART_BACKOFF_INITIAL_S
    restart_at: float | None = None
    last_status: dict[str, Any] = field(default_factory=dict)
    # The event the shard's handler is working on, kept across restarts of the slot.
    in_progress: InProgress | None = None


class Supervisor:
    def __init__(
        self, config: ProcessorConfig, on_tick: Callable[[Supervisor], None] | None = None
    ) -> None:
        self.config = config
        self.context = multiprocessing.get_context("spawn")
        self.slots = [
            ShardSlot(index, in_progress=InProgress(self.context))
            for index in range(config.shards)
        ]
        self.crash_table = CrashTable(self.context)
        self.stopping = False
        # Called from the loop (0.2 s apart or less) and once more after the shards have
        # stopped, for a live view. It runs in the loop, so it must return quickly.
        self.on_tick = on_tick

    def _tick(self) -> None:
        if self.on_tick is None:
            return
        try:
            self.on_tick(self)
        except Exception:  # noqa: BLE001 - a broken view must not stop the shards
            logger.exception("the live view failed; the shards keep running without it")
            self.on_tick = None

    def _start(self, slot: ShardSlot) -> None:
        receiver, sender = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=shard_main,
            args=(
                self.config,
                slot.index,
                sender,
                os.getpid(),
                slot.in_progress,
                self.crash_table,
            ),
            name=f"evp-shard-{slot.index}",
            daemon=False,
        )
        process.start()
        sender.close()
        slot.process = process
        slot.status = receiver
        slot.started_at = time.monotonic()
        slot.restart_at = None
        logger.info("started shard-%d pid=%d", slot.index, process.pid)

    def _on_exit(self, slot: ShardSlot) -> None:
        assert slot.process is not None
        code = slot.process.exitcode
        self._drain_status(slot)
        slot.process = None
        crashed_on = self._record_crash(slot, code)
        if self.stopping:
            logger.info("shard-%d stopped exit_code=%s", slot.index, code)
            return
        ran_s = time.monotonic() - slot.started_at
        if ran_s > RESTART_BACKOFF_RESET_S:
            slot.backoff_s = RESTART_BACKOFF_INITIAL_S
        # A handler that calls os._exit(3) is a crash on its event, not a start-up failure.
        if code == STARTUP_FAILED and crashed_on is None:
            logger.error("shard-%d cannot start (see its error above); not restarting it", slot.index)
            return
        slot.restarts += 1
        slot.restart_at = time.monotonic() + slot.backoff_s
        logger.warning(
            "shard-%d exited with code %s after %.1f s; restarting in %.1f s (restart %d)",
            slot.index,
            code,
            ran_s,
            slot.backoff_s,
            slot.restarts,
        )
        slot.backoff_s = min(slot.backoff_s * 2, RESTART_BACKOFF_MAX_S)

    def _record_crash(self, slot: ShardSlot, code: int | None) -> tuple[int, int] | None:
        """Count a crash of the event the shard was handling when it died, if any."""
        if slot.in_progress is None:
            return None
        event = slot.in_progress.take()
        # Even exit code 0 counts: a shard exits normally only between handler calls.
        if event is None:
            return None
        partition, offset = event
        crashes = self.crash_table.record(partition, offset, code if code is not None else 0)
        logger.error(
            "shard-%d ended with %s while handling topic=%s partition=%d offset=%d "
            "(crash %d of that event; it is dead-lettered after %d)",
            slot.index,
            describe_exit(code),
            self.config.topic,
            partition,
            offset,
            crashes,
            self.config.max_retries,
        )
        return event

    def _drain_status(self, slot: ShardSlot) -> None:
        if slot.status is None:
            return
        try:
            while slot.status.poll():
                slot.last_status = slot.status.recv()
        except (EOFError, OSError):
            slot.status.close()
            slot.status = None

    def run(self) -> int:
        def request_stop(signum: int, _frame: Any) -> None:
            if not self.stopping:
                logger.info("received %s; draining shards", signal.Signals(signum).name)
                self.stopping = True
                return
            # A second Ctrl-C or SIGTERM: a second SIGTERM makes each shard stop at once.
            logger.warning("received %s again; stopping shards without draining", signal.Signals(signum).name)
            for slot in self.slots:
                if slot.process is not None and slot.process.pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(slot.process.pid, signal.SIGTERM)

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        logger.info(
            "processor starting shards=%d group=%s topic=%s queue=%s node=%s",
            self.config.shards,
            self.config.group,
            self.config.topic,
            self.config.queue,
            self.config.node,
        )
        for slot in self.slots:
            self._start(slot)
        while not self.stopping:
            self._watch(timeout_s=0.2)
            now = time.monotonic()
            for slot in self.slots:
                if slot.process is None and slot.restart_at is not None and now >= slot.restart_at:
                    self._start(slot)
            self._tick()
            if all(slot.process is None and slot.restart_at is None for slot in self.slots):
                logger.error("every shard has stopped and none will be restarted")
                return 1
        self._stop_all()
        self._tick()
        return 0

    def _watch(self, timeout_s: float) -> None:
        waitables: list[Any] = []
        for slot in self.slots:
            if slot.process is not None:
                waitables.append(slot.process.sentinel)
            if slot.status is not None:
                waitables.append(slot.status)
        if not waitables:
            time.sleep(timeout_s)
            return
        try:
            multiprocessing.connection.wait(waitables, timeout_s)
        except InterruptedError:
            return
        for slot in self.slots:
            self._drain_status(slot)
            if slot.process is not None and not slot.process.is_alive():
                slot.process.join()
                self._on_exit(slot)

    def _stop_all(self) -> None:
        for slot in self.slots:
            if slot.process is not None and slot.process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.drain_timeout_s + 5
        while any(slot.process is not None for slot in self.slots):
            if time.monotonic() > deadline:
                for slot in self.slots:
                    if slot.process is not None:
                        logger.warning("shard-%d did not stop; killing pid=%d", slot.index, slot.process.pid)
                        slot.process.kill()
                        slot.process.join()
                        slot.process = None
                break
            self._watch(timeout_s=0.2)
            self._tick()

    def summary(self) -> list[dict[str, Any]]:
        rows = []
        for slot in self.slots:
            status = slot.last_status
            rows.append(
                {
                    "shard": slot.index,
                    "member": status.get("member", f"{self.config.node}/shard-{slot.index}"),
                    "processed": status.get("processed", 0),
                    "emitted": status.get("emitted", 0),
                    "failed": status.get("failed", 0),
                    "restarts": slot.restarts,
                }
            )
        return rows


def run(config: ProcessorConfig, on_tick: Callable[[Supervisor], None] | None = None) -> int:
    if config.handler:
        # Fail fast, in the supervisor, on a bad value.
        check_handler(config.handler, config.handler_args)
    supervisor = Supervisor(config, on_tick)
    code = supervisor.run()
    supervisor.last_summary = supervisor.summary()  # type: ignore[attr-defined]
    return code
