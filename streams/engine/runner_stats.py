"""What a projection runner publishes: counters and positions (`RunnerStats`) for status, metrics
and read-your-writes, and which owned partitions hold records too long unfolded (`Behind`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

TP = tuple[str, int]
#: An owned partition is "behind" while records it held this many seconds ago are not folded.
BEHIND_S = 5.0


@dataclass(slots=True)
class RunnerStats:
    """Counters and positions a runner publishes for status, metrics and read-your-writes."""

    state: str = "starting"  # starting | running | retired (folds no more) | stopped | failed
    error: str | None = None
    folded: int = 0
    dead_letters: int = 0
    skipped: int = 0
    batches: int = 0
    rejoins: int = 0  # consumers replaced (`ProjectionRunner.rejoin`)
    positions: dict[TP, int] = field(default_factory=dict)  # next offset per owned partition
    assigned: tuple[TP, ...] = ()
    joined: bool = False  # the group has assigned this consumer its share (none, maybe)
    high_watermarks: dict[TP, int] = field(default_factory=dict)
    last_commit_ms: float = 0.0
    # Refreshed about once a second by the fold thread (`_refresh_watermarks`), each a new object:
    lag: dict[TP, int] = field(default_factory=dict)  # records not folded, per owned partition
    behind: tuple[TP, ...] = ()  # owned partitions with records older than BEHIND_S unfolded
    refreshed_at: float = 0.0  # time.monotonic() of that refresh


class Behind:
    """Which partitions hold records older than `after` seconds that are not folded yet: fed
    the end offsets seen and the positions folded, once a second or so."""

    def __init__(self, after: float = BEHIND_S) -> None:
        self._after = after
        self._seen: list[tuple[float, Mapping[TP, int]]] = []  # (when, ends), oldest first

    def update(
        self, now: float, ends: Mapping[TP, int], folded: Mapping[TP, int]
    ) -> tuple[TP, ...]:
        """Partitions not folded to the ends seen `after` s ago (or, for partitions watched
        less long than that, to the first end seen: a new owner is behind until it caught up
        with what was there when it took the partition)."""
        seen = self._seen
        seen.append((now, ends))
        while len(seen) > 1 and seen[1][0] <= now - self._after:
            seen.pop(0)  # seen[0] stays: the newest sample at least `after` s old
        behind = []
        for tp, nxt in folded.items():
            ref = next((m[tp] for _t, m in seen if tp in m), None)
            if ref is not None and nxt < ref:
                behind.append(tp)
        return tuple(sorted(behind))
