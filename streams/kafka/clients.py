"""Every Kafka client refold builds, from one Config.

Settings are layered by `Config.kafka` (later wins): the connection; refold's tuning defaults for
the client's role (a user may change them); the user's `REFOLD_KAFKA_*` settings; and what refold
requires for correctness, which no setting can change (a user value it overrides is logged once):

- producers: idempotent, `acks=all`, Kafka's Java partitioner (`murmur2_random`), so every
  record is written once and other clients agree on placement;
- consumers: a group of this deployment (`Config.group`), no auto-commit (the store holds the
  offsets), `read_committed` (aborted command transactions are never folded);
- transactional producers: a stable `transactional.id` of this deployment;
- share consumers (KIP-932): a share group of this deployment, explicit acknowledgement (each
  record is accepted, released or rejected by the caller, never implicitly on the next poll).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from confluent_kafka import Consumer, Producer, ShareConsumer
from confluent_kafka.admin import AdminClient
from refold.core.config import Config

#: What every producer needs for "nothing lost, nothing twice" and Java-compatible placement.
PRODUCER_REQUIRED: Mapping[str, object] = {
    "enable.idempotence": True,
    "acks": "all",
    # librdkafka's murmur2_random is the Java client's default partitioner for keyed records.
    "partitioner": "murmur2_random",
}

#: Throughput tuning of producers (a user may change these through REFOLD_KAFKA_*).
PRODUCER_TUNING: Mapping[str, object] = {
    "compression.type": "lz4",
    "linger.ms": 5,
    "batch.size": 1_000_000,
    "queue.buffering.max.messages": 500_000,
    "message.timeout.ms": 60_000,
}

#: Tuning of transactional producers. A transaction that starts right after the previous one's
#: commit is answered CONCURRENT_TRANSACTIONS while the coordinator still writes the commit's
#: markers; librdkafka then retries after `retry.backoff.ms`, 100 ms by default, so nearly every
#: back-to-back transaction waited 100 ms (the Java client retries that case after 20 ms). A
#: bare consume-produce-commit loop at 500 records/s here: 102 -> 7.6 ms median from begin to
#: the offsets sent, end-to-end p50 160 -> 26 ms. Backoffs still grow exponentially to
#: `retry.backoff.max.ms` (1 s) while a broker is down.
TRANSACTIONAL_TUNING: Mapping[str, object] = {"retry.backoff.ms": 5}

#: What every consumer needs: the store, not Kafka, decides where reading resumes.
CONSUMER_REQUIRED: Mapping[str, object] = {
    "enable.auto.commit": False,
    "isolation.level": "read_committed",
}


def producer(
    config: Config,
    *,
    defaults: Mapping[str, object] | None = None,
    required: Mapping[str, object] | None = None,
    transactional_id: str | None = None,
) -> Producer:
    """An idempotent producer; `transactional_id` (already prefixed) makes it transactional."""
    needed: dict[str, object] = {**PRODUCER_REQUIRED, **(required or {})}
    tuning = dict(PRODUCER_TUNING)
    if transactional_id is not None:
        needed["transactional.id"] = transactional_id
        tuning.update(TRANSACTIONAL_TUNING)
    tuning.update(defaults or {})
    return Producer(config.kafka(defaults=tuning, scoped=(), **needed))


def consumer(
    config: Config,
    group: str,
    *,
    defaults: Mapping[str, object] | None = None,
    required: Mapping[str, object] | None = None,
    poll_interval: bool = False,
) -> Consumer:
    """A consumer in `group` (build it with `config.group(...)`), offsets kept by the caller.
    `poll_interval`: the user's REFOLD_KAFKA_MAX_POLL_INTERVAL_MS applies (the command
    processor's consumer); every other keeps librdkafka's 300 s (`refold.core.config.SCOPED`).

    Consumers long-poll (librdkafka's `fetch.wait.max.ms`, 500 ms): a waiting fetch is answered
    as soon as a record lands (read_committed: as soon as its transaction commits), 0.1-0.8 ms
    median on the local broker whether the wait is 5 ms or 500. A short wait bought nothing
    but a fetch request every few ms per idle consumer: an idle bank worker sent 617 fetches/s,
    which held 16% of a core of the broker (5% with long polls)."""
    needed: dict[str, object] = {**CONSUMER_REQUIRED, "group.id": group, **(required or {})}
    scoped = ("max.poll.interval.ms",) if poll_interval else ()
    return Consumer(config.kafka(defaults=defaults, scoped=scoped, **needed))


#: What every share consumer needs: refold acknowledges each record itself.
SHARE_CONSUMER_REQUIRED: Mapping[str, object] = {"share.acknowledgement.mode": "explicit"}


def share_consumer(
    config: Config, group: str, *, defaults: Mapping[str, object] | None = None
) -> ShareConsumer:
    """A share consumer in `group` (`config.group(...)`). The group's own settings (offset
    reset, isolation, record lock) are group configs, set through the admin client."""
    needed: dict[str, object] = {**SHARE_CONSUMER_REQUIRED, "group.id": group}
    return ShareConsumer(config.kafka(defaults=defaults, scoped=(), **needed))


def admin(config: Config, **defaults: object) -> AdminClient:
    return AdminClient(cast("dict[str, Any]", config.kafka(defaults=defaults)))
