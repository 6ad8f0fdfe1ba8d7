"""Events on the publisher's side: reading JSON lines, finding keys, generating.

The key of an event decides its partition. A CloudEvent in structured JSON mode (an
object with `specversion`) that has the `partitionkey` attribute of the CloudEvents
Partitioning extension is keyed by it, whatever `--key-field` names, because that
attribute is the event's own statement of its partition key. Any other event is keyed
by the `--key-field` dotted path when one is given, else by `partitionkey`, else by
`id`. Strings are used as they are, integers by their decimal digits (so 2**64 and
2**64 + 1 stay two keys), and other numbers as Python prints the float, so `1e2`
becomes "100.0". True, false, null, objects and arrays are not keys.

`to_cloudevent` wraps a plain event in a CloudEvents 1.0 envelope for
`evp publish --cloudevents`.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import re
import socket
import sys
import time
import uuid
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson

from evp.records import MAX_KEY_BYTES


# 19 digits or more may not fit in a signed or unsigned 64-bit integer.
LONG_NUMBER = re.compile(rb"\d{19}")


class InvalidEvent(Exception):
    """An input line or event that cannot be published."""


class InputError(Exception):
    """An input file that cannot be read any further."""


def key_path(spec: str | None) -> list[list[str]]:
    """Turn `--key-field` into the list of paths to try, in order."""
    if spec:
        parts = spec.split(".")
        if not all(parts):
            raise ValueError(f"invalid key field {spec!r}: use a dotted path such as repo.name")
        return [parts]
    return [["partitionkey"], ["id"]]


class MissingKey(InvalidEvent):
    """An event that has none of the key fields."""


def is_cloudevent(event: dict[str, Any]) -> bool:
    """Tell whether `event` is a CloudEvent in structured JSON mode."""
    return "specversion" in event


def extract_key(event: dict[str, Any], paths: list[list[str]]) -> bytes:
    """Return the key of `event` as UTF-8 bytes, or raise InvalidEvent (MissingKey)."""
    if is_cloudevent(event) and "partitionkey" in event:
        return _key_bytes(event["partitionkey"], ["partitionkey"])
    for path in paths:
        value: Any = event
        for part in path:
            if not isinstance(value, dict) or part not in value:
                value = _MISSING
                break
            value = value[part]
        if value is _MISSING:
            continue
        return _key_bytes(value, path)
    names = " or ".join(repr(".".join(path)) for path in paths)
    raise MissingKey(f"event has no key: no field {names}; choose one with --key-field")


def _key_bytes(value: Any, path: list[str]) -> bytes:
    if isinstance(value, str):
        key = value.encode()
        if len(key) > MAX_KEY_BYTES:
            raise InvalidEvent(
                f"key field {'.'.join(path)!r} is {len(key)} bytes in UTF-8, over the limit of "
                f"{MAX_KEY_BYTES} bytes per key; choose a shorter field with --key-field"
            )
        return key
    if isinstance(value, bool) or value is None:
        raise InvalidEvent(
            f"key field {'.'.join(path)!r} is {json.dumps(value)}; keys must be strings or numbers"
        )
    if isinstance(value, int | float):
        return json.dumps(value).encode()
    raise InvalidEvent(
        f"key field {'.'.join(path)!r} is a JSON {_json_type(value)}; keys must be strings or numbers"
    )


def default_cloudevent_source() -> str:
    """Return the default CloudEvents `source` of this host's publisher."""
    return f"evp://{socket.gethostname()}/publish"


def to_cloudevent(
    event: dict[str, Any], paths: list[list[str]], source: str, event_type: str
) -> tuple[bytes, bytes]:
    """Wrap `event` in a CloudEvents 1.0 envelope; return (key, JSON bytes).

    The envelope's `partitionkey` is the event's key under the usual rules. An event
    without a key gets no `partitionkey`, and the envelope is keyed by its unique `id`.
    An event that already is a CloudEvent is returned unchanged, keyed by its own key
    or else its `id`. Raises InvalidEvent for a key field of the wrong type.
    """
    if is_cloudevent(event):
        try:
            key = extract_key(event, paths)
        except MissingKey:
            # Published as it is, keyed like a wrapped event without a key: by its id.
            if "id" not in event:
                raise
            key = _key_bytes(event["id"], ["id"])
        return key, dumps_event(event)
    envelope: dict[str, Any] = {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": source,
        "type": event_type,
        "time": datetime.now(UTC).isoformat(timespec="microseconds"),
        "datacontenttype": "application/json",
        "data": event,
    }
    try:
        key = extract_key(event, paths)
        envelope["partitionkey"] = key.decode()
    except MissingKey:
        key = envelope["id"].encode()
    return key, dumps_event(envelope)


_MISSING = object()


def _json_type(value: Any) -> str:
    """Return the JSON name of a parsed value's type, e.g. "null" or "array"."""
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number"}
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return names.get(type(value), type(value).__name__)


def parse_line(line: bytes) -> tuple[dict[str, Any], bytes]:
    """Parse one JSON line into (event, canonical JSON bytes); raise InvalidEvent.

    The canonical bytes are what is published: orjson's compact encoding. Integers
    beyond 64 bits, which orjson does not read, are parsed with the standard library
    and kept exact. NaN and Infinity are rejected, as RFC 8259 JSON has no such values.
    Lone surrogates (\\ud800 with no pair) are rejected, as they cannot be UTF-8.
    """
    if LONG_NUMBER.search(line):
        # orjson reads integers beyond 64 bits as floats, which would change them.
        event = _parse_fallback(line, None)
        if not isinstance(event, dict):
            raise InvalidEvent(f"a JSON {_json_type(event)}, not an object")
        return event, _dumps_exact(event)
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        event = _parse_fallback(line, exc)
        if not isinstance(event, dict):
            raise InvalidEvent(f"a JSON {_json_type(event)}, not an object") from None
        return event, _dumps_exact(event)
    if not isinstance(event, dict):
        raise InvalidEvent(f"a JSON {_json_type(event)}, not an object")
    return event, dumps_event(event)


def loads_event(value: bytes) -> Any:
    """Decode a stored event by the rules of `parse_line`, so that every event the
    queue accepted decodes: integers beyond 64 bits stay exact, and whatever orjson
    cannot read goes to the standard library. Raises InvalidEvent otherwise."""
    if LONG_NUMBER.search(value):
        return _parse_fallback(value, None)
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return _parse_fallback(value, exc)


def check_object(value: bytes) -> None:
    """Raise InvalidEvent unless `value` is the UTF-8 JSON text of an object.

    The rules match `parse_line`, so what the publisher accepts the queue accepts.
    """
    try:
        event = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        event = _parse_fallback(value, exc)
        try:
            _dumps_exact(event)
        except RecursionError:
            raise InvalidEvent("invalid JSON: nested too deeply") from None
    if type(event) is not dict:
        raise InvalidEvent(f"a JSON {_json_type(event)}, not an object")


def _reject_constant(name: str) -> Any:
    raise InvalidEvent(f"{name} is not valid JSON (RFC 8259 has no NaN or Infinity)")


def _parse_fallback(line: bytes, original: Exception | None) -> Any:
    """Parse with the standard library, which keeps integers of any size exact."""
    try:
        text = line.decode()
        return json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidEvent(f"invalid JSON: {original or exc}") from None
    except RecursionError:
        raise InvalidEvent("invalid JSON: nested too deeply") from None


def dumps_event(event: dict[str, Any]) -> bytes:
    """Encode an event as compact UTF-8 JSON, keeping integers beyond 64 bits exact."""
    try:
        return orjson.dumps(event)
    except TypeError:
        # orjson does not write integers beyond 64 bits; the standard library does.
        return _dumps_exact(event)


def _dumps_exact(event: dict[str, Any]) -> bytes:
    try:
        text = json.dumps(event, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return text.encode()
    except (ValueError, UnicodeEncodeError) as exc:
        raise InvalidEvent(f"cannot encode the event as UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise InvalidEvent("cannot encode the event as JSON: nested too deeply") from None


def open_source(path: str) -> IO[bytes]:
    """Open a JSON-lines file (gzip when it ends in .gz) or "-" for standard input."""
    if path == "-":
        return sys.stdin.buffer
    file_path = Path(path)
    if not file_path.is_file():
        raise FileNotFoundError(f"input file {path!r} not found")
    if file_path.suffix == ".gz":
        return io.BufferedReader(gzip.open(file_path, "rb"))  # type: ignore[arg-type]
    return open(file_path, "rb")  # noqa: SIM115


# Bytes read at a time while skipping the rest of an over-long line.
SKIP_CHUNK_BYTES = 64 * 1024


def read_lines(
    source: IO[bytes], name: str = "input", max_line_bytes: int | None = None
) -> Iterator[tuple[int, bytes | None]]:
    """Yield (line number, line) for each non-blank line, CRLF or LF terminated.

    A line longer than `max_line_bytes` (line ending excluded) is yielded as None and
    is never held in memory whole: the rest of it is read and dropped in chunks.
    Raises InputError when the source cannot be read, e.g. a .gz file that is not
    gzip or is truncated.
    """
    number = 0
    # Room for the line ending, so a line of exactly max_line_bytes is accepted.
    read_limit = -1 if max_line_bytes is None else max_line_bytes + 2
    try:
        while True:
            raw = source.readline(read_limit)
            if not raw:
                return
            number += 1
            line = raw.rstrip(b"\r\n")
            if max_line_bytes is not None and len(line) > max_line_bytes:
                while not raw.endswith(b"\n"):
                    raw = source.readline(SKIP_CHUNK_BYTES)
                    if not raw:
                        break
                yield number, None
                continue
            if number == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]  # a UTF-8 byte order mark is not part of the JSON
            if line.strip():
                yield number, line
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"cannot read {name} after line {number}: {exc}") from exc


ACTIONS = ("page_view", "click", "add_to_cart", "purchase", "search", "login", "logout")
PAGES = ("/", "/products", "/products/42", "/cart", "/checkout", "/search", "/account")
# Distinct "type" and "data" parts a generator draws from.
DETAIL_CHOICES = 4096


class EventGenerator:
    """Random user actions keyed by user id, about 190 bytes each as JSON.

    Generation is on the publisher's hot path, where building a dict and encoding it
    cost three times the rest of the publisher's work per event. So each event is one
    bytes template filled with parts made in advance. The id has the shape of a
    version-4 UUID, random per generator in its first 20 digits and the event's number
    in the last 12, so ids are unique. The time string is reused within one
    millisecond. The action, page, duration and amount come from a table of
    DETAIL_CHOICES random combinations made at start.
    """

    def __init__(self, keys: int = 1000, seed: int | None = None) -> None:
        if keys < 1:
            raise ValueError(f"invalid key count {keys}: use 1 or more")
        rnd = self.random = random.Random(seed)
        self.keys = [f"user-{index:06d}".encode() for index in range(keys)]
        bits = rnd.getrandbits(78)
        # 8-4-4-4 hex digits, the version digit 4 and the RFC 9562 variant (8 to b).
        self._id_prefix = b"%08x-%04x-4%03x-%x%03x-" % (
            bits >> 46, bits >> 30 & 0xFFFF, bits >> 18 & 0xFFF, 8 | bits >> 16 & 3, bits & 0xFFF
        )
        self._details = [
            b'"type":"%s","data":{"page":"%s","duration_ms":%d,"amount":%d.%02d}}'
            % (
                rnd.choice(ACTIONS).encode(),
                rnd.choice(PAGES).encode(),
                rnd.randrange(10, 5000),
                rnd.randrange(100),
                rnd.randrange(100),
            )
            for _ in range(DETAIL_CHOICES)
        ]
        self.sequence = 0
        self._time_ms = -1
        self._time_text = b""

    def next(self) -> tuple[bytes, bytes]:
        """Return (key, JSON bytes) of a new event."""
        self.sequence += 1
        sequence = self.sequence
        bits = self.random.getrandbits(44)
        key = self.keys[(bits & 0xFFFFFFFF) % len(self.keys)]
        now_ms = time.time_ns() // 1_000_000
        if now_ms != self._time_ms:
            self._time_ms = now_ms
            moment = datetime.fromtimestamp(now_ms / 1000, UTC)
            self._time_text = moment.isoformat(timespec="milliseconds").encode()
        value = b'{"id":"%s%012x","user":"%s","time":"%s","seq":%d,%s' % (
            self._id_prefix,
            sequence,
            key,
            self._time_text,
            sequence,
            self._details[bits >> 32],
        )
        return key, value
