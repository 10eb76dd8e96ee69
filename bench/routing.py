"""Routing benchmark: key lookups/s through a worker that does not fold the key (forwarded to
the one that does, refold.http.routing) against the owner asked directly, in the same run; and
the time until a worker answers every key again after the other is killed with kill -9.

Two `refold worker --http` processes (`bench.memapp`: the bank's `balances`) share a topic's
partitions. Each repetition offers closed-loop load with bench/loadgen.py to worker A, once for
keys A folds (direct) and once for keys B folds (forwarded), alternating which goes first; the
report gives both rates and the median of the per-repetition ratios (forwarded / direct).

    python -m bench.routing [--events 60000] [--accounts 6000] [--seconds 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from refold.cli.broker import free_port
from refold.core.config import Config
from refold.engine.timetravel import murmur2_partition
from refold.kafka.publisher import Publisher
from refold.kafka.registry import codec_for
from refold.kafka.topics import Topics, event_topic, internal_topics

from bench.common import generate

ROOT = Path(__file__).resolve().parents[1]
PARTITIONS = 6


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


class Node:
    """One `refold worker --http` over the bench's topic."""

    def __init__(self, bootstrap: str, name: str, topic: str, work: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "REFOLD_BOOTSTRAP_SERVERS": bootstrap,
            "REFOLD_DATA_DIR": str(work),
            "REFOLD_APP": "bench.memapp",
            "BENCH_NAME": name,
            "BENCH_TOPIC": topic,
            "PYTHONPATH": str(ROOT),
        }
        work.mkdir(parents=True)
        cmd = [sys.executable, "-m", "refold.cli.main", "worker"]
        cmd += ["--http", f"127.0.0.1:{self.port}", "--http-procs", "1"]
        log = (work.parent / f"{work.name}.log").open("ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.name = name

    def partitions(self) -> dict[int, str]:
        """Partition -> owner ("here" | "elsewhere" | "nobody") as this worker's health says."""
        [entry] = [p for p in _get(self.url + "/projections") if p["name"] == self.name]
        parts = entry["health"].get("partitions", [])
        return {p["partition"]: p["owner"] for p in parts if p["lag"] in (0, None)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _load(base: str, paths: list[str], seconds: float, work: Path, label: str) -> float:
    listing = work / f"{label}.paths"
    listing.write_text("\n".join(paths) + "\n")
    cmd = [sys.executable, "-m", "bench.loadgen", "--base", base, "--paths", str(listing)]
    cmd += ["--seconds", str(seconds), "--connections", "16"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    out = json.loads(done.stdout)
    bad = {k: v for k, v in out.get("statuses", {}).items() if str(k) != "200"}
    if bad:
        raise RuntimeError(f"{label}: non-200 answers {bad}")
    return float(out["rate"])


def _wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=60_000)
    parser.add_argument("--accounts", type=int, default=6_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="refold-bench-routing-"))
    broker_config = None
    bootstrap = os.environ.get("REFOLD_BOOTSTRAP_SERVERS")
    if not bootstrap:
        from refold.cli import broker

        broker_config = Config(data_dir=work / "broker-data")
        bootstrap = broker.start(broker_config, port=broker.free_port()).bootstrap_servers
    config = Config(data_dir=work / "client", bootstrap_override=bootstrap)
    nodes: list[Node] = []
    try:
        run = uuid.uuid4().hex[:8]
        topic, name = f"bench-routing-{run}", f"bench-routing-{run}"
        Topics(config).ensure([*internal_topics(config), event_topic(topic, PARTITIONS)])
        codec = codec_for(config)
        data = generate(codec, args.events, args.accounts)
        with Publisher(config, codec) as publisher:
            publisher.publish_bulk(topic, data.events)
        nodes = [Node(bootstrap, name, topic, work / w) for w in ("a", "b")]
        a, b = nodes

        def settled() -> bool:  # both fold some partitions, all caught up
            mine, theirs = a.partitions(), b.partitions()
            return len(mine) == len(theirs) == PARTITIONS and {"here", "elsewhere"} == set(
                mine.values()
            ) == set(theirs.values())

        _wait(settled, 180, "two workers sharing the partitions")
        owned = a.partitions()
        keys = sorted(data.expected_balance)
        direct, forwarded = [], []
        for key in keys:
            here = owned[murmur2_partition(key.encode(), PARTITIONS)] == "here"
            (direct if here else forwarded).append(f"/projections/{name}/{key}")
        rates: dict[str, list[float]] = {"direct": [], "forwarded": []}
        for rep in range(args.repeats):
            order = ["direct", "forwarded"] if rep % 2 == 0 else ["forwarded", "direct"]
            for label in order:
                paths = direct if label == "direct" else forwarded
                rates[label].append(_load(a.url, paths, args.seconds, work, f"{label}-{rep}"))
        ratios = [f / d for f, d in zip(rates["forwarded"], rates["direct"], strict=True)]
        # kill -9 the other worker: time until A answers one of its keys current again.
        probe = forwarded[0]
        b.proc.send_signal(signal.SIGKILL)
        b.proc.wait(10)
        killed = time.monotonic()

        def answered() -> bool:
            body = _get(a.url + probe)
            return not body.get("stale", True)

        _wait(answered, 120, "the surviving worker answering the dead one's keys")
        recovered_s = time.monotonic() - killed
        report = {
            "events": args.events,
            "keys": len(keys),
            "partitions": PARTITIONS,
            "lookups_per_s_direct": [round(r) for r in rates["direct"]],
            "lookups_per_s_forwarded": [round(r) for r in rates["forwarded"]],
            "forwarded_to_direct_median_ratio": round(statistics.median(ratios), 3),
            "answering_again_after_kill9_s": round(recovered_s, 1),
            "loadavg": os.getloadavg(),
            "cpus": os.cpu_count(),
        }
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    finally:
        for node in nodes:
            node.stop()
        if broker_config is not None:
            from refold.cli import broker

            broker.stop(broker_config)


if __name__ == "__main__":
    main()
