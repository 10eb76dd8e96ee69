"""Scratch dirs of secondary views: named after their owner, swept only when it is gone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from refold.store.scratch import make_scratch, sweep


def test_sweep_removes_dirs_of_processes_gone_and_keeps_the_others(tmp_path: Path) -> None:
    root = tmp_path / "scratch"
    mine = make_scratch(root, "view")
    assert mine.parent == root and mine.name.startswith(f"{os.getpid()}-")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead = root / f"{int(gone.stdout)}-12345-view-abc"
    start = mine.name.split("-")[1]
    reused = root / f"{os.getpid()}-{int(start) + 1}-view-def"  # this pid, another start time
    foreign = root / "not-ours"
    for path in (dead, reused, foreign):
        path.mkdir()
    assert sorted(sweep(root)) == sorted([dead, reused])
    assert sorted(root.iterdir()) == sorted([mine, foreign])
    assert sweep(tmp_path / "missing") == []
