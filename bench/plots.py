"""PNG plots of a results record, drawn with matplotlib (an optional dependency)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLORS = {
    "evp-batch": "#1f77b4",
    "evp-always": "#6baed6",
    "redis-aof": "#d62728",
    "redis-memory": "#ff9896",
    "nats-jetstream": "#2ca02c",
    "nats-core": "#98df8a",
}


def missing() -> str | None:
    """Return why plots cannot be drawn, or None when they can."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed, so no plots were drawn; install it with `pip install -r bench/requirements.txt`"
    return None


def draw_all(record: dict[str, Any], out_dir: Path, stem: str) -> dict[str, Path]:
    """Draw every plot the record has data for; return {title: path}."""
    import matplotlib

    matplotlib.use("Agg")
    drawn: dict[str, Path] = {}
    systems = {key: value for key, value in record["systems"].items() if value.get("full_speed")}
    if systems:
        drawn["Throughput per system"] = _throughput(systems, record, out_dir / f"{stem}-throughput.png")
    if any(system.get("fixed_rate") for system in systems.values()):
        drawn["Latency CDF per system"] = _latency_cdf(systems, record, out_dir / f"{stem}-latency-cdf.png")
    scaling = record.get("evp_only", {}).get("scaling")
    if scaling:
        drawn["evp throughput by shard count"] = _scaling(scaling, record, out_dir / f"{stem}-shards.png")
    return drawn


def _subtitle(record: dict[str, Any]) -> str:
    info = record["machine"]
    return f"{record['date']}, {info['cores']} cores ({info['cpu']}), shared with other work"


def _throughput(systems: dict[str, dict[str, Any]], record: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt

    labels = [system["label"] for system in systems.values()]
    end_to_end = [system["full_speed"]["end_to_end_events_per_s"] for system in systems.values()]
    publish = [system["full_speed"]["publish_events_per_s"] for system in systems.values()]
    figure, axes = plt.subplots(figsize=(9, 0.8 * len(labels) + 1.8))
    positions = range(len(labels))
    height = 0.38
    # Repeated runs show the median with a bar from the minimum to the maximum.
    spreads = [system["full_speed"].get("end_to_end_events_per_s_range") for system in systems.values()]
    errors = [
        [value - spread[0] if spread else 0 for value, spread in zip(end_to_end, spreads, strict=True)],
        [spread[1] - value if spread else 0 for value, spread in zip(end_to_end, spreads, strict=True)],
    ]
    bars = axes.barh([p - height / 2 for p in positions], end_to_end, height, label="end to end (median, min to max)",
                     color=[COLORS.get(key, "gray") for key in systems], xerr=errors, capsize=3,
                     error_kw={"elinewidth": 1, "ecolor": "black"})
    axes.barh([p + height / 2 for p in positions], publish, height, label="publish only (same run)",
              color="none", edgecolor=[COLORS.get(key, "gray") for key in systems], hatch="//")
    for bar, value, error in zip(bars, end_to_end, errors[1], strict=True):
        axes.text(value + error, bar.get_y() + bar.get_height() / 2, f"  {value:,}", va="center", fontsize=9)
    axes.set_yticks(list(positions), labels)
    axes.invert_yaxis()
    axes.set_xlabel("events per second")
    axes.xaxis.set_major_formatter(lambda value, _pos: f"{value:,.0f}")
    events = record["workload"]["events"]
    axes.set_title(f"Full speed, {events:,} events of ~200 bytes, 8 consumers\n{_subtitle(record)}", fontsize=10)
    axes.legend(loc="lower right", fontsize=9)
    highest = max(value + error for value, error in zip(end_to_end, errors[1], strict=True))
    axes.set_xlim(0, max(highest, *publish) * 1.2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _latency_cdf(systems: dict[str, dict[str, Any]], record: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    rates = record["workload"]["rates"]
    figure, axes = plt.subplots(2, len(rates), figsize=(max(8.0, 5.2 * len(rates)), 9), squeeze=False)
    for column, rate in enumerate(rates):
        top, bottom = axes[0][column], axes[1][column]
        for key, system in systems.items():
            run = next((item for item in system.get("fixed_rate", []) if item["rate"] == rate), None)
            if not run or not run["cdf"]:
                continue
            points = _trim_flat_end([(ms, fraction) for ms, fraction in run["cdf"] if ms > 0])
            latency_ms = [ms for ms, _fraction in points]
            fractions = [fraction for _ms, fraction in points]
            tail = [max(1 - fraction, 1e-5) for fraction in fractions]
            # evp's curve comes from histogram buckets: mark its points.
            style = {"marker": "o", "markersize": 3} if system["family"] == "evp" else {}
            label = system["label"] + (" *" if run.get("note") else "")
            top.plot(latency_ms, fractions, label=label, color=COLORS.get(key, "gray"), **style)
            bottom.plot(latency_ms, tail, label=label, color=COLORS.get(key, "gray"), **style)
        top.set_xscale("log")
        top.set_ylim(0, 1.01)
        top.set_title(f"{rate:,.0f} events/s", fontsize=11)
        top.set_ylabel("fraction of events processed within")
        bottom.set_xscale("log")
        bottom.set_yscale("log")
        bottom.set_ylim(1e-4, 1.2)
        bottom.set_ylabel("fraction of events slower than")
        for axis in (top, bottom):
            axis.set_xlabel("latency, publish to processing (ms)")
            axis.grid(True, which="major", alpha=0.3)
            # A range under one decade would get a label on every minor tick, and the
            # labels would overlap: label the powers of ten only.
            axis.xaxis.set_minor_formatter(NullFormatter())
    with_lines = [axis for axis in axes[0] if axis.get_lines()]
    if with_lines:
        with_lines[0].legend(fontsize=8, loc="lower right")
    figure.suptitle(f"Latency from publish to processing at fixed rates\n{_subtitle(record)}", fontsize=10)
    figure.text(
        0.01,
        0.005,
        "evp: the edges of its histogram buckets and its p50, p99 and p99.9 (points); peers: every event.\n"
        "* the publisher fell more than 5 % short of the rate.",
        fontsize=8,
        va="bottom",
    )
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _trim_flat_end(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Drop the points after the first that reaches a fraction of 1 (empty buckets)."""
    for index, (_ms, fraction) in enumerate(points):
        if fraction >= 1:
            return points[: index + 1]
    return points


def _scaling(rows: list[dict[str, Any]], record: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt

    shards = [row["shards"] for row in rows]
    end_to_end = [row["end_to_end_events_per_s"] for row in rows]
    publish = [row["publish_events_per_s"] for row in rows]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    low = [value - row["end_to_end_events_per_s_range"][0] for value, row in zip(end_to_end, rows, strict=True)]
    high = [row["end_to_end_events_per_s_range"][1] - value for value, row in zip(end_to_end, rows, strict=True)]
    axes.errorbar(shards, end_to_end, yerr=[low, high], marker="o", capsize=4, color=COLORS["evp-batch"],
                  label="end to end (median, min to max)")
    axes.plot(shards, publish, marker="s", linestyle="--", color="gray", label="publish only (same run)")
    for count, value in zip(shards, end_to_end, strict=True):
        axes.annotate(f"{value:,}", (count, value), textcoords="offset points", xytext=(0, -18), ha="center", fontsize=9)
    axes.set_xscale("log", base=2)
    axes.set_xticks(shards, [str(count) for count in shards])
    axes.set_xlabel("shards (evp process --shards)")
    axes.set_ylabel("events per second")
    axes.set_ylim(0, max(max(row["end_to_end_events_per_s_range"][1] for row in rows), *publish) * 1.2)
    axes.yaxis.set_major_formatter(lambda value, _pos: f"{value:,.0f}")
    axes.set_title(f"evp, --fsync batch, {rows[0]['events']:,} events at full speed\n{_subtitle(record)}", fontsize=10)
    axes.legend(fontsize=9)
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
