"""The Python API examples under examples/, run as scripts against a real queue."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest
from conftest import ROOT, wait_until

EXAMPLES = ROOT / "examples"


def run_example(name: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], capture_output=True, timeout=60
    )


def test_api_names_importable():
    import evp
    import evp.client

    assert evp.Producer is evp.client.Producer
    assert evp.Consumer is evp.client.Consumer
    assert evp.ClientError is evp.client.ClientError
    with pytest.raises(AttributeError, match="no attribute 'Missing'"):
        evp.Missing  # noqa: B018


@pytest.mark.timeout(120)
def test_api_examples_publish_then_consume(evp):
    _, address = evp.queue()
    published = run_example("api_publish.py", address, "40")
    assert published.returncode == 0, published.stderr.decode()
    assert published.stdout.decode().strip() == "acknowledged 40 of 40 orders"

    consumed = run_example("api_consume.py", address, "40")
    assert consumed.returncode == 0, consumed.stderr.decode()
    rows = [orjson.loads(line) for line in consumed.stdout.splitlines()]
    assert sorted(row["order"]["id"] for row in rows) == list(range(40))
    # Each customer's orders arrive in publish order, because they share a partition.
    for customer in range(10):
        ids = [row["order"]["id"] for row in rows if row["order"]["customer"] == f"customer-{customer}"]
        assert ids == sorted(ids)
        assert len({row["partition"] for row in rows if row["order"]["customer"] == f"customer-{customer}"}) == 1

    # The consumer left after acknowledging, so the group has nothing left to process.
    # The queue drops the member once it sees the closed connection.
    def billing_without_members() -> dict | None:
        groups = evp.run("groups", "--topic", "orders", "--json", "--queue", address)
        assert groups.returncode == 0, groups.stderr.decode()
        (group,) = orjson.loads(groups.stdout)
        return None if group["members"] else group

    group = wait_until(billing_without_members, timeout_s=30)
    assert group["group"] == "billing"
    assert group["lag"] == 0


def test_api_publish_unreachable_queue():
    result = run_example("api_publish.py", "127.0.0.1:1", "1")
    assert result.returncode == 2
    assert "cannot connect to the queue at 127.0.0.1:1" in result.stderr.decode()
