"""Replay and repair: build a projection version from offset zero beside the live one, compare
them key by key at the same offsets, and swap the LIVE pointer in one step.

The live version keeps folding and serving throughout (in a worker); this module only reads its
store through a RocksDB secondary view, whose contents move only when asked to catch up, so the
offsets it reports and the states it returns belong to one moment.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from confluent_kafka import Consumer, Producer
from refold.core.config import Config
from refold.core.errors import ProjectionError, StoreLocked, TopicError
from refold.core.projection import Projection
from refold.core.serde import Codec
from refold.engine.diff import DiffSummary, diff_to_file
from refold.engine.membership import worker_id
from refold.engine.rebuild import (
    PARALLEL_MIN_EVENTS,
    PartsProgress,
    build_in_parts,
    default_procs,
    discard_parts,
    stored_offsets,
)
from refold.engine.repartition import ensure_repartition_topic, repartition_topic
from refold.engine.repartition_progress import route_until, routed_offsets
from refold.engine.runner_stats import TP
from refold.engine.runner_writes import rebuild_writes
from refold.engine.runtime import ProjectionRunner
from refold.kafka import clients
from refold.kafka.log import topic_partitions, watermarks
from refold.store.rocks_open import describe_process, lock_holder
from refold.store.rocksdb import RocksStore, Store
from refold.store.scratch import scratch_dir, sweep
from refold.store.versions import (
    dir_size,
    live_version,
    parts_path,
    pin_live,
    set_live,
    store_path,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Plan:
    """What a replay would do; `--dry-run` prints it and writes nothing."""

    name: str
    version: int
    live: int | None
    ranges: dict[TP, tuple[int, int]]  # (from, to) per partition: what the rebuild still reads
    events: int
    expected_bytes: int
    replaces: str

    def describe(self) -> str:
        lines = [
            f"replay {self.name} v{self.version} "
            f"(live: {'v' + str(self.live) if self.live else 'none'})",
        ]
        for (topic, p), (lo, hi) in sorted(self.ranges.items()):
            lines.append(f"  read {topic}[{p}] offsets {lo}..{hi}  ({max(0, hi - lo)} records)")
        lines.append(f"  events to fold: ~{self.events}")
        lines.append(f"  store size expected: ~{self.expected_bytes / 1e6:.1f} MB")
        lines.append(f"  {self.replaces}")
        return "\n".join(lines)


class Progress:
    """One line per projection, redrawn at most 4 times a second on a terminal (or every 5 s
    otherwise): events/s, position against the end offsets, ETA.

    `sample` returns the events folded so far and the next offset per partition; a rebuild
    switches it from its parallel parts to its own runner once they are merged."""

    def __init__(
        self,
        label: str,
        sample: Callable[[], tuple[int, dict[TP, int]]],
        ends: Callable[[], dict[TP, int]],
        stream: TextIO = sys.stderr,
    ) -> None:
        self.label = label
        self.sample = sample
        self.ends = ends
        self.stream = stream
        self.tty = stream.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="replay-progress", daemon=True)
        self._started = time.monotonic()
        self._folded0 = sample()[0]

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.draw(final=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.25 if self.tty else 5.0):
            self.draw()

    def line(self) -> str:
        folded, positions = self.sample()
        ends = self.ends()
        pos = sum(min(positions.get(tp, 0), end) for tp, end in ends.items())
        total = sum(ends.values()) or 1
        elapsed = max(time.monotonic() - self._started, 1e-6)
        rate = (folded - self._folded0) / elapsed
        eta = (total - pos) / rate if rate > 0 else float("inf")
        width = 30
        filled = int(width * pos / total)
        bar = "#" * filled + "-" * (width - filled)
        eta_s = "--" if eta == float("inf") else f"{eta:,.0f}s"
        return f"{self.label} [{bar}] {pos:,}/{total:,} {rate:,.0f} ev/s ETA {eta_s}"

    def draw(self, final: bool = False) -> None:
        text = self.line()
        if self.tty:
            self.stream.write("\r" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def open_view(config: Config, name: str, version: int) -> RocksStore:
    """A secondary (read-only, following) view of a store another process may be writing."""
    return RocksStore.open_secondary(
        store_path(config, name, version), scratch_root=scratch_dir(config.data_dir)
    )


def source_ends(config: Config, projection: Projection) -> dict[TP, tuple[int, int]]:
    """(low, high) watermarks of every partition of the projection's source topics."""
    return topic_ends(config, projection.topics)


def topic_ends(config: Config, topics: Iterable[str]) -> dict[TP, tuple[int, int]]:
    """(low, high) watermarks of every partition of `topics`."""
    consumer = clients.consumer(config, config.group("replay-plan"))
    try:
        tps = [(t, p) for t in topics for p in _source_partitions(consumer, t)]
        return watermarks(consumer, tps)
    finally:
        consumer.close()


def _source_partitions(consumer: Consumer, topic: str) -> list[int]:
    try:
        return topic_partitions(consumer, topic)
    except TopicError as exc:
        raise ProjectionError(str(exc), hint=exc.hint) from exc


def plan(config: Config, projection: Projection, version: int) -> Plan:
    live = live_version(config, projection.name)
    stored = stored_offsets(config, projection.name, version)
    ranges = {
        tp: (max(low, stored.get(tp, 0)), high)
        for tp, (low, high) in source_ends(config, projection).items()
    }
    events = sum(max(0, hi - lo) for lo, hi in ranges.values())
    live_bytes = dir_size(store_path(config, projection.name, live)) if live else 0
    expected = live_bytes or events * 120
    if live is None:
        replaces = f"no live version: v{version} becomes live once built"
    elif live == version:
        replaces = f"v{version} is already live: nothing to replace (bump `version` to rebuild)"
    else:
        replaces = f"--swap would replace live v{live} by v{version}; v{live} stays for rollback"
    return Plan(projection.name, version, live, ranges, events, expected, replaces)


@dataclass(slots=True)
class ReplayResult:
    version: int
    folded: int
    seconds: float
    diff: DiffSummary | None
    swapped: bool
    parts: int = 1  # processes that folded the bulk of it
    builder: int | None = None  # the pid of another process that built it, waited for


def replay(
    config: Config,
    codec: Codec,
    projection: Projection,
    version: int,
    *,
    diff: bool = False,
    swap: bool = False,
    diff_path: Path | None = None,
    progress: TextIO | None = sys.stderr,
    catch_up_timeout: float = 120.0,
    procs: int | None = None,
    live_frozen: bool = False,
) -> ReplayResult:
    """Build `version` beside the live one until it has caught up with it, then diff and swap.

    A build from scratch is split over `procs` processes (default: one per core, for builds of
    at least PARALLEL_MIN_EVENTS events) up to the live version's offsets, merged, and then
    followed by one runner to the live version's offsets of the moment. `live_frozen`: the code
    has no class for the live version (refold.engine.frozen), so its offsets never move.
    """
    name = projection.name
    sweep(scratch_dir(config.data_dir))  # the views of replays killed before (kill -9)
    # Before v{version}'s store exists: it is not live unswapped (nor, when no version is
    # live yet, before this replay has completed it: a half-built version is never live).
    live = pin_live(config, name, create=True)
    if live == version:
        raise ProjectionError(
            f"v{version} of {name!r} is already live",
            hint="bump the projection's `version` after changing its fold",
        )
    started = time.monotonic()
    while True:
        try:
            store = RocksStore.open(store_path(config, name, version))
            break
        except StoreLocked as exc:
            # A worker (in the background) or another replay builds this version: wait for it
            # instead; if it goes away before catching up (Ctrl-C), build it here.
            if progress is not None and exc.holder:
                progress.write(
                    f"v{version} of {name} is being built by process {exc.holder} "
                    f"({describe_process(exc.holder)}): waiting for it to catch up\n"
                )
            attached = _attached(
                config,
                projection,
                version,
                live,
                diff,
                swap,
                diff_path,
                started,
                catch_up_timeout,
                live_frozen,
                exc.holder,
            )
            if attached is not None:
                return attached
            log.info("%s v%d: its builder went away; building it here", name, version)
    live_view = open_view(config, name, live) if live else None
    build = _Build(config, codec, projection, version, store)
    try:
        below = live_view.offsets() if live_view else {}
        ends = {tp: high for tp, (_low, high) in source_ends(config, projection).items()}
        # What the progress line measures against; replaced as the target moves, never mutated.
        # (A re-keyed build reads the source to its ends: the live one's offsets are those of
        # its own repartition topic.)
        rekeys = projection.rekeys
        goal = [{tp: below.get(tp, 0) for tp in ends} if live_view and not rekeys else ends]
        line = (
            Progress(f"{name} v{version}", build.sample, lambda: goal[0], progress)
            if progress
            else contextlib.nullcontext()
        )
        with line:
            split_over = build.in_parts(goal[0], below, procs, catch_up_timeout)
            ends, target = build.follow(below, live_view, catch_up_timeout, goal)
        summary = None
        if diff and live_view is not None:
            summary = diff_to_file(config, name, live_view, store, diff_path)
            summary.offsets = dict(target) if rekeys else {tp: target.get(tp, 0) for tp in ends}
        folded = build.sample()[0]
    finally:
        build.close()
        if live_view is not None:
            live_view.close()
    if swap or live is None:  # (the first version is live once built)
        set_live(config, name, version)
    return ReplayResult(version, folded, time.monotonic() - started, summary, swap, split_over)


class _Build:
    """One replay's build of a version in this process: the bulk in parallel parts first (from
    scratch, when big enough), then one runner to the live version's offsets. `sample()` says
    what has been folded, from whichever of them is folding, for the progress line."""

    def __init__(
        self, config: Config, codec: Codec, projection: Projection, version: int, store: RocksStore
    ) -> None:
        self.config = config
        self.codec = codec
        self.projection = projection
        self.version = version
        self.store = store
        self.parts = PartsProgress()
        self.runner: ProjectionRunner | None = None
        self._runner_base = 0
        self._dlq: Producer | None = None

    def sample(self) -> tuple[int, dict[TP, int]]:
        runner = self.runner
        if runner is None:
            return self.parts.folded, self.parts.positions
        folded = self.parts.folded + runner.folded_so_far() - self._runner_base
        return folded, runner.pending_positions()

    def in_parts(
        self, target: dict[TP, int], below: dict[TP, int], procs: int | None, timeout: float
    ) -> int:
        """Fold up to `target` in parallel parts and merge them, when the store is empty and
        the build is big enough (or an interrupted one left parts); returns how many processes
        folded the bulk (1: this one will)."""
        config, name, version = self.config, self.projection.name, self.version
        if self.projection.rekeys:  # folds its repartition topic, in `follow`
            return 1
        if self.store.offsets():
            discard_parts(config, name, version)  # left by a merge that completed
            return 1
        todo = sum(target.values())
        split_over = procs or (default_procs() if todo >= PARALLEL_MIN_EVENTS else 1)
        if split_over < 2 and not parts_path(config, name, version).is_dir():
            return 1
        built = build_in_parts(
            config,
            self.projection,
            version,
            self.store,
            target,
            replay_below=below,
            procs=split_over,
            progress=self.parts,
            stall_timeout=timeout,
        )
        return self.parts.count if built else 1

    def follow(
        self,
        below: dict[TP, int],
        live_view: RocksStore | None,
        timeout: float,
        goal: list[dict[TP, int]],
    ) -> tuple[dict[TP, int], dict[TP, int]]:
        """One runner from the store's offsets to the live version's (or the log's ends);
        returns the source partitions' ends and the offsets reached.

        A re-keyed version is built as a worker folds it (refold.engine.repartition): its
        source is routed to its repartition topic up to the source's ends, then that topic is
        folded to its end, so the store holds the repartition offsets any worker that serves
        it goes on from (its states are those of a live fold of the same events)."""
        config, rekeys = self.config, self.projection.rekeys
        if rekeys:
            ends = {tp: high for tp, (_low, high) in source_ends(config, self.projection).items()}
            ensure_repartition_topic(config, self.projection, self.version)
            route_until(
                config,
                self.codec,
                self.projection,
                self.version,
                ends,
                worker_id=worker_id(config),
                timeout=timeout,
            )
            live_view = None  # (its offsets are of another version's repartition topic)
        self._dlq = clients.producer(config)
        self.runner = ProjectionRunner(
            config,
            self.codec,
            self.projection,
            dead_letters=self._dlq,
            store=self.store,
            version=self.version,
            replay_below=below,
            repartitioned=rekeys,
            **rebuild_writes(config),
        )
        self._runner_base = self.runner.stats.folded
        ends = self.runner.assign_all()
        return ends, _follow(self.runner, live_view, ends, timeout, goal)

    def close(self) -> None:
        """Close the runner (and with it the store), or the store when no runner started."""
        if self.runner is None:
            self.store.close()
            return
        self.runner.close()
        if self._dlq is not None:
            self._dlq.flush(10)


def _follow(
    runner: ProjectionRunner,
    live_view: RocksStore | None,
    ends: dict[TP, int],
    timeout: float,
    goal: list[dict[TP, int]],
) -> dict[TP, int]:
    """Fold until `runner` has reached exactly the live version's offsets (or, with no live
    version, the ends of the log), re-reading them until they hold still; returns them.
    `goal[0]` shows the current target to the progress display. Raises ProjectionError when
    the runner fails or folds nothing for `timeout` seconds."""
    while True:
        if live_view is not None:
            live_view.catch_up()
            offsets = live_view.offsets()
            target = {tp: offsets.get(tp, 0) for tp in ends}
        else:
            # From a consumer of its own: the runner's waits behind its own fetch long-polls
            # (up to fetch.wait.max.ms per partition once it has read to the end).
            target = {
                tp: high for tp, (_low, high) in topic_ends(runner.config, runner.topics).items()
            }
        goal[0] = target
        last = runner.pending_positions()
        while not runner.run_until(target, timeout=timeout):  # `timeout` without progress
            if runner.stats.state == "failed":
                raise ProjectionError(f"rebuild of {runner.name!r} stopped: {runner.stats.error}")
            if runner.pending_positions() == last:
                raise ProjectionError(
                    f"v{runner.version} of {runner.name!r} did not move for {timeout:.0f} s",
                    hint="is the broker up? run the replay again: it resumes",
                )
            last = runner.pending_positions()
        if live_view is None:
            return target
        offsets = live_view.offsets()
        if target == {tp: offsets.get(tp, 0) for tp in ends}:
            return target


def _routed_and_folded(
    config: Config, projection: Projection, version: int, view: Store, goal: dict[TP, int]
) -> bool:
    """Whether a re-keyed version's routing has passed `goal` (source offsets) and its store
    has folded its repartition topic to the end."""
    routed = routed_offsets(config, projection, version, goal)
    if any(routed.get(tp, 0) < end for tp, end in goal.items()):
        return False
    topic = repartition_topic(config, projection.name, version)
    folded = view.offsets()
    return all(
        folded.get(tp, 0) >= high for tp, (_low, high) in topic_ends(config, [topic]).items()
    )


def _attached(
    config: Config,
    projection: Projection,
    version: int,
    live: int | None,
    diff: bool,
    swap: bool,
    diff_path: Path | None,
    started: float,
    timeout: float,
    live_frozen: bool = False,
    builder: int | None = None,
) -> ReplayResult | None:
    """The version's store is held by another process building it (a worker, or another
    replay): wait until it has folded exactly what the live version has (at least that, when
    the live version is frozen: the build does not stop there), then diff through read-only
    views and move the pointer. Returns None, having done nothing, when no process holds the
    store any more before it caught up (its `builder`, a pid, was stopped: the caller builds
    it). Gives up when the build stops moving for `timeout` while it is still held."""
    name = projection.name
    new_view = open_view(config, name, version)
    live_view = open_view(config, name, live) if live else None
    # A re-keyed version folds a topic of its own: it is done once its routing passed the
    # source's ends (of now) and its store the ends of its repartition topic.
    goal = (
        {tp: high for tp, (_low, high) in source_ends(config, projection).items()}
        if projection.rekeys
        else None
    )
    try:
        moved_at, last = time.monotonic(), stored_offsets(config, name, version)
        while True:
            new_view.catch_up()
            if live_view is not None:
                live_view.catch_up()
            same = live_view is None or new_view.offsets() == live_view.offsets()
            if goal is not None:
                same = _routed_and_folded(config, projection, version, new_view, goal)
            elif live_frozen and live_view is not None:
                reached = new_view.offsets()
                same = all(reached.get(tp, 0) >= o for tp, o in live_view.offsets().items())
            if same:
                break
            if builder is not None and lock_holder(store_path(config, name, version)) is None:
                return None  # nobody builds it any more
            now = stored_offsets(config, name, version)  # parts included
            if now != last:
                moved_at, last = time.monotonic(), now
            elif time.monotonic() - moved_at > timeout:
                raise ProjectionError(
                    f"v{version} of {name!r} (built by another process) has not caught up with "
                    f"v{live} and did not move for {timeout:.0f} s",
                    hint="look at `refold status`; try again",
                )
            time.sleep(0.2)
        summary = None
        if diff and live_view is not None:
            summary = diff_to_file(config, name, live_view, new_view, diff_path)
            summary.offsets = new_view.offsets()
            if live_frozen:
                summary.frozen_at = live_view.offsets()
        folded = int(new_view.meta("events_folded") or 0)
    finally:
        new_view.close()
        if live_view is not None:
            live_view.close()
    if swap or live is None:  # (the first version is live once built)
        set_live(config, name, version)
    took = time.monotonic() - started
    return ReplayResult(version, folded, took, summary, swap, builder=builder)
