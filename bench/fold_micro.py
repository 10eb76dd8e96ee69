"""Micro-benchmark of the fold loop, `ProjectionRunner._fold`, on records held in memory.

Builds N bank events over `--accounts` keys on 6 partitions as confluent-kafka `Message`s, in
batches of 5,000 made of runs from one partition (as `consume()` hands them out), and times only
the `_fold` calls of a runner over a memory store: decode, `Event`, the fold, the cache and the
position bookkeeping; no Kafka, no store writes. `--against REV` loads `streams/engine/runtime.py`
of that git revision beside the working tree's and runs both, printing
each repetition's ratio and their median; the two runners take turns batch by batch, so load
from other processes falls on both alike. Two cases: a fresh store (a rebuild from scratch:
every key is known to be absent) and a warm one (keys read from the store once per batch).
The fold loop lives in runtime.py itself; the runner's other parts (`runner_writes.py`,
`runner_consumer.py`, ...) are imported from the working tree for both runners.

    PYTHONPATH=. python bench/fold_micro.py [--events 200000] [--accounts 20000] [--repeats 5]
        [--against main]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from confluent_kafka import Message
from refold.core.config import Config
from refold.engine import runtime
from refold.examples.bank.projections import Balances
from refold.kafka.registry import codec_for
from refold.store.memory import MemoryStore

from bench.common import account_key, generate

PARTITIONS = 6
BATCH = 5000
RUN = 500  # records from one partition in a row


def batches(events: list[Any]) -> list[list[Message]]:
    """The events as consumed records: per partition in order, in runs, in batches."""
    per_partition: list[list[Message]] = [[] for _ in range(PARTITIONS)]
    for event in events:
        records = per_partition[hash(event.key) % PARTITIONS]
        records.append(
            Message(
                topic="bench.accounts",
                partition=per_partition.index(records),
                offset=len(records),
                key=event.key.encode(),
                value=event.value,
            )
        )
    runs = [part[i : i + RUN] for part in per_partition for i in range(0, len(part), RUN)]
    runs.sort(key=lambda run: run[0].offset())  # partitions interleave, each stays in order
    flat = [msg for run in runs for msg in run]
    return [flat[i : i + BATCH] for i in range(0, len(flat), BATCH)]


def load_runtime(rev: str) -> ModuleType:
    source = subprocess.run(
        ["git", "show", f"{rev}:streams/engine/runtime.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / f"runtime_{rev.replace('/', '_')}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def runner_of(module: ModuleType, config: Config, codec: Any, warm: bool) -> Any:
    """A fresh runner of `module`'s ProjectionRunner over a memory store."""
    store = MemoryStore()
    if warm:  # half the accounts have a state already
        states = {account_key(i): Balances().initial(account_key(i)) for i in range(0, 20_000, 2)}
        store.commit(states, {})
    return module.ProjectionRunner(
        config, codec, Balances(), dead_letters=None, store=store, consumer_conf={}
    )


def fold_seconds(
    runners: dict[str, Any], work: list[list[Message]], first: int
) -> dict[str, tuple[float, float]]:
    """Wall and thread CPU seconds each runner spends folding every batch. The runners take
    turns batch by batch (who goes first alternates), so a noisy neighbour slows them alike."""
    spent = {name: [0.0, 0.0] for name in runners}
    names = list(runners)
    for i, batch in enumerate(work):
        turn = names if (i + first) % 2 == 0 else names[::-1]
        for name in turn:
            start, cpu = time.perf_counter(), time.thread_time()
            runners[name]._fold(batch)
            spent[name][0] += time.perf_counter() - start
            spent[name][1] += time.thread_time() - cpu
    for runner in runners.values():
        runner._consumer.close()
    return {name: (wall, cpu) for name, (wall, cpu) in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--accounts", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--against", default=None, help="git revision to compare with")
    args = parser.parse_args()
    runtime.tune_collector()
    config = Config.from_env()
    codec = codec_for(config)
    work = batches(generate(codec, args.events, args.accounts).events)
    variants = {"this": runtime}
    if args.against:
        variants[args.against] = load_runtime(args.against)
    for warm in (False, True):
        label = "warm store" if warm else "fresh store"
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        for rep in range(args.repeats):
            runners = {
                name: runner_of(module, config, codec, warm) for name, module in variants.items()
            }
            for name, (wall, cpu) in fold_seconds(runners, work, rep).items():
                seconds[name].append(cpu)
                print(
                    f"{label} rep {rep} {name:>8}: {args.events / wall:>10,.0f} ev/s wall, "
                    f"{args.events / cpu:>10,.0f} ev/cpu-s"
                )
        if args.against:
            ratios = [b / a for a, b in zip(seconds["this"], seconds[args.against], strict=True)]
            print(
                f"{label}: speed this/{args.against} (thread CPU) per repetition "
                f"{[round(r, 3) for r in ratios]}, median {statistics.median(ratios):.3f}"
            )


if __name__ == "__main__":
    main()
