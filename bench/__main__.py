"""Benchmark evp against Redis Streams and NATS in one run, on one machine.

The systems are evp with --fsync batch and always, Redis Streams with and without an
append-only file, NATS JetStream and NATS core. For each one the run measures
end-to-end and publish throughput at full speed, latency from publish to processing
at fixed rates, the server's peak RSS and the CPU seconds per million events. It then
measures evp alone: throughput by shard count, restart with a large backlog, and the
time from a shard's kill -9 to its first redelivered event. A peer that is not
installed is skipped with a message.

Writes bench/results/<date>-<host>.json (with `-quick` in quick mode), a Markdown
summary next to it, PNG plots when matplotlib is installed, and, in full mode, the
tables in docs/benchmarks.md.

Examples:
  python -m bench                      # the full comparison (about 12 minutes)
  python -m bench --quick              # about 100,000 events and one rate
  python -m bench --quick --systems evp --events 2000 --out /tmp/results --no-docs
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench import common, evp_only, plots, report, systems

DEFAULT_WIKIPEDIA = common.ROOT.parent / "shared" / "data" / "wikiticker-2015-09-12.jsonl.gz"
FULL = {"events": 500_000, "repeat": 3, "rates": "1000,10000,50000", "rate_seconds": 10.0, "scaling": "1,2,4,8",
        "backlog": 10_000_000, "failover_events": 500_000, "failover_repeat": 3, "wikipedia_events": 0}
# The failover measure also runs at this fixed rate, for at most this long, where the
# queue has idle time, unlike at full speed.
FAILOVER_RATE = 10_000.0
FAILOVER_SECONDS = 3.0
QUICK = {"events": 100_000, "repeat": 1, "rates": "10000", "rate_seconds": 2.0, "scaling": "1,8",
         "backlog": 300_000, "failover_events": 200_000, "failover_repeat": 1, "wikipedia_events": -1}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="Reduced counts and one rate, under two minutes.")
    parser.add_argument("--events", type=int, help="Events per full-speed run (full 500,000; quick 100,000).")
    parser.add_argument("--keys", type=int, default=10_000, help="Distinct keys of generated events.")
    parser.add_argument("--rates", help="Fixed rates for latency, events/s, comma-separated (full 1000,10000,50000; quick 10000).")
    parser.add_argument("--rate-seconds", type=float, help="Seconds of publishing at each fixed rate (full 10; quick 2).")
    parser.add_argument("--systems", default="evp,redis,nats", help="Families (evp, redis, nats) or system ids, comma-separated.")
    parser.add_argument("--repeat", type=int, help="Full-speed runs per system and shard count; the tables show the median and the range (full 3; quick 1).")
    parser.add_argument("--scaling", help="evp shard counts to compare, comma-separated; empty to skip (full 1,2,4,8; quick 1,8).")
    parser.add_argument("--backlog", type=int, help="Events stored for the evp restart measure; 0 to skip (full 10,000,000; quick 300,000).")
    parser.add_argument("--failover-events", type=int, help="Events published during the evp kill -9 measure; 0 to skip.")
    parser.add_argument("--failover-repeat", type=int, help="Tries of the kill -9 measure (full 3; quick 1).")
    parser.add_argument("--wikipedia", type=Path, default=DEFAULT_WIKIPEDIA, help="Wikipedia edits, JSON lines, keyed by page.")
    parser.add_argument("--wikipedia-events", type=int, help="Events of the file to publish: 0 for all, -1 to skip (quick skips).")
    parser.add_argument("--out", type=Path, default=common.ROOT / "bench" / "results", help="Directory for the results and plots.")
    parser.add_argument("--docs", type=Path, help="Markdown file whose generated section to replace (full mode: docs/benchmarks.md).")
    parser.add_argument("--no-docs", action="store_true", help="Leave every docs file as it is.")
    parser.add_argument("--no-plots", action="store_true", help="Draw no plots.")
    args = parser.parse_args(argv)

    defaults = QUICK if args.quick else FULL
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    args.rates = [float(rate) for rate in str(args.rates).split(",") if rate]
    args.scaling = [int(count) for count in str(args.scaling).split(",") if count]

    if args.docs is None and not args.quick:
        args.docs = common.ROOT / "docs" / "benchmarks.md"
    if args.no_docs:
        args.docs = None
    return args


def selected_systems(spec: str) -> list[systems.System]:
    requested = {item.strip() for item in spec.split(",") if item.strip()}
    known = {system.id for system in systems.SYSTEMS} | {system.family for system in systems.SYSTEMS}
    unknown = requested - known
    if unknown:
        raise SystemExit(f"invalid --systems {sorted(unknown)}: use {', '.join(sorted(known))}")
    return [system for system in systems.SYSTEMS if system.id in requested or system.family in requested]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def describe(run: dict[str, Any]) -> str:
    latency = run["latency_ms"]
    text = (
        f"end to end {run['end_to_end_events_per_s']:,}/s, publish {run['publish_events_per_s']:,}/s, "
        f"p50/p99/p99.9 {latency['p50_ms']}/{latency['p99_ms']}/{latency['p999_ms']} ms, "
        f"server RSS {run['server_peak_rss_mb']} MB, {run['cpu_s_per_million_events']} CPU s per M, lost {run['lost']}"
    )
    return text + (f" ({run['note']})" if run.get("note") else "")


def run_system(system: systems.System, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    record: dict[str, Any] = {
        "label": system.label, "family": system.family, "durability": system.durability,
        "full_speed": None, "full_speed_runs": [], "fixed_rate": [], "wikipedia": None, "failed": [],
    }
    for attempt in range(args.repeat):
        log(f"{system.label}: {args.events:,} events at full speed (run {attempt + 1} of {args.repeat})")
        record["full_speed_runs"].append(_guarded(record, systems.run, system, workdir, args.events, 0, keys=args.keys))
    record["full_speed_runs"] = [run for run in record["full_speed_runs"] if run]
    if record["full_speed_runs"]:
        record["full_speed"] = report.summarize_repeats(record["full_speed_runs"])
    for rate in args.rates:
        events = max(1000, int(rate * args.rate_seconds))
        log(f"{system.label}: {events:,} events at {rate:,.0f} events/s")
        run = _guarded(record, systems.run, system, workdir, events, rate, keys=args.keys)
        if run:
            record["fixed_rate"].append(run)
    if args.wikipedia_events >= 0 and args.wikipedia.exists():
        count = args.wikipedia_events or 10**9
        log(f"{system.label}: Wikipedia edits at full speed")
        record["wikipedia"] = _guarded(record, systems.run, system, workdir, count, 0, file=args.wikipedia)
    return record


def _guarded(record: dict[str, Any], function: Any, *call_args: Any, **kwargs: Any) -> dict[str, Any] | None:
    """Run one measure; on failure record the error and go on with the next."""
    try:
        result = function(*call_args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - one failed run must not lose the others
        message = f"{type(exc).__name__}: {exc}"
        log(f"  failed: {message}")
        traceback.print_exc()
        record["failed"].append(message)
        return None
    if "end_to_end_events_per_s" in result:
        log("  " + describe(result))
    return result


def run_evp_only(args: argparse.Namespace, workdir: Path, main_rows: dict[str, Any]) -> dict[str, Any]:
    extra: dict[str, Any] = {"failed": []}
    if args.scaling:
        log(f"evp alone: shards {args.scaling}, {args.events:,} events each")
        known = {}
        batch = main_rows.get("evp-batch", {}).get("full_speed")
        if batch:
            known[systems.SHARDS] = batch
        extra["scaling"] = _guarded(extra, evp_only.scaling, workdir, args.events, args.scaling, known, args.repeat)
    if args.backlog:
        log(f"evp alone: restart with {args.backlog:,} events stored")
        extra["restart"] = _guarded(extra, evp_only.restart, workdir / "restart-run", args.backlog)
        if extra["restart"]:
            log(f"  {extra['restart']}")
    if args.failover_events:
        extra["failover"] = []
        at_rate = min(args.failover_events, int(FAILOVER_RATE * FAILOVER_SECONDS))
        tries = [(args.failover_events, 0.0), (at_rate, FAILOVER_RATE)]
        for attempt in range(args.failover_repeat):
            for events, rate in tries:
                speed = f"{rate:,.0f} events/s" if rate else "full speed"
                log(f"evp alone: kill -9 of a busy shard at {speed} (try {attempt + 1} of {args.failover_repeat})")
                workdir_try = workdir / f"failover-{attempt}-{rate:g}"
                result = _guarded(extra, evp_only.failover, workdir_try, events, rate)
                if result:
                    log(f"  {result}")
                    extra["failover"].append(result)
    return extra


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    date = datetime.date.today().isoformat()
    info = report.machine()
    stem = f"{date}-{info['host']}" + ("-quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)

    record: dict[str, Any] = {
        "date": date,
        "stem": stem,
        "mode": "quick" if args.quick else "full",
        "command": "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": info,
        "versions": report.versions(),
        "workload": {
            "events": args.events, "keys": args.keys, "rates": args.rates, "rate_seconds": args.rate_seconds,
            "repeat": args.repeat, "partitions": systems.PARTITIONS, "shards": systems.SHARDS,
            "wikipedia": args.wikipedia.name if args.wikipedia_events >= 0 else None,
        },
        "systems": {},
        "skipped": [],
    }

    if args.wikipedia_events >= 0 and not args.wikipedia.exists():
        message = f"Wikipedia run: the data file {args.wikipedia} is absent"
        log(f"skipped: {message}")
        record["skipped"].append(message)
    with tempfile.TemporaryDirectory(prefix="evp-bench-") as tmp:
        workdir = Path(tmp)
        for system in selected_systems(args.systems):
            reason = systems.missing(system)
            if reason:
                log(f"skipped {system.label}: {reason}")
                record["skipped"].append(f"{system.label}: {reason}")
                continue
            record["systems"][system.id] = run_system(system, args, workdir)
        if "evp-batch" in record["systems"]:
            record["evp_only"] = run_evp_only(args, workdir, record["systems"])

    record["ratios"] = report.ratios(record["systems"], args.rates)
    record["duration_s"] = round(time.monotonic() - started, 1)
    plot_links = draw_plots(record, args, stem)
    json_path = args.out / f"{stem}.json"
    try:
        record["results_path"] = str(json_path.resolve().relative_to(common.ROOT))
    except ValueError:
        record["results_path"] = str(json_path)
    markdown = report.render_markdown(record, plot_links)
    json_path.write_text(json.dumps(record, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown)
    log(f"wrote {json_path} and {stem}.md")
    if args.docs:
        report.update_docs(args.docs, markdown)
        log(f"updated the generated section of {args.docs}")
    print_ratios(record)
    return 0


def draw_plots(record: dict[str, Any], args: argparse.Namespace, stem: str) -> dict[str, str]:
    """Draw the plots; return {title: link relative to the docs file}."""
    record["plots"] = []
    reason = "plots were turned off with --no-plots" if args.no_plots else plots.missing()
    if reason:
        log(f"skipped the plots: {reason}")
        record["plots_skipped"] = reason
        return {}
    drawn = plots.draw_all(record, args.out, stem)
    record["plots"] = [str(path) for path in drawn.values()]
    # Links are relative to the Markdown file they appear in.
    base = (args.docs.resolve().parent if args.docs else args.out.resolve())
    links = {}
    for title, path in drawn.items():
        links[title] = os.path.relpath(path.resolve(), base)
        log(f"drew {path}")
    return links


def print_ratios(record: dict[str, Any]) -> None:
    for row in record["ratios"]:
        parts = [f"{field}={value}" for field, value in row.items() if field != "peer"]
        print(f"evp-batch / {row['peer']}: " + " ".join(parts))
    if not record["ratios"]:
        print("no ratios: evp (fsync batch) and a peer did not both run in this run")


if __name__ == "__main__":
    sys.exit(main())
