"""Where `refold replay --diff` writes its full diff: a file of its own for every diff, even
when two replays of one projection finish in the same second (a second replay waits for the
first's build and both diff at once)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from refold.core.config import Config
from refold.engine.diff import diff_to_file
from refold.store.memory import MemoryStore


def test_two_diffs_in_the_same_second_get_a_file_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = Config(data_dir=tmp_path)
    old, new = MemoryStore(), MemoryStore()
    old.commit({"acc-1": {"balance_cents": 5}}, {("t", 0): 1})
    new.commit({"acc-1": {"balance_cents": -5}}, {("t", 0): 1})
    monkeypatch.setattr(time, "strftime", lambda *_: "20261128T120000")
    first = diff_to_file(config, "balances", old, new, None)
    second = diff_to_file(config, "balances", old, new, None)
    assert first.path != second.path
    for summary in (first, second):
        assert summary.path is not None and summary.path.parent == tmp_path / "diffs"
        rows = [json.loads(line) for line in summary.path.read_text().splitlines()]
        assert rows == [
            {
                "key": "acc-1",
                "change": "changed",
                "before": {"balance_cents": 5},
                "after": {"balance_cents": -5},
            }
        ]
