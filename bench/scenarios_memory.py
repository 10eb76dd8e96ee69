"""6. Memory and restart: a real `refold worker` process folds N distinct keys; its resident
memory after folding must not grow with N beyond the capped RocksDB caches. Then it is stopped
and started again on the persisted store: the time until the first query is answered (no replay).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from refold.cli.broker import free_port
from refold.kafka.publisher import PRODUCER_DEFAULTS
from refold.store.versions import dir_size, store_path

from bench.common import Bench, Params

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]


@dataclass(slots=True)
class MemoryResult:
    sizes: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"sizes": self.sizes, "notes": self.notes}


def _rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident set size of `pid` in MB, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except OSError:  # not listening yet
        return 0, None


def _produce_distinct_keys(bench: Bench, topic: str, n: int) -> None:
    """One deposit per key; the value bytes are shared (the fold reads only amount_cents)."""
    value = bench.codec.encode(
        "bank.MoneyDeposited", {"account_id": "k", "amount_cents": 1, "memo": ""}
    )
    producer = Producer({"bootstrap.servers": bench.bootstrap, **PRODUCER_DEFAULTS})
    for i in range(n):
        while True:
            try:
                producer.produce(topic, value, f"k{i:09d}".encode())
                break
            except BufferError:
                producer.poll(0.05)
        if i % 100_000 == 0:
            producer.poll(0)
    if producer.flush(300):
        raise RuntimeError("the memory scenario's events were not all acknowledged")


class _Worker:
    def __init__(self, bench: Bench, name: str, topic: str, data_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "REFOLD_BOOTSTRAP_SERVERS": bench.bootstrap,
            "REFOLD_DATA_DIR": str(data_dir),
            "REFOLD_APP": "bench.memapp",
            "BENCH_NAME": name,
            "BENCH_TOPIC": topic,
            "PYTHONPATH": str(ROOT),
        }
        self.name = name
        self.log = (data_dir.parent / f"{name}.log").open("ab")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "refold.cli.main", "worker", "--only", self.name,
             "--http", f"127.0.0.1:{self.port}"],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        return started

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)


def run(bench: Bench, params: Params) -> MemoryResult:
    result = MemoryResult()
    sizes = (100_000, 1_000_000) if params.quick else (1_000_000, 10_000_000)
    if os.environ.get("BENCH_MEMORY_KEYS"):  # e.g. "20000,50000" for a smoke run
        sizes = tuple(int(n) for n in os.environ["BENCH_MEMORY_KEYS"].split(","))
    for n in sizes:
        topic = bench.topic(f"memory-{n}")
        name = bench.name("memory")
        config = bench.config(f"memory-{n}")
        log.info("memory: producing %d distinct keys", n)
        _produce_distinct_keys(bench, topic, n)
        worker = _Worker(bench, name, topic, config.data_dir)
        started = worker.start()
        try:
            folded, deadline = 0, time.monotonic() + 1800
            while folded < n:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker folded {folded} of {n} keys in 1,800 s")
                time.sleep(1.0)
                status, body = _get(f"{worker.url}/projections")
                if status == 200:
                    folded = next(p["events_folded"] for p in body if p["name"] == name)
            fold_seconds = time.monotonic() - started
            assert worker.proc is not None
            rss, peak = _rss_mb(worker.proc.pid)
            worker.stop()
            store_mb = dir_size(store_path(config, name, 1)) / 1e6
            started = worker.start()
            while _get(f"{worker.url}/projections/{name}/k{n - 1:09d}")[0] != 200:
                if time.monotonic() - started > 120:
                    raise RuntimeError("the restarted worker did not answer within 120 s")
                time.sleep(0.01)
            restart = time.monotonic() - started
            assert worker.proc is not None
            rss_restart, _ = _rss_mb(worker.proc.pid)
        finally:
            worker.stop()
        row = {
            "keys": n,
            "fold_seconds_incl_startup": round(fold_seconds, 1),
            "events_per_s_incl_startup": round(n / fold_seconds),
            "rss_mb_after_fold": round(rss, 1),
            "peak_rss_mb": round(peak, 1),
            "store_mb_on_disk": round(store_mb, 1),
            "restart_to_first_answer_s": round(restart, 2),
            "rss_mb_after_restart": round(rss_restart, 1),
        }
        log.info("memory: %s", row)
        result.sizes.append(row)
    small, large = result.sizes[0], result.sizes[-1]
    result.notes.append(
        f"{large['keys'] / small['keys']:.0f}x the keys: RSS after folding "
        f"{small['rss_mb_after_fold']:.0f} -> {large['rss_mb_after_fold']:.0f} MB "
        f"({large['rss_mb_after_fold'] / small['rss_mb_after_fold']:.2f}x); the store holds the "
        f"states on disk ({small['store_mb_on_disk']:.0f} -> {large['store_mb_on_disk']:.0f} MB)"
    )
    result.notes.append(
        "restart: process start, Python imports, consumer-group join and store open, until the "
        "first GET of a key answers 200 — the store is not rebuilt (offsets are in it)"
    )
    return result
