"""`refold worker`: every projection's runner in its own thread, sharing one dead-letter producer.

Per projection the worker serves the LIVE version. When the code's version is newer than the live
one, it also builds the new version in the background (from offset zero, beside the live one) and,
once caught up, either swaps (`on_new_version = "swap"`) or waits for `refold replay NAME --swap`.
A watcher follows the LIVE pointer, so a swap or rollback made by another process takes effect
here without a restart: the target version is caught up first, then queries switch to it. Until
then queries read the version they read, however long that takes (`switch_status` says why);
each watcher tick takes one step of each projection's switch and never waits for one.

A version queries do not read (a build, a switch's target) trails the one they read: it folds
nothing that one has not folded, so every event it folds then reaches it as `replay`; at the
switch the old version retires (stops folding, its store answering a while longer) and the new
one folds on from there, acting alone (refold.engine.runner_trail, `trailing`).

A store is folded only by its own version's code: a version to serve whose class the code lacks
is frozen (refold.engine.frozen), answering at its last offsets while nothing folds into it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from refold.core.app import load_deciders, load_sagas, load_task_queues, load_versions
from refold.core.commands import CommandResult, Decider
from refold.core.config import Config
from refold.core.errors import ProjectionError, StoreLocked
from refold.core.projection import Projection
from refold.core.sagas import saga_projection_name
from refold.core.serde import Codec
from refold.core.tasks import TaskQueue
from refold.engine.command_processor import CommandProcessor
from refold.engine.frozen import FrozenVersion, Serving, frozen_reason
from refold.engine.health import HealthMonitor
from refold.engine.membership import worker_id
from refold.engine.rebuild import PARALLEL_MIN_EVENTS, build_in_parts, default_procs, discard_parts
from refold.engine.repartition import Repartitioner, ensure_repartition_topic
from refold.engine.runner_stats import TP
from refold.engine.runtime import ProjectionRunner, dead_letter_topic_name
from refold.engine.saga_runner import SagaService
from refold.engine.task_queues import TaskService
from refold.engine.version_switch import VersionSwitch
from refold.kafka import clients
from refold.kafka.command_client import CommandClient, ResultsIndex
from refold.kafka.command_topics import ensure_command_topics
from refold.kafka.publisher import Publisher
from refold.kafka.registry import codec_for
from refold.kafka.topics import Topics, dead_letter_topic, internal_topics
from refold.store.rocksdb import RocksStore, Store
from refold.store.scratch import scratch_dir, sweep
from refold.store.versions import live_version, pin_live, set_live, store_path

log = logging.getLogger(__name__)


class Worker(VersionSwitch):
    """Owns the runners of one process; the query server reads through `runner(name)`."""

    def __init__(
        self,
        config: Config,
        projections: Iterable[Projection] | None = None,
        *,
        codec: Codec | None = None,
        batch_size: int = 5000,
        only: Iterable[str] | None = None,
        deciders: Iterable[Decider] | None = None,
        task_queues: Iterable[TaskQueue] | None = None,
    ) -> None:
        self.config = config
        self.worker_id = worker_id(config)  # this data dir's identity in every group it joins
        self.codec = codec or codec_for(config)
        # Deciders (commands): the bundled and REFOLD_APP ones, unless projections were passed.
        if deciders is None:
            found = load_deciders(config.app_modules) if projections is None else {}
        else:
            found = {d.name: d for d in deciders}
        if projections is None:
            self.versions = load_versions(config.app_modules)
        else:
            self.versions = {}
            for p in projections:
                self.versions.setdefault(p.name, {})[p.version] = p
        sagas = load_sagas(config.app_modules) if projections is None else {}
        if only is not None:
            wanted = set(only)
            sagas = {n: s for n, s in sagas.items() if saga_projection_name(n) in wanted}
            unknown = (
                wanted - set(self.versions) - set(found) - set(map(saga_projection_name, sagas))
            )
            if unknown:
                raise ProjectionError(f"unknown projection(s) {sorted(unknown)}")
            self.versions = {n: v for n, v in self.versions.items() if n in wanted}
            found = {n: d for n, d in found.items() if n in wanted}
        self.deciders: dict[str, Decider] = found
        self.processors: dict[str, CommandProcessor] = {}
        self.results: ResultsIndex | None = None
        self._command_client: CommandClient | None = None
        # Task queues (REFOLD_APP's, unless projections were passed): their status projections
        # run like any other.
        if task_queues is None:
            queues = load_task_queues(config.app_modules) if projections is None else {}
        else:
            queues = {q.name: q for q in task_queues}
        self.tasks = TaskService(config, self.codec, queues)
        for status in self.tasks.projections:
            self.versions.setdefault(status.name, {status.version: status})
        # Sagas (REFOLD_APP's, unless projections were passed): their state projections too.
        self.sagas = SagaService(config, self.codec, sagas)
        for state in self.sagas.projections:
            self.versions.setdefault(state.name, {state.version: state})
        self.projections = [v[max(v)] for v in self.versions.values()]
        self._batch_size = batch_size
        self._topics = Topics(config)
        self.tasks.ensure_topics(self._topics)
        self.sagas.ensure_topics(self._topics)
        self._check_sources()
        self._dlq = clients.producer(config)
        self.runners: dict[str, Serving] = {}  # the live version of each projection
        self.builds: dict[str, ProjectionRunner] = {}  # newer code versions being built
        # Versions the LIVE pointer names that queries do not read yet: catching up (`_switch`).
        self.switching: dict[str, Serving] = {}
        self._switch_said: dict[str, tuple[str, float, str]] = {}  # why, said when, how far
        self._seen: dict[str, dict[TP, int]] = {}  # the serving version's folded, last tick
        self._threads: list[threading.Thread] = []
        self._retired: list[Serving] = []  # versions queries left, answering a while longer
        self._retired_lock = threading.Lock()
        self._publisher: Publisher | None = None
        self._publisher_lock = threading.Lock()
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        # Code versions to build whose store another process holds (a `refold replay`):
        # the watcher tries again until that process lets go. {name: (version, holder)}
        self._held: dict[str, tuple[int, int | None]] = {}
        # Who folds each partition, lag, the broker's reachability: read by the query server.
        self.health = HealthMonitor(config, lambda: self.runners)

    def _check_sources(self) -> None:
        for projection in self.projections:
            for topic in projection.topics:
                if not self._topics.exists(topic):
                    raise ProjectionError(
                        f"projection {projection.name!r} reads topic {topic!r}, which does not "
                        "exist on the broker",
                        hint=f"run `refold topics ensure {topic}`",
                    )

    @property
    def publisher(self) -> Publisher:
        """A publisher for `POST /events`, created on first use."""
        with self._publisher_lock:
            if self._publisher is None:
                self._publisher = Publisher(self.config, self.codec)
            return self._publisher

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        sweep(scratch_dir(self.config.data_dir))  # left by processes killed while reading
        self._topics.ensure(
            [
                *internal_topics(self.config),
                *(
                    dead_letter_topic(dead_letter_topic_name(self.config, p.name))
                    for p in self.projections
                ),
            ]
        )
        for name, versions in self.versions.items():
            code = max(versions)
            live = pin_live(self.config, name)  # before a build creates the code's version
            if live is None:
                set_live(self.config, name, code)
                live = code
            serving = self._serve(name, live)
            self.runners[name] = serving
            if code > live:
                log.info("%s: building v%d beside live v%d", name, code, live)
                self._build_unless_held(name, code)
        self._watcher = threading.Thread(target=self._watch, name="live-watcher", daemon=True)
        self._watcher.start()
        self.health.start()
        self._start_commands()
        self.tasks.start(self.runners)
        self.sagas.start(self.runners, self.processors)

    def _serve(self, name: str, version: int, acted_below: dict[TP, int] | None = None) -> Serving:
        """A runner folding `version` with its own class, or, when the code has no class for
        it, the version frozen at its stored offsets (never folded by another version's code).
        Events below `acted_below` (what the version served before it folded) reach it as
        replay: that version's side effects for them happened already."""
        reason = frozen_reason(name, self.versions[name], version)
        if reason is None:
            return self._start_runner(name, version, acted_below)
        return FrozenVersion(self.config, name, version, reason)

    def _start_runner(
        self,
        name: str,
        version: int,
        replay_below: dict[TP, int] | None = None,
        store: Store | None = None,
    ) -> ProjectionRunner:
        projection = self.versions[name][version]
        runner = ProjectionRunner(
            self.config,
            self.codec,
            projection,
            dead_letters=self._dlq,
            store=store,
            version=version,
            batch_size=self._batch_size,
            replay_below=replay_below,
            instance_id=f"{self.worker_id}.{name}.v{version}",
            repartitioned=projection.rekeys,
        )
        if runner.repartitioned:
            runner.feeder = self._start_repartitioner(projection, version)
        serving = self.runners.get(name)
        if isinstance(serving, ProjectionRunner):  # not live (yet): it acts on nothing first
            runner.trailing = serving
        thread = threading.Thread(target=runner.run, name=f"fold-{name}-v{version}", daemon=True)
        self._threads.append(thread)
        thread.start()
        return runner

    def _start_repartitioner(self, projection: Projection, version: int) -> Repartitioner:
        """The stage that routes a re-keyed projection's source partitions this worker owns to
        its repartition topic (created here when missing)."""
        ensure_repartition_topic(self.config, projection, version)
        feeder = Repartitioner(
            self.config,
            self.codec,
            projection,
            version,
            worker_id=self.worker_id,
            dlq_topic=dead_letter_topic_name(self.config, projection.name),
            batch_size=self._batch_size,
        )
        thread = threading.Thread(
            target=feeder.run, name=f"repartition-{projection.name}-v{version}", daemon=True
        )
        self._threads.append(thread)
        thread.start()
        return feeder

    def _build_unless_held(self, name: str, version: int) -> None:
        """Build `version` beside the live one, unless another process holds its store (a
        `refold replay` building it): then serve on and try again from the watcher."""
        try:
            self._start_build(name, version, self.runners[name].store.offsets())
        except StoreLocked as exc:
            if self._held.get(name) != (version, exc.holder):
                log.warning(
                    "%s: v%d is not built here while another process writes it: %s",
                    name,
                    version,
                    exc,
                )
            self._held[name] = (version, exc.holder)
            return
        self._held.pop(name, None)

    def _start_build(self, name: str, version: int, live: dict[TP, int]) -> None:
        """Build `version` beside the live one. A build from scratch of at least
        PARALLEL_MIN_EVENTS is first folded in parts by one process per core, up to the live
        offsets of now (refold.engine.rebuild); its runner then follows in the group like any
        other."""
        store = RocksStore.open(store_path(self.config, name, version))
        if (
            store.offsets()
            or default_procs() < 2
            or sum(live.values()) < PARALLEL_MIN_EVENTS
            or self.versions[name][version].rekeys  # folds its own repartition topic
        ):
            discard_parts(self.config, name, version)
            self.builds[name] = self._start_runner(name, version, live, store)
            return

        def in_parts() -> None:
            try:
                merged = build_in_parts(
                    self.config,
                    self.versions[name][version],
                    version,
                    store,
                    live,
                    replay_below=live,
                    procs=default_procs(),
                    stop=self._stopping,
                )
                if self._stopping.is_set():
                    store.close()
                    return
                log.info("%s: v%d %s", name, version, "merged" if merged else "not split")
                runner = self.builds[name] = self._start_runner(name, version, live, store)
                if self._stopping.is_set():  # stop() may have passed the builds meanwhile
                    runner.stop()
            except Exception:  # the live version keeps serving; say why the build stopped
                log.exception("%s: building v%d failed", name, version)
                store.close()

        thread = threading.Thread(target=in_parts, name=f"build-{name}-v{version}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self.health.stop()
        self.tasks.stop(timeout)
        self.sagas.stop(timeout)
        if self._watcher is not None:
            self._watcher.join(timeout)
        for runner in [
            *self.runners.values(),
            *self.builds.values(),
            *self.switching.values(),
            *self._retired,
        ]:
            runner.stop()
        for processor in self.processors.values():
            processor.stop()
        if self.results is not None:
            self.results.stop(timeout)
        if self._command_client is not None:
            self._command_client.close()
        for thread in self._threads:
            thread.join(timeout)
        self._dlq.flush(10)
        if self._publisher is not None:
            self._publisher.close()

    # -- commands -------------------------------------------------------------------------

    def _start_commands(self) -> None:
        """A command processor per decider whose event topic exists (its command and results
        topics are created co-partitioned with it), and the results index for GET /commands."""
        for name, decider in self.deciders.items():
            if not self._topics.exists(decider.events_topic):
                log.info(
                    "commands %s: event topic %s missing, not deciding", name, decider.events_topic
                )
                continue
            ensure_command_topics(self._topics, decider)
            processor = CommandProcessor(
                self.config, self.codec, decider, on_decided=self._answer_committed
            )
            thread = threading.Thread(target=processor.run, name=f"commands-{name}", daemon=True)
            self._threads.append(thread)
            thread.start()
            self.processors[name] = processor
        if self.processors:
            running = [self.deciders[n] for n in self.processors]
            self.results = ResultsIndex(
                self.config,
                [d.results_topic for d in running],
                store_path=self.config.data_dir / "command-results",
                window_ms=max(d.result_retention_ms for d in running),
            ).start()

    def _answer_committed(self, results: list[CommandResult]) -> None:
        """A processor's committed results, to the results index at once (its waiters need
        not wait for the read-back through Kafka)."""
        index = self.results
        if index is not None:
            index.learn_committed(r.to_json() for r in results)

    @property
    def command_client(self) -> CommandClient:
        """A client for `POST /commands`, over the deciders this worker runs."""
        with self._publisher_lock:
            if self._command_client is None:
                running = {n: self.deciders[n] for n in self.processors}
                self._command_client = CommandClient(self.config, running)
            return self._command_client

    def runner(self, name: str) -> Serving:
        try:
            return self.runners[name]
        except KeyError:
            raise ProjectionError(
                f"unknown projection {name!r}",
                hint="known: " + ", ".join(sorted(self.runners)),
            ) from None

    # -- versions ---------------------------------------------------------------------------

    def _watch(self) -> None:
        locked: dict[str, str] = {}  # why a projection waits for another process, said once
        while not self._stopping.wait(0.3):
            for name in list(self.runners):
                try:
                    self._follow_pointer(name)
                    locked.pop(name, None)
                except StoreLocked as exc:  # a replay still writes the version LIVE names
                    if locked.get(name) != str(exc):
                        log.warning("%s: following the LIVE pointer once free: %s", name, exc)
                    locked[name] = str(exc)
                except Exception:  # keep serving the current version; say why it did not move
                    log.exception("%s: could not follow the LIVE pointer", name)

    def _follow_pointer(self, name: str) -> None:
        serving = self.runners[name]
        live = live_version(self.config, name)
        build = self.builds.get(name)
        held = self._held.get(name)
        if held is not None and held[0] == live:  # the process that built it swapped it in
            del self._held[name]
        elif held is not None and build is None:
            self._build_unless_held(name, held[0])
        if live is not None and live != serving.version:
            self._switch(name, live)
            return
        if name in self.switching:  # the pointer came back before queries moved
            self._abandon(name)
        if (
            build is not None
            and self.versions[name][build.version].on_new_version == "swap"
            and build.stats.state == "running"
            and self._keeps_pace(name, build, serving)
        ):
            log.info("%s: v%d caught up with v%d, swapping", name, build.version, serving.version)
            set_live(self.config, name, build.version)
            self._switch(name, build.version)
