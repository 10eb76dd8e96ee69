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

3. decide each command in order against the state left by the previous ones: a command id that
   already has a result is skipped (the first result stands, nothing is emitted); a stale
   `expected_version` is rejected as a conflict; otherwise `decide` gives events or a rejection;
4. produce the events to event partition p, flush (delivery reports give their offsets), produce
   one result per command to results partition p (keyed by command id), flush;
5. `send_offsets_to_transaction` for the command offsets with the consumer's group metadata
   (KIP-447: a processor that lost the partition is fenced) and `commit_transaction`;
6. only then fold the events into the in-memory states and write states, results and offsets to
   the store in one WriteBatch. On any abort the states are rebuilt from store + topics (step 1)
   and the command consumer is rewound to the committed offsets; a kill -9 anywhere leaves either
   the whole transaction in Kafka or none of it, and step 1 folds whatever is there.

The transactional.id is stable per worker data directory, so a restarted worker fences its dead
predecessor and aborts its open transaction at once.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from refold.core.commands import Command, CommandResult, Decider, EventSpec, Rejected
from refold.core.config import Config
from refold.core.errors import CommandError, DecodeError, EncodeError, InputError
from refold.core.serde import Codec, Event, envelope_headers
from refold.engine.claims import ClaimsIndex
from refold.engine.tail import event_from_message
from refold.kafka import clients
from refold.kafka.registry import SchemaRegistry
from refold.store.rocksdb import RocksStore

log = logging.getLogger(__name__)

_AGG = "a/"
_RES = "r/"
TXN_TIMEOUT_MS = 10_000  # how long a dead processor's open transaction can block readers
MAX_CACHED = 100_000


def group_id(config: Config, name: str) -> str:
    """The consumer group of a decider's processors: `<app id>.commands.<name>`."""
    return config.group("commands", name)


def store_dir(config: Config, name: str) -> Path:
    return config.data_dir / "commands" / name


def _instance_id(path: Path) -> str:
    """A stable id for this worker's data directory (transactional.id, static membership)."""
    marker = path.parent / f"{path.name}.instance"
    marker.parent.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(uuid.uuid4().hex[:12])
        tmp.replace(marker)
    return marker.read_text().strip()


@dataclass(slots=True)
class ProcessorStats:
    state: str = "starting"  # starting | running | stopped | failed
    error: str | None = None
    accepted: int = 0
    rejected: int = 0
    duplicates: int = 0
    #: commands whose id was first claimed by another command (refold.engine.claims)
    conflicts: int = 0
    transactions: int = 0
    aborts: int = 0
    assigned: tuple[int, ...] = ()


class _Abort(Exception):
    """The current transaction must be aborted (a delivery failed, an abortable Kafka error)."""


class CommandProcessor:
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
        self._batch_size = batch_size
        self._on_decided = on_decided
        self._source = f"refold://{socket.gethostname()}/commands/{self.name}"
        path = store_dir(config, self.name)
        instance = _instance_id(path)
        self.store = RocksStore.open(path)
        self._claims = ClaimsIndex(config, decider, path.with_name(f"{path.name}.claims"))
        self._cache: dict[str, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._registry = SchemaRegistry(config, codec.catalog)
        group = group_id(config, self.name)
        self._consumer = clients.consumer(
            config,
            group,
            defaults={"session.timeout.ms": 10_000},
            required={
                "group.instance.id": f"{self.name}-{instance}",
                "auto.offset.reset": "earliest",
            },
        )
        self._reader = clients.consumer(
            config, f"{group}.reader", defaults={"queued.min.messages": 100_000}
        )
        self._producer = clients.producer(
            config,
            defaults={"linger.ms": 1},
            transactional_id=f"{group}.{instance}",
            # librdkafka refuses a message timeout above the transaction timeout
            required={
                "transaction.timeout.ms": TXN_TIMEOUT_MS,
                "message.timeout.ms": TXN_TIMEOUT_MS,
            },
        )

    # -- lifecycle --------------------------------------------------------------------------

    def run(self) -> None:
        """Decide until `stop()`; any unexpected error ends the processor in state `failed`."""
        try:
            # Fences a predecessor with the same transactional.id and aborts its open transaction.
            self._producer.init_transactions(30)
            self._claims.start()
            # Writer schemas must be durable before any event that uses them; the registry
            # write is not part of a transaction, so it goes through a plain producer.
            plain = clients.producer(self.config)
            for type_name in self.codec.catalog.types:
                self._registry.ensure_registered(self.codec.writer_for(type_name), plain)
            self._consumer.subscribe(
                [self.decider.command_topic],
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_revoke,
            )
            self.stats.state = "running"
            while not self._stop.is_set():
                first = self._consumer.poll(0.1)
                if first is None:
                    continue
                msgs = [first, *self._consumer.consume(self._batch_size - 1, 0)]
                self._process(msgs)
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
        owned = sorted(tp.partition for tp in partitions)
        self._catch_up(owned)
        consumer.assign(partitions)
        self.stats.assigned = tuple(owned)
        log.info("commands %s: deciding for partitions %s", self.name, owned)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Every batch is committed or aborted before the next poll, so nothing is in flight.
        self._cache.clear()
        consumer.unassign()
        self.stats.assigned = ()

    def _catch_up(self, partitions: list[int]) -> None:
        """Fold event and results partitions from the store's offsets to their current ends."""
        self._cache.clear()
        if not partitions:
            return
        d = self.decider
        stored = self.store.offsets()
        starts = [
            TopicPartition(t, p, stored.get((t, p), OFFSET_BEGINNING))
            for p in partitions
            for t in (d.events_topic, d.results_topic)
        ]
        ends = {
            (tp.topic, tp.partition): self._reader.get_watermark_offsets(tp, 10)[1] for tp in starts
        }
        todo = {k for k, end in ends.items() if end > stored.get(k, 0)}
        if not todo:
            return
        self._reader.assign(starts)
        folded = 0
        try:
            while todo and not self._stop.is_set():
                msgs = self._reader.consume(5000, 0.2)
                folded += self._fold_records([m for m in msgs if m.error() is None])
                # Transaction markers are never delivered: trust the position for the last ones.
                for tp in self._reader.position([TopicPartition(*k) for k in todo]):
                    if tp.offset >= ends[(tp.topic, tp.partition)]:
                        todo.discard((tp.topic, tp.partition))
        finally:
            self._reader.unassign()
        log.info("commands %s: folded %d records of partitions %s", self.name, folded, partitions)

    def _fold_records(self, msgs: list[Message]) -> int:
        """Fold events / learn results read back from Kafka; store them with their offsets."""
        d = self.decider
        changed: dict[str, Any] = {}
        offsets: dict[tuple[str, int], int] = {}
        for msg in msgs:
            topic, offset = msg.topic(), msg.offset()
            offsets[(topic, msg.partition())] = offset + 1
            if topic == d.results_topic:
                try:
                    result = orjson.loads(msg.value() or b"")
                    changed[_RES + result["command_id"]] = result
                except (ValueError, KeyError, TypeError):
                    log.warning(
                        "commands %s: unreadable result at %s[%d]@%d",
                        self.name,
                        topic,
                        msg.partition(),
                        offset,
                    )
                continue
            try:
                event = event_from_message(self.codec, msg)
            except DecodeError as exc:  # not an event (foreign bytes): it cannot change state
                log.warning(
                    "commands %s: skipping %s[%d]@%d: %s",
                    self.name,
                    topic,
                    msg.partition(),
                    offset,
                    exc,
                )
                continue
            key = _AGG + event.key
            wrapper = changed.get(key) or self._load(event.key)
            changed[key] = self._apply(wrapper, event)
        if offsets:
            self.store.commit(changed, offsets)
        self._cache.clear()
        return len(msgs)

    def _load(self, key: str) -> dict[str, Any]:
        wrapper = self._cache.get(key)
        if wrapper is None:
            wrapper = self.store.get(_AGG + key)
            if wrapper is None:
                wrapper = {"version": 0, "state": self.decider.initial(key)}
        return wrapper

    def _apply(self, wrapper: dict[str, Any], event: Event) -> dict[str, Any]:
        try:
            state = self.decider.apply(wrapper["state"], event)
        except Exception as exc:  # deciding on a state we could not fold would break invariants
            raise CommandError(
                f"decider {self.name!r} cannot fold {event!r}: {type(exc).__name__}: {exc}"
            ) from exc
        return {"version": wrapper["version"] + 1, "state": state}

    # -- deciding ---------------------------------------------------------------------------

    def _process(self, msgs: list[Message]) -> None:
        good = []
        for msg in msgs:
            if msg.error() is None:
                good.append(msg)
            elif msg.error().code() != KafkaError._PARTITION_EOF:
                log.warning("commands %s: consume error %s", self.name, msg.error())
        if not good:
            return
        try:
            self._transact(good)
        except _Abort as exc:
            self._recover(str(exc))
        except KafkaException as exc:
            err = exc.args[0]
            if err.fatal():
                raise CommandError(f"commands {self.name}: fatal Kafka error: {err}") from exc
            self._recover(str(err))

    def _recover(self, reason: str) -> None:
        """Abort, rebuild states from store + topics, rewind commands to the committed offsets."""
        log.warning("commands %s: transaction aborted: %s", self.name, reason)
        self.stats.aborts += 1
        try:
            self._producer.abort_transaction(30)
        except KafkaException as exc:
            if exc.args[0].fatal():
                raise CommandError(f"commands {self.name}: cannot abort: {exc}") from exc
            log.info("commands %s: abort: %s", self.name, exc)
        assignment = self._consumer.assignment()
        self._catch_up(sorted(tp.partition for tp in assignment))
        for tp in self._consumer.committed(assignment, timeout=30):
            if tp.offset < 0:
                tp.offset = OFFSET_BEGINNING
            self._consumer.seek(tp)

    def _transact(self, msgs: list[Message]) -> None:
        d = self.decider
        commands: list[tuple[Message, Command | None, str]] = []
        for msg in msgs:
            try:
                commands.append((msg, Command.decode(msg.value(), msg.headers()), ""))
            except InputError as exc:
                commands.append((msg, None, f"malformed command: {exc}"))
        ids = {_command_id(m, c) for m, c, _ in commands}
        known = self.store.get_many([_RES + i for i in ids])
        winners = self._claim(
            c for _m, c, p in commands if c and not p and _RES + c.command_id not in known
        )
        keys = {c.key for _, c, _ in commands if c is not None} - self._cache.keys()
        for raw_key, wrapper in self.store.get_many([_AGG + k for k in keys]).items():
            self._cache[raw_key[len(_AGG) :]] = wrapper
        horizon = time.time() * 1000 - d.result_retention_ms
        before: dict[str, dict[str, Any]] = {}  # state of each touched key before this batch
        tentative: dict[str, dict[str, Any]] = {}
        decisions: list[tuple[Message, Command | None, str, dict[str, Any]]] = []
        emitted: list[tuple[int, str, str, dict[str, Any]]] = []  # (decision, key, type, data)
        seen: set[str] = set()
        for msg, command, problem in commands:
            cid = _command_id(msg, command)
            first = known.get(_RES + cid)
            if cid in seen or (first is not None and first.get("decided_at_ms", 0) >= horizon):
                self.stats.duplicates += 1
                continue
            seen.add(cid)
            winner = winners.get(cid)
            if command is not None and winner and winner["fingerprint"] != command.fingerprint:
                self.stats.conflicts += 1  # the id means another command: never executed here
                continue
            key = command.key if command is not None else (msg.key() or b"").decode()
            if key not in tentative:
                before[key] = self._load(key)
                tentative[key] = _copy(before[key])  # decisions must not touch committed states
            wrapper = tentative[key]
            outcome: dict[str, Any] = {"version": wrapper["version"]}
            if command is None or problem:
                outcome["reason"] = problem or "malformed command"
            elif msg.key() != command.key.encode():  # its events would land in another partition
                outcome["reason"] = "the record key differs from the command's key"
            elif (
                command.expected_version is not None
                and command.expected_version != wrapper["version"]
            ):
                outcome["reason"] = (
                    f"conflict: expected version {command.expected_version}, "
                    f"the aggregate is at version {wrapper['version']}"
                )
                outcome["current_version"] = wrapper["version"]
            else:
                try:
                    specs = self._decide(command, wrapper)
                except Rejected as rej:
                    outcome["reason"] = rej.reason
                    if rej.current_version is not None:
                        outcome["current_version"] = rej.current_version
                else:
                    for type_name, data in specs:
                        emitted.append((len(decisions), key, type_name, data))
                        wrapper = self._apply(wrapper, _pending_event(type_name, key, data, msg))
                    tentative[key] = wrapper
                    outcome["version"] = wrapper["version"]
            decisions.append((msg, command, cid, outcome))
        if not decisions:
            self._commit_offsets_only(msgs)
            return
        self._producer.begin_transaction()
        results = self._produce(decisions, emitted)
        self._send_offsets(msgs)
        self._producer.commit_transaction(30)
        self._after_commit(results, before, emitted)

    def _claim(self, commands: Iterable[Command]) -> dict[str, dict[str, Any]]:
        """The first claim of each new command id (refold.engine.claims); an index that cannot
        answer aborts the batch, to be retried, rather than deciding without it."""
        try:
            return self._claims.claim(commands)
        except CommandError as exc:
            raise _Abort(str(exc)) from exc

    def _decide(self, command: Command, wrapper: dict[str, Any]) -> list[EventSpec]:
        """The decider's events, each checked against its schema; Rejected on any problem."""
        d = self.decider
        if command.aggregate and command.aggregate != d.name:
            raise Rejected(f"command is for aggregate {command.aggregate!r}, not {d.name!r}")
        try:
            d.check_command(command.type, command.data)
        except InputError as exc:
            raise Rejected(str(exc)) from exc
        state = _copy(wrapper["state"])  # decide must not touch the state it is shown
        try:
            specs = d.decide(command, state)
            for type_name, data in specs:
                self.codec.check(type_name, data)
        except Rejected:
            raise
        except EncodeError as exc:
            raise Rejected(f"decider {d.name!r} produced an invalid event: {exc}") from exc
        except Exception as exc:  # a bug in user code rejects this command, not the worker
            log.exception("commands %s: decide failed for %s", self.name, command.command_id)
            raise Rejected(f"decider error: {type(exc).__name__}: {exc}") from exc
        return specs

    def _produce(
        self,
        decisions: list[tuple[Message, Command | None, str, dict[str, Any]]],
        emitted: list[tuple[int, str, str, dict[str, Any]]],
    ) -> list[tuple[CommandResult, Message, tuple[int, int] | None]]:
        d = self.decider
        produce = self._producer.produce
        failures: list[str] = []
        event_pos: list[tuple[int, int] | None] = [None] * len(emitted)

        def delivered(box: list[Any], index: int) -> Callable[[KafkaError | None, Message], None]:
            def on_delivery(err: KafkaError | None, msg: Message) -> None:
                if err is not None:
                    failures.append(str(err))
                else:
                    box[index] = (msg.partition(), msg.offset())

            return on_delivery

        per_decision: dict[int, list[int]] = {}
        for i, (n, key, type_name, data) in enumerate(emitted):
            msg = decisions[n][0]
            cid = decisions[n][2]
            produce(
                d.events_topic,
                self.codec.encode(type_name, data),
                key.encode(),
                partition=msg.partition(),
                headers=envelope_headers(
                    type_name, source=self._source, correlation_id=cid, causation_id=cid
                ),
                on_delivery=delivered(event_pos, i),
            )
            per_decision.setdefault(n, []).append(i)
        self._flush(failures)
        now_ms = int(time.time() * 1000)
        results: list[tuple[CommandResult, Message, tuple[int, int] | None]] = []
        result_pos: list[tuple[int, int] | None] = [None] * len(decisions)
        for n, (msg, command, cid, outcome) in enumerate(decisions):
            events = tuple(
                {
                    "type": emitted[i][2],
                    "topic": d.events_topic,
                    "partition": _delivered(event_pos[i])[0],
                    "offset": _delivered(event_pos[i])[1],
                }
                for i in per_decision.get(n, ())
            )
            result = CommandResult(
                command_id=cid,
                status="rejected" if "reason" in outcome else "accepted",
                aggregate=d.name,
                key=command.key if command else (msg.key() or b"").decode("utf-8", "replace"),
                type=command.type if command else "",
                events=events,
                reason=outcome.get("reason"),
                current_version=outcome.get("current_version"),
                version=outcome["version"],
                decided_at_ms=now_ms,
                fingerprint=command.fingerprint if command else "",
                command_position={
                    "topic": msg.topic(),
                    "partition": msg.partition(),
                    "offset": msg.offset(),
                },
            )
            produce(
                d.results_topic,
                result.encode(),
                cid.encode(),
                partition=msg.partition(),
                on_delivery=delivered(result_pos, n),
            )
            results.append((result, msg, None))
        self._flush(failures)
        return [(r, m, result_pos[n]) for n, (r, m, _) in enumerate(results)]

    def _flush(self, failures: list[str]) -> None:
        remaining = self._producer.flush(30)
        if failures or remaining:
            raise _Abort(failures[0] if failures else f"{remaining} records not acknowledged")

    def _send_offsets(self, msgs: list[Message]) -> None:
        nxt: dict[tuple[str, int], int] = {}
        for msg in msgs:
            tp = (msg.topic(), msg.partition())
            nxt[tp] = max(nxt.get(tp, 0), msg.offset() + 1)
        self._producer.send_offsets_to_transaction(
            [TopicPartition(t, p, o) for (t, p), o in nxt.items()],
            self._consumer.consumer_group_metadata(),
            30,
        )

    def _commit_offsets_only(self, msgs: list[Message]) -> None:
        """A batch of duplicates only: move the command offsets in an empty transaction."""
        self._producer.begin_transaction()
        self._send_offsets(msgs)
        self._producer.commit_transaction(30)
        self.stats.transactions += 1

    def _after_commit(
        self,
        results: list[tuple[CommandResult, Message, tuple[int, int] | None]],
        before: dict[str, dict[str, Any]],
        emitted: list[tuple[int, str, str, dict[str, Any]]],
    ) -> None:
        """Fold the committed events (with their real positions) and store everything at once."""
        d = self.decider
        changed: dict[str, Any] = {}
        offsets: dict[tuple[str, int], int] = {}
        states = dict(before)
        by_command: dict[str, list[dict[str, Any]]] = {}
        for result, _msg, pos in results:
            changed[_RES + result.command_id] = result.to_json()
            by_command[result.command_id] = list(result.events)
            if pos is not None:
                tp = (d.results_topic, pos[0])
                offsets[tp] = max(offsets.get(tp, 0), pos[1] + 1)
            if result.status == "accepted":
                self.stats.accepted += 1
            else:
                self.stats.rejected += 1
        event_data = iter(emitted)
        for result, _msg, _pos in results:
            for position in by_command[result.command_id]:
                _n, key, type_name, data = next(event_data)
                event = Event(
                    type_name,
                    key,
                    data,
                    d.events_topic,
                    position["partition"],
                    position["offset"],
                    int(time.time() * 1000),
                )
                states[key] = self._apply(states[key], event)
                changed[_AGG + key] = states[key]
                tp = (d.events_topic, position["partition"])
                offsets[tp] = max(offsets.get(tp, 0), position["offset"] + 1)
        self.store.commit(changed, offsets)
        for key in before:
            self._cache[key] = states[key]
        if len(self._cache) > MAX_CACHED:
            self._cache.clear()
        self.stats.transactions += 1
        if self._on_decided is not None:
            self._on_decided([r for r, _m, _p in results])


def _copy(value: Any) -> Any:
    return orjson.loads(orjson.dumps(value))


def _command_id(msg: Message, command: Command | None) -> str:
    if command is not None:
        return command.command_id
    return f"{msg.topic()}-{msg.partition()}-{msg.offset()}"


def _pending_event(type_name: str, key: str, data: dict[str, Any], msg: Message) -> Event:
    """An event not yet appended (position unknown) for deciding later commands of the batch."""
    return Event(type_name, key, data, "", msg.partition(), -1, int(time.time() * 1000))


def _delivered(position: tuple[int, int] | None) -> tuple[int, int]:
    """A delivery report's (partition, offset); the flush before this guarantees one."""
    if position is None:
        raise _Abort("an event was flushed without a delivery report")
    return position
