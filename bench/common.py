"""What every scenario shares: parameters, the run context, the bank data set and statistics."""

from __future__ import annotations

import logging
import os
import random
import statistics
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Message, TopicPartition
from refold.core.config import Config
from refold.core.inputs import EventInput
from refold.core.projection import Projection
from refold.core.serde import Codec
from refold.engine.runner_consumer import FOLD_CONSUMER_CONF
from refold.examples.bank.projections import Balances
from refold.kafka.topics import Topics, event_topic, internal_topics

log = logging.getLogger(__name__)

DEPOSIT = "bank.MoneyDeposited"
WITHDRAWAL = "bank.MoneyWithdrawn"
MEMOS = ("salary", "rent", "groceries", "atm", "transfer", "")
PARTITIONS = 6  # refold's default for event topics

#: The settings `refold.engine.runtime.ProjectionRunner` reads with, so the bare baselines read
#: exactly as the runtime does.
RUNTIME_CONSUMER_CONF: dict[str, object] = dict(FOLD_CONSUMER_CONF)
RUNTIME_BATCH = 5000  # ProjectionRunner's default batch_size

#: Record headers as confluent-kafka's produce() is typed to take them.
WireHeaders = list[tuple[str, str | bytes | None]]


@dataclass(frozen=True, slots=True)
class Params:
    """What to run; `--quick` shrinks every scenario to a smoke run of a few minutes."""

    quick: bool
    events: int
    accounts: int
    repeats: int
    fresh_rate: int  # events/s offered in the freshness scenario
    fresh_seconds: float
    query_seconds: float
    query_connections: int
    faust_timeout: float  # seconds the Faust peer may take before it is reported as timed out
    serial_sample: int  # events in the in-memory measurements of the serial bound

    @classmethod
    def build(
        cls,
        *,
        quick: bool,
        events: int | None,
        accounts: int | None,
        repeats: int | None,
    ) -> Params:
        n = events or (200_000 if quick else 1_000_000)
        return cls(
            quick=quick,
            events=n,
            accounts=accounts or (20_000 if quick else 100_000),
            repeats=repeats or 3,
            fresh_rate=2_000 if quick else 5_000,
            fresh_seconds=10.0 if quick else 30.0,
            query_seconds=5.0 if quick else 15.0,
            query_connections=64,
            faust_timeout=600.0 if quick else 1800.0,
            serial_sample=min(n, 200_000),
        )


@dataclass(slots=True)
class Bench:
    """The run context: one broker address, a scratch directory, the codec, unique names."""

    bootstrap: str
    work: Path
    codec: Codec
    broker_pid: int | None = None
    out: Path | None = None  # where reports and logs worth keeping go
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    _counter: int = 0
    _topics: Topics | None = None

    def config(self, label: str) -> Config:
        """A Config with its own fresh data dir (stores never carry over between runs)."""
        self._counter += 1
        data_dir = self.work / f"{self._counter:02d}-{label}"
        data_dir.mkdir(parents=True, exist_ok=True)
        return Config(data_dir=data_dir, bootstrap_override=self.bootstrap)

    def name(self, label: str) -> str:
        """A name unique to this run, for topics, groups and projections."""
        self._counter += 1
        return f"bench-{self.run_id}-{label}-{self._counter}"

    def topic(self, label: str, partitions: int = PARTITIONS) -> str:
        name = self.name(label)
        config = Config(bootstrap_override=self.bootstrap)
        if self._topics is None:
            self._topics = Topics(config)
        self._topics.ensure([*internal_topics(config), event_topic(name, partitions)])
        return name


@dataclass(slots=True)
class BankData:
    """N deposits and withdrawals over `accounts` keys, pre-encoded, with the expected fold."""

    events: list[EventInput]
    accounts: int
    expected_balance: dict[str, int]
    expected_events: dict[str, int]

    @property
    def triples(self) -> list[tuple[str, str, dict[str, Any]]]:
        return [(e.type, e.key, e.data) for e in self.events]

    @property
    def total_balance(self) -> int:
        return sum(self.expected_balance.values())


def account_key(i: int) -> str:
    return f"acc-{i:07d}"


def generate(codec: Codec, n: int, accounts: int, seed: int = 42) -> BankData:
    """Deterministic bank events: 70% deposits, 30% withdrawals, random amounts and accounts."""
    rng = random.Random(seed)
    keys = [account_key(i) for i in range(accounts)]
    balance: dict[str, int] = {}
    counts: dict[str, int] = {}
    events: list[EventInput] = []
    encode = codec.encode
    for _ in range(n):
        key = keys[rng.randrange(accounts)]
        amount = rng.randrange(1, 100_000)
        type_name = DEPOSIT if rng.random() < 0.7 else WITHDRAWAL
        data = {"account_id": key, "amount_cents": amount, "memo": rng.choice(MEMOS)}
        events.append(EventInput(type_name, key, data, encode(type_name, data)))
        balance[key] = balance.get(key, 0) + (amount if type_name == DEPOSIT else -amount)
        counts[key] = counts.get(key, 0) + 1
    return BankData(events, accounts, balance, counts)


def balances_on(topic: str, name: str) -> Projection:
    """The bundled `Balances` fold, unchanged, reading `topic` under a run-unique name.

    A unique name gives each run its own consumer group, store and dead-letter topic, so runs
    never see each other's offsets (nor a live worker's, on a shared broker).
    """

    def rebuild(_self: Projection) -> tuple[Any, ...]:  # pickled by recipe (parallel rebuilds)
        return balances_on, (topic, name)

    attrs = {"name": name, "topics": (topic,), "__reduce__": rebuild}
    cls = type("BenchBalances", (Balances,), attrs)
    projection: Projection = cls()
    return projection


def where(msg: Message) -> tuple[str, int, int, str]:
    """Topic, partition, offset and key of a consumed or delivered record."""
    topic, partition, offset, key = msg.topic(), msg.partition(), msg.offset(), msg.key()
    if topic is None or partition is None or offset is None:
        raise ValueError(f"record without a position: {msg!r}")
    return topic, partition, offset, (key or b"").decode()


def end_offsets(config: Config, topic: str) -> dict[int, int]:
    """High watermark per partition of `topic`."""
    consumer = Consumer(config.kafka(**{"group.id": f"bench-watermarks-{uuid.uuid4().hex[:6]}"}))
    try:
        md = consumer.list_topics(topic, timeout=10).topics[topic]
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in sorted(md.partitions)
        }
    finally:
        consumer.close()


# -- statistics ---------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, int(-(-q * len(sorted_values) // 100)) - 1))
    return float(sorted_values[rank])


def latency_summary(seconds: Iterable[float]) -> dict[str, float]:
    """Count and p50/p90/p99/p99.9/max in milliseconds."""
    values = sorted(s * 1000 for s in seconds)
    out: dict[str, float] = {"count": float(len(values))}
    for label, q in (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9)):
        out[label] = percentile(values, q)
    out["max"] = values[-1] if values else float("nan")
    return out


@dataclass(slots=True)
class Runs:
    """Repeated measurements of one variant: events/s and CPU seconds per million events."""

    label: str
    rates: list[float] = field(default_factory=list)
    cpu_per_million: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, events: int, seconds: float, cpu_seconds: float | None = None) -> None:
        self.rates.append(events / seconds if seconds > 0 else float("nan"))
        if cpu_seconds is not None:
            self.cpu_per_million.append(cpu_seconds * 1_000_000 / events)

    @property
    def rate(self) -> float:
        return median(self.rates)

    @property
    def cpu(self) -> float | None:
        return median(self.cpu_per_million) if self.cpu_per_million else None

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "events_per_s_median": self.rate,
            "events_per_s_runs": self.rates,
            "cpu_s_per_million_median": self.cpu,
            "cpu_s_per_million_runs": self.cpu_per_million,
            **self.extra,
        }


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


# -- CPU --------------------------------------------------------------------------------------


def process_cpu() -> float:
    """CPU seconds of this process, every thread (librdkafka's included)."""
    return time.process_time()


def pid_cpu(pid: int | None) -> float | None:
    """CPU seconds (user + system) of another process, from /proc; None when unknown."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until(predicate: Any, timeout: float, interval: float = 0.005) -> bool:
    """Poll `predicate()` until true or `timeout` seconds passed; returns the last answer."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return bool(predicate())
        time.sleep(interval)
    return True
