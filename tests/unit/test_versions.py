"""The LIVE pointer under concurrent writers: `refold replay --swap`, `refold rollback` and a
worker's own swap may run at the same moment, each from its own process."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

from refold.core.config import Config
from refold.core.errors import ProjectionError
from refold.store.versions import live_version, rollback, set_live, store_path

NAME = "balances"
ROUNDS = 300


def _swapper(data_dir: str, version: int, changes: multiprocessing.Queue) -> None:
    """Make `version` live again and again; count the calls that moved the pointer (each one
    pushed the version it replaced onto the rollback stack)."""
    config = Config(data_dir=Path(data_dir))
    moved = 0
    try:
        for _ in range(ROUNDS):
            moved += set_live(config, NAME, version) != version
    except Exception as exc:
        changes.put(repr(exc))
        return
    changes.put(moved)


def _roller(data_dir: str, changes: multiprocessing.Queue) -> None:
    """Roll back again and again; count the rollbacks done (each popped one entry)."""
    config = Config(data_dir=Path(data_dir))
    popped = 0
    try:
        for _ in range(ROUNDS):
            try:
                rollback(config, NAME)
                popped += 1
            except ProjectionError as exc:  # nothing to roll back to at that moment
                if "no previous version" not in str(exc):
                    raise
    except Exception as exc:
        changes.put(repr(exc))
        return
    changes.put(-popped)


def test_concurrent_swaps_and_rollbacks_neither_fail_nor_lose_an_update(tmp_path: Path) -> None:
    config = Config(data_dir=tmp_path)
    for version in (1, 2, 3):
        store_path(config, NAME, version).mkdir(parents=True)
    set_live(config, NAME, 1)
    ctx = multiprocessing.get_context("spawn")
    changes: multiprocessing.Queue = ctx.Queue()
    procs = [
        ctx.Process(target=_swapper, args=(str(tmp_path), 2, changes)),
        ctx.Process(target=_swapper, args=(str(tmp_path), 3, changes)),
        ctx.Process(target=_roller, args=(str(tmp_path), changes)),
    ]
    for proc in procs:
        proc.start()
    counts = [changes.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(30)
    assert all(isinstance(c, int) for c in counts), counts  # no writer tripped over another
    net = sum(counts)
    pointer = json.loads((store_path(config, NAME, 1).parent / "LIVE").read_text())
    # Serialized read-modify-writes: every push and every pop is in the final stack.
    assert len(pointer["previous"]) == net
    assert live_version(config, NAME) == pointer["version"]
    assert not list(store_path(config, NAME, 1).parent.glob("*.tmp"))
