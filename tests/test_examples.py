"""The pipelines of examples/ on real data, checked against counts made from the input file."""

from __future__ import annotations

import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import (
    GHARCHIVE,
    ROOT,
    WIKITICKER,
    group_state,
    read_events,
    read_output,
    require_data,
    wait_for_node,
    wait_until,
)

EXAMPLES = ROOT / "examples"
CATCH_UP_TIMEOUT_S = 180.0
LARGE_EDIT_BYTES = 1000


def start_stage(
    evp: Any, address: str, node: str, topic: str, group: str, *extra: str
) -> subprocess.Popen[bytes]:
    process = evp.start(
        "process", "--queue", address, "--shards", "2", "--node", node, "--topic", topic,
        "--group", group, *extra,
        log_name=node,
    )
    wait_for_node(evp, process, node, address, node, 2, topic, group)
    return process


def publish(evp: Any, address: str, topic: str, path: Path, key_field: str) -> None:
    result = evp.run(
        "publish", "--queue", address, "--topic", topic, "--file", str(path),
        "--key-field", key_field, "--rate", "0",
        timeout_s=CATCH_UP_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr.decode()


def wait_for_lag_zero(address: str, topic: str, group: str) -> None:
    def caught_up() -> bool:
        state = group_state(address, topic, group)
        return state is not None and state["lag"] == 0

    wait_until(caught_up, CATCH_UP_TIMEOUT_S, message=f"group {group} of {topic} lags")


def run_chain(
    evp: Any,
    data: Path,
    *,
    topic: str,
    key_field: str,
    first: list[str],
    middle: str,
    second: list[str],
) -> None:
    """Run a two-stage chain over `data` until both stages are idle, then stop the second.

    The first stage reads `topic` with the handler options `first` and publishes to
    `middle`; the second reads `middle` with `second`. The second stage is stopped
    with SIGTERM, so its handler's teardown runs.
    """
    _, address = evp.queue(None, None, "--partitions", "8")
    start_stage(evp, address, "first", topic, "first", *first, "--output-topic", middle)
    last = start_stage(evp, address, "second", middle, "second", *second)
    publish(evp, address, topic, data, key_field)
    wait_for_lag_zero(address, topic, "first")
    wait_for_lag_zero(address, middle, "second")
    last.send_signal(signal.SIGTERM)
    assert last.wait(timeout=60) == 0


@pytest.mark.timeout(240)
def test_github_push_filter(evp, tmp_path):
    data = require_data(GHARCHIVE)
    pushes = [event for event in read_events(data) if event["type"] == "PushEvent"]
    sink_path = tmp_path / "pushes-{shard}.jsonl"
    run_chain(
        evp,
        data,
        topic="github",
        key_field="repo.name",
        first=["--handler", f"{EXAMPLES / 'github.py'}:push_events"],
        middle="pushes",
        second=["--handler", "evp:jsonl", "--handler-arg", f"path={sink_path}"],
    )

    written = [
        orjson.loads(line)
        for path in sorted(tmp_path.glob("pushes-*.jsonl"))
        for line in path.read_bytes().splitlines()
    ]
    assert sorted(row["id"] for row in written) == sorted(event["id"] for event in pushes)
    expected_commits = {event["id"]: len(event["payload"].get("commits") or []) for event in pushes}
    assert {row["id"]: row["commits"] for row in written} == expected_commits


@pytest.mark.timeout(300)
def test_wikipedia_edit_counts(evp, tmp_path):
    data = require_data(WIKITICKER)
    expected = Counter(event["page"] for event in read_events(data) if not event["isRobot"])
    counts_path = tmp_path / "counts-{shard}.json"
    run_chain(
        evp,
        data,
        topic="wikipedia",
        key_field="page",
        first=["--handler", f"{EXAMPLES / 'wikipedia.py'}:human_edits"],
        middle="human-edits",
        second=["--handler", "evp:count", "--handler-arg", f"path={counts_path}"],
    )

    counted: Counter[str] = Counter()
    files = sorted(tmp_path.glob("counts-*.json"))
    assert len(files) == 2
    for path in files:
        shard_counts = orjson.loads(path.read_bytes())
        # A page's events share a key, so each page is counted by one shard only.
        assert counted.keys().isdisjoint(shard_counts)
        counted.update(shard_counts)
    assert sum(counted.values()) == sum(expected.values())
    assert counted == expected


@pytest.mark.timeout(240)
def test_wikipedia_large_edit_alerts(evp, tmp_path):
    data = require_data(WIKITICKER)
    events = read_events(data)
    expected = Counter(
        event["page"] for event in events if abs(event["delta"]) >= LARGE_EDIT_BYTES
    )
    _, address = evp.queue(None, None, "--partitions", "8")
    output = tmp_path / "alerts"
    start_stage(
        evp, address, "alerts", "wikipedia", "alerts", "--output", str(output),
        "--handler", f"{EXAMPLES / 'wikipedia.py'}:LargeEdits",
        "--handler-arg", f"threshold={LARGE_EDIT_BYTES}",
    )
    publish(evp, address, "wikipedia", data, "page")
    wait_for_lag_zero(address, "wikipedia", "alerts")

    alerts = [row["event"] for row in read_output(output)]
    assert len(alerts) == sum(expected.values())
    assert Counter(alert["page"] for alert in alerts) == expected
    assert all(abs(alert["delta"]) >= LARGE_EDIT_BYTES for alert in alerts)
    assert {alert["alert"] for alert in alerts} == {"large_edit"}
