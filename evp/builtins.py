"""Built-in handlers, addressed as `--handler evp:NAME`.

- `evp:passthrough` returns each event unchanged.
- `evp:print` writes each event to standard output as one JSON line with its topic,
  partition, offset and key, and passes it on unchanged.
- `evp:count` counts events per key and drops them. It logs the total and the top
  keys every `interval` seconds (default 10) and when the shard stops. With
  `--handler-arg path=FILE`, it also writes every count to FILE as a JSON object when
  the shard stops.
- `evp:jsonl` appends each event to a JSON-lines file and drops it:
  `--handler-arg path=FILE` (default `evp-output-{shard}.jsonl`).

In a `path`, `{shard}` is replaced by the shard's index, so each shard process writes
its own file.
"""

from __future__ import annotations

import asyncio
import collections
import os
import sys
from pathlib import Path
from typing import Any

import orjson

from evp.context import Context, ShardInfo

TOP_KEYS_LOGGED = 10


def _shard_path(template: str, shard: int) -> Path:
    return Path(template.replace("{shard}", str(shard)))


def passthrough(event: dict[str, Any]) -> dict[str, Any]:
    """Return the event unchanged."""
    return event


def print_event(event: dict[str, Any], context: Context) -> dict[str, Any]:
    """Write the event to standard output as one JSON line, then pass it on."""
    line = orjson.dumps(
        {
            "topic": context.topic,
            "partition": context.partition,
            "offset": context.offset,
            "key": context.key,
            "event": event,
        }
    )
    sys.stdout.buffer.write(line + b"\n")
    sys.stdout.buffer.flush()
    return event


class Count:
    """Count events per key; log the top keys periodically and write the counts at the end.

    NOTE: the counts live in memory only. A shard that crashes loses them, and its
    restart writes counts from zero over the file at its next shutdown.
    """

    def __init__(self, path: str | None = None, interval: str = "10") -> None:
        try:
            self.interval_s = float(interval)
        except ValueError:
            self.interval_s = 0.0
        if not self.interval_s > 0:
            raise ValueError(
                f"invalid interval {interval!r}: give a number of seconds above 0, "
                f"e.g. interval=10"
            )
        self.path_template = path
        self.counts: collections.Counter[str] = collections.Counter()
        self.total = 0
        self._logged_total = 0
        self._logger: Any = None
        self._timer: asyncio.TimerHandle | None = None

    def setup(self, shard: ShardInfo) -> None:
        self._logger = shard.logger
        # setup runs on the shard's event loop, so a timer logs even when events stop.
        self._timer = asyncio.get_running_loop().call_later(self.interval_s, self._tick)

    def handle(self, event: dict[str, Any], context: Context) -> None:
        self.counts[context.key] += 1
        self.total += 1
        return None

    def _tick(self) -> None:
        if self.total != self._logged_total:
            self._log()
        self._timer = asyncio.get_running_loop().call_later(self.interval_s, self._tick)

    def _log(self) -> None:
        self._logged_total = self.total
        if self._logger is None:
            return
        top = ", ".join(f"{key}={count}" for key, count in self.counts.most_common(TOP_KEYS_LOGGED))
        self._logger.info(
            "count total=%d keys=%d top: %s", self.total, len(self.counts), top or "(none)"
        )

    def teardown(self, shard: ShardInfo) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._log()
        if self.path_template is None:
            return
        path = _shard_path(self.path_template, shard.index)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_bytes(orjson.dumps(dict(self.counts), option=orjson.OPT_SORT_KEYS))
        os.replace(temporary, path)


class JsonLines:
    """Append each event to a JSON-lines file and drop it."""

    def __init__(self, path: str = "evp-output-{shard}.jsonl") -> None:
        self.path_template = path
        self._fd: int | None = None

    def setup(self, shard: ShardInfo) -> None:
        path = _shard_path(self.path_template, shard.index)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def handle(self, event: dict[str, Any], context: Context) -> None:
        assert self._fd is not None, "setup() opens the file before the first event"
        # One write per line with O_APPEND: the line is with the OS before the event is
        # acknowledged, and shards sharing a file never split each other's lines.
        os.write(self._fd, orjson.dumps(event) + b"\n")
        return None

    def teardown(self, shard: ShardInfo) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


BUILTINS: dict[str, Any] = {
    "passthrough": passthrough,
    "print": print_event,
    "count": Count,
    "jsonl": JsonLines,
}
