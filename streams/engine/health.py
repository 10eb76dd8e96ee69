"""Whether a worker's answers are current: who folds each source partition, how far behind it
is, and whether the broker answers.

`HealthMonitor` runs one thread per worker. Every `CHECK_EVERY_S` it asks the broker (each call
bounded by `REQUEST_TIMEOUT_S`) for the source topics' partitions, each live projection group's
members and assignments, and, for partitions other members own, the group's committed offsets
and the end offsets. The group questions go through a child process (refold.engine.group_probe:
librdkafka can abort the process that asks them while a broker is lost). Every `LOCAL_EVERY_S`
it combines that with what the fold threads publish (owned partitions, lag, behind) into a
`Health` snapshot, replaced whole, that `/healthz`, `GET /projections` and every key lookup read
without a broker round trip.

A partition is, for one projection:
- `here`: owned by this worker; its lag is the runner's (records not folded, refreshed each
  second) and it is `behind` while records older than `runner_stats.BEHIND_S` are not folded;
- `elsewhere`: owned by another member of the group; its lag is counted from the group's
  committed offsets (committed within a second of each store write) and it is `behind` on the
  same rule. A member that died keeps its partitions until the session timeout expires it;
  meanwhile its partitions show as behind as soon as events arrive that nobody folds;
- `nobody`: no member owns it (a rebalance, or a group that lost its members).
The broker is `unreachable` once no call succeeded for `UNREACHABLE_AFTER_S`; lookups are then
marked stale, and `/healthz` answers 503 until a call succeeds again.

A runner whose group, as the broker describes it, has gone on without it (its static member is
not in the group, or partitions of its topics are owned by nobody) for longer than
`membership.rejoin_after_s` is told to replace its consumer (`ProjectionRunner.rejoin`): after
the group coordinator's node is lost, librdkafka was seen to stay out of its group for good.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from confluent_kafka import (
    IsolationLevel,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec
from refold.core.config import Config
from refold.engine.group_probe import GroupProbe, ProbeError
from refold.engine.membership import rejoin_after_s
from refold.engine.runner_consumer import group_id
from refold.engine.runner_stats import TP, Behind
from refold.engine.runtime import ProjectionRunner
from refold.kafka import clients

log = logging.getLogger(__name__)

CHECK_EVERY_S = 1.0
LOCAL_EVERY_S = 0.25
REQUEST_TIMEOUT_S = 2.0
UNREACHABLE_AFTER_S = 3.0


@dataclass(frozen=True, slots=True)
class PartitionHealth:
    topic: str
    partition: int
    owner: str  # "here" | "elsewhere" | "nobody"
    next_offset: int | None  # here: folded; elsewhere: the group's committed offset
    lag: int | None  # records not folded yet; None when unknown
    behind: bool
    member: str | None = None  # elsewhere: the owning member (instance id, or client id@host)

    def to_json(self) -> dict[str, object]:
        return {
            "topic": self.topic,
            "partition": self.partition,
            "owner": self.owner,
            "member": self.member,
            "next_offset": self.next_offset,
            "lag": self.lag,
            "behind": self.behind,
        }


@dataclass(frozen=True, slots=True)
class ProjectionHealth:
    """One live projection version in this worker: every partition of its source topics."""

    name: str
    version: int
    rekeys: bool
    counts: tuple[tuple[str, int], ...]  # (topic, partitions) of each source topic, in order
    partitions: tuple[PartitionHealth, ...]

    @property
    def unowned(self) -> list[str]:
        return [f"{p.topic}:{p.partition}" for p in self.partitions if p.owner == "nobody"]

    @property
    def behind(self) -> list[str]:
        return [f"{p.topic}:{p.partition}" for p in self.partitions if p.behind]


@dataclass(frozen=True, slots=True)
class Health:
    """A snapshot of the worker's health; `ok` only when every answer it gives is current."""

    reachable: bool
    broker_error: str | None
    projections: Mapping[str, ProjectionHealth] = field(default_factory=dict)
    at: float = 0.0  # time.time() of the snapshot
    checked: bool = False  # False until the broker answered once

    def status(self) -> str:
        """ok | starting | broker unreachable | unowned | behind (failed runners are the
        caller's to add)."""
        if not self.reachable:
            return "broker unreachable"
        if not self.checked:
            return "starting"
        if any(p.unowned for p in self.projections.values()):
            return "unowned"
        if any(p.behind for p in self.projections.values()):
            return "behind"
        return "ok"

    def summary(self) -> dict[str, object]:
        """What `/healthz` says beside the runner states."""
        return {
            "broker": "reachable" if self.reachable else f"unreachable: {self.broker_error}",
            "unowned": {n: p.unowned for n, p in self.projections.items() if p.unowned},
            "behind": {n: p.behind for n, p in self.projections.items() if p.behind},
        }


STARTING = Health(reachable=True, broker_error=None)


@dataclass(slots=True)
class _GroupView:
    """What the broker last said about one group (kept between checks)."""

    owners: dict[TP, str] = field(default_factory=dict)  # partition -> member, all members
    committed: dict[TP, int] = field(default_factory=dict)
    ends: dict[TP, int] = field(default_factory=dict)
    behind: tuple[TP, ...] = ()
    history: Behind = field(default_factory=Behind)
    stranded_since: float | None = None  # since when the group goes on without this runner


class HealthMonitor:
    """The worker's health thread; `health` is the latest snapshot (never blocks)."""

    def __init__(self, config: Config, runners: Callable[[], Mapping[str, object]]) -> None:
        self._config = config
        self._runners = runners
        self._admin: AdminClient | None = None
        self._probe: GroupProbe | None = None  # the group questions, asked from a child process
        self._counts: dict[str, int] = {}  # partitions per source topic
        self._groups: dict[str, _GroupView] = {}
        self._last_ok = time.monotonic()
        self._error: str | None = None
        self._checked_at = 0.0
        self._checked = False
        self._reachable = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.health: Health = STARTING

    def start(self) -> HealthMonitor:
        self._last_ok = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="health", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._probe is not None:
            self._probe.close()

    @property
    def reachable(self) -> bool:
        return self.health.reachable

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if time.monotonic() - self._checked_at >= CHECK_EVERY_S:
                    self._checked_at = time.monotonic()
                    self._check_broker()
                self.health = self._snapshot()
            except Exception:  # keep watching; a bug here must not end the worker's health
                log.exception("health check failed")
            self._stop.wait(LOCAL_EVERY_S)

    def _folding(self) -> dict[str, ProjectionRunner]:
        """The live versions that fold (a frozen version folds nothing: it says so itself)."""
        return {n: r for n, r in list(self._runners().items()) if isinstance(r, ProjectionRunner)}

    # -- the broker's side ----------------------------------------------------------------

    def _check_broker(self) -> None:
        """The broker is reachable when it answers a metadata request; a group it cannot
        describe right now (its coordinator moving or loading) keeps its last known view."""
        runners = self._folding()
        try:
            if self._admin is None:
                self._admin = clients.admin(self._config)
            topics = {t for r in runners.values() for t in r.topics}
            self._read_counts(self._admin, topics or {self._config.schemas_topic})
        except KafkaException as exc:
            self._failed(exc)
            return
        if not self._reachable:
            log.warning("the broker at %s answers again", self._config.bootstrap_servers)
        self._last_ok = time.monotonic()
        self._reachable, self._error, self._checked = True, None, True
        for runner in runners.values():
            try:
                self._read_group(self._admin, runner)
            except (KafkaException, ProbeError) as exc:  # its last view stays (see above)
                log.debug("group of %s v%d not described: %s", runner.name, runner.version, exc)
                view = self._groups.get(group_id(self._config, runner.name, runner.version))
                if view is not None:  # stranded counts only while the broker says so
                    view.stranded_since = None
            self.health = self._snapshot()  # a slow coordinator delays no other news

    def _failed(self, exc: KafkaException) -> None:
        error = exc.args[0] if exc.args else exc
        text = error.str() if hasattr(error, "str") else str(error)
        down = time.monotonic() - self._last_ok
        if down <= UNREACHABLE_AFTER_S:
            return  # a blip; librdkafka retries by itself
        if self._reachable:  # once per outage: the health snapshot says the rest
            log.warning(
                "the broker at %s is unreachable (%.0f s): %s",
                self._config.bootstrap_servers,
                down,
                text,
            )
        self._reachable, self._error = False, text

    def _read_counts(self, admin: AdminClient, topics: Iterable[str]) -> None:
        for topic in sorted(topics):
            md = admin.list_topics(topic, timeout=REQUEST_TIMEOUT_S).topics.get(topic)
            if md is not None and md.error is None and md.partitions:
                self._counts[topic] = len(md.partitions)

    def _read_group(self, admin: AdminClient, runner: ProjectionRunner) -> None:
        group = group_id(self._config, runner.name, runner.version)
        view = self._groups.setdefault(group, _GroupView())
        if self._probe is None:
            self._probe = GroupProbe(self._config)
        members = self._probe.describe(group, REQUEST_TIMEOUT_S)
        owners: dict[TP, str] = {}
        for member in members:
            for topic, partition in member["assignment"]:
                owners[(topic, partition)] = member["name"]
        view.owners = owners
        self._watch_membership(runner, view, {m["instance"] for m in members})
        here = set(runner.stats.assigned)
        elsewhere = sorted(tp for tp in owners if tp not in here)
        if not elsewhere:
            view.committed, view.ends, view.behind = {}, {}, ()
            return
        tps = [TopicPartition(t, p) for t, p in elsewhere]
        view.committed = self._probe.committed(group, elsewhere, REQUEST_TIMEOUT_S)
        futures = admin.list_offsets(
            {tp: OffsetSpec.latest() for tp in tps},
            isolation_level=IsolationLevel.READ_COMMITTED,
            request_timeout=REQUEST_TIMEOUT_S,
        )
        view.ends = {
            (tp.topic, tp.partition): f.result(timeout=REQUEST_TIMEOUT_S + 1).offset
            for tp, f in futures.items()
        }
        folded = {tp: view.committed.get(tp, 0) for tp in elsewhere}
        view.behind = view.history.update(time.monotonic(), view.ends, folded)

    def _watch_membership(
        self, runner: ProjectionRunner, view: _GroupView, instances: set[str | None]
    ) -> None:
        """Tell `runner` to rejoin once its group has gone on without it for too long."""
        missing = runner.instance_id is not None and runner.instance_id not in instances
        unowned = [
            f"{t}:{p}"
            for t in runner.topics
            for p in range(self._counts.get(t, 0))
            if (t, p) not in view.owners
        ]
        if not missing and not unowned:
            view.stranded_since = None
            return
        now = time.monotonic()
        if view.stranded_since is None:
            view.stranded_since = now
        elif now - view.stranded_since > rejoin_after_s(self._config):
            view.stranded_since = now  # give the new consumer as long again
            why = "not a member of its group" if missing else f"{', '.join(unowned)} unowned"
            runner.rejoin(f"{why} for {rejoin_after_s(self._config):.0f} s")

    # -- the snapshot ---------------------------------------------------------------------

    def _snapshot(self) -> Health:
        reachable = self._reachable
        projections: dict[str, ProjectionHealth] = {}
        for name, runner in self._folding().items():
            projections[name] = self._projection(runner)
        return Health(reachable, self._error, projections, time.time(), self._checked)

    def _projection(self, runner: ProjectionRunner) -> ProjectionHealth:
        stats = runner.stats
        here = set(stats.assigned)
        lag, behind, positions = stats.lag, set(stats.behind), stats.positions
        view = self._groups.get(group_id(self._config, runner.name, runner.version), _GroupView())
        elsewhere_behind = set(view.behind)
        counts = tuple((t, self._counts[t]) for t in runner.topics if t in self._counts)
        out: list[PartitionHealth] = []
        for topic, count in counts:
            for p in range(count):
                tp = (topic, p)
                if tp in here:
                    # Not measured yet (just assigned): not claimed current either.
                    late = tp in behind or tp not in lag
                    out.append(
                        PartitionHealth(topic, p, "here", positions.get(tp), lag.get(tp), late)
                    )
                elif view.owners.get(tp, runner.instance_id) != runner.instance_id:
                    committed, end = view.committed.get(tp), view.ends.get(tp)
                    gap = None if end is None else max(0, end - (committed or 0))
                    member = view.owners[tp]
                    late = tp in elsewhere_behind
                    out.append(PartitionHealth(topic, p, "elsewhere", committed, gap, late, member))
                else:
                    out.append(PartitionHealth(topic, p, "nobody", None, None, False))
        return ProjectionHealth(runner.name, runner.version, runner.rekeys_here, counts, tuple(out))
