"""Bounded transactional calls of a command processor's producer.

librdkafka 2.16 does not always honour the timeouts of init_transactions, send_offsets,
commit and abort (see `TXN_CALL_TIMEOUT_S`), so each such call runs in a thread of its own and is
given up after its timeout: its producer is then recorded as stuck (`Stuck` is raised) and
replaced by a new one with the same transactional.id, whose init_transactions fences the old
one. The transactional.id is stable per worker data directory (`stable_instance_id`), so a
restarted worker fences its dead predecessor at once.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from confluent_kafka import KafkaError, KafkaException, Producer
from refold.core.config import Config
from refold.core.errors import LogReadError, TopicError
from refold.kafka import clients

log = logging.getLogger(__name__)

#: How long a transaction may stay open, and a record may wait for its acknowledgement. It must
#: outlast a leader election: losing the KRaft controller of a 3-node cluster took 13.5 s here
#: until its partitions had new leaders (10 s, the former value, expired mid-failover). It is also
#: how long a processor that died for good (its data directory never restarted) can hold back
#: read_committed readers of its partitions; a restart with the same directory aborts at once.
TXN_TIMEOUT_MS = 30_000
#: How long a transactional call (init, send offsets, commit, abort) may block before its producer
#: is given up. librdkafka 2.16 does not always honour these calls' own timeouts: when the group
#: coordinator's node is lost, send_offsets_to_transaction can wait for a coordinator that its
#: cache still names, forever (confluentinc/librdkafka#5456, #5511; seen in
#: tests/integration/test_broker_faults.py). Each call gets its own timeout below this.
TXN_CALL_TIMEOUT_S = 30.0
#: A step failing for long (`_retrying`) logs the first failure of each kind, then every this
#: many failures; every failure is counted.
RETRY_LOG_EVERY = 20


@dataclass(slots=True)
class Backoff:
    """The pauses between the tries of a step that keeps failing, and which failures to log.

    Pauses: `first` s, doubling, at most `cap` s; back to `first` after a success. Logged: the
    first failure of each kind since the last success (a KafkaError's code name, not its text:
    librdkafka's text names a sequence number that changes every try; and one failure can
    surface as two codes in turn, the produce error or the transaction state it left), and
    every `log_every`-th failure; the others are counted only."""

    first: float = 0.5
    cap: float = 30.0
    log_every: int = RETRY_LOG_EVERY
    failures: int = 0
    logged: set[str] = field(default_factory=set)

    def failed(self, kind: str) -> tuple[float, bool]:
        """One more failure, of `kind`: (the pause before the next try, whether to log it)."""
        self.failures += 1
        pause = min(self.first * 2.0 ** min(self.failures - 1, 64), self.cap)
        log_it = kind not in self.logged or self.failures % self.log_every == 0
        self.logged.add(kind)
        return pause, log_it

    def succeeded(self) -> int:
        """Back to the first pause; the number of failures in a row before this success."""
        failures, self.failures = self.failures, 0
        self.logged.clear()
        return failures


def failure_kind(exc: BaseException) -> str:
    """What `Backoff` compares to tell a new failure from a repeat: a KafkaError's code name,
    else the exception's type."""
    error = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
    if isinstance(error, KafkaError):
        return str(error.name())
    return type(exc).__name__


def stable_instance_id(path: Path) -> str:
    """A stable id for this worker's data directory (its transactional.id)."""
    marker = path.parent / f"{path.name}.instance"
    marker.parent.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(uuid.uuid4().hex[:12])
        tmp.replace(marker)
    return marker.read_text().strip()


class Stuck(Exception):
    """A transactional call did not return in time: its producer is given up, not aborted."""


class BoundedTransactions:
    """A transactional producer with every call bounded in time, and the recovery of a failed
    transaction: the base of the command processor and the repartitioner. A subclass has
    `stats` (with `aborts` and `retries` counters), a `_stop` event and its `_rewind`."""

    #: The longest pause between two tries of a failing step (`_retrying`): the command
    #: processor tries again within 5 s, so its commands are decided soon after a failover.
    RETRY_CAP_S: ClassVar[float] = 5.0

    config: Config
    name: str
    stats: Any
    _stop: threading.Event
    _producer: Producer
    _transactional_id: str
    _stuck: list[tuple[Producer, threading.Thread]]

    @property
    def _label(self) -> str:
        """How the logs name this stage."""
        return self.name

    def _rewind(self) -> None:
        """Back to the last committed transaction: whatever the aborted one read is read again."""
        raise NotImplementedError

    def _after_failed_try(self) -> None:
        """Called after each failed try of `_retrying`, before its pause."""

    def _recover(self, reason: str, *, fatal: bool = False, quiet: bool = False) -> None:
        """Abort, then `_rewind`. A producer that cannot abort (a fatal error, or one the abort
        itself raises: after a broker loss the coordinator may already have ended the
        transaction), or whose call is stuck (`_bounded`), is replaced by a new one with the
        same transactional.id, whose init_transactions fences the old one and ends whatever it
        left open: committed if its commit had reached the coordinator, else aborted; the
        rewind reads which. Both are retried until they succeed (a coordinator or leader may
        still be moving), so a broker loss never stops the stage. `quiet`: counted, not logged
        (the caller logs the failures of a transaction that keeps failing now and then)."""
        if not quiet:
            log.warning("%s: transaction aborted: %s", self._label, reason)
        self.stats.aborts += 1
        if not fatal:
            try:
                self._bounded("abort_transaction", self._producer.abort_transaction)
            except (KafkaException, Stuck) as exc:
                log.warning("%s: abort failed: %s", self._label, exc)
                fatal = True
        if fatal:
            self._retrying("a new producer", self._renew_producer)
        self._retrying("the rewind", self._rewind)

    def _retrying(self, what: str, step: Callable[[], None]) -> None:
        """Run `step` until it succeeds or the stage stops: while a broker is moving leaders or
        coordinators it fails for a while (tried again after 0.5 s, backing off to
        `RETRY_CAP_S`). Every retry is counted (`stats.retries`); the log has the first
        failure of each kind, then one line per `RETRY_LOG_EVERY` failures, not one per retry
        (`Backoff`)."""
        backoff = Backoff(first=0.5, cap=self.RETRY_CAP_S)
        while not self._stop.is_set():
            try:
                step()
                failures = backoff.succeeded()
                if failures:
                    log.info("%s: %s succeeded after %d retries", self._label, what, failures)
                return
            except (KafkaException, LogReadError, TopicError, Stuck) as exc:
                self.stats.retries += 1
                pause, log_it = backoff.failed(failure_kind(exc))
                if log_it:
                    log.warning(
                        "%s: %s failed %d time(s), trying again in %.1fs: %s",
                        self._label,
                        what,
                        backoff.failures,
                        pause,
                        exc,
                    )
                self._after_failed_try()
                self._stop.wait(pause)

    def _producer_settings(self) -> dict[str, object]:
        """Settings a stage requires of its producer beyond these (see `_new_producer`)."""
        return {}

    def _new_producer(self) -> Producer:
        return clients.producer(
            self.config,
            defaults={"linger.ms": 1},
            transactional_id=self._transactional_id,
            # librdkafka refuses a message timeout above the transaction timeout
            required={
                "transaction.timeout.ms": TXN_TIMEOUT_MS,
                "message.timeout.ms": TXN_TIMEOUT_MS,
                **self._producer_settings(),
            },
        )

    def _renew_producer(self) -> None:
        """A new producer with the same transactional.id: its init_transactions fences the old
        one (a call of the old one that returns later fails as fenced) and ends the transaction
        the old one left open. The old one is not flushed when a call of its is stuck."""
        log.warning("%s: new transactional producer %s", self._label, self._transactional_id)
        if not self._is_stuck():
            self._producer.flush(0)
        self._producer = self._new_producer()
        self._init_transactions()

    def _init_transactions(self) -> None:
        """init_transactions, on a new producer if a call of the current one is stuck."""
        self._stuck = [(p, t) for p, t in self._stuck if t.is_alive()]
        if self._is_stuck():
            self._producer = self._new_producer()
        self._bounded("init_transactions", self._producer.init_transactions)

    def _is_stuck(self) -> bool:
        return any(producer is self._producer for producer, _thread in self._stuck)

    def _bounded(self, what: str, call: Callable[[float], object]) -> None:
        """`call(timeout)` on the current producer, given up after TXN_CALL_TIMEOUT_S plus a
        grace: then the producer is recorded as stuck and `Stuck` raised (see the constant).
        The call runs in a thread of its own; its exceptions are re-raised here."""
        failure: list[BaseException] = []

        def run() -> None:
            try:
                call(TXN_CALL_TIMEOUT_S)
            except BaseException as exc:  # re-raised in the caller's thread below
                failure.append(exc)

        thread = threading.Thread(target=run, name=f"txn-{self.name}", daemon=True)
        thread.start()
        thread.join(TXN_CALL_TIMEOUT_S + 5)
        if thread.is_alive():
            self._stuck.append((self._producer, thread))
            raise Stuck(f"{what} did not return in {TXN_CALL_TIMEOUT_S + 5:.0f}s")
        if failure:
            raise failure[0]
