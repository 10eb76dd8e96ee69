"""Where a command's time goes: a histogram of milliseconds per step, for `/metrics`.

Steps, in a command's order (per command unless it says per transaction):

- `http_intake`: the POST read, parsed and validated (HTTP, before the append);
- `http_append`: the append to the command topic until Kafka acknowledged it;
- `queued`: from the command record's timestamp (its produce) to the processor's consume;
- `decide`: states and `decide_batch` for the command's batch (the claims travel meanwhile);
- `txn_begin`, `txn_offsets`, `txn_events`, `claims_wait`, `txn_commit`, per transaction: begun;
  events produced and the command offsets sent; events flushed and results produced; the
  batch's claims awaited and checked; committed (the commit flushes the results);
- `store`: the after-commit fold and RocksDB write (per transaction);
- `decided_to_committed`: from the batch's decision time to its commit;
- `decided_to_index`: from the result's `decided_at_ms` (taken once the events are flushed) to
  the HTTP worker's results index learning it (commit, the results consumer's fetch, the
  index's write);
- `http_answer`: from the index learning the result to the answer being written;
- `post_total`: the whole POST with `?wait_ms=`, as the server sees it.

Prometheus histograms (cumulative buckets, `_sum`, `_count`): a bench scrapes them before and
after its run and takes the difference, so earlier traffic does not count.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Iterator

#: Upper bounds of the buckets, ms.
BUCKETS_MS = (
    0.25,
    0.5,
    1.0,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    15.0,
    20.0,
    30.0,
    50.0,
    75.0,
    100.0,
    150.0,
    200.0,
    300.0,
    500.0,
    750.0,
    1000.0,
    2000.0,
    5000.0,
    10000.0,
)

STEPS = (
    "http_intake",
    "http_append",
    "queued",
    "decide",
    "txn_begin",
    "txn_offsets",
    "txn_events",
    "claims_wait",
    "txn_commit",
    "store",
    "decided_to_committed",
    "decided_to_index",
    "http_answer",
    "post_total",
)


class StepTimes:
    """Milliseconds per step, bucketed. `add` may be called from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}

    def add(self, step: str, ms: float, times: int = 1) -> None:
        at = bisect_left(BUCKETS_MS, ms)
        with self._lock:
            counts = self._counts.get(step)
            if counts is None:
                counts = self._counts[step] = [0] * (len(BUCKETS_MS) + 1)
                self._sums[step] = 0.0
            counts[at] += times
            self._sums[step] += ms * times

    def samples(self) -> Iterator[tuple[str, str, float, int]]:
        """(step, le, cumulative count, -) rows, then each step's sum and count."""
        with self._lock:
            snapshot = {step: list(c) for step, c in self._counts.items()}
            sums = dict(self._sums)
        for step in sorted(snapshot, key=_order):
            total = 0
            for bound, count in zip((*BUCKETS_MS, float("inf")), snapshot[step], strict=True):
                total += count
                yield step, "+Inf" if bound == float("inf") else f"{bound:g}", sums[step], total


def _order(step: str) -> int:
    return STEPS.index(step) if step in STEPS else len(STEPS)


def metrics_lines(timings: dict[str, StepTimes]) -> list[str]:
    """The `refold_command_step_ms` histogram family, one series per aggregate and step."""
    name = "refold_command_step_ms"
    lines = [
        f"# HELP {name} Milliseconds per step of a command (refold.engine.command_timing).",
        f"# TYPE {name} histogram",
    ]
    for aggregate, times in sorted(timings.items()):
        last: dict[str, tuple[float, int]] = {}
        for step, le, total_ms, cumulative in times.samples():
            labels = f'aggregate="{aggregate}",step="{step}"'
            lines.append(f'{name}_bucket{{{labels},le="{le}"}} {cumulative}')
            last[step] = (total_ms, cumulative)
        for step, (total_ms, count) in last.items():
            labels = f'aggregate="{aggregate}",step="{step}"'
            lines.append(f"{name}_sum{{{labels}}} {total_ms:.3f}")
            lines.append(f"{name}_count{{{labels}}} {count}")
    return lines
