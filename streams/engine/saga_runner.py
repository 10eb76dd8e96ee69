"""The sagas a `refold worker` runs: per saga, its state projection (a runner like any other,
named `sagas.<name>`, folding `<name>.saga` with atomic offsets) and a `SagaRunner` that drives
the sagas of the partitions this worker owns.

The runner sweeps the state store every `interval_s` (and at once when a result it waits for
arrives) and, for each saga not ended, asks the pure decision
(`refold.core.saga_decision.advance`) what to do with the state and the command results known
now. Its steps, in order:

1. the partition's state must be caught up: when the worker gets a saga partition, the runner
   notes the partition's end offset and does nothing for its sagas until the store has folded up
   to it. So a store rebuilt from offset zero (a replay) sends nothing while it rebuilds, and a
   restarted worker decides from the state the log holds, not from a stale one;
2. the events the decision names (`step_sent`, `step_accepted`, ...) are appended to the saga
   topic and acknowledged (acks=all) — a dead letter first when the saga ends `failed`; a
   decision that sends nothing is folded into a copy of the state and the next one made at once
   (a step's result and the next step's send go out in one sweep);
3. only then the commands are sent, with their deterministic ids, through `CommandClient`; the
   commands a saga waits on are re-sent once by a runner that did not send them itself (after a
   restart or a rebalance), which the command processor answers with the first result;
4. until the fold shows what it appended, the runner leaves that saga alone (so it never
   appends the same step twice in a row).

A step that timed out is fenced before `step_timed_out` is recorded: the runner claims its
command id for nothing through the processor's claims index (`refold.engine.claims`); the first
claim of an id wins everywhere, so a fenced command is never decided, and when the processor's
claim came first the command will be decided and the runner waits for its result instead.
A sweep that fails (the broker unreachable) is retried a second later from the fold: a repeated
event is a no-op in the fold, a repeated command in the processor.

Crash safety: a kill -9 between 2 and 3 leaves a step `sent` whose command may not exist; step 3
after the restart sends it. Between 3 and the result: the result is on the results topic, which
the runner's results index reads (RocksDB, offsets in the same WriteBatch). Timeouts count from
the `at_ms` recorded in the events, so a timer survives restarts: the due times are rebuilt from
the fold; they count from the later of the step's send and the moment this runner took the
partition over, so a worker that was down does not time out every step at once.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from confluent_kafka import KafkaException, TopicPartition
from refold.core.app import load_deciders
from refold.core.commands import Command, Decider
from refold.core.config import Config
from refold.core.errors import CommandError, InputError, RefoldError, SagaStepsError
from refold.core.saga_decision import Outgoing, advance, steps_failed
from refold.core.sagas import (
    TERMINAL,
    Saga,
    SagaStateProjection,
    Start,
    apply_event,
    public_state,
    saga_event,
    saga_projection,
    saga_projection_name,
)
from refold.core.serde import Codec
from refold.engine.claims import ClaimRequest, ClaimsIndex
from refold.engine.command_processor import CommandProcessor
from refold.engine.frozen import Serving
from refold.engine.timetravel import murmur2_partition
from refold.kafka import clients
from refold.kafka.command_client import CommandClient, ResultsIndex
from refold.kafka.command_topics import ensure_command_topics
from refold.kafka.saga_log import Acks, SagaClient, SagaLog, Started, ensure_saga_topics
from refold.kafka.topics import Topics

log = logging.getLogger(__name__)

PAGE = 1000
SEND_TIMEOUT_S = 30.0
FENCE = "refold.sagas.Fence"  # the type of the claim that fences a timed-out step's command
CHAIN = 8  # decisions one sweep may chain for a saga (a transfer needs at most 2 in a row)
#: Commands a sweep re-sends at most: those its sagas wait on that this runner did not send
#: (after a restart, a rebalance, a send that failed). The rest go in the next sweeps, so a
#: worker that takes over many waiting sagas re-sends each once, this many every 0.2 s.
RESEND_PER_SWEEP = 1000


@dataclass(slots=True)
class SagaRunnerStats:
    state: str = "starting"
    error: str | None = None
    sweeps: int = 0
    events: int = 0
    commands: int = 0
    resent: int = 0
    dead: int = 0
    fenced: int = 0  # timed-out steps whose command will never be decided
    unfenced: int = 0  # timed-out steps whose command was claimed already: their result comes
    chained: int = 0  # decisions made on a decision of the same sweep (not a sweep later)
    errors: int = 0  # sweeps that failed (the broker unreachable...); the next one retries
    unsendable: int = 0  # sagas with commands answered here as rejected, not ended yet
    sent_here: int = 0  # sagas with commands this runner sent, not ended yet
    claimed: int = 0  # sagas with timed-out commands the processor claimed first, not ended yet
    resend_deferred: int = 0  # waiting commands left to re-send by a later sweep (the cap)
    unfolded: int = 0  # sagas with events appended here that the fold does not show yet
    ready: tuple[int, ...] = ()  # the owned partitions whose state is caught up


class PerSaga:
    """What a runner remembers about the commands of the sagas it drives, per saga: bounded by
    the open sagas of the partitions it drives (which each sweep reads anyway), for a runner
    that runs for months. A saga's entries go once a sweep sees it ended, or no longer sees it
    open in a partition it drives (`keep`: another worker drives it now). There is no fixed
    limit: one (10,000 sagas, the oldest forgotten first) made a runner with more sagas
    waiting than that re-send the forgotten ones on every sweep, remembering them anew in
    place of others, for ever."""

    def __init__(self) -> None:
        self._by_saga: dict[str, dict[str, Any]] = {}

    def __len__(self) -> int:
        """How many sagas have commands remembered."""
        return len(self._by_saga)

    def _put(self, saga_id: str, command_id: str, value: Any) -> None:
        self._by_saga.setdefault(saga_id, {})[command_id] = value

    def _get(self, saga_id: str, command_id: str) -> Any:
        commands = self._by_saga.get(saga_id)
        return None if commands is None else commands.get(command_id)

    def keep(self, wanted: Callable[[str], bool]) -> None:
        """Forget the sagas `wanted` refuses (ended, or of partitions this runner lost)."""
        if any(not wanted(s) for s in self._by_saga):
            self._by_saga = {s: c for s, c in self._by_saga.items() if wanted(s)}


class Unsendable(PerSaga):
    """Commands no record can carry (an aggregate the app cannot send to, too large, not
    UTF-8), answered here as rejected since no processor ever will (a compensation would wait
    for ever)."""

    def add(self, saga_id: str, command_id: str, reason: str) -> None:
        self._put(saga_id, command_id, {"status": "rejected", "reason": reason})

    def get(self, saga_id: str, command_id: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = self._get(saga_id, command_id)
        return found


class CommandIds(PerSaga):
    """A set of command ids, per saga (see `PerSaga`)."""

    def add(self, saga_id: str, command_id: str) -> None:
        self._put(saga_id, command_id, True)

    def has(self, saga_id: str, command_id: str) -> bool:
        return self._get(saga_id, command_id) is not None


class SagaRunner:
    """Drives one saga's runs; `runner()` is its state projection's live runner."""

    def __init__(
        self,
        config: Config,
        codec: Codec,
        saga: Saga,
        runner: Callable[[], Serving],
        *,
        partitions: int,
        commands: CommandClient,
        results: ResultsIndex,
        claims: Callable[[str], ClaimsIndex | None],
        interval_s: float = 0.2,
    ) -> None:
        self.saga = saga
        self.stats = SagaRunnerStats()
        self._runner = runner
        self._partitions = partitions
        self._commands = commands
        self._results = results
        self._claims = claims
        self._interval_s = interval_s
        self._log = SagaLog(config, codec, source=f"refold://sagas/{saga.name}")
        self._producer = clients.producer(config, defaults={"linger.ms": 1})
        self._watermarks = clients.consumer(config, config.group("sagas", saga.name, "ends"))
        self._ends: dict[int, int] = {}  # owned partition -> its end when this runner got it
        self._ready: dict[int, int] = {}  # caught-up partition -> since when (epoch ms)
        #: Timed-out commands the processor claimed first: their result will come, so they
        #: are not fenced again.
        self._claimed = CommandIds()
        #: saga id -> its event count when we last appended (4.); pruned like the memories
        self._pending: dict[str, int] = {}
        #: Commands this runner sent: those a saga waits on that it did not send (a restart, a
        #: rebalance, a send that failed) are re-sent once (3.), at most RESEND_PER_SWEEP a
        #: sweep (a duplicate the processor's claims answer with the first result).
        self._sent_here = CommandIds()
        self._resends = RESEND_PER_SWEEP  # left in this sweep
        self._unsendable = Unsendable()  # commands answered here as rejected (see the class)
        self._memories: tuple[PerSaga, ...] = (self._sent_here, self._claimed, self._unsendable)
        self._wake = threading.Event()
        self._stop = threading.Event()

    def run(self) -> None:
        registered = False
        try:
            self.stats.state = "running"
            while not self._stop.is_set():
                self._wake.wait(self._interval_s)
                self._wake.clear()
                try:
                    if not registered:  # the schema is durable before any event uses it
                        self._log.register(self._producer)
                        registered = True
                    self.sweep(int(time.time() * 1000))
                except (RefoldError, KafkaException, TimeoutError) as exc:
                    # Nothing is lost: what was not acknowledged is decided again (the fold
                    # takes a repeated event as a no-op, the processor a repeated command).
                    log.warning("saga %s: sweep failed, retrying: %s", self.saga.name, exc)
                    self.stats.errors += 1
                    self._pending.clear()
                    self._stop.wait(1.0)
        except Exception as exc:  # the saga stops moving; /healthz and the log say why
            log.exception("saga runner %s failed", self.saga.name)
            self.stats.state = "failed"
            self.stats.error = f"{type(exc).__name__}: {exc}"
        finally:
            if self.stats.state != "failed":
                self.stats.state = "stopped"
            self._producer.flush(10)
            self._watermarks.close()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def sweep(self, now_ms: int) -> None:
        runner = self._runner()
        ready = self._caught_up(runner)
        if not ready:
            return
        acks = Acks()
        outbox: list[tuple[str, Outgoing]] = []  # (saga id, command)
        driven: set[str] = set()  # the open sagas of the partitions this runner drives
        self._resends, self.stats.resend_deferred = RESEND_PER_SWEEP, 0
        after: str | None = None
        while True:
            page = runner.store.scan("", after, PAGE)
            for saga_id, state in page:
                if state.get("status") in TERMINAL:
                    continue
                since = ready.get(self._partition(saga_id))
                if since is not None:
                    driven.add(saga_id)
                    drive = self._drive(saga_id, state, now_ms, since, acks)
                    outbox += [(saga_id, out) for out in drive]
            if len(page) < PAGE:
                break
            after = page[-1][0]
        # What is remembered of sagas ended, gone or driven elsewhere now goes.
        for memory in self._memories:
            memory.keep(driven.__contains__)
        self._pending = {s: n for s, n in self._pending.items() if s in driven}
        acks.wait(self._producer, f"events of saga {self.saga.name!r}")
        self._send(outbox)
        self.stats.unsendable = len(self._unsendable)
        self.stats.sent_here = len(self._sent_here)
        self.stats.claimed = len(self._claimed)
        self.stats.unfolded = len(self._pending)
        self.stats.sweeps += 1

    def _caught_up(self, runner: Serving) -> dict[int, int]:
        """The owned partitions whose store has folded up to their end at assignment (1.)."""
        topic = self.saga.topic
        owned = {p for t, p in runner.stats.assigned if t == topic}
        lost = set(self._ends) - owned  # another worker drives them now
        for p in lost:
            del self._ends[p]
            self._ready.pop(p, None)
        if lost:  # (a sweep prunes too, but sweeps nothing while no partition is ready)
            for memory in self._memories:
                memory.keep(lambda saga_id: self._partition(saga_id) not in lost)
            self._pending = {
                s: n for s, n in self._pending.items() if self._partition(s) not in lost
            }
        for p in owned - set(self._ends):
            _low, high = self._watermarks.get_watermark_offsets(
                TopicPartition(topic, p), timeout=10
            )
            self._ends[p] = high
        if owned - self._ready.keys():
            stored = runner.store.offsets()
            for p in owned - self._ready.keys():
                if stored.get((topic, p), 0) >= self._ends[p]:
                    log.info("saga %s: partition %d caught up, driving it", self.saga.name, p)
                    self._ready[p] = int(time.time() * 1000)
        self.stats.ready = tuple(sorted(self._ready))  # lost ones dropped above
        return {p: since for p, since in self._ready.items() if p in owned}

    def _partition(self, saga_id: str) -> int:
        return murmur2_partition(saga_id.encode(), self._partitions)

    def _drive(
        self, saga_id: str, state: dict[str, Any], now_ms: int, since_ms: int, acks: Acks
    ) -> list[Outgoing]:
        """Decide for one saga. Decisions that send nothing (a step accepted or rejected, a
        compensation done) are folded here into a copy of the state and decided on at once, so
        a step's result and the next step's send are appended in one sweep, not two; the chain
        stops at the first decision that sends a command or waits for a result."""
        if self._pending.get(saga_id) == state["events"]:
            return []  # what we appended is not folded yet (4.)
        self._pending.pop(saga_id, None)
        outbox: list[Outgoing] = []

        def results(command_id: str) -> dict[str, Any] | None:
            return self._unsendable.get(saga_id, command_id) or self._results.get(command_id)

        for _ in range(CHAIN):
            try:
                step = advance(self.saga, state, results, now_ms, since_ms=since_ms)
            except SagaStepsError as exc:  # this saga's bug: it fails, the others go on
                step = steps_failed(self.saga, saga_id, exc, now_ms)
            if step.fence is not None and not self._fenced(saga_id, step.fence):
                break  # claimed by the processor: its result will come
            if step.dead is not None:
                self._dead(saga_id, state, step.dead)
            for event in step.events:
                self._log.produce(self._producer, self.saga.topic, saga_id, event, acks)
                self.stats.events += 1
            if step.events and saga_id not in self._pending:
                self._pending[saga_id] = state["events"]  # the store's count, before them
            resend = [o for o in step.waiting if not self._sent_here.has(saga_id, o.command_id)]
            self.stats.resend_deferred += max(0, len(resend) - self._resends)
            resend = resend[: self._resends]  # the rest in a later sweep
            self._resends -= len(resend)
            self.stats.resent += len(resend)
            outbox += [*step.commands, *resend]
            if not step.events or step.commands or step.waiting or step.fence is not None:
                break
            state = copy.deepcopy(state)  # the store's own value stays as the store has it
            for event in step.events:
                apply_event(self.saga, state, event)
            self.stats.chained += 1
        return outbox

    def _fenced(self, saga_id: str, out: Outgoing) -> bool:
        """Claim a timed-out step's command id for nothing, so that no processor ever decides
        it; False when a processor claimed it first (it will be decided)."""
        if self._claimed.has(saga_id, out.command_id):
            return False
        claims = self._claims(out.send.aggregate)
        if claims is None:  # an aggregate no decider of the app knows: nothing decides it
            log.warning("saga %s: cannot fence %s", self.saga.name, out.command_id)
            return True
        send = out.send
        fence = Command(out.command_id, send.aggregate, send.key, FENCE, {})
        winner = claims.claim([ClaimRequest.of(fence)]).get(out.command_id)
        if winner is not None and winner.get("fingerprint") != fence.fingerprint:
            self._claimed.add(saga_id, out.command_id)
            self.stats.unfenced += 1
            return False
        self.stats.fenced += 1
        return True

    def _dead(self, saga_id: str, state: dict[str, Any], reason: str) -> None:
        acks = Acks()
        letter = saga_event(saga_id, "dead", reason=reason, data=json.dumps(state))
        self._log.produce(self._producer, self.saga.dead_topic, saga_id, letter, acks)
        acks.wait(self._producer, f"dead letter of saga {saga_id!r}")  # before the end (2.)
        self.stats.dead += 1
        log.warning("saga %s %s failed: %s", self.saga.name, saga_id, reason)

    def _send(self, outbox: list[tuple[str, Outgoing]]) -> None:
        """Append the commands (3.), each with its saga's id; each one's result wakes the
        next sweep."""
        futures = []
        for saga_id, out in outbox:
            send = out.send
            command = Command(out.command_id, send.aggregate, send.key, send.type, send.data)
            try:
                futures.append((saga_id, out, self._commands.append(command)))
            except InputError as exc:  # a bad step: no processor will ever answer it
                log.error("saga %s: cannot send %s: %s", self.saga.name, out.command_id, exc)
                self._unsendable.add(saga_id, out.command_id, f"cannot be sent: {exc}")
                self._wake.set()
                continue
            except CommandError as exc:  # not sent now: the next sweep sends it again
                log.error("saga %s: cannot send %s: %s", self.saga.name, out.command_id, exc)
                continue
            self._results.watch(out.command_id, lambda _r: self._wake.set())
        for saga_id, out, future in futures:
            future.result(SEND_TIMEOUT_S)
            self._sent_here.add(saga_id, out.command_id)
            self.stats.commands += 1


class SagaService:
    """The sagas of one worker process."""

    def __init__(self, config: Config, codec: Codec, sagas: Mapping[str, Saga]) -> None:
        self.config = config
        self.codec = codec
        self.sagas = dict(sagas)
        self.projections: list[SagaStateProjection] = [
            saga_projection(s) for s in self.sagas.values()
        ]
        self.runners: dict[str, SagaRunner] = {}
        self._runners: Mapping[str, Serving] = {}
        self._threads: list[threading.Thread] = []
        self._partitions: dict[str, int] = {}
        self._client: SagaClient | None = None
        self._client_lock = threading.Lock()
        self._commands: CommandClient | None = None
        self._results: ResultsIndex | None = None
        self._processors: Mapping[str, CommandProcessor] = {}
        self._deciders: dict[str, Decider] = {}
        self._own_claims: dict[str, ClaimsIndex] = {}  # of deciders no processor here runs
        #: Sagas whose state this worker folds but which it cannot drive, and why: /healthz
        #: shows them failed (their sagas would stay `running` for ever without a word).
        self.undriven: dict[str, str] = {}
        self._claims_lock = threading.Lock()

    def ensure_topics(self, topics: Topics) -> None:
        if not self.sagas:
            return
        ensure_saga_topics(topics, self.sagas)
        for s in self.sagas.values():
            self._partitions[s.name] = topics.partitions(s.topic)

    def start(
        self, runners: Mapping[str, Serving], processors: Mapping[str, CommandProcessor]
    ) -> None:
        """A runner per saga; `runners` is the worker's live runner per projection (looked up
        at each use), `processors` the command processors of this worker. The commands go to
        every decider of the app, whether or not its processor runs here (`--only`)."""
        self._runners = runners
        if not self.sagas:
            return
        self._processors = processors
        deciders = {name: p.decider for name, p in processors.items()}
        topics = Topics(self.config)
        for name, decider in load_deciders(self.config.app_modules).items():
            if name in deciders:
                continue
            try:  # a decider whose event topic is missing cannot take commands: skip it
                ensure_command_topics(topics, decider)
            except RefoldError as exc:
                log.warning("sagas: cannot send to decider %s: %s", name, exc)
                continue
            deciders[name] = decider
        self._deciders = deciders
        if not deciders:
            why = "no decider of the app can take commands (none, or their event topics missing)"
            for name in self.sagas:
                if saga_projection_name(name) in runners:
                    self.undriven[name] = why
            log.error("sagas %s: not driving: %s", sorted(self.undriven), why)
            return
        self._commands = CommandClient(self.config, deciders)
        self._results = ResultsIndex(
            self.config,
            [d.results_topic for d in deciders.values()],
            store_path=self.config.data_dir / "sagas" / "results",
            window_ms=max(d.result_retention_ms for d in deciders.values()),
        ).start()
        for name, saga in self.sagas.items():
            if saga_projection_name(name) not in runners:  # `--only` left its state out
                log.info("saga %s: its state is not folded here, not driving it", name)
                continue
            runner = SagaRunner(
                self.config,
                self.codec,
                saga,
                lambda n=name: self.runner(n),  # type: ignore[misc]
                partitions=self._partitions[name],
                commands=self._commands,
                results=self._results,
                claims=self.claims,
            )
            self.runners[name] = runner
            thread = threading.Thread(target=runner.run, name=f"saga-{name}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def claims(self, aggregate: str) -> ClaimsIndex | None:
        """The claims index of `aggregate`'s command ids, to fence a timed-out step: the local
        processor's, or one of the saga service's own (every index reads every partition of
        the claims topic, so any of them sees the first claim of an id)."""
        processor = self._processors.get(aggregate)
        if processor is not None:
            return processor.claims
        decider = self._deciders.get(aggregate)
        if decider is None:
            return None
        with self._claims_lock:
            index = self._own_claims.get(aggregate)
            if index is None:
                path = self.config.data_dir / "sagas" / "claims" / aggregate
                index = ClaimsIndex.for_decider(self.config, decider, path).start()
                self._own_claims[aggregate] = index
            return index

    def stop(self, timeout: float = 30.0) -> None:
        for runner in self.runners.values():
            runner.stop()
        for thread in self._threads:
            thread.join(timeout)
        for index in self._own_claims.values():
            index.stop(timeout)
        if self._results is not None:
            self._results.stop(timeout)
        if self._commands is not None:
            self._commands.close()
        if self._client is not None:
            self._client.close()

    # -- what the HTTP routes call ------------------------------------------------------------

    def runner(self, name: str) -> Serving:
        return self._runners[saga_projection_name(name)]

    def saga(self, name: str) -> Saga:
        try:
            return self.sagas[name]
        except KeyError:
            known = ", ".join(sorted(self.sagas)) or "none"
            raise InputError(f"unknown saga {name!r}; known: {known}") from None

    @property
    def client(self) -> SagaClient:
        with self._client_lock:
            if self._client is None:
                # Starts are checked against every decider the app declares (those whose
                # topics are missing too: such a step is a setup problem /healthz names).
                deciders = load_deciders(self.config.app_modules)
                deciders.update((n, p.decider) for n, p in self._processors.items())
                self._client = SagaClient(
                    self.config, self.sagas, codec=self.codec, known=self._state, deciders=deciders
                )
            return self._client

    def _state(self, name: str, saga_id: str) -> dict[str, Any] | None:
        state: dict[str, Any] | None = self.runner(name).store.get(saga_id)
        return state

    def start_saga(self, name: str, obj: Any) -> Started:
        """Check and append one start (InputError for bad input, SagaConflict for a saga id
        started with other data, SagaError if not acked)."""
        return self.append_start(name, self.prepare(name, obj))

    def prepare(self, name: str, obj: Any) -> Start:
        """Check a start request (InputError if bad); nothing is sent."""
        return self.client.prepare(name, obj)

    def append_start(self, name: str, start: Start) -> Started:
        """Append a checked start (see `start_saga`)."""
        return self.client.start(name, start)

    def describe(self, name: str) -> dict[str, Any]:
        """`GET /sagas/{name}`: what this worker's runner of the saga has done (its counters,
        the partitions it drives), for operators and for tests that wait on a sweep."""
        saga = self.saga(name)
        runner = self.runners.get(name)
        stats = None if runner is None else asdict(runner.stats)
        if name in self.undriven:
            stats = {"state": "failed", "error": self.undriven[name]}
        return {"saga": name, "topic": saga.topic, "runner": stats}

    def status(self, name: str, saga_id: str) -> dict[str, Any] | None:
        self.saga(name)
        state = self._state(name, saga_id)
        return None if state is None or state["status"] is None else public_state(state, name)
