"""Scenario 4, queries: key lookups over HTTP against `GET /healthz` of the same server.

A Worker folds the bank topic into `balances`, a QueryServer (projections/server.py) serves it,
and a separate process generates the load over keep-alive connections:

- maximum rate: `wrk` (if installed) or bench/loadgen.py in closed loop, for both endpoints,
  the median of `repeats` runs taken in turns with the baselines below;
- latency at half the lookup maximum: bench/loadgen.py in open loop (fixed schedule, latency
  from the scheduled start) in two processes sharing the rate (one Python client cannot offer
  that much), the same offered rate for both endpoints.

The server runs as `refold worker` runs it by default: one process per core (the worker and
reader processes, projections/readers.py). Beside it, in the same run and the same worker: the
same lookups from one process, and from one process with aiohttp answering every request (the
server before its fast path), to read the gains as ratios.

Keys are picked at random among the accounts that have a state. Client and server share the
machine's cores, so on a small machine the client's own CPU limits the maxima.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refold.engine.worker import Worker

from bench.common import BankData, Bench, Params, balances_on, wait_until
from bench.loadgen import percentiles

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
LOOKUP = "GET /projections/{name}/{key}"
HEALTHZ = "GET /healthz"
LOOKUP_ONE = "GET /projections/{name}/{key}, 1 process"
LOOKUP_AIOHTTP = "GET /projections/{name}/{key}, 1 process, aiohttp only"
HEALTHZ_AIOHTTP = "GET /healthz, 1 process, aiohttp only"
_WRK_SCRIPT = """\
local paths = {}
for line in io.lines("%s") do paths[#paths + 1] = line end
math.randomseed(7)
request = function()
  return wrk.format("GET", paths[math.random(#paths)])
end
"""


@dataclass(slots=True)
class QueryResult:
    status: str  # ok | skipped | failed
    reason: str = ""
    max_tool: str = ""
    max: dict[str, dict[str, Any]] = field(default_factory=dict)
    half: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "reason": self.reason,
            "max_tool": self.max_tool,
            "max": self.max,
            "half_load": self.half,
            "notes": self.notes,
        }


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def loadgen(
    base: str,
    target: list[str],
    seconds: float,
    connections: int,
    rate: float | None = None,
    procs: int = 1,
) -> dict[str, Any]:
    """bench/loadgen.py in `procs` processes at once (each `rate / procs`, `connections / procs`),
    their counts summed and their latencies pooled before taking percentiles: one Python
    client process cannot offer half of what the server answers."""
    cmd = [sys.executable, "-m", "bench.loadgen", "--base", base, *target, "--seconds"]
    cmd += [str(seconds), "--connections", str(max(1, connections // procs))]
    if rate:
        cmd += ["--rate", f"{rate / procs:.0f}"]
    with tempfile.TemporaryDirectory(prefix="refold-loadgen-") as scratch:
        raws = [Path(scratch) / f"{i}.json" for i in range(procs)]
        running = [
            subprocess.Popen(
                [*cmd, "--raw", str(raw)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=ROOT,
                env=_env(),
            )
            for raw in raws
        ]
        reports = []
        for proc in running:
            out, err = proc.communicate(timeout=seconds * 4 + 120)
            if proc.returncode != 0:
                raise RuntimeError(f"loadgen failed: {err.strip()[-500:]}")
            reports.append(json.loads(out))
        latencies = [x for raw in raws for x in json.loads(raw.read_text())]
    if procs == 1:
        return dict(reports[0])
    merged = dict(reports[0])
    merged["processes"] = procs
    merged["offered_per_s"] = rate
    merged["connections"] = connections
    merged["seconds"] = max(r["seconds"] for r in reports)
    merged["requests"] = sum(r["requests"] for r in reports)
    merged["rate"] = sum(r["rate"] for r in reports)
    merged["statuses"] = _summed(r["statuses"] for r in reports)
    merged["errors"] = _summed(r["errors"] for r in reports)
    merged["latency_ms"] = percentiles(latencies)
    return merged


def _summed(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def wrk(url: str, script: Path | None, seconds: float, connections: int) -> dict[str, Any]:
    """Run wrk and parse its rate, latency percentiles and non-2xx count."""
    cmd = ["wrk", "-t2", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]
    if script is not None:
        cmd += ["-s", str(script)]
    done = subprocess.run(
        [*cmd, url], capture_output=True, text=True, timeout=seconds * 4 + 60, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed: {done.stderr.strip()[-500:]}")
    out = done.stdout
    latency: dict[str, float] = {}
    for pct, value, unit in re.findall(r"^\s+(50|90|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M):
        latency[f"p{pct}"] = float(value) * _UNITS[unit]
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:(.*)", out)
    return {
        "tool": "wrk",
        "connections": connections,
        "threads": 2,
        "rate": float(rate.group(1)) if rate else float("nan"),
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": errors.group(1).strip() if errors else "",
        "latency_ms": latency,
    }


def run(
    bench: Bench, topic: str, ends: dict[int, int], data: BankData, params: Params
) -> QueryResult:
    try:
        from refold.http.server import QueryServer
    except ImportError:
        return QueryResult("skipped", "projections/server.py (QueryServer) does not exist yet")
    name = bench.name("balances")
    config = bench.config("queries")
    worker = Worker(config, [balances_on(topic, name)], codec=bench.codec)
    worker.start()
    servers: list[Any] = []
    result = QueryResult("ok")
    try:
        runner = worker.runners[name]
        last = {(topic, p): end - 1 for p, end in ends.items() if end > 0}
        if not wait_until(lambda: runner.reached(last), 1800, 0.05):
            return QueryResult("failed", f"worker did not fold the topic: {runner.stats.error}")
        procs = os.cpu_count() or 1
        for kwargs in ({"procs": procs}, {}, {"fast_path": False}):
            servers.append(QueryServer(worker, "127.0.0.1", 0, **kwargs))
            servers[-1].start()
        base, one, plain = (f"http://127.0.0.1:{s.port}" for s in servers)
        result.notes.append(f"{procs} processes (the worker and {procs - 1} readers)")
        keys = sorted(data.expected_balance)
        with urllib.request.urlopen(f"{base}/projections/{name}/{keys[0]}", timeout=10) as answer:
            state = json.loads(answer.read())["state"]
        if state["balance_cents"] != data.expected_balance[keys[0]]:
            result.notes.append(f"lookup of {keys[0]} returned {state}, not the expected balance")
        paths = config.data_dir / "paths.txt"
        paths.write_text("".join(f"/projections/{name}/{k}\n" for k in keys))
        targets = {LOOKUP: ["--paths", str(paths)], HEALTHZ: ["--path", "/healthz"]}
        seconds, conns = params.query_seconds, params.query_connections
        # label -> (base URL, endpoint): the product's server first, then the baselines.
        variants = {
            LOOKUP: (base, LOOKUP),
            HEALTHZ: (base, HEALTHZ),
            LOOKUP_ONE: (one, LOOKUP),
            LOOKUP_AIOHTTP: (plain, LOOKUP),
            HEALTHZ_AIOHTTP: (plain, HEALTHZ),
        }
        runs: dict[str, list[dict[str, Any]]] = {label: [] for label in variants}
        script = config.data_dir / "paths.lua"
        script.write_text(_WRK_SCRIPT % paths)
        use_wrk = shutil.which("wrk") is not None
        result.max_tool = (
            "wrk -t2 (keep-alive)" if use_wrk else "bench/loadgen.py closed loop (no wrk)"
        )
        result.max_tool += f", median of {params.repeats} runs taken in turns"
        for _ in range(params.repeats):
            for label, (url, endpoint) in variants.items():
                if use_wrk:
                    lookup = endpoint == LOOKUP
                    runs[label].append(
                        wrk(
                            url if lookup else f"{url}/healthz",
                            script if lookup else None,
                            seconds,
                            conns,
                        )
                    )
                else:
                    runs[label].append(loadgen(url, targets[endpoint], seconds, conns))
        for label, done in runs.items():
            ordered = sorted(done, key=lambda r: float(r["rate"]))
            result.max[label] = {**ordered[len(ordered) // 2], "runs": [r["rate"] for r in done]}
        rate = {label: float(v["rate"]) for label, v in result.max.items()}
        result.notes.append(
            f"lookups/s: {rate[LOOKUP] / rate[HEALTHZ]:.2f}x /healthz of the same server, "
            f"{rate[LOOKUP] / rate[LOOKUP_ONE]:.2f}x one process, "
            f"{rate[LOOKUP] / rate[LOOKUP_AIOHTTP]:.2f}x one process with aiohttp only "
            f"(whose lookups are {rate[LOOKUP_AIOHTTP] / rate[HEALTHZ_AIOHTTP]:.2f}x its /healthz)"
        )
        half = result.max[LOOKUP]["rate"] / 2
        for label, target in targets.items():
            result.half[label] = loadgen(base, target, seconds, conns, rate=half, procs=2)
        for label in targets:
            log.info(
                "queries %-32s max %.0f/s, at %.0f/s p99 %.2f ms",
                label,
                result.max[label]["rate"],
                half,
                result.half[label]["latency_ms"]["p99"],
            )
        return result
    finally:
        for server in servers:
            server.stop()
        worker.stop()
