"""Scenario 1, publish: refold's Publisher against a bare confluent-kafka producer.

Every variant sends the same N pre-built bank events with the same producer settings
(`refold.kafka.publisher.PRODUCER_DEFAULTS`: idempotent, acks=all, lz4, linger 5 ms) to a fresh
topic, and waits until every record is acknowledged. Variants run interleaved (A B C D E A B ...)
so that background noise spreads evenly over them.

`refold publish --file` runs end to end beside them: the CLI in its own process on a JSON-lines
file of the same events (start-up, parsing, validation and encoding included), timed from its
start to its exit. Its ratios to `publish_bulk` and to the bare producer are taken per repetition
(the runs of one repetition are neighbours in time) and their median reported.

The refold variant the publish targets were first read from is `publish_bulk` (pre-encoded;
the bulk path `refold publish --file` sends through): its producer adds
`delivery.report.only.error` (failures still raise; landed records cost no report). The bare
baselines keep a delivery callback for every record, as a bare producer that checks its
deliveries does; `publish_encoded` (a position per event) is measured beside them.
"""

from __future__ import annotations

import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import KafkaError, Message, Producer
from refold.core import envelope
from refold.core.inputs import EventInput
from refold.kafka.publisher import DEFAULT_MXFAST, PRODUCER_DEFAULTS, Publisher, tune_allocator

from bench.common import (
    BankData,
    Bench,
    Params,
    Runs,
    WireHeaders,
    end_offsets,
    median,
    pid_cpu,
    process_cpu,
    ratio,
)

log = logging.getLogger(__name__)

REFOLD_BULK = "refold Publisher.publish_bulk (pre-encoded)"
REFOLD_FILE = "`refold publish --file` end to end (JSONL file, CLI process)"
REFOLD_FILE_SENDERS = "`refold publish --file --senders 2` end to end (2 sending processes)"
REFOLD_ENCODED = "refold Publisher.publish_encoded (pre-encoded, a position per event)"
REFOLD_MANY = "refold Publisher.publish_many (encodes each event)"
BARE = "bare Producer, key + value"
BARE_HEADERS = "bare Producer, key + value + pre-built CloudEvents headers"


@dataclass(slots=True)
class PublishResult:
    topic: str  # a topic holding exactly the N events, written by refold's publisher
    runs: dict[str, Runs]
    broker_cpu_per_million: dict[str, float] = field(default_factory=dict)
    costs_us: dict[str, float] = field(default_factory=dict)
    verified: bool = True
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        refold, bare = self.runs[REFOLD_BULK].rate, self.runs[BARE].rate
        file_rates = self.runs[REFOLD_FILE].rates
        return {
            "file_events_per_s_median": self.runs[REFOLD_FILE].rate,
            "ratio_file_to_bulk_per_rep_median": median(
                [f / b for f, b in zip(file_rates, self.runs[REFOLD_BULK].rates, strict=False)]
            ),
            "ratio_file_to_bare_per_rep_median": median(
                [f / b for f, b in zip(file_rates, self.runs[BARE].rates, strict=False)]
            ),
            "ratio_file_senders_to_file_per_rep_median": median(
                [
                    s / f
                    for s, f in zip(self.runs[REFOLD_FILE_SENDERS].rates, file_rates, strict=False)
                ]
            ),
            "topic": self.topic,
            "refold_variant": REFOLD_BULK,
            "variants": {k: r.to_json() for k, r in self.runs.items()},
            "broker_cpu_s_per_million_median": self.broker_cpu_per_million,
            "python_costs_us_per_event": self.costs_us,
            "ratio_refold_bulk_to_bare": ratio(refold, bare),
            "ratio_refold_bulk_to_bare_headers": ratio(refold, self.runs[BARE_HEADERS].rate),
            "ratio_refold_encoded_to_bare": ratio(self.runs[REFOLD_ENCODED].rate, bare),
            "ratio_refold_many_to_bare": ratio(self.runs[REFOLD_MANY].rate, bare),
            "verified": self.verified,
            "notes": self.notes,
        }


def bare_publish(
    producer: Producer, topic: str, events: Sequence[EventInput], headers: WireHeaders | None
) -> None:
    """The baseline: produce every record, one shared delivery callback, flush."""
    failures: list[str] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            failures.append(str(err))

    produce, poll = producer.produce, producer.poll
    for event in events:
        while True:
            try:
                produce(topic, event.value, event.key, headers=headers, on_delivery=on_delivery)
                break
            except BufferError:
                poll(0.05)
    remaining = producer.flush(120)
    if failures or remaining:
        raise RuntimeError(
            f"bare producer: {len(failures)} failed, {remaining} unacknowledged ({failures[:1]})"
        )


def write_jsonl(events: Sequence[EventInput], path: Path) -> None:
    """The events as `refold publish --file` input, one `{"type", "key", "data"}` per line."""
    with path.open("wb") as fh:
        for e in events:
            fh.write(orjson.dumps({"type": e.type, "key": e.key, "data": e.data}) + b"\n")


def cli_publish(bootstrap: str, topic: str, path: Path, *options: str) -> tuple[float, float]:
    """Run `refold publish TOPIC --file PATH [OPTIONS]` in its own process: (wall s, its CPU s,
    its parse and send processes included)."""
    env = {**os.environ, "REFOLD_BOOTSTRAP_SERVERS": bootstrap}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "refold.cli.main", "publish", topic, "--file", str(path), *options],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"refold publish --file failed: {done.stderr.strip()[-500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def python_costs(bench: Bench, data: BankData, sample: int = 100_000) -> dict[str, float]:
    """Per-event costs of the publisher's own Python steps, measured apart from Kafka."""
    events = data.events[:sample]
    n = len(events)
    encode = bench.codec.encode

    def timed(fn: Callable[[], object]) -> float:
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) * 1e6 / n

    return {
        "envelope.headers() (uuid4, timestamp, 5 tuples)": timed(
            lambda: [envelope.headers(e.type, source="refold://bench") for e in events]
        ),
        "codec.encode()": timed(lambda: [encode(e.type, e.data) for e in events]),
    }


def run(bench: Bench, data: BankData, params: Params) -> PublishResult:
    events = data.events
    triples = data.triples
    # The same shape of headers refold sends, built once: what the wire carries, without the cost
    # of building them per event.
    static_headers: WireHeaders = list(envelope.headers(events[0].type, source="refold://bench"))

    def refold_bulk(topic: str) -> None:
        with Publisher(bench.config("pub"), bench.codec) as publisher:
            started = time.perf_counter(), process_cpu()
            summary = publisher.publish_bulk(topic, events)
            finish(topic, REFOLD_BULK, started)
        if summary.count != len(events):
            raise RuntimeError(f"publish_bulk reported {summary.count} events")

    jsonl = Path(tempfile.mkdtemp(prefix="refold-bench-publish-")) / "events.jsonl"
    write_jsonl(events, jsonl)

    def refold_file(topic: str, label: str = REFOLD_FILE, *options: str) -> None:
        wall, cpu = cli_publish(bench.bootstrap, topic, jsonl, *options)
        runs[label].add(len(events), wall, cpu)
        after, before = pid_cpu(bench.broker_pid), broker_before[0]
        if after is not None and before is not None:
            broker_cpu[label].append((after - before) * 1_000_000 / len(events))
        log.info("publish %-60s %10.0f events/s (%.2f s)", label, len(events) / wall, wall)

    def refold_encoded(topic: str) -> None:
        with Publisher(bench.config("pub"), bench.codec) as publisher:
            started = time.perf_counter(), process_cpu()
            positions = publisher.publish_encoded(topic, events)
            finish(topic, REFOLD_ENCODED, started)
        if len(positions) != len(events) or any(p is None for p in positions):
            raise RuntimeError("publish_encoded returned missing positions")

    def refold_many(topic: str) -> None:
        with Publisher(bench.config("pub"), bench.codec) as publisher:
            started = time.perf_counter(), process_cpu()
            publisher.publish_many(topic, triples)
            finish(topic, REFOLD_MANY, started)

    def bare(topic: str, headers: WireHeaders | None, label: str) -> None:
        producer = Producer(bench.config("pub").kafka(**PRODUCER_DEFAULTS))
        started = time.perf_counter(), process_cpu()
        bare_publish(producer, topic, events, headers)
        finish(topic, label, started)

    variants: dict[str, Callable[[str], None]] = {
        REFOLD_FILE: refold_file,
        REFOLD_BULK: refold_bulk,
        REFOLD_FILE_SENDERS: lambda t: refold_file(t, REFOLD_FILE_SENDERS, "--senders", "2"),
        BARE: lambda t: bare(t, None, BARE),
        REFOLD_ENCODED: refold_encoded,
        BARE_HEADERS: lambda t: bare(t, static_headers, BARE_HEADERS),
        REFOLD_MANY: refold_many,
    }
    runs = {label: Runs(label) for label in variants}
    broker_cpu: dict[str, list[float]] = {label: [] for label in variants}
    broker_before: list[float | None] = [None]
    first_topic: list[str] = []
    result = PublishResult("", runs)
    result.notes.append(
        "publish_bulk's producer adds `delivery.report.only.error=true` (a failed record still"
        " raises PublishError); the bare baselines take a delivery callback for every record"
    )

    def finish(topic: str, label: str, started: tuple[float, float]) -> None:
        wall = time.perf_counter() - started[0]
        cpu = process_cpu() - started[1]
        runs[label].add(len(events), wall, cpu)
        after, before = pid_cpu(bench.broker_pid), broker_before[0]
        if after is not None and before is not None:
            broker_cpu[label].append((after - before) * 1_000_000 / len(events))
        log.info("publish %-60s %10.0f events/s (%.2f s)", label, len(events) / wall, wall)

    # Every variant runs under the allocator setting `refold publish` makes (glibc without
    # fastbins, see tune_allocator), restored afterwards for the other scenarios.
    tuned = tune_allocator()
    if tuned:
        result.notes.append(
            "every variant ran as `refold publish` runs: glibc fastbins off (tune_allocator)"
        )
    try:
        for rep in range(params.repeats):
            for label, variant in variants.items():
                topic = bench.topic("publish")
                broker_before[0] = pid_cpu(bench.broker_pid)
                variant(topic)
                written = sum(end_offsets(bench.config("check"), topic).values())
                if written != len(events):
                    result.verified = False
                    result.notes.append(
                        f"{label} run {rep + 1}: topic holds {written} records, "
                        f"expected {len(events)}"
                    )
                if label == REFOLD_BULK and not first_topic:
                    first_topic.append(topic)
    finally:
        if tuned:
            tune_allocator(DEFAULT_MXFAST)
        jsonl.unlink(missing_ok=True)
        jsonl.parent.rmdir()
    result.topic = first_topic[0]
    result.costs_us = python_costs(bench, data)
    result.broker_cpu_per_million = {
        label: median(values) for label, values in broker_cpu.items() if values
    }
    return result
