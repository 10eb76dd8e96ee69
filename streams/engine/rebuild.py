"""The parallel rebuild: a projection version folded by several processes, then merged.

One Python thread folds about 80k events/s (consume, decode, fold and store writes all hold the
GIL), so a rebuild from offset zero splits the source partitions between processes, each folding
its share into a part store of its own (`v<N>.parts/part-<i>`), and merges the parts into the
version's store once every part has reached its bounds.

Keys must not cross parts: every partition number goes to one part with the same partition of
every source topic (co-partitioned topics put a key in the same partition number everywhere), and
projections that fold under another key (`key()`) are rebuilt by one process.

Crash safety, step by step:
1. the split is written to `LAYOUT.json` before any part starts; a rerun uses the same split;
2. each part is an ordinary store: states and offsets in one WriteBatch, so a part killed at any
   point resumes from its own offsets;
3. the merge copies the parts' states into the version's store, then writes the offsets and the
   counters in ONE last batch: a crash before it leaves that store without offsets (the merge
   runs again, overwriting the same keys with the same states); a crash after it finds the store
   complete and the parts are removed.
Children are killed by the kernel when the parent dies (PR_SET_PDEATHSIG), even by kill -9.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import multiprocessing
import os
import pickle
import queue
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from refold.core.config import Config
from refold.core.errors import ProjectionError, StoreError
from refold.core.projection import Projection
from refold.engine.runner_stats import TP
from refold.engine.runner_writes import rebuild_writes
from refold.engine.runtime import ProjectionRunner, tune_collector
from refold.kafka import clients
from refold.store.rocksdb import RocksStore
from refold.store.scratch import scratch_dir
from refold.store.versions import parts_path, store_path, versions_on_disk

log = logging.getLogger(__name__)

PARALLEL_MIN_EVENTS = 200_000  # below this, starting processes costs more than it saves
_PR_SET_PDEATHSIG = 1
_REPORT_EVERY_S = 0.25
_COUNTERS = ("events_folded", "dead_letters", "skipped")


def default_procs() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def split(projection: Projection, partitions: Mapping[str, int], procs: int) -> list[list[int]]:
    """Partition numbers per part, or [] when this projection must be rebuilt by one process.

    `partitions` is the partition count of each source topic.
    """
    counts = set(partitions.values())
    if procs < 2 or projection.rekeys or len(counts) != 1:
        return []
    count = counts.pop()
    procs = min(procs, count)
    if procs < 2:
        return []
    return [list(range(i, count, procs)) for i in range(procs)]


@dataclass(slots=True)
class PartsProgress:
    """What the parts have folded in this run and the offsets they reached, as their reports
    say (a resumed part's first report carries what it had folded before: not counted)."""

    folded: int = 0
    positions: dict[TP, int] = field(default_factory=dict)
    _first: dict[int, int] = field(default_factory=dict)
    _last: dict[int, int] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self._first)

    def update(self, part: int, folded: int, positions: Mapping[TP, int]) -> None:
        self._first.setdefault(part, folded)
        self._last[part] = folded
        self.folded = sum(self._last.values()) - sum(self._first.values())
        merged = dict(self.positions)
        merged.update(positions)
        self.positions = merged


def stored_offsets(config: Config, name: str, version: int) -> dict[TP, int]:
    """The offsets a version has folded: its store's, or (mid-rebuild) its parts'."""
    offsets: dict[TP, int] = {}
    for path in (store_path(config, name, version), *_part_dirs(config, name, version)):
        if not (path / "CURRENT").is_file():
            continue
        try:
            view = RocksStore.open_secondary(path, scratch_root=scratch_dir(config.data_dir))
        except StoreError:
            continue  # being created right now: nothing folded yet
        try:
            for tp, offset in view.offsets().items():
                offsets.setdefault(tp, offset)
        finally:
            view.close()
    return offsets


def build_on_disk(config: Config, name: str, live: int) -> tuple[int, dict[TP, int]] | None:
    """The newest version above `live` that has a store on disk (a rebuild that another process
    runs, or left off), with the offsets it has folded."""
    newer = [v for v in versions_on_disk(config, name) if v > live]
    if not newer:
        return None
    return newer[-1], stored_offsets(config, name, newer[-1])


def _part_dirs(config: Config, name: str, version: int) -> list[Path]:
    root = parts_path(config, name, version)
    return sorted(root.glob("part-*")) if root.is_dir() else []


def build_in_parts(
    config: Config,
    projection: Projection,
    version: int,
    store: RocksStore,
    bounds: Mapping[TP, int],
    *,
    replay_below: Mapping[TP, int],
    procs: int,
    progress: PartsProgress | None = None,
    stall_timeout: float = 120.0,
    stop: threading.Event | None = None,
) -> bool:
    """Fold every source partition up to `bounds` in parallel parts, then merge them into
    `store` (open, read-write, without offsets). Returns True once merged; False when this
    projection or its topics cannot be split (see `split`: nothing done), or when `stop` was set
    first (the parts stay for the next attempt). Raises ProjectionError when no part moves for
    `stall_timeout` seconds (say, the broker is gone)."""
    root = parts_path(config, projection.name, version)
    try:
        pickle.dumps(projection)
    except Exception as exc:  # e.g. a class made inside a function: children cannot import it
        log.warning("%s: one process rebuilds it, it cannot be pickled: %s", projection.name, exc)
        discard_parts(config, projection.name, version)
        return False
    layout = _layout(root, projection, bounds, procs)
    if not layout:
        return False
    if store.offsets():
        raise ProjectionError(f"{store.path} already holds offsets: it cannot take parts")
    progress = progress or PartsProgress()
    started = time.monotonic()
    paths = [root / f"part-{i}" for i in range(len(layout))]
    copied: list[Path] = []

    def copy_states(index: int) -> None:
        # A part done before the others is copied while they fold, on the core it freed.
        with RocksStore.open(paths[index]) as part:
            store.copy_states(part)
        copied.append(paths[index])

    if not _run_parts(
        config,
        projection,
        version,
        root,
        layout,
        bounds,
        replay_below,
        progress,
        stall_timeout,
        stop or threading.Event(),
        copy_states,
    ):
        return False
    folded_at = time.monotonic()
    _merge(store, paths, copied)
    discard_parts(config, projection.name, version)
    log.info(
        "%s v%d: %d parts folded in %.1f s, merged in %.1f s after the last one",
        projection.name,
        version,
        len(layout),
        folded_at - started,
        time.monotonic() - folded_at,
    )
    return True


def discard_parts(config: Config, name: str, version: int, attempts: int = 20) -> bool:
    """Remove parts left by a rebuild whose merge completed (or that is being redone serially).
    A file that appears or vanishes while the tree goes (a part store still closing) only makes
    it try again; cleanup never fails the build: after `attempts` tries it warns and returns
    False, and the next build of the version removes what is left."""
    root = parts_path(config, name, version)
    for attempt in range(attempts):
        try:
            shutil.rmtree(root)
            return True
        except FileNotFoundError:
            if not root.exists():
                return True
        except OSError as exc:
            if attempt == attempts - 1:
                log.warning("%s v%d: parts left in %s: %s", name, version, root, exc)
        time.sleep(0.1 * (attempt + 1))
    return False


def _layout(
    root: Path, projection: Projection, bounds: Mapping[TP, int], procs: int
) -> list[list[int]]:
    """The split recorded by an interrupted rebuild, else a new one, recorded before use."""
    record = root / "LAYOUT.json"
    if record.is_file():
        return [list(part) for part in json.loads(record.read_text())["parts"]]
    counts: dict[str, int] = {}
    for topic, partition in bounds:
        counts[topic] = max(counts.get(topic, 0), partition + 1)
    layout = split(projection, counts, procs)
    if layout:
        root.mkdir(parents=True, exist_ok=True)
        tmp = record.with_suffix(".tmp")
        tmp.write_text(json.dumps({"parts": layout}))
        os.replace(tmp, record)
    return layout


@dataclass(frozen=True, slots=True)
class PartProgress:
    """A part's progress report: events folded (stored or pending) and next offsets."""

    part: int
    folded: int
    positions: dict[TP, int]


@dataclass(frozen=True, slots=True)
class PartDone:
    """A part reached its bounds and stored everything: its final counts."""

    part: int
    folded: int
    positions: dict[TP, int]


@dataclass(frozen=True, slots=True)
class PartFailed:
    """A part stopped before its bounds, and why."""

    part: int
    reason: str


#: What a part's process sends its parent, in order: progress reports, then done or failed.
PartReport = PartProgress | PartDone | PartFailed


def _run_parts(
    config: Config,
    projection: Projection,
    version: int,
    root: Path,
    layout: list[list[int]],
    bounds: Mapping[TP, int],
    replay_below: Mapping[TP, int],
    progress: PartsProgress,
    stall_timeout: float,
    stop: threading.Event,
    on_done: Callable[[int], None],
) -> bool:
    """Run every part to its bounds, calling `on_done(index)` as each but the last one ends;
    False if `stop` was set first (the parts are killed)."""
    ctx = multiprocessing.get_context("spawn")
    reports: multiprocessing.Queue[PartReport] = ctx.Queue()
    label = f"{projection.name!r} v{version}"
    children: list[BaseProcess] = []
    for index, numbers in enumerate(layout):
        mine = {tp: end for tp, end in bounds.items() if tp[1] in numbers}
        below = {tp: o for tp, o in replay_below.items() if tp in mine}
        part = (config, projection, version, index, str(root / f"part-{index}"), mine, below)
        name = f"refold-rebuild-{projection.name}-v{version}-part-{index}"
        children.append(_start_part(ctx, name, part, reports))
    done: set[int] = set()
    stalled = _Stall(progress, stall_timeout, f"rebuild of {label}", sum(bounds.values()))
    try:
        while len(done) < len(children):
            if stop.is_set():
                return False
            stalled.check()
            report = _next_report(reports)
            if report is None:
                _check_alive(children, done, label)
                continue
            if isinstance(report, PartFailed):
                raise ProjectionError(
                    f"rebuild part {report.part} of {label} failed: {report.reason}",
                    hint="run the replay again: every part resumes from its offsets",
                )
            progress.update(report.part, report.folded, report.positions)
            if isinstance(report, PartDone):
                done.add(report.part)
                if len(done) < len(children):
                    on_done(report.part)
        return True
    finally:
        for i, proc in enumerate(children):
            if i not in done and proc.exitcode is None:
                proc.kill()
            proc.join(30)
        reports.close()


def _start_part(
    ctx: Any, name: str, part: tuple[Any, ...], reports: multiprocessing.Queue[PartReport]
) -> BaseProcess:
    """Spawn the process `name` that folds one part: `part` is (config, projection, version,
    index, path, bounds, replay_below), the arguments of `_part_main` after the parent's."""
    child: BaseProcess = ctx.Process(
        target=_part_main,
        name=name,
        args=(os.getpid(), _log_levels(), *part, reports),
        daemon=True,
    )
    child.start()
    return child


class _Stall:
    """Raises ProjectionError once the parts' positions have not moved for `timeout` s."""

    def __init__(self, progress: PartsProgress, timeout: float, what: str, total: int) -> None:
        self._progress = progress
        self._timeout = timeout
        self._what = what
        self._total = total
        self._moved_at = time.monotonic()
        self._last = progress.positions

    def check(self) -> None:
        now = self._progress.positions
        if now != self._last:
            self._moved_at, self._last = time.monotonic(), now
        elif time.monotonic() - self._moved_at > self._timeout:
            raise ProjectionError(
                f"{self._what}: no part moved for {self._timeout:.0f} s "
                f"(at {sum(self._last.values())} of {self._total})",
                hint="is the broker up? run the replay again: every part resumes",
            )


def _check_alive(children: list[BaseProcess], done: set[int], label: str) -> None:
    """ProjectionError naming the first part that exited without reporting done."""
    for i, proc in enumerate(children):
        if i not in done and proc.exitcode is not None:
            raise ProjectionError(
                f"rebuild part {i} of {label} died (exit code {proc.exitcode})",
                hint="run the replay again: every part resumes from its offsets",
            )


def _next_report(reports: multiprocessing.Queue[PartReport]) -> PartReport | None:
    try:
        return reports.get(timeout=0.5)
    except queue.Empty:
        return None


def _merge(store: RocksStore, parts: list[Path], copied: list[Path]) -> None:
    opened = [RocksStore.open(path) for path in parts]
    try:
        totals = {name: sum(int(part.meta(name) or 0) for part in opened) for name in _COUNTERS}
        store.absorb(opened, meta=totals, copied=copied)
    finally:
        for part in opened:
            try:
                part.close()
            except StoreError as exc:  # merged or not, the parts are only read: go on
                log.warning("closing part %s after the merge: %s", part.path, exc)


# -- the child process ----------------------------------------------------------------------


def _part_main(
    parent: int,
    log_levels: dict[str, int],
    config: Config,
    projection: Projection,
    version: int,
    index: int,
    path: str,
    bounds: dict[TP, int],
    replay_below: dict[TP, int],
    reports: multiprocessing.Queue[PartReport],
) -> None:
    """Fold one part up to its bounds, reporting progress; runs in a spawned child."""
    _die_with(parent)
    tune_collector()
    logging.basicConfig(
        level=log_levels.pop(""), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for name, level in log_levels.items():
        logging.getLogger(name).setLevel(level)
    from refold.kafka.registry import codec_for

    try:
        store = _open_part(Path(path))
        dlq = clients.producer(config)
        runner = ProjectionRunner(
            config,
            codec_for(config),
            projection,
            dead_letters=dlq,
            store=store,
            version=version,
            replay_below=replay_below,
            **rebuild_writes(config),
        )
        reports.put(PartProgress(index, runner.stats.folded, dict(runner.store.offsets())))
        with _reporting(runner, index, reports):
            runner.assign_all(partitions={p for _t, p in bounds})
            reached = runner.run_until(bounds)
        state, error = runner.stats.state, runner.stats.error
        folded, positions = runner.stats.folded, dict(runner.stats.positions)
        runner.close()
        if dlq.flush(30):
            raise ProjectionError(f"dead letters of part {index} not delivered")
        if not reached or state == "failed":
            reports.put(PartFailed(index, error or "stopped before its bounds"))
        else:
            reports.put(PartDone(index, folded, positions))
    except Exception as exc:
        log.exception("rebuild part %d failed", index)
        reports.put(PartFailed(index, f"{type(exc).__name__}: {exc}"))
    finally:
        reports.close()
        reports.join_thread()


def _log_levels() -> dict[str, int]:
    """The parent's root and librdkafka log levels, for its children to log alike."""
    return {
        "": logging.getLogger().getEffectiveLevel(),
        "librdkafka": logging.getLogger("librdkafka").getEffectiveLevel(),
    }


def _die_with(parent: int) -> None:
    """Have the kernel kill this process when the parent dies, whatever kills the parent."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request above: follow it now
        os._exit(1)


def _open_part(path: Path, wait: float = 15.0) -> RocksStore:
    """A part store; a part of an earlier run killed a moment ago may still hold its lock."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return RocksStore.open(path)
        except StoreError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@contextlib.contextmanager
def _reporting(
    runner: ProjectionRunner, index: int, reports: multiprocessing.Queue[PartReport]
) -> Iterator[None]:
    stop = threading.Event()

    def report() -> None:
        while not stop.wait(_REPORT_EVERY_S):
            reports.put(PartProgress(index, runner.folded_so_far(), runner.pending_positions()))

    thread = threading.Thread(target=report, name="rebuild-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
