"""Scenario 2c, the Faust peer: runs bench/faust_peer.py over the bank topic, as one worker
process or as several in one group (the equal-process-count comparison with refold's replay).

The peer is timed from its first event to the moment its agents have folded every event (startup,
topic creation and group join are reported apart) and its table (the workers' parts added up) is
checked against the expected totals; events folded twice (at-least-once across a rebalance) show
as a table event count above the topic's. A peer that runs past `Params.faust_timeout` is stopped
and reported with its progress.
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
    workers: int = 1
    folded_twice: int = 0  # table event count above the topic's (at-least-once repeats)

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def run(
    bench: Bench, topic: str, partitions: int, data: BankData, params: Params, workers: int = 1
) -> FaustResult:
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
    work = bench.config(f"faust{workers}").data_dir
    stop_file = work / "stop"
    n = len(data.events)
    app_id = bench.name(f"faust{workers}")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
        ),
    }
    peers = [_Peer(work / f"w{i}", (bench.out or work) / f"faust{workers}-w{i}.log") for i in
             range(workers)]  # fmt: skip
    started = time.time()
    try:
        for peer in peers:
            cmd = [sys.executable, "-m", "bench.faust_peer", "--bootstrap", bench.bootstrap,
                   "--topic", topic, "--events", str(n), "--partitions", str(partitions),
                   "--app-id", app_id, "--data-dir", str(peer.work / "data"),
                   "--result", str(peer.result), "--progress", str(peer.progress)]  # fmt: skip
            if workers > 1:
                cmd += ["--stop-file", str(stop_file)]
            peer.start(cmd, env)
        deadline = time.monotonic() + params.faust_timeout
        while time.monotonic() < deadline and not all(p.result.exists() for p in peers):
            if any(p.proc is not None and p.proc.poll() is not None for p in peers) and not all(
                p.result.exists() for p in peers
            ):
                break  # a worker exited without a result
            if workers > 1 and sum(p.count() for p in peers) >= n:
                stop_file.touch()  # every event folded (some perhaps twice): write the parts
            time.sleep(0.5)
        if workers > 1:
            stop_file.touch()
            wait_until = time.monotonic() + 60
            while time.monotonic() < wait_until and not all(p.result.exists() for p in peers):
                time.sleep(0.5)
    finally:
        for peer in peers:
            peer.stop(60 if peer.result.exists() else 0.1)
    return _outcome(peers, data, params, started, workers)


@dataclass
class _Peer:
    """One Faust worker process of the peer, with its own data, progress and result files."""

    work: Path
    log_path: Path
    proc: subprocess.Popen | None = None

    @property
    def result(self) -> Path:
        return self.work / "result.json"

    @property
    def progress(self) -> Path:
        return self.work / "progress.json"

    def start(self, cmd: list[str], env: dict[str, str]) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("w") as log_file:
            self.proc = subprocess.Popen(
                cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT, env=env
            )

    def count(self) -> int:
        return int((_read(self.progress) or {}).get("count", 0))

    def stop(self, grace: float) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(grace)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _outcome(
    peers: list[_Peer], data: BankData, params: Params, started: float, workers: int
) -> FaustResult:
    n = len(data.events)
    outcome = FaustResult("failed", log_path=str(peers[0].log_path), workers=workers)
    results = [_read(p.result) for p in peers]
    if any(r is None for r in results):
        progress = [_read(p.progress) or {} for p in peers]
        outcome.processed = sum(int(p.get("count", 0)) for p in progress)
        elapsed = time.time() - started
        if elapsed >= params.faust_timeout:
            outcome.status = "timeout"
            outcome.reason = (
                f"stopped after {elapsed:.0f} s having folded {outcome.processed} of {n} events"
            )
            firsts = [p["first"] for p in progress if p.get("first")]
            if firsts and outcome.processed:
                outcome.events_per_s = outcome.processed / (
                    max(p["now"] for p in progress if p.get("now")) - min(firsts)
                )
        else:
            failed = next(p for p, r in zip(peers, results, strict=True) if r is None)
            code = failed.proc.returncode if failed.proc is not None else None
            tail = failed.log_path.read_text(errors="replace").strip().splitlines()[-5:]
            outcome.reason = f"exit code {code}: " + " | ".join(tail)
        return outcome
    done = [r for r in results if r is not None]
    first = min(r["first"] for r in done if r["first"])
    last = max(r["done"] or r["first"] for r in done if r["first"])
    outcome.status = "ok"
    outcome.processed = sum(int(r["count"]) for r in done)
    outcome.events_per_s = n / (last - first)
    outcome.events_per_s_with_startup = n / (last - min(r["started"] for r in done))
    outcome.startup_s = first - min(r["started"] for r in done)
    outcome.cpu_s_per_million = sum(r["cpu_s"] for r in done) * 1_000_000 / n
    outcome.max_rss_mb = max(r["max_rss_mb"] for r in done)
    outcome.settings = {**done[0]["settings"], "store_driver": done[0].get("store_driver")}
    keys = sum(r["table_keys"] for r in done)
    total = sum(r["table_total_balance_cents"] for r in done)
    events = sum(r["table_total_events"] for r in done)
    outcome.folded_twice = max(0, events - n)
    good = keys == len(data.expected_balance) and total == data.total_balance and events == n
    outcome.verified = (
        f"table verified: {keys} keys, total balance and event count as expected"
        if good
        else f"table MISMATCH: {keys} keys (expected {len(data.expected_balance)}), "
        f"total {total} (expected {data.total_balance}), events {events} (expected {n})"
    )
    log.info(
        "faust x%d: %.0f events/s (startup %.1f s)",
        workers,
        outcome.events_per_s,
        outcome.startup_s,
    )
    return outcome
