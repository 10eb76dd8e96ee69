"""Who holds a store: `lock_holder` names the process that has it open for writing, and asking
never loosens the lock (a descriptor of RocksDB's LOCK file closed in the holder would drop it)."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest
from refold.core.errors import StoreLocked
from refold.store.rocks_open import lock_holder
from refold.store.rocksdb import RocksStore


def _open_elsewhere(path: str, answers: multiprocessing.Queue) -> None:
    try:
        RocksStore.open(path).close()
        answers.put("opened")
    except StoreLocked as exc:
        answers.put(exc.holder)


def _in_a_child(path: Path) -> object:
    ctx = multiprocessing.get_context("spawn")
    answers: multiprocessing.Queue = ctx.Queue()
    child = ctx.Process(target=_open_elsewhere, args=(str(path), answers))
    child.start()
    answer = answers.get(timeout=30)
    child.join(30)
    return answer


def test_the_holder_is_named_and_asking_keeps_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "v2"
    store = RocksStore.open(path)
    try:
        assert lock_holder(path) == os.getpid()
        assert lock_holder(path) == os.getpid()  # asked twice: still held
        assert _in_a_child(path) == os.getpid()  # the other process is told who holds it
        with pytest.raises(StoreLocked) as raised:
            RocksStore.open(path)
        assert raised.value.holder is None  # this very process
    finally:
        store.close()
    assert lock_holder(path) is None
    assert _in_a_child(path) == "opened"
