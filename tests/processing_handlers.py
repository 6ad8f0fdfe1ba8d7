"""Handlers for the tests of retries, dead letters, crashes and handler classes.

Each runs inside a shard process. Tests steer them through events' fields and through
environment variables, which shard processes inherit from `evp process`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson

# Path of a file; `hold_until_released` fails events marked "hold" until it exists.
RELEASE_ENV = "EVP_TEST_RELEASE_FILE"
# Exit code of `exit_on_marked`, distinct from evp's own exit codes.
CRASH_EXIT_CODE = 17


class HeldError(Exception):
    """Raised by `hold_until_released` for an event that is held."""


class MarkedError(ValueError):
    """Raised by `fail_marked` for an event marked "fail"."""


def hold_until_released(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Fail events marked "hold" until the file named by EVP_TEST_RELEASE_FILE exists."""
    if event.get("hold") and not Path(os.environ[RELEASE_ENV]).exists():
        raise HeldError(f"event {event['id']} is held")
    return dict(event, delivery=context.delivery)


def fail_marked(event: dict[str, Any]) -> dict[str, Any]:
    """Fail every delivery of events marked "fail"; pass the rest."""
    if event.get("fail"):
        raise MarkedError(f"event {event['id']} is marked to fail")
    return event


def exit_on_marked(event: dict[str, Any]) -> dict[str, Any]:
    """End the whole shard process on events marked "crash", as a segfault would."""
    if event.get("crash"):
        os._exit(CRASH_EXIT_CODE)
    return event


def rekey_by_id(event: dict[str, Any]) -> Any:
    """Return the event under the key of its id, so a chain can check the output key."""
    from evp import Keyed

    return Keyed(event["id"], event)


class Recorder:
    """Record setup, teardown and each event's context to a JSON-lines file per shard."""

    def __init__(self, path: str) -> None:
        self.path_template = path
        self.file: Any = None

    def setup(self, shard: Any) -> None:
        path = Path(self.path_template.replace("{shard}", str(shard.index)))
        self.file = path.open("ab")
        self._write({"call": "setup", "shard": shard.index, "member": shard.member})

    def handle(self, event: dict[str, Any], context: Any) -> dict[str, Any]:
        fields = context.as_dict()
        fields["logger"] = context.logger.name
        self._write({"call": "handle", "id": event["id"], "context": fields})
        return dict(event, context=fields)

    def teardown(self) -> None:
        self._write({"call": "teardown"})
        self.file.close()

    def _write(self, row: dict[str, Any]) -> None:
        self.file.write(orjson.dumps(row) + b"\n")
        self.file.flush()


class BrokenSetup:
    """A handler class whose setup() fails, as with a missing configuration file."""

    def setup(self) -> None:
        raise FileNotFoundError("settings.toml not found")

    def handle(self, event: dict[str, Any]) -> dict[str, Any]:
        return event


def invalid_results(event: dict[str, Any]) -> Any:
    """Return results the queue cannot take for marked events: a bad key, a huge event."""
    from evp import Keyed

    if event.get("bad_key"):
        return Keyed(123, event)  # type: ignore[arg-type]
    if event.get("huge"):
        return dict(event, padding="x" * 8192)
    return event
