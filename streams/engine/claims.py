"""Ids that mean one thing: the first claim of an id wins, across every partition.

Used for command ids (below) and for task ids (`refold.engine.task_queues`: a task id is
claimed by the intake node that received it before the task is appended, so two nodes that
receive one id append it once, and a repeat with another body is a conflict).

A command id is unique across its aggregate type (its decider), not per partition. The same id
sent for two accounts lands in two command partitions, decided by two processors (maybe in two
workers) that know nothing of each other, so per-partition idempotency alone would execute it
twice. Kafka has no conditional append, but each partition is one order that every reader agrees
on. So before deciding a batch a processor appends a claim `(command id, fingerprint, key, type)`
for each new command to the claims topic (`<commands>.ids`, keyed by id) and waits until its
index of that topic has read past its own claims. The FIRST claim of an id in the log wins: a
command with the winner's fingerprint is decided; any other is a conflict, executed never and
answered with no result of its own (its sender finds the winner's result, whose fingerprint
differs, and answers 409 with the winner's key and type).

Crash safety: claims are appended outside the decision transaction and are idempotent by
fingerprint, so a processor killed after claiming claims the same command again after restart
and still wins. The index keeps the first claim of each id and its read offsets in one RocksDB
WriteBatch, so a restart resumes where it stopped. The claims topic is never compacted
(compaction keeps the last record of a key, not the first); its retention is the idempotency
window, and a claim older than the window no longer counts. The index forgets it too: it keeps
claims in two generations of a window each (refold.store.generations), so its disk holds at
most two windows of ids, not every id since the worker began.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, KafkaError, Message, TopicPartition
from refold.core.commands import Command, Decider
from refold.core.config import Config
from refold.core.errors import CommandError
from refold.kafka import clients
from refold.kafka.topics import Topics
from refold.store.generations import Generations

log = logging.getLogger(__name__)

Claim = dict[str, Any]


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """What one claim says: the id, the fingerprint of the body it names, its key and type,
    and who claims it (`claimer`: an intake node's identity, for ids where the same body sent
    twice must still be appended once)."""

    id: str
    fingerprint: str
    key: str
    type: str
    claimer: str = ""

    @classmethod
    def of(cls, command: Command) -> ClaimRequest:
        return cls(command.command_id, command.fingerprint, command.key, command.type)


class ClaimsIndex:
    """The first claim of every id on a claims topic, and `claim()`: a decider's command ids
    (`for_decider`), a task queue's task ids (refold.engine.task_queues)."""

    def __init__(self, config: Config, topic: str, group: str, window_ms: int, path: Path) -> None:
        self.topic = topic
        self._window_ms = window_ms
        self._config = config
        self._store = Generations(path, window_ms)  # claims older than the window go
        # A long poll (librdkafka's fetch.wait.max.ms, 500 ms): the broker answers a waiting
        # fetch as soon as a claim lands, so a claim is read back as fast as with a 5 ms poll
        # (0.13-0.16 ms median, measured), without a fetch every 5 ms while nothing happens.
        self._consumer = clients.consumer(config, group, defaults={"fetch.error.backoff.ms": 50})
        self._producer = clients.producer(config, defaults={"linger.ms": 0})
        self._positions: dict[int, int] = {}
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None

    @classmethod
    def for_decider(cls, config: Config, decider: Decider, path: Path) -> ClaimsIndex:
        group = config.group("commands", decider.name, "claims")
        return cls(config, decider.claims_topic, group, decider.result_retention_ms, path)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> ClaimsIndex:
        partitions = Topics(self._config).partitions(self.topic)
        stored = self._store.offsets()
        starts = [
            TopicPartition(self.topic, p, stored.get((self.topic, p), OFFSET_BEGINNING))
            for p in range(partitions)
        ]
        self._positions = {tp.partition: max(tp.offset, 0) for tp in starts}
        self._consumer.assign(starts)
        self._thread = threading.Thread(target=self._run, name=f"claims-{self.topic}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._producer.flush(10)
        for close in (self._consumer.close, self._store.close):
            try:
                close()
            except Exception:  # closing is best-effort; the store's WAL has every commit
                log.warning("claims %s: close failed", self.topic, exc_info=True)

    # -- claiming ---------------------------------------------------------------------------

    def claim(self, requests: Iterable[ClaimRequest], timeout: float = 30.0) -> dict[str, Claim]:
        """Append a claim for each request, wait until the index has read them, and return the
        winning (first) claim of each id. CommandError if that takes over `timeout`."""
        wanted = {r.id: r for r in requests}
        if not wanted:
            return {}
        landed: dict[int, int] = {}
        failures: list[str] = []
        reported = threading.Semaphore(0)

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                failures.append(str(err))
            else:
                p = msg.partition()
                landed[p] = max(landed.get(p, -1), msg.offset())
            reported.release()

        now_ms = int(time.time() * 1000)
        for request in wanted.values():
            record = {
                "command_id": request.id,  # the id's field keeps its first name (claims in topics)
                "fingerprint": request.fingerprint,
                "key": request.key,
                "type": request.type,
                "claimed_at_ms": now_ms,
            }
            if request.claimer:
                record["claimer"] = request.claimer
            self._producer.produce(
                self.topic, orjson.dumps(record), request.id.encode(), on_delivery=on_delivery
            )
        # Each caller waits for its own delivery reports (served by whichever caller polls),
        # not for a flush of every claim in flight: concurrent claims share round trips.
        deadline = time.monotonic() + timeout
        for _ in wanted:
            while not reported.acquire(blocking=False):
                if time.monotonic() > deadline:
                    raise CommandError(f"claims {self.topic}: not acknowledged in time")
                self._producer.poll(0.005)
        if failures:
            raise CommandError(f"claims {self.topic}: {failures[0]}")
        with self._changed:
            while any(self._positions.get(p, 0) <= o for p, o in landed.items()):
                left = deadline - time.monotonic()
                if left <= 0 or self.error is not None:
                    raise CommandError(
                        f"claims {self.topic}: the index did not read its own claims "
                        f"({self.error or 'timed out'})"
                    )
                self._changed.wait(min(left, 0.5))
        return {cid: claim for cid in wanted if (claim := self.first(cid)) is not None}

    def first(self, command_id: str) -> Claim | None:
        """The winning claim of `command_id` within the idempotency window, if any."""
        claim = self._store.get(command_id)
        if claim is None or self._expired(claim):
            return None
        return dict(claim)

    def _expired(self, claim: Claim) -> bool:
        return int(claim.get("claimed_at_ms") or 0) < time.time() * 1000 - self._window_ms

    # -- the index --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                # The first record at once, then what else is there: consume(n, timeout) alone
                # waits out its whole timeout unless n records come (50 ms on every claim).
                first = self._consumer.poll(0.05)
                if first is None:
                    continue
                msgs = [first, *self._consumer.consume(999, 0)]
                good = [m for m in msgs if m.error() is None]
                for m in msgs:
                    if m.error() is not None and m.error().code() != KafkaError._PARTITION_EOF:
                        log.warning("claims %s: %s", self.topic, m.error())
                if good:
                    self._index(good)
        except Exception as exc:  # claim() callers see the reason instead of waiting forever
            log.exception("claims index %s failed", self.topic)
            self.error = f"{type(exc).__name__}: {exc}"
            with self._changed:
                self._changed.notify_all()

    def _index(self, msgs: list[Message]) -> None:
        """Keep the first claim of each new id; store them with the read offsets at once."""
        first: dict[str, Any] = {}
        offsets: dict[tuple[str, int], int] = {}
        for msg in msgs:
            offsets[(self.topic, msg.partition())] = msg.offset() + 1
            try:
                claim = orjson.loads(msg.value() or b"")
                cid = str(claim["command_id"])
            except (ValueError, KeyError, TypeError):
                log.warning("claims %s: unreadable claim at [%d]@%d", *_where(msg, self.topic))
                continue
            if cid in first:
                continue
            if self.first(cid) is None:  # none yet, or the one there expired
                first[cid] = claim
        self._store.commit(first, offsets)
        with self._changed:
            for (_t, p), nxt in offsets.items():
                self._positions[p] = max(self._positions.get(p, 0), nxt)
            self._changed.notify_all()


def _where(msg: Message, topic: str) -> tuple[str, int, int]:
    return topic, msg.partition(), msg.offset()
