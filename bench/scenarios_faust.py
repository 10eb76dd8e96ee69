"""Scenario 2c, the Faust peer: runs bench/faust_peer.py in its own process over the bank topic.

The peer is timed from its first event to the moment its agent has folded every event (startup,
topic creation and group join are reported apart) and its table is checked against the expected
totals. A peer that runs past `Params.faust_timeout` is stopped and reported with its progress.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import BankData, Bench, Params

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent


@dataclass(slots=True)
class FaustResult:
    status: str  # ok | timeout | failed | skipped
    reason: str = ""
    events_per_s: float = float("nan")  # first event to last event folded
    events_per_s_with_startup: float = float("nan")  # process start to last event folded
    startup_s: float = float("nan")
    cpu_s_per_million: float = float("nan")
    max_rss_mb: float = float("nan")
    processed: int = 0
    verified: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    log_path: str = ""

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def run(bench: Bench, topic: str, partitions: int, data: BankData, params: Params) -> FaustResult:
    if importlib.util.find_spec("faust") is None:
        return FaustResult(
            "skipped", "faust-streaming is not installed (pip install faust-streaming)"
        )
    if importlib.util.find_spec("cramjam") is None:
        # refold's producer compresses with lz4, which aiokafka reads only through cramjam.
        return FaustResult(
            "skipped",
            "aiokafka cannot read lz4-compressed batches without cramjam "
            "(pip install 'aiokafka[lz4]')",
        )
    work = bench.config("faust").data_dir
    result_path, progress_path = work / "result.json", work / "progress.json"
    log_path = (bench.out or work) / "faust.log"
    n = len(data.events)
    cmd = [sys.executable, "-m", "bench.faust_peer", "--bootstrap", bench.bootstrap,
           "--topic", topic, "--events", str(n), "--partitions", str(partitions),
           "--app-id", bench.name("faust"), "--data-dir", str(work / "data"),
           "--result", str(result_path), "--progress", str(progress_path)]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
        ),
    }
    started = time.time()
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        try:
            deadline = time.monotonic() + params.faust_timeout
            while proc.poll() is None and not result_path.exists():
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(60 if result_path.exists() else 0.1)
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    outcome = FaustResult("failed", log_path=str(log_path))
    result = _read(result_path)
    if result is None:
        progress = _read(progress_path) or {}
        outcome.processed = int(progress.get("count", 0))
        elapsed = time.time() - started
        if elapsed >= params.faust_timeout:
            outcome.status = "timeout"
            outcome.reason = (
                f"stopped after {elapsed:.0f} s having folded {outcome.processed} of {n} events"
            )
            first = progress.get("first")
            if first and outcome.processed:
                outcome.events_per_s = outcome.processed / (progress["now"] - first)
        else:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            outcome.reason = f"exit code {proc.returncode}: " + " | ".join(tail)
        return outcome
    outcome.status = "ok"
    outcome.processed = int(result["count"])
    outcome.events_per_s = n / (result["done"] - result["first"])
    outcome.events_per_s_with_startup = n / (result["done"] - result["started"])
    outcome.startup_s = result["first"] - result["started"]
    outcome.cpu_s_per_million = result["cpu_s"] * 1_000_000 / n
    outcome.max_rss_mb = result["max_rss_mb"]
    outcome.settings = {**result["settings"], "store_driver": result.get("store_driver")}
    good = (
        result["table_keys"] == len(data.expected_balance)
        and result["table_total_balance_cents"] == data.total_balance
        and result["table_total_events"] == n
    )
    outcome.verified = (
        f"table verified: {result['table_keys']} keys, total balance and event count as expected"
        if good
        else f"table MISMATCH: {result['table_keys']} keys, "
        f"total {result['table_total_balance_cents']}"
        f" (expected {data.total_balance}), events {result['table_total_events']} (expected {n})"
    )
    log.info("faust: %.0f events/s (startup %.1f s)", outcome.events_per_s, outcome.startup_s)
    return outcome
