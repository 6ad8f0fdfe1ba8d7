"""The benchmark entry point (`python -m bench`) on tiny counts.

These tests check that a run completes and records every field, never that anything
is fast. They run evp alone, so they pass without redis-server, nats-server or their
clients; the plots are checked only where matplotlib is installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import plots, report, systems  # noqa: E402

QUICK_EVP_ONLY = [
    "--quick",
    "--systems", "evp-batch",
    "--events", "2000",
    "--rates", "1000",
    "--rate-seconds", "1",
    "--scaling", "1",
    "--backlog", "2000",
    "--failover-events", "3000",
    "--wikipedia-events", "500",
]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    out = tmp_path_factory.mktemp("bench-results")
    docs = ROOT / "docs" / "benchmarks.md"
    docs_before = docs.read_text() if docs.exists() else None
    completed = subprocess.run(
        [sys.executable, "-m", "bench", *QUICK_EVP_ONLY, "--out", str(out), "--no-docs"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert (docs.read_text() if docs.exists() else None) == docs_before, "--no-docs changed docs/benchmarks.md"
    results = list(out.glob("*-quick.json"))
    assert len(results) == 1, sorted(path.name for path in out.iterdir())
    return json.loads(results[0].read_text()), out, completed.stdout


@pytest.mark.timeout(180)
def test_quick_run_records_machine_and_versions(quick_run: tuple[dict, Path, str]) -> None:
    record, _out, _stdout = quick_run
    assert record["mode"] == "quick"
    assert record["command"].startswith("python -m bench --quick")
    for field in ("host", "cpu", "cores", "memory_gb", "os", "load_average_at_start"):
        assert field in record["machine"]
    for name in ("python", "evp", "orjson", "redis-server", "nats-server", "redis", "nats-py", "matplotlib"):
        assert name in record["versions"]
    assert record["versions"]["evp"]
    assert record["workload"]["events"] == 2000
    assert record["workload"]["rates"] == [1000.0]
    assert record["duration_s"] > 0


@pytest.mark.timeout(180)
def test_quick_run_measures_evp(quick_run: tuple[dict, Path, str]) -> None:
    record, _out, _stdout = quick_run
    assert list(record["systems"]) == ["evp-batch"]
    system = record["systems"]["evp-batch"]
    assert system["failed"] == []
    run = system["full_speed"]
    assert run["processed"] == 2000
    assert run["lost"] == 0
    for field in ("end_to_end_events_per_s", "publish_events_per_s", "server_peak_rss_mb", "cpu_s_per_million_events"):
        assert run[field] > 0, field
    assert set(run["cpu_s"]) == {"publisher", "server", "consumers", "total"}
    assert {"p50_ms", "p99_ms", "p999_ms"} <= set(run["latency_ms"])
    assert run["latency_ms"]["events_counted"] == 2000
    [fixed] = system["fixed_rate"]
    assert fixed["rate"] == 1000
    assert fixed["processed"] == 1000
    assert fixed["latency_ms"]["p50_ms"] is not None
    assert fixed["cdf"], "the fixed-rate run has no CDF points"
    if (ROOT.parent / "shared" / "data" / "wikiticker-2015-09-12.jsonl.gz").exists():
        assert system["wikipedia"]["processed"] == 500
    assert record["ratios"] == []


@pytest.mark.timeout(180)
def test_quick_run_measures_evp_alone(quick_run: tuple[dict, Path, str]) -> None:
    record, _out, _stdout = quick_run
    extra = record["evp_only"]
    assert extra["failed"] == []
    assert [row["shards"] for row in extra["scaling"]] == [1]
    restart = extra["restart"]
    assert restart["events"] == 2000
    for field in ("restart_s", "restart_after_kill9_s", "queue_rss_mb_with_backlog", "queue_rss_mb_after_restart"):
        assert restart[field] > 0, field
    assert [row["rate"] for row in extra["failover"]] == [0, 10000]
    for row in extra["failover"]:
        assert row["redelivered"] > 0
        assert row["kill_to_first_redelivered_ms"] >= row["kill_to_removal_ms"] >= 0
        assert row["acked_after_drain"] >= row["events"]


@pytest.mark.timeout(180)
def test_quick_run_writes_markdown_and_plots(quick_run: tuple[dict, Path, str]) -> None:
    record, out, stdout = quick_run
    markdown = (out / f"{record['stem']}.md").read_text()
    assert "| evp, fsync batch |" in markdown
    assert record["command"] in markdown
    if plots.missing() is not None:
        assert "matplotlib is not installed" in record["plots_skipped"]
        assert "matplotlib is not installed" in stdout
        pytest.skip("matplotlib is not installed: the plots were skipped with a message, as expected")
    assert len(record["plots"]) == 3
    for path in map(Path, record["plots"]):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


def test_missing_servers_named_with_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    by_family = {system.family: system for system in systems.SYSTEMS}
    assert systems.missing(by_family["evp"]) is None
    assert "apt-get install redis-server" in systems.missing(by_family["redis"])
    assert "apt-get install nats-server" in systems.missing(by_family["nats"])


def test_missing_matplotlib_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert "matplotlib is not installed" in plots.missing()


def test_update_docs_replaces_only_generated_section(tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    docs.write_text(f"# Benchmarks\n\nhand-written\n\n{report.BEGIN_MARKER}\nold\n{report.END_MARKER}\n\nafter\n")
    report.update_docs(docs, "new table\n")
    text = docs.read_text()
    assert "old" not in text
    assert "new table" in text
    assert text.startswith("# Benchmarks\n\nhand-written\n")
    assert text.endswith("\n\nafter\n")
