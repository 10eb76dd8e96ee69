"""Recovery: seconds from restarting a `kill -9`-ed worker until every key is current.

Run against a broker of your own (it is not part of `make bench`: each slow variant waits out a
session timeout several times):

    REFOLD_BOOTSTRAP_SERVERS=127.0.0.1:29492 .venv/bin/python -m bench.recovery [--kills 3]

For each group-membership variant (classic protocol with static membership, refold's default;
classic without; KIP-848 `group.protocol=consumer` with and without static membership) and each
case, a publisher offers `--rate` events/s to a 6-partition topic while real `refold worker`
processes fold it:

- `one`: one worker, killed with SIGKILL and restarted at once, `--kills` times in a row;
- `one-of-two`: two workers, one of them killed and restarted, `--kills` times;
- `gone`: two workers, one killed and never restarted (the other must take its partitions).

A measurement is the time from the restart (for `gone`: the kill) until the workers' folded
positions, read from `GET /projections`, reach the topic's end offsets taken at that moment,
i.e. every event published before the restart is folded into a live worker's store.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

from confluent_kafka import Consumer, KafkaException, TopicPartition
from refold.cli.broker import free_port
from refold.core.config import Config
from refold.kafka.publisher import Publisher
from refold.kafka.registry import codec_for
from refold.kafka.topics import Topics, event_topic, internal_topics

ROOT = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, dict[str, str]] = {
    "classic+static": {},
    "classic": {"REFOLD_STATIC_MEMBERSHIP": "0"},
    "kip848": {"REFOLD_KAFKA_GROUP_PROTOCOL": "consumer", "REFOLD_STATIC_MEMBERSHIP": "0"},
    "kip848+static": {"REFOLD_KAFKA_GROUP_PROTOCOL": "consumer"},
}
PARTITIONS = 6
WORKER = (sys.executable, "-m", "refold.cli.main", "worker")


class Worker:
    def __init__(self, env: dict[str, str], name: str, data_dir: Path) -> None:
        self.env = {**env, "REFOLD_DATA_DIR": str(data_dir)}
        self.name = name
        self.data_dir = data_dir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        log = (self.data_dir.parent / f"{self.data_dir.name}.log").open("ab")
        self.proc = subprocess.Popen(
            [*WORKER, "--only", self.name, "--http", f"127.0.0.1:{self.port}", "--http-procs", "1"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill9()

    def positions(self) -> dict[int, int]:
        if self.proc is None or self.proc.poll() is not None:
            return {}
        try:
            url = f"http://127.0.0.1:{self.port}/projections"
            with urllib.request.urlopen(url, timeout=2) as resp:
                described = json.loads(resp.read())
        except OSError:
            return {}
        return {
            p["partition"]: p["next_offset"]
            for entry in described
            for p in entry["partitions"]
            if p["next_offset"] is not None
        }


def ends(config: Config, topic: str) -> dict[int, int]:
    consumer = Consumer(config.kafka(**{"group.id": "bench-recovery-ends"}))
    try:
        for attempt in range(20):
            try:
                return {
                    p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                    for p in range(PARTITIONS)
                }
            except KafkaException:  # a new topic's leaders are still being elected
                if attempt == 19:
                    raise
                time.sleep(0.5)
        raise AssertionError("unreachable")
    finally:
        consumer.close()


def time_to_current(
    config: Config, topic: str, workers: list[Worker], since: float, timeout: float
) -> float | None:
    target = ends(config, topic)
    while time.monotonic() - since < timeout:
        folded: dict[int, int] = {}
        for w in workers:
            for p, off in w.positions().items():
                folded[p] = max(off, folded.get(p, 0))
        if all(folded.get(p, 0) >= end for p, end in target.items() if end > 0):
            return time.monotonic() - since
        time.sleep(0.1)
    return None


def settle(workers: list[Worker], timeout: float) -> None:
    """Wait until every worker owns partitions and together they own them all."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        owned = [set(w.positions()) for w in workers]
        if all(owned) and set().union(*owned) == set(range(PARTITIONS)):
            time.sleep(2)  # heartbeats flowing, offsets committed
            return
        time.sleep(0.2)
    raise RuntimeError(f"partitions never split over {len(workers)} workers")


def publish_forever(config: Config, topic: str, rate: int, stop: threading.Event) -> None:
    with Publisher(config, codec_for(config)) as publisher:
        i = 0
        while not stop.is_set():
            started = time.monotonic()
            batch = []
            for _ in range(max(1, rate // 10)):
                acc = f"acc-{i % 500:04d}"
                data = {"account_id": acc, "amount_cents": 1 + i % 97, "memo": str(i)}
                batch.append(("bank.MoneyDeposited", acc, data))
                i += 1
            publisher.publish_many(topic, batch)
            stop.wait(max(0.0, 0.1 - (time.monotonic() - started)))


def run_case(
    config: Config, variant: str, case: str, kills: int, rate: int, timeout: float, tmp: Path
) -> list[float | None]:
    topic = f"recovery-{uuid.uuid4().hex[:8]}"
    name = f"rec_{uuid.uuid4().hex[:8]}"
    Topics(config).ensure([event_topic(topic, PARTITIONS), *internal_topics(config)])
    env = {
        **os.environ,
        **VARIANTS[variant],
        "REFOLD_BOOTSTRAP_SERVERS": config.bootstrap_servers,
        "REFOLD_APP": "tests.integration.apps.ledger",
        "LEDGER_NAME": name,
        "LEDGER_TOPIC": topic,
        "PYTHONPATH": str(ROOT),
    }
    count = 1 if case == "one" else 2
    workers = [Worker(env, name, tmp / f"{name}-w{i}") for i in range(count)]
    stop = threading.Event()
    publisher = threading.Thread(target=publish_forever, args=(config, topic, rate, stop))
    publisher.start()
    times: list[float | None] = []
    try:
        for w in workers:
            w.start()
        first = time_to_current(config, topic, workers, time.monotonic(), 120)
        if first is None:
            raise RuntimeError(f"{variant}/{case}: the workers never caught up")
        settle(workers, 60)
        victim = workers[-1]
        for _ in range(1 if case == "gone" else kills):
            victim.kill9()
            since = time.monotonic()
            if case == "gone":
                times.append(time_to_current(config, topic, workers[:1], since, timeout))
                break
            victim.start()
            took = time_to_current(config, topic, workers, since, timeout)
            times.append(took)
            print(f"  {variant:<15} {case:<11} {_fmt(took)}", flush=True)
            time.sleep(1)
    finally:
        stop.set()
        publisher.join(30)
        for w in workers:
            w.stop()
    return times


def _fmt(took: float | None) -> str:
    return "timeout" if took is None else f"{took:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--rate", type=int, default=1000, help="events/s offered meanwhile")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--cases", default="one,one-of-two,gone")
    parser.add_argument("--tmp", default="/tmp/refold-bench-recovery")
    args = parser.parse_args()
    config = Config.from_env()
    tmp = Path(args.tmp)
    rows = []
    for variant in args.variants.split(","):
        for case in args.cases.split(","):
            times = run_case(config, variant, case, args.kills, args.rate, args.timeout, tmp)
            done = [t for t in times if t is not None]
            median = f"{statistics.median(done):.1f}" if done else "-"
            rows.append((variant, case, ", ".join(_fmt(t) for t in times), median))
            print(f"{variant:<15} {case:<11} {rows[-1][2]}  (median {median} s)", flush=True)
    print("\n| membership | case | seconds to every key current, per kill | median |")
    print("|---|---|---|---|")
    for variant, case, times_text, median in rows:
        print(f"| {variant} | {case} | {times_text} | {median} |")


if __name__ == "__main__":
    main()
