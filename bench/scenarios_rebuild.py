"""Scenario 2, rebuild: `balances` folded from offset 0, against bare consume loops and the
serial bound (the sum of the measured per-event costs of what one fold thread must do).

The runtime is timed from the moment its consumer group assigned it every partition (the group
join is reported apart) until its positions reach the topic's end offsets. The bare loops
assign the partitions directly and read with the runtime's consumer settings.
"""

from __future__ import annotations

import io
import logging
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition
from refold.engine.rebuild import default_procs
from refold.engine.replay import replay
from refold.engine.runtime import ProjectionRunner, store_path
from refold.engine.tail import event_from_message
from refold.examples.bank.projections import Balances
from refold.kafka.registry import codec_for
from refold.store.rocksdb import RocksStore

from bench.common import (
    RUNTIME_BATCH,
    RUNTIME_CONSUMER_CONF,
    BankData,
    Bench,
    Params,
    Runs,
    balances_on,
    median,
    process_cpu,
    ratio,
    wait_until,
    where,
)

log = logging.getLogger(__name__)

REFOLD = "refold ProjectionRunner (balances)"
REPLAY = "refold replay, parts over {procs} processes (start, fold, merge, progress display)"
BARE = "(a) bare consume loop"
BARE_DECODE = "(b) bare loop + codec.decode"
BARE_FOLD = "(c0) bare loop + event_from_message + fold into a dict (no store)"

Ends = dict[int, int]


@dataclass(slots=True)
class SerialBound:
    """Per-event costs in microseconds of each step one fold thread performs."""

    costs_us: dict[str, float] = field(default_factory=dict)
    sample: int = 0
    distinct_keys_per_batch: float = 0.0

    def bound(self, steps: tuple[str, ...]) -> float:
        total = sum(self.costs_us[s] for s in steps)
        return 1_000_000 / total if total else float("nan")

    def to_json(self, rebuild_rate: float) -> dict[str, Any]:
        brief = self.bound(BRIEF_STEPS)
        full = self.bound(ALL_STEPS)
        return {
            "costs_us_per_event": {k: self.costs_us[k] for k in DISPLAY if k in self.costs_us},
            "steps_in_bound": list(ALL_STEPS),
            "sample_events": self.sample,
            "distinct_keys_per_batch": self.distinct_keys_per_batch,
            "bound_consume_decode_store_events_per_s": brief,
            "bound_all_steps_events_per_s": full,
            "rebuild_to_bound_consume_decode_store": ratio(rebuild_rate, brief),
            "rebuild_to_bound_all_steps": ratio(rebuild_rate, full),
        }


CONSUME = "consume (bare loop a)"
AVRO = "codec.decode"
EVENT = "event_from_message (decode + Event)"
HEADERS = "of which: msg.headers(), first call (6 headers converted to Python)"
FOLD = "Balances.apply via a dict cache"
READ = "store reads (get_many of uncached keys)"
WRITE = "store writes (RocksStore.commit per batch)"
BRIEF_STEPS = (CONSUME, AVRO, WRITE)
ALL_STEPS = (CONSUME, EVENT, FOLD, READ, WRITE)
DISPLAY = (CONSUME, AVRO, EVENT, HEADERS, FOLD, READ, WRITE)


@dataclass(slots=True)
class RebuildResult:
    runs: dict[str, Runs]
    startup_s: list[float]
    serial: SerialBound
    verified: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        refold = self.runs[REFOLD].rate
        replay_label = next(k for k in self.runs if k.startswith("refold replay"))
        return {
            "variants": {k: r.to_json() for k, r in self.runs.items()},
            "replay_variant": replay_label,
            "ratio_replay_to_bare": ratio(self.runs[replay_label].rate, self.runs[BARE].rate),
            "ratio_replay_to_bare_decode": ratio(
                self.runs[replay_label].rate, self.runs[BARE_DECODE].rate
            ),
            "refold_group_join_s_runs": self.startup_s,
            "ratio_refold_to_bare": ratio(refold, self.runs[BARE].rate),
            "ratio_refold_to_bare_decode": ratio(refold, self.runs[BARE_DECODE].rate),
            "ratio_refold_to_bare_fold": ratio(refold, self.runs[BARE_FOLD].rate),
            "serial_bound": self.serial.to_json(refold),
            "verified": self.verified,
            "notes": self.notes,
        }


# -- the runtime ------------------------------------------------------------------------------


def refold_rebuild(
    bench: Bench, topic: str, ends: Ends, data: BankData, runs: Runs, verify: bool
) -> tuple[float, list[str]]:
    """One rebuild into a fresh store; returns the group-join seconds and verification notes."""
    config = bench.config("rebuild")
    projection = balances_on(topic, bench.name("balances"))
    dlq = Producer(config.kafka(**{"enable.idempotence": True, "acks": "all"}))
    runner = ProjectionRunner(config, codec_for(config), projection, dead_letters=dlq)
    last = {(topic, p): end - 1 for p, end in ends.items() if end > 0}
    total = sum(ends.values())
    thread = threading.Thread(target=runner.run, name="bench-rebuild", daemon=True)
    started = time.perf_counter()
    thread.start()
    wait_until(
        lambda: len(runner.stats.assigned) == len(ends) or runner.stats.state == "failed",
        120,
        0.001,
    )
    assigned, cpu0 = time.perf_counter(), process_cpu()
    # Woken by the runner's own writes: polling here would take the GIL from the fold thread.
    deadline = time.monotonic() + 3600
    while not runner.wait_for(last, 1.0):
        if runner.stats.state == "failed" or time.monotonic() > deadline:
            break
    done, cpu1 = time.perf_counter(), process_cpu()
    runner.stop()
    thread.join(60)
    dlq.flush(10)
    stats = runner.stats
    if stats.state == "failed":
        raise RuntimeError(f"rebuild failed: {stats.error}")
    runs.add(total, done - assigned, cpu1 - cpu0)
    log.info(
        "rebuild: %.0f events/s (join %.2f s, fold %.2f s)",
        total / (done - assigned),
        assigned - started,
        done - assigned,
    )
    notes = []
    if stats.folded != total or stats.dead_letters:
        notes.append(f"runner folded {stats.folded} of {total}, {stats.dead_letters} dead letters")
    if verify:
        notes.append(_verify_store(store_path(config, projection.name, projection.version), data))
    return assigned - started, notes


def _verify_store(path: Any, data: BankData) -> str:
    """Compare every account's stored state with the fold computed while generating."""
    with RocksStore.open(path, read_only=True) as store:
        keys = sorted(data.expected_balance)
        states = store.get_many(keys)
    wrong = [
        k
        for k in keys
        if k not in states
        or states[k]["balance_cents"] != data.expected_balance[k]
        or states[k]["events"] != data.expected_events[k]
    ]
    if wrong:
        return f"store MISMATCH: {len(wrong)} of {len(keys)} accounts differ (e.g. {wrong[0]})"
    return f"store verified: all {len(keys)} accounts equal the independently computed fold"


# -- bare loops -------------------------------------------------------------------------------


def bare_consumer(bench: Bench, topic: str, ends: Ends) -> Consumer:
    config = bench.config("bare")
    consumer = Consumer(config.kafka(**{"group.id": bench.name("bare"), **RUNTIME_CONSUMER_CONF}))
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(ends)])
    return consumer


def bare_loop(
    bench: Bench,
    topic: str,
    ends: Ends,
    runs: Runs,
    work: Callable[[list[Message]], None] | None = None,
) -> None:
    """consume(5000) batches until every record was read; `work` sees each batch."""
    total = sum(ends.values())
    consumer = bare_consumer(bench, topic, ends)
    try:
        started, cpu0 = time.perf_counter(), process_cpu()
        count = 0
        while count < total:
            msgs = consumer.consume(RUNTIME_BATCH, 0.1)
            for msg in msgs:
                if msg.error() is None:
                    count += 1
            if work is not None:
                work(msgs)
        runs.add(total, time.perf_counter() - started, process_cpu() - cpu0)
    finally:
        consumer.close()


def decode_work(bench: Bench) -> Callable[[list[Message]], None]:
    decode = bench.codec.decode

    def work(msgs: list[Message]) -> None:
        for msg in msgs:
            decode(msg.value())

    return work


def fold_work(bench: Bench) -> Callable[[list[Message]], None]:
    codec, fold = bench.codec, Balances()
    apply, initial = fold.apply, fold.initial
    states: dict[str, Any] = {}

    def work(msgs: list[Message]) -> None:
        for msg in msgs:
            event = event_from_message(codec, msg)
            key = event.key
            state = states.get(key)
            states[key] = apply(initial(key) if state is None else state, event)

    return work


# -- the serial bound -------------------------------------------------------------------------


def collect_sample(bench: Bench, topic: str, ends: Ends, size: int) -> list[Message]:
    """The first `size` records in the order the runtime's consumer would deliver them."""
    consumer = bare_consumer(bench, topic, ends)
    sample: list[Message] = []
    try:
        while len(sample) < size:
            sample.extend(m for m in consumer.consume(RUNTIME_BATCH, 1.0) if m.error() is None)
    finally:
        consumer.close()
    return sample[:size]


def _timed(fn: Callable[[], object], repeats: int = 3) -> float:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - started)
    return median(seconds)


def _per_batch(items: list[Any], step: Callable[[Any], object]) -> Callable[[], None]:
    """`step` over every item, batch by batch, each batch's results dropped as the runtime does
    (results kept for the whole sample would make the garbage collector's work grow with it)."""

    def run() -> None:
        for i in range(0, len(items), RUNTIME_BATCH):
            [step(x) for x in items[i : i + RUNTIME_BATCH]]

    return run


def serial_bound(
    bench: Bench, topic: str, ends: Ends, consume_rate: float, params: Params
) -> SerialBound:
    """Measure each step of the fold thread in isolation on a sample held in memory.

    A Message converts its headers to Python on the first `headers()` call only and keeps
    them, so the steps that read headers are timed once each, on records never read before.
    """
    codec = bench.codec
    fresh = collect_sample(bench, topic, ends, params.serial_sample)
    n = len(fresh)
    result = SerialBound(sample=n)
    result.costs_us[CONSUME] = 1_000_000 / consume_rate
    result.costs_us[HEADERS] = _timed(_per_batch(fresh, lambda m: m.headers()), 1) * 1e6 / n
    sample = collect_sample(bench, topic, ends, params.serial_sample)
    result.costs_us[EVENT] = (
        _timed(_per_batch(sample, lambda m: event_from_message(codec, m)), 1) * 1e6 / n
    )
    values = [m.value() for m in sample]
    result.costs_us[AVRO] = _timed(_per_batch(values, codec.decode)) * 1e6 / n
    del fresh, values
    events = [event_from_message(codec, m) for m in sample]
    fold = Balances()

    def fold_all() -> dict[str, Any]:
        states: dict[str, Any] = {}
        for event in events:
            key = event.key
            state = states.get(key)
            states[key] = fold.apply(fold.initial(key) if state is None else state, event)
        return states

    result.costs_us[FOLD] = _timed(fold_all) * 1e6 / n
    final = fold_all()
    batches = [sample[i : i + RUNTIME_BATCH] for i in range(0, n, RUNTIME_BATCH)]
    positions = [[where(m) for m in b] for b in batches]
    key_batches = [list(dict.fromkeys(key for *_, key in b)) for b in positions]
    offsets = [{(t, p): o + 1 for t, p, o, _ in b} for b in positions]
    result.distinct_keys_per_batch = sum(map(len, key_batches)) / max(1, len(key_batches))
    store_dir = bench.config("serial").data_dir / "store"
    with RocksStore.open(store_dir) as store:

        def write_all() -> None:
            for keys, offs in zip(key_batches, offsets, strict=True):
                store.commit({k: final[k] for k in keys}, offs)

        # Writes first into the empty store (as in a rebuild), reads after, as a rebuild reads:
        # one get_many per batch of the keys it has not cached yet.
        started = time.perf_counter()
        write_all()
        result.costs_us[WRITE] = (time.perf_counter() - started) * 1e6 / n

        def read_uncached() -> None:
            cached: set[str] = set()
            for keys in key_batches:
                missing = [k for k in keys if k not in cached]
                store.get_many(missing)
                cached.update(missing)

        result.costs_us[READ] = _timed(read_uncached) * 1e6 / n
    return result


def refold_replay(
    bench: Bench, topic: str, ends: Ends, data: BankData, runs: Runs, procs: int, verify: bool
) -> list[str]:
    """`replay()` as `refold replay` runs it, timed end to end: the child processes' start, the
    parallel fold, the merge and the final catch-up, with the progress display drawing."""
    config = bench.config("replay")
    projection = balances_on(topic, bench.name("balances"))
    total = sum(ends.values())
    display = io.StringIO()  # the display draws as into a log file (every 5 s)
    cpu0 = process_cpu() + children_cpu()
    started = time.perf_counter()
    result = replay(config, codec_for(config), projection, 1, progress=display, procs=procs)
    seconds = time.perf_counter() - started
    runs.add(total, seconds, process_cpu() + children_cpu() - cpu0)
    log.info("replay over %d processes: %.0f events/s", result.parts, total / seconds)
    notes = []
    if result.folded != total or result.parts != procs:
        notes.append(f"replay folded {result.folded} of {total} over {result.parts} processes")
    if verify:
        notes.append(_verify_store(store_path(config, projection.name, 1), data))
    return notes


def children_cpu() -> float:
    """CPU seconds of this process's children that have ended (the rebuild's parts)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- the scenario -----------------------------------------------------------------------------


def run(bench: Bench, topic: str, ends: Ends, data: BankData, params: Params) -> RebuildResult:
    procs = default_procs()
    replay_label = REPLAY.format(procs=procs)
    labels = (REFOLD, replay_label, BARE, BARE_DECODE, BARE_FOLD)
    runs = {label: Runs(label) for label in labels}
    startup: list[float] = []
    verified: list[str] = []
    for rep in range(params.repeats):
        join_s, notes = refold_rebuild(bench, topic, ends, data, runs[REFOLD], verify=rep == 0)
        startup.append(join_s)
        verified.extend(notes)
        verified.extend(
            refold_replay(bench, topic, ends, data, runs[replay_label], procs, verify=rep == 0)
        )
        bare_loop(bench, topic, ends, runs[BARE])
        bare_loop(bench, topic, ends, runs[BARE_DECODE], decode_work(bench))
        bare_loop(bench, topic, ends, runs[BARE_FOLD], fold_work(bench))
        log.info(
            "rebuild rep %d: refold %.0f, replay %.0f, bare %.0f, decode %.0f, fold %.0f events/s",
            rep + 1,
            *(runs[k].rates[-1] for k in labels),
        )
    serial = serial_bound(bench, topic, ends, runs[BARE].rate, params)
    return RebuildResult(runs, startup, serial, verified)
