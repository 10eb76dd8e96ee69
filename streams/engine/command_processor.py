"""The command processor: the single writer of an aggregate's event partitions.

One processor per decider per worker. Its consumer is in group `refold.commands.<name>` on the
command topic; Kafka's group protocol gives each command partition p to one processor, which is
then the only writer of event partition p (the topics are co-partitioned).

On assignment of command partition p, before deciding anything:

1. fold event partition p (read_committed) from the store's offset to its end into the aggregate
   states, and read results partition p likewise into the set of decided command ids; both go to
   the RocksDB store under `$REFOLD_DATA_DIR/commands/<name>/` with their offsets in the same
   WriteBatch, so a restart resumes where the store stopped;
2. the command consumer starts at the group's committed offset, which only ever moves inside a
   committed transaction together with the events and results of the commands before it.

Then for each batch of commands (up to `batch_size`), in ONE Kafka transaction:

3. append a claim for each new command id (refold.engine.claims) in a thread of its own and,
   meanwhile, decide each command in order against the state left by the previous ones,
   assuming each new id is won by its command unless the claims index already knows another
   winner; before the commit (step 5) the claims' winners are checked, and a batch with an id
   won by another command is aborted and decided again (then knowing that winner). A command
   id that already has a result is skipped (the first result stands, nothing is emitted); a stale
   `expected_version` is rejected as a conflict; otherwise `decide` gives events or a rejection;
4. produce the events to event partition p; while they travel, `send_offsets_to_transaction`
   for the command offsets with the consumer's group metadata (KIP-447: a processor that lost
   the partition is fenced); flush the events (delivery reports give their offsets; an event
   record refused as too large aborts the batch, decided again with its command rejected:
   refold.engine.command_limits);
5. produce one result per command to results partition p (keyed by command id) and
   `commit_transaction`, which flushes them first (a failed delivery fails the commit);
6. only then fold the events into the in-memory states and write states, results and offsets to
   the store in one WriteBatch. On any abort the states are rebuilt from store + topics (step 1)
   and the command consumer is rewound to the committed offsets; a kill -9 anywhere leaves either
   the whole transaction in Kafka or none of it, and step 1 folds whatever is there.

The transactional.id is stable per worker data directory, so a restarted worker fences its dead
predecessor and aborts its open transaction at once. A batch decided and committed in longer than
the consumer's max.poll.interval.ms fails (the consumer was put out of its group); it is decided
again with its slow commands rejected, or in smaller batches (refold.engine.command_limits).
Each batch is decided in a thread of its own: a command whose decision does not return within
REFOLD_DECIDE_TIMEOUT_S is given up and rejected, the rest decided again without it
(refold.engine.command_watchdog).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from refold.core.commands import (
    CommandResult,
    Decider,
)
from refold.core.config import Config
from refold.core.errors import CommandError
from refold.core.serde import Codec, Event
from refold.engine.claims import ClaimRequest, ClaimsIndex
from refold.engine.command_catchup import AGG as _AGG
from refold.engine.command_catchup import RES as _RES
from refold.engine.command_catchup import CatchUp
from refold.engine.command_limits import PollBudget, Position, SizeLimits
from refold.engine.command_output import Abort, Box, Deliveries, Output
from refold.engine.command_timing import StepTimes
from refold.engine.command_watchdog import DecideHung, DecideThread
from refold.engine.decisions import (
    Aggregate,
    BatchDecision,
    CommandRecord,
    decide_batch,
    fold,
    record_of,
)
from refold.engine.transactions import BoundedTransactions, Stuck, stable_instance_id
from refold.kafka import clients
from refold.kafka.registry import SchemaRegistry
from refold.store.rocksdb import RocksStore

log = logging.getLogger(__name__)

MAX_CACHED = 100_000
MAX_REFUSALS = 10_000


def group_id(config: Config, name: str) -> str:
    """The consumer group of a decider's processors: `<app id>.commands.<name>`."""
    return config.group("commands", name)


def store_dir(config: Config, name: str) -> Path:
    return config.data_dir / "commands" / name


@dataclass(slots=True)
class ProcessorStats:
    state: str = "starting"  # starting | running | stopped | failed
    error: str | None = None
    accepted: int = 0
    rejected: int = 0
    duplicates: int = 0
    #: commands whose id was first claimed by another command (refold.engine.claims)
    conflicts: int = 0
    #: events read back that the decider could not fold or whose state could not be stored
    skipped_events: int = 0
    transactions: int = 0
    aborts: int = 0
    #: decisions given up for running past REFOLD_DECIDE_TIMEOUT_S (their commands rejected)
    decide_timeouts: int = 0
    #: threads still stuck in such a decision (Python cannot stop them; a restart does)
    stuck_decisions: int = 0
    #: failed steps tried again (catch-up, rewind, new producer, starting transactions)
    retries: int = 0
    assigned: tuple[int, ...] = ()


class CommandProcessor(CatchUp, Output, BoundedTransactions):
    """Decides the commands of one aggregate type for the command partitions it owns."""

    def __init__(
        self,
        config: Config,
        codec: Codec,
        decider: Decider,
        *,
        batch_size: int = 500,
        on_decided: Callable[[list[CommandResult]], None] | None = None,
    ) -> None:
        self.config = config
        self.codec = codec
        self.decider = decider
        self.name = decider.name
        self.stats = ProcessorStats()
        #: milliseconds per step (refold.engine.command_timing), for /metrics
        self.timing = StepTimes()
        self._on_decided = on_decided
        self._source = f"refold://{socket.gethostname()}/commands/{self.name}"
        self._limits = SizeLimits(config, decider.events_topic)
        self._budget = PollBudget(config, batch_size)
        #: how long each decision of the current batch took (for `PollBudget.overrun`)
        self._timed: list[tuple[CommandRecord, float]] = []
        #: commands to reject when their batch is decided again (refold.engine.command_limits)
        self._refusals: dict[Position, str] = {}
        # The thread that decides each batch, watched (refold.engine.command_watchdog); the
        # ones given up while stuck in a decision, until their call returns.
        self._deciding = self._new_decide_thread()
        self._abandoned: list[DecideThread] = []
        path = store_dir(config, self.name)
        instance = stable_instance_id(path)
        self.store = RocksStore.open(path)
        self._claims = ClaimsIndex.for_decider(
            config, decider, path.with_name(f"{path.name}.claims")
        )
        # One thread claims a batch's new ids while the batch is decided and its events sent.
        self._claimer = ThreadPoolExecutor(1, thread_name_prefix=f"claims-{self.name}")
        self._cache: dict[str, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._registry = SchemaRegistry(config, codec.catalog)
        group = group_id(config, self.name)
        self._consumer = self._new_consumer()
        self._reader = self._new_reader()
        self._transactional_id = f"{group}.{instance}"
        self._producer = self._new_producer()
        # Producers given up while a call of theirs was stuck, with the thread still in it: kept
        # referenced until that call returns, so no thread destroys a handle in use.
        self._stuck: list[tuple[Producer, threading.Thread]] = []

    def _new_consumer(self) -> Consumer:
        return clients.consumer(
            self.config,
            group_id(self.config, self.name),
            # no longer than the poll interval, which librdkafka requires (the broker's least
            # session timeout is 6 s)
            defaults={"session.timeout.ms": min(10_000, max(6_000, self._budget.interval_ms))},
            poll_interval=True,  # the batch budget (refold.engine.command_limits)
            # No static membership (group.instance.id): when the group coordinator's node is
            # lost, librdkafka 2.16 heartbeats the new coordinator with an empty member id, is
            # fenced (FENCED_INSTANCE_ID, fatal for the consumer). A restarted worker waits for
            # the session timeout instead.
            required={"auto.offset.reset": "earliest"},
        )

    def _renew_consumer(self, reason: str) -> None:
        """Replace a consumer that failed for good (a fatal error) by a new one in the group;
        the old one is closed in the background (cut off from its coordinator, closing can take
        long). Nothing is in flight between batches; the new one catches up on assignment."""
        log.warning("commands %s: a new consumer joins the group: %s", self.name, reason)
        old = self._consumer
        self._consumer = self._new_consumer()
        self._cache.clear()
        self.stats.assigned = ()
        threading.Thread(target=_close_quietly, args=(old,), daemon=True).start()
        self._subscribe()
        self._stop.wait(1.0)  # a fatal error that recurs at once does not spin

    def _subscribe(self) -> None:
        self._consumer.subscribe(
            [self.decider.command_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )

    @property
    def claims(self) -> ClaimsIndex:
        """The first claim of each command id of this decider (a saga fences a command with it)."""
        return self._claims

    def _new_reader(self) -> Consumer:
        """The consumer that reads event and results partitions to their ends (no group)."""
        group = f"{group_id(self.config, self.name)}.reader"
        return clients.consumer(self.config, group, defaults={"queued.min.messages": 100_000})

    def run(self) -> None:
        """Decide until `stop()`; any unexpected error ends the processor in state `failed`."""
        try:
            if self._limits.learn():  # batches no larger than the event topic takes
                self._producer = self._new_producer()
            # Fences a predecessor with the same transactional.id and aborts its open transaction.
            self._retrying("starting transactions", self._init_transactions)
            self._claims.start()
            # Writer schemas must be durable before any event that uses them; the registry
            # write is not part of a transaction, so it goes through a plain producer.
            plain = clients.producer(self.config)
            for type_name in self.codec.catalog.types:
                self._registry.ensure_registered(self.codec.writer_for(type_name), plain)
            self._subscribe()
            self.stats.state = "running"
            while not self._stop.is_set():
                if self._abandoned:
                    self._count_stuck()
                first = self._consumer.poll(0.1)
                if first is None:
                    continue
                more = self._budget.batch - 1
                msgs = [first, *(self._consumer.consume(more, 0) if more else ())]
                self._process(msgs, time.monotonic())
        except Exception as exc:
            log.exception("command processor %s failed", self.name)
            self.stats.state = "failed"
            self.stats.error = f"{type(exc).__name__}: {exc}"
        finally:
            self._close()

    def stop(self) -> None:
        self._stop.set()

    def _close(self) -> None:
        if self.stats.state != "failed":
            self.stats.state = "stopped"
        self._claimer.shutdown(wait=True)
        self._deciding.close()
        for close in (
            self._consumer.close,
            self._reader.close,
            self._claims.stop,
            self.store.close,
        ):
            try:
                close()
            except Exception:  # closing is best-effort; the store's WAL has every commit
                log.warning("command processor %s: close failed", self.name, exc_info=True)

    # -- assignment: fold the event and results partitions first ------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if consumer is not self._consumer:
            return  # a replaced consumer, closing
        owned = sorted(tp.partition for tp in partitions)
        self._retrying("the catch-up", lambda: self._catch_up(owned))
        consumer.assign(partitions)
        self.stats.assigned = tuple(owned)
        log.info("commands %s: deciding for partitions %s", self.name, owned)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if consumer is not self._consumer:
            return  # a replaced consumer, closing
        # Every batch is committed or aborted before the next poll, so nothing is in flight.
        self._cache.clear()
        consumer.unassign()
        self.stats.assigned = ()

    # -- deciding ---------------------------------------------------------------------------

    def _process(self, msgs: list[Message], polled: float) -> None:
        """Decide and commit one batch consumed at `polled` (time.monotonic)."""
        good = []
        for msg in msgs:
            error = msg.error()
            if error is None:
                good.append(msg)
            elif error.fatal() or error.code() == KafkaError._FATAL:
                self._renew_consumer(f"the consumer failed: {error}")
                return  # the batch's commands are read again by the new consumer
            elif error.code() != KafkaError._PARTITION_EOF:
                log.warning("commands %s: consume error %s", self.name, error)
        if not good:
            return
        self._timed = []
        try:
            self._transact(good)
        except Abort as exc:
            self._refuse(exc.refusals)
            self._overran(len(good), polled)
            self._recover(str(exc), fatal=exc.renew)
        except Stuck as exc:
            self._overran(len(good), polled)
            self._recover(str(exc), fatal=True)
        except DecideHung as exc:
            self._gave_up(exc)
        except KafkaException as exc:
            self._overran(len(good), polled)
            self._recover(str(exc.args[0]), fatal=exc.args[0].fatal())
        else:
            self._budget.committed(len(good), time.monotonic() - polled)

    def _overran(self, size: int, polled: float) -> None:
        """After a failed batch: if it took longer than max.poll.interval.ms (the consumer was
        kicked out of the group, which failed the batch), smaller batches or slow commands
        rejected next time (refold.engine.command_limits)."""
        elapsed = time.monotonic() - polled
        if not self._budget.overran(elapsed):
            return
        refusals = self._budget.overrun(size, self._timed)
        log.warning(
            "commands %s: a batch of %d took %.1f s, past max.poll.interval.ms (%d ms); "
            "next batches take at most %d",
            self.name,
            size,
            elapsed,
            self._budget.interval_ms,
            self._budget.batch,
        )
        self._refuse(refusals)

    def _new_decide_thread(self) -> DecideThread:
        return DecideThread(f"decide-{self.name}", self.config.decide_timeout_s)

    def _gave_up(self, hung: DecideHung) -> None:
        """A decision ran past REFOLD_DECIDE_TIMEOUT_S: leave its thread behind (it holds no
        client and no store), decide the batch again in a new one with that command rejected.
        No transaction is open yet (decisions come before it); claims already sent stand."""
        record = hung.record
        log.error(
            "commands %s: decide for command %r at %s[%d]@%d did not return within %g s; the "
            "command is rejected and its thread left behind (Python cannot stop it), stuck "
            "at:\n%s",
            self.name,
            record.command_id,
            *record.position,
            hung.timeout_s,
            hung.stack,
        )
        self.stats.decide_timeouts += 1
        self.stats.aborts += 1
        self._abandoned.append(self._deciding)
        self._deciding = self._new_decide_thread()
        self._count_stuck()
        self._refuse({record.position: hung.reason})
        self._retrying("the rewind", self._rewind)

    def _count_stuck(self) -> None:
        self._abandoned = [t for t in self._abandoned if t.is_alive()]
        self.stats.stuck_decisions = len(self._abandoned)

    @property
    def _label(self) -> str:
        return f"commands {self.name}"

    def _producer_settings(self) -> dict[str, object]:
        batch = self._limits.batch_bytes()
        return {} if batch is None else {"batch.size": batch}

    def _refuse(self, refusals: dict[Position, str]) -> None:
        """Remember commands to reject when their batch is decided again (bounded: a position
        the partition moved past, or that went to another processor, is never asked for)."""
        for at, reason in refusals.items():
            log.warning("commands %s: rejecting the command at %s: %s", self.name, at, reason)
        self._refusals.update(refusals)
        while len(self._refusals) > MAX_REFUSALS:
            del self._refusals[next(iter(self._refusals))]

    def _after_failed_try(self) -> None:
        # A reader whose metadata went stale in a failover may never recover it.
        self._reader.close()
        self._reader = self._new_reader()

    def _rewind(self) -> None:
        """States from store + topics; the command consumer back to the committed offsets."""
        assignment = self._consumer.assignment()
        self._catch_up(sorted(tp.partition for tp in assignment))
        for tp in self._consumer.committed(assignment, timeout=30):
            if tp.offset < 0:
                tp.offset = OFFSET_BEGINNING
            self._consumer.seek(tp)

    def _transact(self, msgs: list[Message]) -> None:
        """Steps 3-6 for one batch: claim the new ids, decide (pure), produce, commit, store."""
        timing, started = self.timing, time.time()
        for msg in msgs:
            kind, stamp = msg.timestamp()
            if kind:  # the command's produce time (CreateTime) -> its consume
                timing.add("queued", started * 1000 - stamp)
        records = [record_of(msg) for msg in msgs]
        decided_at = self._decided_at({r.command_id for r in records})
        new: dict[str, CommandRecord] = {}  # the first record of each new id, malformed or not
        for r in records:
            if r.command_id not in decided_at:
                new.setdefault(r.command_id, r)
        # Claims travel while the batch is decided and its events sent (see _check_claims);
        # the decision assumes each new id is won by its command unless the index knows better.
        claiming = self._claimer.submit(self._claim, new.values()) if new else None
        known = {}
        for cid in new:
            claim = self._claims.first(cid)
            if claim is not None:
                known[cid] = claim["fingerprint"]
        assumed = {cid: known.get(cid, r.fingerprint) for cid, r in new.items()}
        now_ms = int(time.time() * 1000)
        states = self._states_of({r.key for r in records})
        batch = self._deciding.run(
            lambda progress: decide_batch(
                self.decider,
                self._check_event,
                records,
                states,
                decided_at,
                claims=known,
                refused=self._refusals,
                horizon_ms=now_ms - self.decider.result_retention_ms,
                now_ms=now_ms,
                progress=progress,
            )
        )
        self._timed = batch.timed
        self.stats.duplicates += batch.duplicates
        self.stats.conflicts += batch.conflicts
        decided = time.time()
        timing.add("decide", (decided - started) * 1000, len(msgs))
        if not batch.decisions:
            self._check_claims(claiming, assumed)
            self._commit_offsets_only(msgs)
            return
        self._producer.begin_transaction()
        step = time.time()
        timing.add("txn_begin", (step - decided) * 1000)
        # The offsets go first, while the events are on their way (round trips overlap);
        # the results are flushed by the commit itself (steps 4-5 in one less round trip).
        deliveries = Deliveries()
        events = self._produce_events(batch.decisions, deliveries)
        self._send_offsets(msgs)
        step = self._step("txn_offsets", step)
        results = self._produce_results(batch.decisions, events, deliveries)
        step = self._step("txn_events", step)
        self._check_claims(claiming, assumed)
        step = self._step("claims_wait", step)
        self._bounded("commit_transaction", self._producer.commit_transaction)
        self._producer.poll(0)  # the results' delivery reports (the commit flushed them)
        for record in records if self._refusals else ():
            self._refusals.pop(record.position, None)
        if deliveries.failures:  # not reachable: a failed delivery fails the commit
            log.warning("commands %s: committed, yet: %s", self.name, deliveries.failures[0])
        step = self._step("txn_commit", step)
        timing.add("decided_to_committed", (step - decided) * 1000, len(batch.decisions))
        self._after_commit(batch, results)
        self._step("store", step)

    def _step(self, name: str, since: float) -> float:
        """Record the step that began at `since` as ending now; returns now."""
        now = time.time()
        self.timing.add(name, (now - since) * 1000)
        return now

    def _states_of(self, keys: set[str]) -> dict[str, Aggregate]:
        """The committed state of each key that has one: cached, else stored. A key without is
        left out: `decide_batch` starts it, and rejects its commands if `initial` fails."""
        missing = keys - self._cache.keys()
        for raw_key, wrapper in self.store.get_many([_AGG + k for k in missing]).items():
            self._cache[raw_key[len(_AGG) :]] = wrapper
        return {key: self._cache[key] for key in keys if key in self._cache}

    def _claim(self, records: Iterable[CommandRecord]) -> dict[str, dict[str, Any]]:
        """The first claim of each new command id (refold.engine.claims), a malformed command's
        too (else a well-formed command with its id could be decided on another partition, a
        second result for one id); an index that cannot answer aborts the batch, to be
        retried, rather than deciding without it."""
        try:
            return self._claims.claim(
                ClaimRequest(
                    r.command_id, r.fingerprint, r.key, r.command.type if r.command else ""
                )
                for r in records
            )
        except CommandError as exc:
            raise Abort(str(exc)) from exc

    def _check_claims(
        self, claiming: Future[dict[str, dict[str, Any]]] | None, assumed: dict[str, str]
    ) -> None:
        """Before anything of the batch commits: every new id was won by the fingerprint its
        decision assumed. If another command claimed an id first (rare: an id reused for
        another body), the batch is aborted and decided again, when the index knows that
        winner (`claim` returns once the index has read past these claims), so the retry
        decides it as the conflict it is."""
        if claiming is None:
            return
        winners = claiming.result()  # the claim's own timeout bounds it; Abort if it fails
        for cid, fingerprint in assumed.items():
            winner = winners.get(cid)
            if winner is not None and winner["fingerprint"] != fingerprint:
                raise Abort(f"command id {cid!r} was claimed first by another command")

    def _decided_at(self, ids: set[str]) -> dict[str, int]:
        """When each of these command ids was decided, for those that have a result."""
        known = self.store.get_many([_RES + i for i in ids])
        return {k[len(_RES) :]: int(v.get("decided_at_ms", 0)) for k, v in known.items()}

    def _send_offsets(self, msgs: list[Message]) -> None:
        nxt: dict[tuple[str, int], int] = {}
        for msg in msgs:
            tp = (msg.topic(), msg.partition())
            nxt[tp] = max(nxt.get(tp, 0), msg.offset() + 1)
        offsets = [TopicPartition(t, p, o) for (t, p), o in nxt.items()]
        metadata = self._consumer.consumer_group_metadata()
        send = self._producer.send_offsets_to_transaction
        self._bounded(
            "send_offsets_to_transaction", lambda timeout: send(offsets, metadata, timeout)
        )

    def _commit_offsets_only(self, msgs: list[Message]) -> None:
        """A batch of duplicates only: move the command offsets in an empty transaction."""
        self._producer.begin_transaction()
        self._send_offsets(msgs)
        self._bounded("commit_transaction", self._producer.commit_transaction)
        self.stats.transactions += 1

    def _after_commit(self, batch: BatchDecision, results: list[tuple[CommandResult, Box]]) -> None:
        """Step 6: fold the committed events (at their real positions) into the states the
        batch started from, and store states, results and offsets in one WriteBatch."""
        d = self.decider
        changed: dict[str, Any] = {}
        offsets: dict[tuple[str, int], int] = {}
        states = dict(batch.before)
        now_ms = int(time.time() * 1000)
        for decision, (result, box) in zip(batch.decisions, results, strict=True):
            changed[_RES + result.command_id] = result.to_json()
            where = box[0]
            if where is not None:
                _advance(offsets, (d.results_topic, where[0]), where[1])
            if decision.accepted:
                self.stats.accepted += 1
            else:
                self.stats.rejected += 1
            key = decision.record.key
            for (type_name, data), at in zip(decision.events, result.events, strict=True):
                partition, offset = at["partition"], at["offset"]
                event = Event(type_name, key, data, d.events_topic, partition, offset, now_ms)
                states[key] = fold(d, states[key], event)
                changed[_AGG + key] = states[key]
                _advance(offsets, (d.events_topic, partition), offset)
        self.store.commit(changed, offsets)
        self._cache.update(states)
        if len(self._cache) > MAX_CACHED:
            self._cache.clear()
        self.stats.transactions += 1
        if self._on_decided is not None:
            self._on_decided([r for r, _where in results])


def _close_quietly(consumer: Consumer) -> None:
    try:
        consumer.close()
    except Exception as exc:  # it is gone either way; the group expires it
        log.info("closing a replaced consumer: %s", exc)


def _advance(offsets: dict[tuple[str, int], int], tp: tuple[str, int], offset: int) -> None:
    offsets[tp] = max(offsets.get(tp, 0), offset + 1)
