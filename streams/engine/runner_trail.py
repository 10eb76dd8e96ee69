"""A projection runner that trails the live version, and one that retires from it.

A version queries do not read yet (a build, a switch's target: refold.engine.version_switch)
`trails` the runner they read: it folds nothing that one has not folded, and takes its
positions as the replay floor, so every event it folds reaches it as `replay` (the live one
acted on it). At the switch the old runner retires: it stops folding and acting, ends in state
`retired` with its final positions, and its store answers the queries still reading it until
`stop()`.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from confluent_kafka import Message
from refold.engine.repartition import Repartitioner
from refold.engine.repartition_progress import RoutedPositions
from refold.engine.runner_stats import TP, RunnerStats
from refold.store.rocksdb import Store

if TYPE_CHECKING:
    from refold.engine.runtime import ProjectionRunner


class RunnerTrail:
    """Trailing and retiring, for `ProjectionRunner` (its fields, set by the runner)."""

    stats: RunnerStats
    store: Store
    feeder: Repartitioner | None
    routed: RoutedPositions | None
    trailing: ProjectionRunner | None
    _stop: threading.Event
    _store_lock: threading.Lock
    _retiring: bool
    _ended: threading.Event
    _replay_below: dict[TP, int]

    def _close_store(self) -> None:
        if self.routed is not None:
            self.routed.close()
        self.store.close()

    def stop(self) -> None:
        """Stop folding and close the store (at once if the runner has retired)."""
        self._stop.set()
        if self.feeder is not None:
            self.feeder.stop()
        with self._store_lock:
            self._retiring = False
            ended = self._ended.is_set()
        if ended:
            self._close_store()

    def retire(self) -> None:
        """Stop folding (and acting on events), keep answering: the fold thread stores what it
        folded, closes its consumer and ends in state `retired` with its final positions; the
        store stays open for the queries still reading it until `stop()`. For a version
        queries left: the version they read now folds on from there, alone."""
        with self._store_lock:
            if self._ended.is_set():
                return
            self._retiring = True
        self._stop.set()
        if self.feeder is not None:
            self.feeder.stop()

    def ended(self, timeout: float) -> bool:
        """Whether the fold thread has ended (waiting up to `timeout` seconds)."""
        return self._ended.wait(timeout)

    def _trail(self, msgs: list[Message]) -> None:
        """Wait until `trailing` (the version queries read) has folded `msgs`, in the
        partitions it folds, then take its positions as this runner's replay floor: it acted
        on those events, so here they are `replay`. Once it no longer folds (retired at a
        switch, failed, stopped), its final positions are the floor and this runner, acting
        on what follows, stops trailing. A version being built or caught up thus never acts
        on an event the serving one acts on, and never gets ahead of it to skip one."""
        live = self.trailing
        if live is None:
            return
        last: dict[TP, int] = {}
        for msg in msgs:
            if msg.error() is None:
                last[(msg.topic(), msg.partition())] = msg.offset()
        while True:
            done = live.stats.state in ("retired", "stopped", "failed")
            positions = live.stats.positions
            if done or self._stop.is_set():
                break
            if all(positions.get(tp, offset + 1) > offset for tp, offset in last.items()):
                break
            self._stop.wait(0.005)
        floor = self._replay_below
        for tp, nxt in positions.items():
            if nxt > floor.get(tp, 0):
                floor[tp] = nxt
        if done:
            self.trailing = None
