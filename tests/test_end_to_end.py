"""End-to-end runs of real data through `evp queue`, `evp process` and `evp publish`.

Every test starts the processor first and waits until all its shards have joined, so
that the assignment is stable while events flow and no key moves between shards.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import (
    GHARCHIVE,
    WIKITICKER,
    read_events,
    read_output,
    require_data,
    snapshot,
    wait_until,
)

WIKITICKER_EVENTS = 39_244
GHARCHIVE_EVENTS = 800
START_TIMEOUT_S = 60.0
CATCH_UP_TIMEOUT_S = 120.0


# Helpers.


def canonical(event: Any) -> bytes:
    return orjson.dumps(event, option=orjson.OPT_SORT_KEYS)


def nested(event: dict[str, Any], dotted: str) -> Any:
    value: Any = event
    for part in dotted.split("."):
        value = value[part]
    return value


def first_deliveries(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the first row of each (partition, offset), because later rows are redeliveries."""
    seen: set[tuple[int, int]] = set()
    first = []
    for row in rows:
        position = (row["partition"], row["offset"])
        if position not in seen:
            seen.add(position)
            first.append(row)
    return first


def offsets_out_of_order(rows: list[dict[str, Any]]) -> list[tuple[int, int, int, int]]:
    """List (shard, partition, offset, previous offset) wherever a shard's file goes back."""
    last: dict[tuple[int, int], int] = {}
    problems = []
    for row in rows:
        stream = (row["shard"], row["partition"])
        previous = last.get(stream)
        if previous is not None and row["offset"] <= previous:
            problems.append((row["shard"], row["partition"], row["offset"], previous))
        last[stream] = row["offset"]
    return problems


def keys_on_several(rows: list[dict[str, Any]], field: str) -> dict[str, set[int]]:
    """Map each key written by more than one shard (or partition) to those shards."""
    owners: dict[str, set[int]] = defaultdict(set)
    for row in rows:
        owners[row["key"]].add(row[field])
    return {key: shards for key, shards in owners.items() if len(shards) > 1}


def keys_out_of_input_order(
    inputs: list[dict[str, Any]], rows: list[dict[str, Any]], key_field: str
) -> list[str]:
    """List the keys whose events, in offset order, differ from their order in the input."""
    expected: dict[str, list[bytes]] = defaultdict(list)
    for event in inputs:
        expected[str(nested(event, key_field))].append(canonical(event))
    got: dict[str, list[bytes]] = defaultdict(list)
    for row in sorted(rows, key=lambda row: (row["partition"], row["offset"])):
        got[row["key"]].append(canonical(row["event"]))
    return [key for key in expected if expected[key] != got.get(key)]


def multiset_difference(expected: list[Any], got: list[Any]) -> tuple[int, int]:
    """Return (events expected but missing, events present but not expected)."""
    expected_counts = Counter(canonical(event) for event in expected)
    got_counts = Counter(canonical(event) for event in got)
    missing = sum((expected_counts - got_counts).values())
    unexpected = sum((got_counts - expected_counts).values())
    return missing, unexpected


def start_processor(evp: Any, address: str, output: Path, shards: int, *extra: str) -> Any:
    """Start `evp process` and wait until every one of its shards has joined the group."""
    process = evp.start(
        "process",
        "--queue", address,
        "--shards", str(shards),
        "--output", str(output),
        "--node", "e2e",
        *extra,
        log_name="process",
    )

    def all_joined() -> bool:
        assert process.poll() is None, f"evp process exited:\n{evp.log('process')}"
        groups = snapshot(address)["groups"]
        return bool(groups) and len(groups[0]["members"]) == shards

    wait_until(all_joined, START_TIMEOUT_S, message=f"{shards} shards did not join")
    return process


def wait_for_lag_zero(address: str) -> dict[str, Any]:
    def caught_up() -> dict[str, Any] | None:
        current = snapshot(address)
        groups = current["groups"]
        return current if groups and all(group["lag"] == 0 for group in groups) else None

    return wait_until(caught_up, CATCH_UP_TIMEOUT_S, message="the group did not reach lag 0")


def publish_file(evp: Any, address: str, path: Path, key_field: str) -> str:
    result = evp.run(
        "publish", "--queue", address, "--file", str(path), "--key-field", key_field, "--rate", "0"
    )
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    return stderr


def check_processed(
    evp: Any, address: str, output: Path, inputs: list[dict[str, Any]], key_field: str
) -> None:
    """Assert the output contains every input event once, in key order, one shard per key."""
    rows = read_output(output)
    first = first_deliveries(rows)
    assert len(first) == len(inputs)
    missing, unexpected = multiset_difference(inputs, [row["event"] for row in first])
    assert missing == 0
    assert unexpected == 0
    assert offsets_out_of_order(rows) == []
    assert keys_on_several(rows, "shard") == {}
    assert keys_on_several(rows, "partition") == {}
    wrong_keys = [row for row in rows if row["key"] != str(nested(row["event"], key_field))]
    assert wrong_keys == []
    assert keys_out_of_input_order(inputs, first, key_field) == []

    result = evp.run("stats", "--queue", address, "--json", "--once")
    assert result.returncode == 0, result.stderr.decode()
    stats = orjson.loads(result.stdout)
    assert [group["group"] for group in stats["groups"]] == ["default"]
    assert sum(group["lag"] for group in stats["groups"]) == 0


# Real data sets.


@pytest.mark.timeout(240)
def test_wikiticker_all_events(evp, tmp_path):
    data = require_data(WIKITICKER)
    inputs = read_events(data)
    assert len(inputs) == WIKITICKER_EVENTS
    _, address = evp.queue(tmp_path / "data")
    output = tmp_path / "out"
    start_processor(evp, address, output, 8)

    stderr = publish_file(evp, address, data, "page")
    assert f"acknowledged={WIKITICKER_EVENTS} " in stderr
    assert "unacknowledged=0 " in stderr
    wait_for_lag_zero(address)

    check_processed(evp, address, output, inputs, "page")
    shards_used = {row["shard"] for row in read_output(output)}
    assert shards_used == set(range(8))


@pytest.mark.timeout(120)
def test_gharchive_all_events(evp, tmp_path):
    data = require_data(GHARCHIVE)
    inputs = read_events(data)
    assert len(inputs) == GHARCHIVE_EVENTS
    _, address = evp.queue(tmp_path / "data")
    output = tmp_path / "out"
    start_processor(evp, address, output, 4)

    stderr = publish_file(evp, address, data, "repo.name")
    assert f"acknowledged={GHARCHIVE_EVENTS} " in stderr
    wait_for_lag_zero(address)

    check_processed(evp, address, output, inputs, "repo.name")


def expected_github_results(event: dict[str, Any]) -> list[dict[str, Any]]:
    """Compute what tests/handlers.py:github yields for one event, without calling it."""
    if event["type"] == "WatchEvent":
        return []
    if event["type"] == "PushEvent":
        commits = event["payload"].get("commits", [])
        return [
            {"repo": event["repo"]["name"], "event_id": event["id"], "sha": commit["sha"]}
            for commit in commits
        ]
    tagged = dict(event)
    tagged["handled_by"] = "tests.handlers.github"
    return [tagged]


@pytest.mark.timeout(120)
def test_gharchive_handler_results(evp, tmp_path):
    data = require_data(GHARCHIVE)
    inputs = read_events(data)
    expected = [result for event in inputs for result in expected_github_results(event)]
    handler = str(Path(__file__).with_name("handlers.py")) + ":github"
    _, address = evp.queue(tmp_path / "data")
    output = tmp_path / "out"
    start_processor(evp, address, output, 2, "--handler", handler)

    publish_file(evp, address, data, "repo.name")
    wait_for_lag_zero(address)

    rows = read_output(output)
    got = [row["event"] for row in rows]
    assert len(got) == len(expected)
    missing, unexpected = multiset_difference(expected, got)
    assert missing == 0
    assert unexpected == 0
    watch_events = [event for event in got if event.get("type") == "WatchEvent"]
    assert watch_events == []
    fanned_out = Counter((row["partition"], row["offset"]) for row in rows if "sha" in row["event"])
    assert max(fanned_out.values()) > 1
    handler_errors = [line for line in evp.log("process").splitlines() if "handler failed" in line]
    assert handler_errors == []


# Input edge cases.

BIG_VALUE = "x" * (100 * 1024)
INPUT_LINES = [
    b'{"id": "a", "n": 1}\n',
    b"\n",
    b'{"id": "b", "n": 2}\r\n',
    b'{"id": "c", "n": \n',
    b'{"id": "d", "big": "' + BIG_VALUE.encode() + b'"}\n',
    b"[1, 2]\n",
    b'{"id": "e", "n": 5}',
]
VALID_EVENTS = [
    {"id": "a", "n": 1},
    {"id": "b", "n": 2},
    {"id": "d", "big": BIG_VALUE},
    {"id": "e", "n": 5},
]
INVALID_LINE_NUMBERS = (4, 6)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("source", ["file", "stdin"])
def test_publish_skips_invalid_lines(evp, tmp_path, source):
    _, address = evp.queue(tmp_path / "data")
    output = tmp_path / "out"
    start_processor(evp, address, output, 1)
    content = b"".join(INPUT_LINES)
    if source == "file":
        path = tmp_path / "input.jsonl"
        path.write_bytes(content)
        result = evp.run("publish", "--queue", address, "--file", str(path), "--rate", "0")
        name = str(path)
    else:
        result = evp.run("publish", "--queue", address, "--file", "-", "--rate", "0", input=content)
        name = "stdin"
    stderr = result.stderr.decode()

    # Skipped lines are input that was not published, so the exit code is 1 while
    # every valid line is still published and acknowledged.
    assert result.returncode == 1, stderr
    assert "2 invalid input lines were skipped" in stderr
    for number in INVALID_LINE_NUMBERS:
        assert f"{name}:{number}: skipped" in stderr
    reported = re.findall(r":(\d+): skipped", stderr)
    assert sorted(int(number) for number in reported) == list(INVALID_LINE_NUMBERS)
    assert "invalid_lines=2 " in stderr
    assert f"acknowledged={len(VALID_EVENTS)} " in stderr
    assert "Traceback" not in stderr

    wait_for_lag_zero(address)
    got = [row["event"] for row in read_output(output)]
    assert len(got) == len(VALID_EVENTS)
    missing, unexpected = multiset_difference(VALID_EVENTS, got)
    assert missing == 0
    assert unexpected == 0


# The demo.


@pytest.mark.timeout(150)
def test_demo_loses_nothing(evp):
    result = evp.run("demo", "--count", "3000", "--rate", "0", "--shards", "4", timeout_s=140)
    stdout = result.stdout.decode()
    assert result.returncode == 0, stdout + result.stderr.decode()
    assert re.search(r"lost\s*\S\s*0\s", stdout), stdout[-2000:]
    assert re.search(r"published \(acknowledged\)\s*\S\s*3,000\s", stdout), stdout[-2000:]
