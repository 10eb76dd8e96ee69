"""Scenario 3, freshness: publish -> state readable, under a steady offered load.

One thread offers `rate` events/s for `seconds`, each produced on its own (no waiting for acks)
by a producer with the Publisher's settings and the CloudEvents headers the Publisher sends;
`t0` is taken just before `produce()`. The delivery report gives each event's offset. Readers:

- refold: a Worker folds `balances`; an observer calls `runner.wait_for({tp: offset})` (the
  runtime's read-your-writes wait) for every delivered event, in order: latency = wake-up - t0.
- refold over HTTP (when projections/server.py exists): a sample of the events (about 50/s) is
  read with `GET /projections/{name}/{key}?min_offset=P:O&wait_ms=5000`: latency = 200 answer - t0.
- bare hops: a bare consumer on its own topic records when each record reaches it, (i) with a
  low-latency loop (`poll(0.1)` then drain with `consume(n, 0)`), (ii) with the runtime's call,
  `consume(5000, 0.1)`. Latency = receive time - t0 of the record at that offset.

Everything runs in this one process (GIL shared by publisher, folding and observers).
The first `WARMUP_S` seconds of each run are left out of the percentiles.
"""

from __future__ import annotations

import http.client
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    Message,
    Producer,
    TopicPartition,
)
from refold.core import envelope
from refold.engine.worker import Worker
from refold.kafka.publisher import PRODUCER_DEFAULTS

from bench.common import (
    PARTITIONS,
    RUNTIME_BATCH,
    RUNTIME_CONSUMER_CONF,
    BankData,
    Bench,
    Params,
    WireHeaders,
    balances_on,
    latency_summary,
    wait_until,
    where,
)

log = logging.getLogger(__name__)

WARMUP_S = 1.0
HTTP_SAMPLES_PER_S = 50
REFOLD = "refold: publish -> runner.wait_for(offset) returns"
REFOLD_HTTP = "refold: publish -> GET ?min_offset answers 200 (sampled)"
BARE_POLL = "bare hop: produce -> consumer (poll + drain)"
BARE_BATCH = "bare hop: produce -> consumer (consume(5000, 0.1), the call the runtime used to make)"

#: (t0, partition, offset, key) of one acknowledged event
Delivered = tuple[float, int, int, str]


@dataclass(slots=True)
class LoadRun:
    """What one offered load produced: acknowledged events and the achieved rate."""

    delivered: list[Delivered] = field(default_factory=list)
    sent: int = 0
    failed: int = 0
    start: float = 0.0
    seconds: float = 0.0


@dataclass(slots=True)
class FreshnessResult:
    rate: int
    seconds: float
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "offered_events_per_s": self.rate,
            "seconds": self.seconds,
            "warmup_excluded_s": WARMUP_S,
            "variants": self.variants,
            "notes": self.notes,
        }


def offer_load(
    bench: Bench,
    topic: str,
    data: BankData,
    rate: int,
    seconds: float,
    on_delivered: Callable[[Delivered], None] | None = None,
) -> LoadRun:
    """Produce `rate` events/s one by one for `seconds`; returns every delivery report."""
    producer = Producer(bench.config("fresh-pub").kafka(**PRODUCER_DEFAULTS))
    run = LoadRun()
    lock = threading.Lock()

    def on_delivery(t0: float, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            run.failed += 1
            return
        _topic, partition, offset, key = where(msg)
        item = (t0, partition, offset, key)
        with lock:
            run.delivered.append(item)
        if on_delivered is not None:
            on_delivered(item)

    events = data.events
    total = int(rate * seconds)
    produce, poll, clock = producer.produce, producer.poll, time.perf_counter
    run.start = start = clock()
    while run.sent < total:
        due = min(total, int((clock() - start) * rate) + 1)
        while run.sent < due:
            event = events[run.sent % len(events)]
            headers: WireHeaders = list(envelope.headers(event.type, source="refold://bench"))
            t0 = clock()
            produce(
                topic, event.value, event.key, headers=headers, on_delivery=partial(on_delivery, t0)
            )
            run.sent += 1
        poll(0)
        pause = start + run.sent / rate - clock()
        if pause > 0:
            time.sleep(pause)
    run.seconds = clock() - start
    producer.flush(30)
    return run


def summarize(run: LoadRun, latencies: list[tuple[float, float]], expected: int) -> dict[str, Any]:
    """Percentiles of (t0, latency) pairs produced after the warm-up."""
    cutoff = run.start + WARMUP_S
    kept = [lat for t0, lat in latencies if t0 >= cutoff]
    return {
        "achieved_events_per_s": run.sent / run.seconds if run.seconds else float("nan"),
        "sent": run.sent,
        "acknowledged": len(run.delivered),
        "failed": run.failed,
        "observed": len(latencies),
        "expected_observations": expected,
        "latency_ms": latency_summary(kept),
    }


# -- refold -----------------------------------------------------------------------------------


class HttpSampler:
    """Reads every k-th delivered event back over HTTP with `min_offset`, on a few threads."""

    def __init__(self, port: int, name: str, every: int, threads: int = 4) -> None:
        self._port, self._name, self._every = port, name, every
        self._queue: queue.SimpleQueue[Delivered | None] = queue.SimpleQueue()
        self.latencies: list[tuple[float, float]] = []
        self.errors: list[str] = []
        self.offered = 0
        self._count = 0
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def offer(self, item: Delivered) -> None:
        self._count += 1
        if self._count % self._every == 0:
            self.offered += 1
            self._queue.put(item)

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(30)

    def _work(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self._port, timeout=10)
        while (item := self._queue.get()) is not None:
            t0, partition, offset, key = item
            try:
                conn.request(
                    "GET",
                    f"/projections/{self._name}/{key}?min_offset={partition}:{offset}&wait_ms=5000",
                )
                response = conn.getresponse()
                response.read()
                done = time.perf_counter()
            except (OSError, http.client.HTTPException) as exc:
                self.errors.append(repr(exc))
                conn.close()
                continue
            if response.status == 200:
                self.latencies.append((t0, done - t0))
            else:
                self.errors.append(f"HTTP {response.status}")
        conn.close()


def refold_freshness(bench: Bench, data: BankData, params: Params, result: FreshnessResult) -> None:
    topic = bench.topic("fresh")
    name = bench.name("balances")
    worker = Worker(bench.config("fresh-worker"), [balances_on(topic, name)], codec=bench.codec)
    worker.start()
    server: Any = None
    try:
        runner = worker.runners[name]
        wait_until(lambda: len(runner.stats.assigned) == PARTITIONS, 60)
        sampler: HttpSampler | None = None
        try:
            from refold.http.server import QueryServer
        except ImportError:
            result.notes.append("projections/server.py absent: HTTP freshness not measured")
        else:
            server = QueryServer(worker, "127.0.0.1", 0)
            server.start()
            every = max(1, params.fresh_rate // HTTP_SAMPLES_PER_S)
            sampler = HttpSampler(server.port, name, every)
        deliveries: queue.SimpleQueue[Delivered | None] = queue.SimpleQueue()
        latencies: list[tuple[float, float]] = []
        missed: list[Delivered] = []

        def observe() -> None:
            while (item := deliveries.get()) is not None:
                t0, partition, offset, _key = item
                if runner.wait_for({(topic, partition): offset}, 10.0):
                    latencies.append((t0, time.perf_counter() - t0))
                else:
                    missed.append(item)

        observer = threading.Thread(target=observe, name="bench-observer", daemon=True)
        observer.start()

        def delivered(item: Delivered) -> None:
            deliveries.put(item)
            if sampler is not None:
                sampler.offer(item)

        run = offer_load(bench, topic, data, params.fresh_rate, params.fresh_seconds, delivered)
        deliveries.put(None)
        observer.join(60)
        result.variants[REFOLD] = summarize(run, latencies, len(run.delivered))
        if missed:
            result.notes.append(f"{len(missed)} events not folded within 10 s of delivery")
        if sampler is not None:
            sampler.close()
            summary = summarize(run, sampler.latencies, sampler.offered)
            summary["errors"] = sampler.errors[:5]
            result.variants[REFOLD_HTTP] = summary
    finally:
        if server is not None:
            server.stop()
        worker.stop()


# -- bare hops --------------------------------------------------------------------------------


def bare_hop(bench: Bench, data: BankData, params: Params, batch_wait: bool) -> dict[str, Any]:
    """One offered load read by a bare consumer; `batch_wait` uses the runtime's consume call."""
    topic = bench.topic("hop")
    consumer = Consumer(
        bench.config("hop").kafka(**{"group.id": bench.name("hop"), **RUNTIME_CONSUMER_CONF})
    )
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
    received: dict[tuple[int, int], float] = {}
    stop = threading.Event()

    def read() -> None:
        clock = time.perf_counter
        while not stop.is_set():
            if batch_wait:
                msgs = consumer.consume(RUNTIME_BATCH, 0.1)
            else:
                first = consumer.poll(0.1)
                msgs = [] if first is None else [first, *consumer.consume(RUNTIME_BATCH - 1, 0)]
            now = clock()
            for msg in msgs:
                if msg.error() is None:
                    _topic, partition, offset, _key = where(msg)
                    received[(partition, offset)] = now

    reader = threading.Thread(target=read, name="bench-hop", daemon=True)
    reader.start()
    try:
        run = offer_load(bench, topic, data, params.fresh_rate, params.fresh_seconds)
        wait_until(lambda: len(received) >= len(run.delivered), 30, 0.05)
    finally:
        stop.set()
        reader.join(10)
        consumer.close()
    latencies = [(t0, received[(p, o)] - t0) for t0, p, o, _ in run.delivered if (p, o) in received]
    return summarize(run, latencies, len(run.delivered))


def run(bench: Bench, data: BankData, params: Params) -> FreshnessResult:
    result = FreshnessResult(params.fresh_rate, params.fresh_seconds)
    refold_freshness(bench, data, params, result)
    result.variants[BARE_POLL] = bare_hop(bench, data, params, batch_wait=False)
    result.variants[BARE_BATCH] = bare_hop(bench, data, params, batch_wait=True)
    for label, variant in result.variants.items():
        lat = variant["latency_ms"]
        log.info("freshness %-70s p50 %.1f p99 %.1f ms", label, lat["p50"], lat["p99"])
    return result
