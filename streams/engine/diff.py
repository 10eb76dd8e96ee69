"""The diff of two versions of a projection: both stores merge-joined in key order, every
difference one JSON line (`{"key", "change", "before", "after"}`), and the counts. `refold replay
--diff` runs it through read-only views once the new version has folded the live one's offsets.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from refold.core.config import Config
from refold.engine.runner_stats import TP
from refold.store.rocksdb import Store


@dataclass(slots=True)
class DiffSummary:
    added: int = 0
    removed: int = 0
    changed: int = 0
    unchanged: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)
    path: Path | None = None
    offsets: dict[TP, int] = field(default_factory=dict)
    frozen_at: dict[TP, int] | None = None  # the live version's offsets, when it was frozen

    def describe(self) -> str:
        counts = (
            f"{self.changed} changed, {self.added} added, {self.removed} removed, "
            f"{self.unchanged} unchanged"
        )
        if self.frozen_at is None or self.frozen_at == self.offsets:
            return f"diff at the same offsets: {counts}"
        behind = sum(max(0, o - self.frozen_at.get(tp, 0)) for tp, o in self.offsets.items())
        return (
            f"diff against the frozen live version, {behind} events behind the new one "
            f"(its changes count too): {counts}"
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


def diff_to_file(
    config: Config, name: str, old: Store, new: Store, path: Path | None
) -> DiffSummary:
    """Diff `old` and `new` into `path`, else into a new file under the data dir's `diffs/`."""
    if path is None:
        out, path = _new_file(config.data_dir / "diffs", name)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        out = path.open("w")
    with out:
        summary = diff_stores(old, new, out)
    summary.path = path
    return summary


def _new_file(directory: Path, name: str) -> tuple[TextIO, Path]:
    """`<name>-<time>.jsonl`, created here (not opened over another replay's diff of the same
    second: `-2`, `-3`, ... then)."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{time.strftime('%Y%m%dT%H%M%S')}"
    path, n = directory / f"{stem}.jsonl", 1
    while True:
        try:
            return path.open("x"), path
        except FileExistsError:
            n += 1
            path = directory / f"{stem}-{n}.jsonl"
