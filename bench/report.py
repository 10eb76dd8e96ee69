"""The reports: one JSON document with every number, and Markdown tables made from it."""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import confluent_kafka

PACKAGES = (
    "confluent-kafka",
    "fastavro",
    "rocksdict",
    "orjson",
    "aiohttp",
    "faust-streaming",
    "aiokafka",
)


def machine() -> dict[str, Any]:
    """What the numbers came from."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor()
    mem_gb = float("nan")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    versions: dict[str, str] = {}
    for package in PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    versions["librdkafka"] = confluent_kafka.libversion()[0]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_gb, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def now_utc() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# -- formatting ---------------------------------------------------------------------------------


def num(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (int, float)):
        return f"{value:,.{digits}f}"
    return str(value)


def times(value: Any) -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:.2f}x"
    )


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def runs_cell(runs: Sequence[float]) -> str:
    return ", ".join(f"{r:,.0f}" for r in runs)


def _failed(section: dict[str, Any]) -> list[str] | None:
    if section.get("status") == "failed" and "error" in section:
        return [f"**Failed:** `{section['error']}`", ""]
    return None


# -- sections ---------------------------------------------------------------------------------


def publish_md(p: dict[str, Any]) -> list[str]:
    rows = []
    for label, v in p["variants"].items():
        rows.append(
            [
                label,
                num(v["events_per_s_median"]),
                runs_cell(v["events_per_s_runs"]),
                num(v["cpu_s_per_million_median"], 2),
                num(p["broker_cpu_s_per_million_median"].get(label), 2),
            ]
        )
    out = table(
        [
            "variant",
            "events/s (median)",
            "runs",
            "client CPU s / M events",
            "broker CPU s / M events",
        ],
        rows,
    )
    out += [
        "- `refold publish --file` end to end / `publish_bulk` (median of per-repetition ratios): "
        f"**{times(p.get('ratio_file_to_bulk_per_rep_median'))}**; / bare producer: "
        f"{times(p.get('ratio_file_to_bare_per_rep_median'))}; with `--senders 2` / without: "
        f"{times(p.get('ratio_file_senders_to_file_per_rep_median'))}",
        "- refold `publish_bulk` / bare producer: "
        f"**{times(p['ratio_refold_bulk_to_bare'])}** (/ bare with the same headers: "
        f"{times(p['ratio_refold_bulk_to_bare_headers'])}); `publish_encoded` (a position per "
        f"event) / bare: {times(p['ratio_refold_encoded_to_bare'])};"
        f" `publish_many` (encoding included) / bare: {times(p['ratio_refold_many_to_bare'])}",
        "- per-event Python costs measured apart from Kafka: "
        + "; ".join(f"{k}: {v:.2f} µs" for k, v in p.get("python_costs_us_per_event", {}).items()),
        f"- every topic held exactly the events sent: {p['verified']}",
        *(f"- {n}" for n in p["notes"]),
        "",
    ]
    return out


def rebuild_md(r: dict[str, Any]) -> list[str]:
    rows = [
        [
            label,
            num(v["events_per_s_median"]),
            runs_cell(v["events_per_s_runs"]),
            num(v["cpu_s_per_million_median"], 2),
        ]
        for label, v in r["variants"].items()
    ]
    out = table(["variant", "events/s (median)", "runs", "CPU s / M events"], rows)
    joins = ", ".join(f"{s:.2f}" for s in r["refold_group_join_s_runs"])
    out += [
        f"- refold replay (parts over processes) / (a) bare loop: "
        f"**{times(r['ratio_replay_to_bare'])}**; / (b) loop + decode: "
        f"{times(r['ratio_replay_to_bare_decode'])}",
        f"- one ProjectionRunner / (a) bare loop: **{times(r['ratio_refold_to_bare'])}**; "
        f"/ (b) loop + decode: {times(r['ratio_refold_to_bare_decode'])}; "
        f"/ (c0) loop + decode + fold in a dict: {times(r['ratio_refold_to_bare_fold'])}",
        f"- refold's group join before the first assignment (not in the rate): {joins} s",
        *(f"- {n}" for n in [*r["verified"], *r["notes"]]),
        "",
    ]
    s = r["serial_bound"]
    rows = [[step, num(cost, 2)] for step, cost in s["costs_us_per_event"].items()]
    out += [
        "**Serial bound** (one fold thread; per-event costs measured in isolation on "
        f"{s['sample_events']:,} events held in memory; {s['distinct_keys_per_batch']:,.0f} "
        "distinct keys per 5,000-event batch):",
        "",
    ]
    out += table(["step", "µs / event"], rows)
    out += [
        "- bound from consume + decode + store writes: "
        f"{num(s['bound_consume_decode_store_events_per_s'])} events/s; the rebuild reaches "
        f"**{times(s['rebuild_to_bound_consume_decode_store'])}** of it",
        f"- bound from every step (consume, event_from_message, fold, store reads and writes): "
        f"{num(s['bound_all_steps_events_per_s'])} events/s; the rebuild reaches "
        f"**{times(s['rebuild_to_bound_all_steps'])}** of it",
        "",
    ]
    return out


def faust_md(
    peers: list[dict[str, Any]], refold_one: float | None, refold_many: float | None
) -> list[str]:
    """The Faust peer as one worker and as two, each beside refold at the same process count:
    the single-process ProjectionRunner, and the replay over its parts."""
    rows, notes = [], []
    for f in peers:
        failed = _failed(f)
        if failed or f["status"] != "ok":
            notes += failed or [f"**{f['status']}** ({f.get('workers', 1)} worker(s)): "
                                f"{f['reason']}", ""]  # fmt: skip
            continue
        workers = int(f.get("workers", 1))
        refold = refold_one if workers == 1 else refold_many
        ratio = refold / f["events_per_s"] if refold and f["events_per_s"] else float("nan")
        rows.append(
            [
                f"faust-streaming, {workers} worker process(es)",
                num(f["events_per_s"]),
                num(f["events_per_s_with_startup"]),
                num(f["startup_s"], 1),
                num(f["cpu_s_per_million"], 1),
                num(f["max_rss_mb"]),
                times(ratio),
            ]
        )
        notes.append(
            f"- {workers} worker(s): {f['verified']}; folded twice: {f.get('folded_twice', 0):,}; "
            f"log `{f['log_path']}`"
        )
    if not rows:
        return notes
    settings = ", ".join(f"`{k}={v}`" for k, v in peers[0].get("settings", {}).items())
    return [
        *table(
            [
                "peer",
                "events/s (first to last event)",
                "incl. startup",
                "startup s",
                "CPU s / M events",
                "max RSS MB",
                "refold at equal processes / peer",
            ],
            rows,
        ),
        *notes,
        "- refold at equal processes: one worker against the single-process ProjectionRunner, "
        "two against the replay over its parts.",
        "- configuration: one agent per worker iterating `stream.events()`, decoding with "
        "refold's codec and folding with `Balances.apply` into `app.Table` (changelogged, "
        f"at-least-once), tuned as an expert would for throughput. Settings: {settings}",
        "",
    ]


def freshness_md(f: dict[str, Any]) -> list[str]:
    rows = []
    for label, v in f["variants"].items():
        lat = v["latency_ms"]
        rows.append(
            [
                label,
                num(v["achieved_events_per_s"]),
                f"{v['observed']:,} / {v['expected_observations']:,}",
                *(num(lat[k], 1) for k in ("p50", "p90", "p99", "p99.9", "max")),
            ]
        )
    out = [
        f"Offered {f['offered_events_per_s']:,} events/s for {f['seconds']:.0f} s, one "
        f"produce() per event; the first {f['warmup_excluded_s']:.0f} s are left out.",
        "",
    ]
    out += table(
        [
            "path",
            "achieved events/s",
            "observed",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
        ],
        rows,
    )
    return [*out, *(f"- {n}" for n in f["notes"]), ""]


def queries_md(q: dict[str, Any]) -> list[str]:
    failed = _failed(q)
    if failed:
        return failed
    if q["status"] != "ok":
        return [f"**{q['status']}**: {q['reason']}", ""]
    rows = []
    for label, v in q["max"].items():
        lat = v["latency_ms"]
        bad = v.get("non_2xx", 0) or sum(
            c for s, c in v.get("statuses", {}).items() if not s.startswith("2")
        )
        rows.append(
            [label, num(v["rate"]), num(lat.get("p50"), 2), num(lat.get("p99"), 2), str(bad)]
        )
    out = [
        f"Maximum rate ({q['max_tool']}, {next(iter(q['max'].values()))['connections']} "
        "connections):",
        "",
    ]
    out += table(["endpoint", "requests/s", "p50 ms", "p99 ms", "non-2xx"], rows)
    rows = []
    for label, v in q["half_load"].items():
        lat = v["latency_ms"]
        rows.append(
            [
                label,
                num(v["offered_per_s"]),
                num(v["rate"]),
                *(num(lat[k], 2) for k in ("p50", "p90", "p99", "p99.9", "max")),
                ", ".join(f"{s}: {c:,}" for s, c in v["statuses"].items()) or "-",
                ", ".join(f"{e}: {c}" for e, c in v["errors"].items()) or "-",
            ]
        )
    out += [
        "At half the lookup maximum (bench/loadgen.py, open loop, latency from the scheduled "
        "start):",
        "",
    ]
    out += table(
        [
            "endpoint",
            "offered/s",
            "achieved/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "statuses",
            "errors",
        ],
        rows,
    )
    return [*out, *(f"- {n}" for n in q["notes"]), ""]


def memory_md(m: dict[str, Any]) -> list[str]:
    failed = _failed(m)
    if failed is not None:
        return failed
    rows = [
        [
            f"{r['keys']:,}",
            num(r["events_per_s_incl_startup"]),
            num(r["rss_mb_after_fold"], 1),
            num(r["peak_rss_mb"], 1),
            num(r["store_mb_on_disk"], 1),
            num(r["restart_to_first_answer_s"], 2),
        ]
        for r in m["sizes"]
    ]
    out = table(
        ["distinct keys", "fold events/s (incl. start)", "RSS MB after fold", "peak RSS MB",
         "store MB on disk", "restart to first answer s"],
        rows,
    )  # fmt: skip
    return [*out, *(f"- {n}" for n in m["notes"]), ""]


SECTIONS: dict[str, tuple[str, Callable[[dict[str, Any]], list[str]]]] = {
    "publish": ("1. Publish", publish_md),
    "rebuild": ("2. Rebuild of `balances` from offset 0", rebuild_md),
    "freshness": ("3. Freshness: publish to readable state", freshness_md),
    "queries": ("4. Queries over HTTP", queries_md),
    "memory": ("6. Memory and restart", memory_md),
}


def targets_md(targets: list[dict[str, Any]]) -> list[str]:
    rows = [[t["target"], t["measured"], t["verdict"]] for t in targets]
    return table(["target (issue 6, this 2-core machine)", "measured", ""], rows)


def markdown(report: dict[str, Any]) -> str:
    meta, params, m = report["meta"], report["params"], report["meta"]["machine"]
    lines = [
        "# refold benchmarks",
        "",
        f"- date: {meta['finished']} (started {meta['started']}, {meta['seconds']:.0f} s)",
        f"- command: `{meta['command']}`",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, {m['platform']}, "
        f"Python {m['python']}",
        f"- load average before / after: {meta['loadavg_start']} / {meta['loadavg_end']} "
        "(other work on the machine shows up here: noisy numbers)",
        f"- broker: {meta['broker']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        f"- data: {params['events']:,} bank events over {params['accounts']:,} accounts, "
        f"{params['partitions']} partitions; medians of {params['repeats']} runs where repeated",
        "",
    ]
    for key, (title, render) in SECTIONS.items():
        section = report.get(key)
        if section is None:
            continue
        lines += [f"## {title}", ""]
        failed = _failed(section)
        lines += failed if failed else render(section)
        if key == "rebuild" and "faust" in report:
            lines += ["### 2c. Peer: faust-streaming", ""]
            variants = section.get("variants", {})
            one = variants.get("refold ProjectionRunner (balances)", {})
            many = variants.get(section.get("replay_variant", ""), one)
            peers = [report[k] for k in ("faust", "faust2") if k in report]
            lines += faust_md(
                peers, one.get("events_per_s_median"), many.get("events_per_s_median")
            )
    if report.get("targets"):
        lines += ["## Targets", "", *targets_md(report["targets"])]
    return "\n".join(lines).rstrip() + "\n"


def _get(report: dict[str, Any], *path: str) -> Any:
    node: Any = report
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _rss_ratio(report: dict[str, Any]) -> float | None:
    sizes = _get(report, "memory", "sizes")
    if not sizes or len(sizes) < 2:
        return None
    return float(sizes[-1]["rss_mb_after_fold"]) / float(sizes[0]["rss_mb_after_fold"])


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 6's targets next to what this run measured (a reading aid, not a pass/fail gate)."""
    replay_label = _get(report, "rebuild", "replay_variant") or "refold ProjectionRunner (balances)"
    refold_rebuild = _get(report, "rebuild", "variants", replay_label, "events_per_s_median")
    # the replay runs on several processes: against Faust on as many workers where measured
    faust_rate = _get(report, "faust2", "events_per_s") or _get(report, "faust", "events_per_s")
    fresh = _get(report, "freshness", "variants") or {}
    fresh_p99 = next((v["latency_ms"]["p99"] for k, v in fresh.items() if "wait_for" in k), None)
    http_p99 = next((v["latency_ms"]["p99"] for k, v in fresh.items() if "GET" in k), None)
    lookup = "GET /projections/{name}/{key}"
    checks: list[tuple[str, Any, str, float, bool]] = [
        (
            "publish ≥ 100,000 events/s",
            _get(
                report,
                "publish",
                "variants",
                _get(report, "publish", "refold_variant") or "",
                "events_per_s_median",
            ),
            "events/s",
            100_000,
            True,
        ),
        (
            "`refold publish --file` ≥ 100,000 events/s end to end",
            _get(report, "publish", "file_events_per_s_median"),
            "events/s",
            100_000,
            True,
        ),
        (
            "`refold publish --file` ≥ 0.6x publish_bulk",
            _get(report, "publish", "ratio_file_to_bulk_per_rep_median"),
            "x",
            0.6,
            True,
        ),
        (
            "publish ≥ 0.5x bare producer",
            _get(report, "publish", "ratio_refold_bulk_to_bare"),
            "x",
            0.5,
            True,
        ),
        ("rebuild ≥ 150,000 events/s", refold_rebuild, "events/s", 150_000, True),
        (
            "rebuild ≥ 0.5x bare consume loop",
            _get(report, "rebuild", "ratio_replay_to_bare"),
            "x",
            0.5,
            True,
        ),
        (
            "rebuild ≥ 10x Faust table peer (tuned, equal process count)",
            refold_rebuild / faust_rate if refold_rebuild and faust_rate else None,
            "x",
            10,
            True,
        ),
        ("freshness p99 ≤ 50 ms (runner position)", fresh_p99, "ms", 50, False),
        ("freshness p99 ≤ 50 ms (HTTP min_offset read)", http_p99, "ms", 50, False),
        ("≥ 15,000 lookups/s", _get(report, "queries", "max", lookup, "rate"), "/s", 15_000, True),
        (
            "worker RSS flat in keys (RSS ratio, largest / smallest key count)",
            _rss_ratio(report),
            "x",
            1.5,
            False,
        ),
        (
            "lookup p99 ≤ 5 ms at half load",
            _get(report, "queries", "half_load", lookup, "latency_ms", "p99"),
            "ms",
            5,
            False,
        ),
    ]
    out = []
    for label, value, unit, limit, at_least in checks:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            measured, verdict = "not measured", "-"
        else:
            digits = 2 if unit in ("x", "ms") else 0
            measured = f"{value:,.{digits}f} {unit}"
            verdict = "met" if (value >= limit if at_least else value <= limit) else "missed"
        out.append({"target": label, "measured": measured, "verdict": verdict, "value": value})
    return out
