"""Micro-benchmark of the projection store's hot path: `commit` and `get_many` in batches.

Times N states committed in batches (first inserts, then updates of the same keys), then
`get_many` of the same keys in commit order, shuffled, and for absent keys, beside raw
rocksdict baselines on pre-encoded bytes, so the store's own overhead shows as a ratio.
Results of each batch are dropped, as the fold loop drops them. Prints ops/s; asserts nothing.

    PYTHONPATH=. python bench/store_micro.py [--n 1000000] [--batch 5000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import gc
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import orjson
import rocksdict
from refold.store.rocksdb import RocksStore


def timed(label: str, batches: Sequence[Any], step: Callable[[Any], object]) -> None:
    """Run `step` on every batch, dropping its result, and print items per second.

    Besides wall time it prints the rate per second of this thread's CPU time, which other
    processes on a shared machine disturb far less (RocksDB's background threads excluded).
    """
    n = sum(len(b) for b in batches)
    start, cpu_start = time.perf_counter(), time.thread_time()
    for batch in batches:
        step(batch)
    seconds, cpu = time.perf_counter() - start, time.thread_time() - cpu_start
    print(f"{label:<42} {n / seconds:>10,.0f} ops/s wall {n / cpu:>10,.0f} ops/cpu-s")


def state(i: int) -> dict[str, object]:
    return {"balance_cents": i * 100, "events": i % 97, "currency": "EUR"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--dir", type=Path, default=None, help="scratch dir (default: a temp dir)")
    args = parser.parse_args()
    n, size = args.n, args.batch

    rng = random.Random(7)
    keys = [f"acc-{i:08d}" for i in range(n)]
    rng.shuffle(keys)  # Kafka keys arrive in no particular order
    batches = [keys[i : i + size] for i in range(0, n, size)]
    shuffled = keys[:]
    rng.shuffle(shuffled)
    reads = [shuffled[i : i + size] for i in range(0, n, size)]
    missing = [[k + "x" for k in b] for b in reads]
    encoded = [[(k.encode(), orjson.dumps(state(1))) for k in b] for b in batches]
    raw_reads = [[k.encode() for k in b] for b in reads]
    gc.freeze()  # the inputs are not the store's garbage; keep the collector off them

    print(f"rocksdict {version('rocksdict')}, orjson {version('orjson')}, n={n:,}, batch={size:,}")
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        store = RocksStore.open(Path(scratch) / "store")
        tp = ("bench", 0)
        offset = [0]

        def commit(generation: int) -> Callable[[list[str]], None]:
            def step(batch: list[str]) -> None:
                offset[0] += len(batch)
                store.commit({k: state(generation) for k in batch}, {tp: offset[0]})

            return step

        timed("store.commit (insert)", batches, commit(1))
        timed("store.commit (update)", batches, commit(2))
        timed("store.get_many (commit order)", batches, store.get_many)
        timed("store.get_many (shuffled)", reads, store.get_many)
        timed("store.get_many (all missing)", missing, store.get_many)
        print(f"approximate_keys: {store.approximate_keys():,}")
        store.close()

        # Baselines: the same work in rocksdict alone, on pre-encoded bytes.
        timed(
            "baseline: orjson.dumps of the states",
            batches,
            lambda b: [orjson.dumps(state(1)) for _ in b],
        )
        opts = rocksdict.Options(raw_mode=True)
        opts.create_if_missing(True)
        db = rocksdict.Rdict(str(Path(scratch) / "raw"), opts)

        def raw_write(pairs: list[tuple[bytes, bytes]]) -> None:
            wb = rocksdict.WriteBatch(raw_mode=True)
            for k, v in pairs:
                wb.put(k, v)
            db.write(wb)

        timed("baseline: rocksdict WriteBatch (bytes)", encoded, raw_write)
        timed("baseline: rocksdict multi-get (shuffled)", raw_reads, db.get)
        db.close()


if __name__ == "__main__":
    main()
