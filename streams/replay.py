"""Replay and repair: build a projection version from offset zero beside the live one, compare
them key by key at the same offsets, and swap the LIVE pointer in one step.

The live version keeps folding and serving throughout (in a worker); this module only reads its
store through a RocksDB secondary view, whose contents move only when asked to catch up, so the
offsets it reports and the states it returns belong to one moment.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from confluent_kafka import Consumer, Producer, TopicPartition

from projections.projection import Projection
from projections.store import RocksStore, Store
from streams.config import Config
from streams.errors import ProjectionError, StoreError
from streams.runtime import TP, ProjectionRunner
from streams.serde import Codec
from streams.versions import dir_size, live_version, set_live, store_path

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


@dataclass(slots=True)
class DiffSummary:
    added: int = 0
    removed: int = 0
    changed: int = 0
    unchanged: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)
    path: Path | None = None
    offsets: dict[TP, int] = field(default_factory=dict)

    def describe(self) -> str:
        return (
            f"diff at the same offsets: {self.changed} changed, {self.added} added, "
            f"{self.removed} removed, {self.unchanged} unchanged"
        )


def _page(store: Store, page: int = 5000) -> Iterator[tuple[str, Any]]:
    after: str | None = None
    while True:
        rows = store.scan(after=after, limit=page)
        yield from rows
        if len(rows) < page:
            return
        after = rows[-1][0]


def diff_stores(old: Store, new: Store, out: TextIO, samples: int = 5) -> DiffSummary:
    """Merge-join both stores in key order; every difference is one JSON line in `out`."""
    summary = DiffSummary()
    a, b = _page(old), _page(new)
    x, y = next(a, None), next(b, None)

    def emit(change: str, key: str, before: Any, after: Any) -> None:
        row = {"key": key, "change": change, "before": before, "after": after}
        out.write(json.dumps(row) + "\n")
        if len(summary.samples) < samples:
            summary.samples.append(row)

    while x is not None or y is not None:
        if y is None or (x is not None and x[0] < y[0]):
            assert x is not None
            summary.removed += 1
            emit("removed", x[0], x[1], None)
            x = next(a, None)
        elif x is None or y[0] < x[0]:
            summary.added += 1
            emit("added", y[0], None, y[1])
            y = next(b, None)
        else:
            if x[1] == y[1]:
                summary.unchanged += 1
            else:
                summary.changed += 1
                emit("changed", x[0], x[1], y[1])
            x, y = next(a, None), next(b, None)
    return summary


class Progress:
    """One line per projection, redrawn at most 4 times a second on a terminal (or every 5 s
    otherwise): events/s, position against the end offsets, ETA."""

    def __init__(
        self,
        runner: ProjectionRunner,
        ends: Callable[[], dict[TP, int]],
        stream: TextIO = sys.stderr,
    ) -> None:
        self.runner = runner
        self.ends = ends
        self.stream = stream
        self.tty = stream.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="replay-progress", daemon=True)
        self._started = time.monotonic()
        self._folded0 = runner.stats.folded

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
        stats = self.runner.stats
        ends = self.ends()
        pos = sum(min(stats.positions.get(tp, 0), end) for tp, end in ends.items())
        total = sum(ends.values()) or 1
        elapsed = max(time.monotonic() - self._started, 1e-6)
        rate = (stats.folded - self._folded0) / elapsed
        eta = (total - pos) / rate if rate > 0 else float("inf")
        width = 30
        filled = int(width * pos / total)
        bar = "#" * filled + "-" * (width - filled)
        eta_s = "--" if eta == float("inf") else f"{eta:,.0f}s"
        return (
            f"{self.runner.name} v{self.runner.version} [{bar}] {pos:,}/{total:,} "
            f"{rate:,.0f} ev/s ETA {eta_s}"
        )

    def draw(self, final: bool = False) -> None:
        text = self.line()
        if self.tty:
            self.stream.write("\r" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def open_view(config: Config, name: str, version: int) -> RocksStore:
    """A secondary (read-only, following) view of a store another process may be writing."""
    return RocksStore.open_secondary(store_path(config, name, version))


def plan(config: Config, projection: Projection, version: int) -> Plan:
    live = live_version(config, projection.name)
    stored: dict[TP, int] = {}
    path = store_path(config, projection.name, version)
    if path.is_dir():
        view = open_view(config, projection.name, version)
        try:
            stored = view.offsets()
        finally:
            view.close()
    consumer = Consumer(config.kafka(**{"group.id": "refold-replay-plan"}))
    ranges: dict[TP, tuple[int, int]] = {}
    try:
        for topic in projection.topics:
            md = consumer.list_topics(topic, timeout=10).topics.get(topic)
            if md is None or md.error is not None:
                raise ProjectionError(f"topic {topic!r} does not exist")
            for p in sorted(md.partitions):
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                ranges[(topic, p)] = (max(low, stored.get((topic, p), 0)), high)
    finally:
        consumer.close()
    events = sum(max(0, hi - lo) for lo, hi in ranges.values())
    live_bytes = dir_size(store_path(config, projection.name, live)) if live else 0
    expected = live_bytes or events * 120
    if live is None:
        replaces = f"no live version: v{version} becomes live when swapped"
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
) -> ReplayResult:
    """Build `version` beside the live one until it has caught up with it, then diff and swap."""
    name = projection.name
    live = live_version(config, name)
    if live == version:
        raise ProjectionError(
            f"v{version} of {name!r} is already live",
            hint="bump the projection's `version` after changing its fold",
        )
    started = time.monotonic()
    try:
        store = RocksStore.open(store_path(config, name, version))
    except StoreError:
        # A worker already builds this version in the background: watch it instead.
        return _attached(
            config, projection, version, live, diff, swap, diff_path, started, catch_up_timeout
        )
    live_view = open_view(config, name, live) if live else None
    try:
        below = live_view.offsets() if live_view else {}
        dlq = Producer(config.kafka(**{"enable.idempotence": True, "acks": "all"}))
        runner = ProjectionRunner(
            config,
            codec,
            projection,
            dead_letters=dlq,
            store=store,
            version=version,
            replay_below=below,
        )
        folded0 = runner.stats.folded
        ends = runner.assign_all()
        try:
            target = dict(ends)
            reporter = Progress(runner, lambda: target, progress) if progress else None
            if reporter:
                reporter.__enter__()
            try:
                while True:
                    if live_view is not None:
                        live_view.catch_up()
                        target = {tp: live_view.offsets().get(tp, 0) for tp in ends}
                    else:
                        target = runner.end_offsets()
                    if not runner.run_until(target, timeout=catch_up_timeout):
                        raise ProjectionError(
                            f"v{version} of {name!r} did not catch up within "
                            f"{catch_up_timeout:.0f}s",
                            hint="run the replay again: it resumes",
                        )
                    if live_view is None or target == {
                        tp: live_view.offsets().get(tp, 0) for tp in ends
                    }:
                        break
            finally:
                if reporter:
                    reporter.__exit__(None, None, None)
            summary = None
            if diff and live_view is not None:
                summary = _diff_to_file(config, name, live_view, runner.store, diff_path)
                summary.offsets = target
            folded = runner.stats.folded - folded0
        finally:
            runner.close()
            dlq.flush(10)
    finally:
        if live_view is not None:
            live_view.close()
    if swap:
        set_live(config, name, version)
    return ReplayResult(version, folded, time.monotonic() - started, summary, swap)


def _diff_to_file(
    config: Config, name: str, old: Store, new: Store, path: Path | None
) -> DiffSummary:
    path = path or config.data_dir / "diffs" / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        summary = diff_stores(old, new, out)
    summary.path = path
    return summary


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
) -> ReplayResult:
    """The version's store is held by a worker building it: wait until it has folded exactly
    what the live version has, then diff through read-only views and move the pointer."""
    name = projection.name
    new_view = open_view(config, name, version)
    live_view = open_view(config, name, live) if live else None
    try:
        deadline = time.monotonic() + timeout
        while True:
            new_view.catch_up()
            if live_view is not None:
                live_view.catch_up()
            same = live_view is None or new_view.offsets() == live_view.offsets()
            if same:
                break
            if time.monotonic() > deadline:
                raise ProjectionError(
                    f"v{version} of {name!r} (built by a running worker) has not caught up with "
                    f"v{live} within {timeout:.0f}s",
                    hint="look at `refold status`; try again",
                )
            time.sleep(0.2)
        summary = None
        if diff and live_view is not None:
            summary = _diff_to_file(config, name, live_view, new_view, diff_path)
            summary.offsets = new_view.offsets()
        folded = int(new_view.meta("events_folded") or 0)
    finally:
        new_view.close()
        if live_view is not None:
            live_view.close()
    if swap:
        set_live(config, name, version)
    return ReplayResult(version, folded, time.monotonic() - started, summary, swap)
