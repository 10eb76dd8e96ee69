"""Frozen versions: a store whose version's class the code no longer has.

A store is folded only by its own version's code. When the worker must serve a version (it is
live, or a swap or rollback targets it) whose class the app's modules no longer define, that
version is frozen: its store is opened read-only and answers queries at the offsets it last
stored, with no consumer and nothing folded into it. The newest version builds beside it as
usual, and a swap moves queries to it. Keeping the old class beside the new one avoids this.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from refold.core.config import Config
from refold.core.projection import Projection
from refold.engine.runner_stats import TP, RunnerStats
from refold.engine.runtime import ProjectionRunner
from refold.store.rocksdb import RocksStore
from refold.store.versions import store_path

log = logging.getLogger(__name__)

FROZEN = "frozen"


def frozen_reason(name: str, versions: Mapping[int, Projection], version: int) -> str | None:
    """Why `version` of projection `name` cannot be folded by this code, or None if it can."""
    if version in versions:
        return None
    newest = f"the newest is v{max(versions)}" if versions else "it has no version at all"
    return f"code has no class for v{version} of {name!r}; {newest}"


class FrozenVersion:
    """The read side of a version nobody may fold: the same surface the query server, the
    reader processes and the status use of a `ProjectionRunner` (name, version, topics, stats,
    store, reached, wait_for, stop), over a store opened read-only."""

    def __init__(self, config: Config, name: str, version: int, reason: str) -> None:
        self.config = config
        self.name = name
        self.version = version
        self.reason = reason
        self.store = RocksStore.open(store_path(config, name, version), read_only=True)
        offsets = self.store.offsets()
        self.topics: tuple[str, ...] = tuple(sorted({t for t, _ in offsets}))
        self.stats = RunnerStats(
            state=FROZEN,
            error=reason,
            folded=int(self.store.meta("events_folded") or 0),
            dead_letters=int(self.store.meta("dead_letters") or 0),
            skipped=int(self.store.meta("skipped") or 0),
            positions=dict(offsets),
            assigned=tuple(sorted(offsets)),
        )
        log.warning("%s v%d is frozen at %s: %s", name, version, offsets, reason)

    def reached(self, wanted: Mapping[TP, int]) -> bool:
        """True once every (topic, partition) in `wanted` has folded that offset; a frozen
        version never moves, so what it has not reached now it never will."""
        positions = self.stats.positions
        return all(positions.get(tp, 0) > offset for tp, offset in wanted.items())

    def wait_for(self, wanted: Mapping[TP, int], timeout: float) -> bool:
        return self.reached(wanted)

    def lag(self) -> dict[TP, int]:
        return {}

    def stop(self) -> None:
        self.stats.state = "stopped"
        self.store.close()


#: What a worker serves queries from: a runner folding its version, or a frozen version.
Serving = ProjectionRunner | FrozenVersion
