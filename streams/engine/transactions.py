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
from pathlib import Path

from confluent_kafka import Producer
from refold.core.config import Config
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
    """The transactional producer of a `CommandProcessor`, with every call bounded in time."""

    config: Config
    name: str
    _producer: Producer
    _transactional_id: str
    _stuck: list[tuple[Producer, threading.Thread]]

    def _new_producer(self) -> Producer:
        return clients.producer(
            self.config,
            defaults={"linger.ms": 1},
            transactional_id=self._transactional_id,
            # librdkafka refuses a message timeout above the transaction timeout
            required={
                "transaction.timeout.ms": TXN_TIMEOUT_MS,
                "message.timeout.ms": TXN_TIMEOUT_MS,
            },
        )

    def _renew_producer(self) -> None:
        """A new producer with the same transactional.id: its init_transactions fences the old
        one (a call of the old one that returns later fails as fenced) and ends the transaction
        the old one left open. The old one is not flushed when a call of its is stuck."""
        log.warning("commands %s: new transactional producer %s", self.name, self._transactional_id)
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
