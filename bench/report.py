"""The results record: machine and versions, ratios, and its Markdown rendering.

`render_markdown` writes the tables that `python -m bench` puts between the
BEGIN_MARKER and END_MARKER lines of docs/benchmarks.md. The text around them is
written by hand, and `update_docs` leaves it as it is.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import psutil

from evp import __version__ as evp_version

BEGIN_MARKER = "<!-- bench:begin (written by python -m bench; edit the text outside) -->"
END_MARKER = "<!-- bench:end -->"
LIBRARIES = ("orjson", "uvloop", "xxhash", "psutil", "redis", "hiredis", "nats-py", "matplotlib")


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M)
        if found:
            model = found[1].strip()
    return {
        "host": socket.gethostname(),
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
    }


def _server_version(command: list[str], pattern: str) -> str | None:
    try:
        output = subprocess.run(command, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(pattern, output)
    return found[1] if found else output.strip() or None


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version(), "evp": evp_version}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    found["redis-server"] = _server_version(["redis-server", "--version"], r"v=(\S+)")
    found["nats-server"] = _server_version(["nats-server", "--version"], r"\bv(\d\S*)")
    return found


def summarize_repeats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the run with the median end-to-end rate, with the range over all runs."""
    ordered = sorted(runs, key=lambda run: run["end_to_end_events_per_s"])
    median = dict(ordered[(len(ordered) - 1) // 2])
    for field in ("end_to_end_events_per_s", "publish_events_per_s", "cpu_s_per_million_events"):
        values = [run[field] for run in runs]
        median[f"{field}_range"] = [min(values), max(values)]
    median["repeats"] = len(runs)
    return median


def ratios(systems: dict[str, dict[str, Any]], rates: list[float]) -> list[dict[str, Any]]:
    """Divide evp's (fsync batch) figures by those of each peer that ran in the same run."""
    evp = systems.get("evp-batch", {})
    if not evp.get("full_speed"):
        return []
    rows = []
    for system_id, record in systems.items():
        if record["family"] == "evp" or not record.get("full_speed"):
            continue
        peer = record["full_speed"]
        row: dict[str, Any] = {"peer": system_id}
        for field in ("end_to_end_events_per_s", "publish_events_per_s", "server_peak_rss_mb", "cpu_s_per_million_events"):
            if peer.get(field):
                row[field] = round(evp["full_speed"][field] / peer[field], 2)
        for rate in rates:
            ours = _at_rate(evp, rate)
            theirs = _at_rate(record, rate)
            if ours and theirs and theirs["latency_ms"]["p99_ms"]:
                row[f"p99_at_{rate:g}"] = round(ours["latency_ms"]["p99_ms"] / theirs["latency_ms"]["p99_ms"], 2)
        rows.append(row)
    return rows


def _at_rate(record: dict[str, Any], rate: float) -> dict[str, Any] | None:
    return next((run for run in record.get("fixed_rate", []) if run["rate"] == rate), None)


def _count(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def _ms(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}" if value < 10 else f"{value:,.0f}"


def _range(run: dict[str, Any], field: str) -> str:
    text = _count(run[field])
    spread = run.get(f"{field}_range")
    if spread and run.get("repeats", 1) > 1:
        text += f" ({_count(spread[0])} to {_count(spread[1])})"
    return text


def render_markdown(record: dict[str, Any], plot_links: dict[str, str]) -> str:
    """Render the generated part of docs/benchmarks.md for one run."""
    lines = [
        f"### Run of {record['date']} on `{record['machine']['host']}` ({record['mode']} mode)",
        "",
        f"Command: `{record['command']}` ({record['duration_s']:.0f} s). "
        f"Raw results: `{record['results_path']}`.",
        "",
        _machine_line(record),
        "",
        _versions_line(record["versions"]),
        "",
        _workload_line(record),
        "",
    ]
    lines += _throughput_table(record)
    lines += _latency_table(record)
    lines += _wikipedia_table(record)
    lines += _evp_only_tables(record)
    lines += _ratio_table(record)
    if plot_links:
        lines += ["Plots:", ""]
        lines += [f"![{title}]({link})" for title, link in plot_links.items()]
        lines.append("")
    if record.get("plots_skipped"):
        lines += [f"Plots: {record['plots_skipped']}", ""]
    for message in record["skipped"]:
        lines += [f"Skipped: {message}", ""]
    return "\n".join(lines).rstrip() + "\n"


def _machine_line(record: dict[str, Any]) -> str:
    info = record["machine"]
    load = ", ".join(str(value) for value in info["load_average_at_start"])
    return (
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gb']} GiB of memory, "
        f"{info['os']}. The load average at the start was {load}. Other work on the "
        f"machine makes every figure noisy: compare systems within this run, and expect "
        f"another run to differ."
    )


def _versions_line(found: dict[str, str | None]) -> str:
    parts = [f"{name} {version}" for name, version in found.items() if version]
    absent = [name for name, version in found.items() if not version]
    text = "Versions: " + ", ".join(parts) + "."
    if absent:
        text += " Not installed: " + ", ".join(absent) + "."
    return text


def _workload_line(record: dict[str, Any]) -> str:
    work = record["workload"]
    rates = ", ".join(f"{rate:,.0f}" for rate in work["rates"])
    runs = "one run per system" if work["repeat"] == 1 else (
        f"{work['repeat']} runs per system: the median run, with the range from min to max in brackets"
    )
    return (
        f"Workload: {work['events']:,} generated events of about 200 bytes with "
        f"{work['keys']:,} distinct keys at full speed ({runs}). Each fixed rate "
        f"({rates} events/s) ran for {work['rate_seconds']:g} s. "
        f"Each peer uses {work['partitions']} streams or subjects by key "
        f"hash and {work['partitions']} consumer processes; evp uses `--shards {work['shards']}` "
        f"and 64 partitions."
    )


def _throughput_table(record: dict[str, Any]) -> list[str]:
    events = record["workload"]["events"]
    lines = [
        f"Full speed, {events:,} events:",
        "",
        "| system | stored | end to end, events/s | publish, events/s | server peak RSS, MB | CPU s per million events | lost |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for record_id, system in record["systems"].items():
        run = system.get("full_speed")
        if not run:
            continue
        lines.append(
            f"| {system['label']} | {system['durability']} | {_range(run, 'end_to_end_events_per_s')} "
            f"| {_range(run, 'publish_events_per_s')} | {run['server_peak_rss_mb']:,.0f} "
            f"| {run['cpu_s_per_million_events']:,.0f} | {run['lost']:,} |"
        )
    return [*lines, ""]


def _latency_table(record: dict[str, Any]) -> list[str]:
    rates = record["workload"]["rates"]
    header = " | ".join(f"{rate:,.0f} events/s" for rate in rates)
    lines = [
        "Latency from publish to processing, p50 / p99 / p99.9 in ms, at fixed rates "
        "(a mark * means the publisher fell more than 5 % short of the rate):",
        "",
        f"| system | {header} |",
        "| --- |" + " --- |" * len(rates),
    ]
    for system in record["systems"].values():
        cells = []
        for rate in rates:
            run = _at_rate(system, rate)
            if run is None:
                cells.append("n/a")
                continue
            latency = run["latency_ms"]
            cell = " / ".join(_ms(latency[name]) for name in ("p50_ms", "p99_ms", "p999_ms"))
            cells.append(cell + (" *" if run.get("note") else ""))
        if any(cell != "n/a" for cell in cells):
            lines.append(f"| {system['label']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _wikipedia_table(record: dict[str, Any]) -> list[str]:
    runs = [(system, system["wikipedia"]) for system in record["systems"].values() if system.get("wikipedia")]
    if not runs:
        return []
    events = runs[0][1]["processed"]
    lines = [
        f"Real events: Wikipedia edits of 2015-09-12 ({events:,} events of about 430 bytes, "
        "keyed by `page`), at full speed:",
        "",
        "| system | end to end, events/s | publish, events/s | lost |",
        "| --- | --- | --- | --- |",
    ]
    for system, run in runs:
        lines.append(
            f"| {system['label']} | {_count(run['end_to_end_events_per_s'])} "
            f"| {_count(run['publish_events_per_s'])} | {run['lost']:,} |"
        )
    return [*lines, ""]


def _evp_only_tables(record: dict[str, Any]) -> list[str]:
    extra = record.get("evp_only", {})
    lines: list[str] = []
    if extra.get("scaling"):
        lines += [
            "evp alone, `--fsync batch`, full speed, by shard count (the row for 8 shards is "
            "the full-speed run above):",
            "",
            "| shards | events | end to end, events/s | publish, events/s | CPU s per million events |",
            "| --- | --- | --- | --- | --- |",
        ]
        for row in extra["scaling"]:
            lines.append(
                f"| {row['shards']} | {row['events']:,} | {_range(row, 'end_to_end_events_per_s')} "
                f"| {_range(row, 'publish_events_per_s')} | {row['cpu_s_per_million_events']:,.0f} |"
            )
        lines.append("")
    restart = extra.get("restart")
    if restart:
        lines += [
            f"evp alone, restart with {restart['events']:,} events stored ({restart['data_mb']:,} MB "
            "of logs, no shards):",
            "",
            "| measure | figure |",
            "| --- | --- |",
            f"| publish of the backlog | {restart['publish_s']} s, {_count(restart['publish_events_per_s'])} events/s |",
            f"| queue peak RSS while publishing | {restart['queue_peak_rss_mb_while_publishing']} MB |",
            f"| queue RSS with the backlog stored | {restart['queue_rss_mb_with_backlog']} MB |",
            f"| stop (SIGTERM) | {restart['stop_s']} s |",
            f"| restart until the snapshot shows every event | {restart['restart_s']} s |",
            f"| queue RSS after the restart | {restart['queue_rss_mb_after_restart']} MB |",
            f"| restart after kill -9 | {restart['restart_after_kill9_s']} s |",
            "",
        ]
    failovers = extra.get("failover") or []
    if failovers:
        lines += [
            "evp alone, kill -9 of one of 8 shards while events flow (one row per try):",
            "",
            "| publish rate | events published | unacknowledged at the shard | kill to member removed (queue log), ms "
            "| kill to member removed (snapshot), ms | kill to first redelivered event processed (snapshot), ms |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for row in failovers:
            speed = f"{row['rate']:,.0f} events/s" if row["rate"] else "full speed"
            logged = row.get("kill_to_removal_logged_ms")
            lines.append(
                f"| {speed} | {row['events']:,} | {row['redelivered']:,} | {'n/a' if logged is None else logged} "
                f"| {row['kill_to_removal_ms']} | {row['kill_to_first_redelivered_ms']} |"
            )
        lines.append("")
    return lines


def _ratio_table(record: dict[str, Any]) -> list[str]:
    rows = record.get("ratios") or []
    if not rows:
        return []
    rates = record["workload"]["rates"]
    labels = {system_id: system["label"] for system_id, system in record["systems"].items()}
    columns = [
        ("end_to_end_events_per_s", "end to end"),
        ("publish_events_per_s", "publish"),
        ("server_peak_rss_mb", "server RSS"),
        ("cpu_s_per_million_events", "CPU per event"),
        *[(f"p99_at_{rate:g}", f"p99 at {rate:,.0f}/s") for rate in rates],
    ]
    lines = [
        "Ratios, evp (fsync batch) divided by each peer, from this run only "
        "(above 1: evp is higher, which is better for throughput and worse for the rest):",
        "",
        "| peer | " + " | ".join(title for _field, title in columns) + " |",
        "| --- |" + " --- |" * len(columns),
    ]
    for row in rows:
        cells = [f"{row[field]:g}" if field in row else "n/a" for field, _title in columns]
        lines.append(f"| {labels[row['peer']]} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def update_docs(path: Path, markdown: str) -> None:
    """Replace the text between the markers in `path`, or append it with the markers."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{BEGIN_MARKER}\n\n{markdown}\n{END_MARKER}"
    if BEGIN_MARKER in text and END_MARKER in text:
        before, rest = text.split(BEGIN_MARKER, 1)
        _old, after = rest.split(END_MARKER, 1)
        text = before + block + after
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
