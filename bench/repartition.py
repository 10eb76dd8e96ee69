"""The cost of the repartition topic (issue #17): the fold rate of the bank's re-keyed `owners`
in one process, folded from the source by one runner owning every partition (the path before
the repartition topic, still the one replays of older releases took) against the two stages a
worker now runs (routing to `_<app>.<name>.v<version>.repartition` in transactions, then
folding that topic). Both from offset 0 of the same published events, each with its own groups
and store; the clock runs from start until every event is folded (stored or pending).

    python -m bench.repartition [--events 200000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import threading
import time
import uuid
from pathlib import Path

from refold.core.config import Config
from refold.core.inputs import EventInput
from refold.engine.repartition import Repartitioner, ensure_repartition_topic
from refold.engine.runtime import ProjectionRunner, tune_collector
from refold.examples.bank.projections import Owners
from refold.kafka import clients
from refold.kafka.publisher import Publisher
from refold.kafka.registry import codec_for
from refold.kafka.topics import Topics, event_topic, internal_topics
from refold.store.rocksdb import RocksStore

ACCOUNTS, OWNERS = 2000, 250


def publish(config: Config, topic: str, events: int) -> None:
    rng = random.Random(7)
    out = []
    for i in range(ACCOUNTS):
        data = {"account_id": f"acc-{i}", "owner": f"owner-{rng.randrange(OWNERS)}"}
        out.append(("bank.AccountOpened", f"acc-{i}", data))
    for _ in range(events - ACCOUNTS):
        account = f"acc-{rng.randrange(ACCOUNTS)}"
        kind = "bank.MoneyDeposited" if rng.random() < 0.7 else "bank.MoneyWithdrawn"
        out.append((kind, account, {"account_id": account, "amount_cents": 100, "memo": ""}))
    codec = codec_for(config)
    with Publisher(config, codec) as publisher:
        publisher.publish_bulk(topic, [EventInput(t, k, d, codec.encode(t, d)) for t, k, d in out])


def fold_rate(config: Config, topic: str, events: int, repartitioned: bool, data: Path) -> float:
    cls = type("BenchOwners", (Owners,), {"name": f"owners-{uuid.uuid4().hex[:8]}"})
    cls.topics = (topic,)
    projection = cls()
    codec = codec_for(config)
    dlq = clients.producer(config)
    store = RocksStore.open(data / projection.name)
    runner = ProjectionRunner(
        config, codec, projection, dead_letters=dlq, store=store, repartitioned=repartitioned
    )
    threads = [threading.Thread(target=runner.run, daemon=True)]
    if repartitioned:
        ensure_repartition_topic(config, projection, 1)
        feeder = Repartitioner(
            config, codec, projection, 1, worker_id="bench", dlq_topic="bench.dlq", static=False
        )
        runner.feeder = feeder
        threads.append(threading.Thread(target=feeder.run, daemon=True))
    started = time.monotonic()
    for thread in threads:
        thread.start()
    while runner.folded_so_far() < events:
        if runner.stats.state == "failed":
            raise RuntimeError(runner.stats.error)
        time.sleep(0.01)
    seconds = time.monotonic() - started
    runner.stop()
    for thread in threads:
        thread.join(30)
    return events / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    tune_collector()
    config = Config.from_env()
    topic = f"bench-owners-{uuid.uuid4().hex[:8]}"
    Topics(config).ensure([event_topic(topic, partitions=6), *internal_topics(config)])
    publish(config, topic, args.events)
    with tempfile.TemporaryDirectory(prefix="bench-repartition-") as tmp:
        for _ in range(args.rounds):
            for repartitioned in (False, True):
                rate = fold_rate(config, topic, args.events, repartitioned, Path(tmp))
                how = "repartition topic (2 stages)" if repartitioned else "local (1 runner)"
                print(f"owners, {how}: {rate:,.0f} events/s over {args.events:,} events")


if __name__ == "__main__":
    main()
