"""The store contract (`refold.store.contract.StoreContract`) run against both stores.

`TestRocksStore` adds what only a real database has: persistence, locking, corruption,
a reader in another process, and consistency after kill -9.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from refold.core.errors import StoreError
from refold.store.contract import P0, P1, StoreContract
from refold.store.memory import MemoryStore
from refold.store.rocksdb import RocksStore, Store

REPO = Path(__file__).resolve().parents[2]


def spawn(code: str, *args: str) -> subprocess.Popen[str]:
    """Run `code` in a fresh interpreter that can import the repo's packages."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def read_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        assert proc.stderr is not None
        pytest.fail(f"child exited early: {proc.wait()} {proc.stderr.read()}")
    return line.strip()


class TestMemoryStore(StoreContract):
    def make_store(self, tmp_path: Path) -> Store:
        return MemoryStore()


LOCK_HOLDER = """
import sys
from refold.store.rocksdb import RocksStore
store = RocksStore.open(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
store.close()
"""

SECONDARY_READER = """
import json, sys
from refold.store.rocksdb import RocksStore
store = RocksStore.open_secondary(sys.argv[1], sys.argv[2])
def show():
    print(json.dumps([store.get("a"), store.link("e"), store.meta("m"),
                      sorted(store.offsets().items())]), flush=True)
show()
sys.stdin.readline()
store.catch_up()
show()
store.close()
"""

KILLED_WRITER = """
import sys
from refold.store.rocksdb import RocksStore
store = RocksStore.open(sys.argv[1], cache_mb=8, write_buffer_mb=1)  # small: frequent flushes
batch = store.offsets().get(("t", 0), 0)
keys = [f"k{i:04}" for i in range(int(sys.argv[2]))]
while True:
    batch += 1
    states = dict.fromkeys(keys, batch)
    states[f"b{batch:06}"] = batch  # one new key per batch
    store.commit(states, {("t", 0): batch}, meta={"batch": batch})
    if batch % 5 == 0:
        print(batch, flush=True)
"""


class TestRocksStore(StoreContract):
    def make_store(self, tmp_path: Path) -> Store:
        return RocksStore.open(tmp_path / "store", cache_mb=8, write_buffer_mb=2)

    def test_reopen_persists_everything(self, tmp_path: Path) -> None:
        path = tmp_path / "data" / "balances-v1"  # parents are created
        with RocksStore.open(path) as store:
            store.commit({"a": {"n": 1}, "b": 2, "c": 3}, {P0: 3, P1: 1}, links={"e": "a"})
            store.commit({"b": 5}, {P0: 4}, meta={"m": [1]}, deletes=["c"])
        with RocksStore.open(path) as store:
            assert store.get_many(["a", "b", "c"]) == {"a": {"n": 1}, "b": 5}
            assert store.offsets() == {P0: 4, P1: 1}
            assert store.link("e") == "a"
            assert store.meta("m") == [1]
            with pytest.raises(StoreError, match="backwards"):  # checked against disk too
                store.commit({}, {P0: 3})

    def test_absorb_copies_disjoint_parts_then_their_offsets(self, tmp_path: Path) -> None:
        with RocksStore.open(tmp_path / "p0") as a, RocksStore.open(tmp_path / "p1") as b:
            a.commit({f"a{i:02d}": {"n": i} for i in range(25)}, {P0: 40}, links={"x": "a01"})
            b.commit({f"b{i:02d}": i for i in range(7)}, {P1: 9}, meta={"ignored": 1})
            with RocksStore.open(tmp_path / "whole") as whole:
                whole.absorb([a, b], meta={"events_folded": 49}, chunk=4)  # many small batches
                assert whole.offsets() == {P0: 40, P1: 9}
                assert dict(whole.scan(limit=100)) == {
                    **{f"a{i:02d}": {"n": i} for i in range(25)},
                    **{f"b{i:02d}": i for i in range(7)},
                }
                assert whole.link("x") == "a01" and whole.meta("events_folded") == 49
                assert whole.meta("ignored") is None  # counters are the caller's to sum
                with pytest.raises(StoreError, match="holds offsets"):
                    whole.absorb([a])
            with RocksStore.open(tmp_path / "again") as again:
                with pytest.raises(StoreError, match="overlap"):
                    again.absorb([a, a])
                assert again.offsets() == {} and again.scan() == []  # nothing written
            with RocksStore.open(tmp_path / "early") as early:
                early.copy_states(b)  # a part done before the other: states, no offsets yet
                assert early.offsets() == {} and early.get("b03") == 3
                early.absorb([a, b], meta={"events_folded": 49}, copied=[b.path])
                assert early.offsets() == {P0: 40, P1: 9} and early.link("x") == "a01"
                assert len(early.scan(limit=100)) == 32

    def test_sync_commits(self, tmp_path: Path) -> None:
        with RocksStore.open(tmp_path / "s", sync=True) as store:
            store.commit({"a": 1}, {P0: 1})
        with RocksStore.open(tmp_path / "s", read_only=True) as store:
            assert store.get("a") == 1

    def test_read_only_view(self, tmp_path: Path) -> None:
        with pytest.raises(StoreError, match="no store at"):
            RocksStore.open(tmp_path / "missing", read_only=True)
        with RocksStore.open(tmp_path / "s") as writer:
            writer.commit({"a": 1}, {P0: 1})
            with RocksStore.open(tmp_path / "s", read_only=True) as reader:
                assert reader.get("a") == 1
                assert reader.offsets() == {P0: 1}
                with pytest.raises(StoreError, match="read-only"):
                    reader.commit({"a": 2}, {P0: 2})

    def test_second_writer_in_same_process_is_refused(self, tmp_path: Path) -> None:
        with RocksStore.open(tmp_path / "s"), pytest.raises(StoreError, match="already open"):
            RocksStore.open(tmp_path / "s")
        RocksStore.open(tmp_path / "s").close()  # released on close

    def test_store_locked_by_another_process(self, tmp_path: Path) -> None:
        path = tmp_path / "s"
        holder = spawn(LOCK_HOLDER, str(path))
        try:
            assert read_line(holder) == "ready"
            with pytest.raises(StoreError) as caught:
                RocksStore.open(path)
            assert str(path) in str(caught.value)
            assert caught.value.hint is not None and "REFOLD_DATA_DIR" in caught.value.hint
        finally:
            holder.communicate("\n", timeout=10)
        assert holder.returncode == 0
        RocksStore.open(path).close()

    def test_corruption_is_a_store_error(self, tmp_path: Path) -> None:
        path = tmp_path / "s"
        with RocksStore.open(path) as store:
            store.commit({"a": 1}, {P0: 1})
        (path / "CURRENT").write_text("garbage\n")
        with pytest.raises(StoreError, match="corrupted") as caught:
            RocksStore.open(path)
        assert str(path) in str(caught.value)

    def test_corrupted_block_fails_reads_loudly(self, tmp_path: Path) -> None:
        path = tmp_path / "s"
        keys = [f"k{i:05}" for i in range(20_000)]
        with RocksStore.open(path) as store:
            store.commit({k: {"pad": "x" * 50} for k in keys}, {P0: 1})  # close flushes an SST
        sst = max(path.glob("*.sst"), key=lambda f: f.stat().st_size)
        with sst.open("r+b") as f:  # data blocks come first; index and filter at the end
            f.seek(sst.stat().st_size // 4)
            f.write(b"\0" * 64)
        with RocksStore.open(path) as store:
            with pytest.raises(StoreError, match="Corruption"):
                store.scan(limit=len(keys))  # not a silently shorter page
            with pytest.raises(StoreError, match=str(path)):
                store.get_many(keys)

    def test_secondary_without_a_scratch_dir_cleans_up_its_own(self, tmp_path: Path) -> None:
        path = tmp_path / "s"
        with RocksStore.open(path) as writer:
            writer.commit({"a": 1}, {P0: 1})
            with pytest.raises(StoreError, match="needs a scratch dir"):
                RocksStore.open_secondary(path)  # never in /tmp
            reader = RocksStore.open_secondary(path, scratch_root=tmp_path / "scratch")
            scratch = reader._scratch
            assert scratch is not None and scratch.is_dir()
            assert scratch.parent == tmp_path / "scratch"
            assert scratch.name.startswith(f"{os.getpid()}-")
            writer.commit({"a": 2}, {P0: 2})
            reader.catch_up()
            assert reader.get("a") == 2 and reader.offsets() == {P0: 2}
            reader.close()
            assert not scratch.exists()

    def test_a_secondary_that_fails_to_open_leaves_no_scratch_dir(self, tmp_path: Path) -> None:
        temp = tmp_path / "temp"
        temp.mkdir()
        (tmp_path / "half").mkdir()  # a store directory being created: no CURRENT yet
        with pytest.raises(StoreError):
            RocksStore.open_secondary(tmp_path / "half", scratch_root=temp)
        assert list(temp.iterdir()) == []

    def test_secondary_reader_in_another_process(self, tmp_path: Path) -> None:
        path = tmp_path / "s"
        with RocksStore.open(path) as writer:
            writer.commit({"a": 1}, {P0: 1}, links={"e": "a"})
            reader = spawn(SECONDARY_READER, str(path), str(tmp_path / "secondary"))
            try:
                assert json.loads(read_line(reader)) == [1, "a", None, [[list(P0), 1]]]
                writer.commit({"a": 2}, {P0: 2, P1: 5}, meta={"m": "x"})
                assert reader.stdin is not None
                reader.stdin.write("\n")
                reader.stdin.flush()
                assert json.loads(read_line(reader)) == [
                    2,
                    "a",
                    "x",
                    [[list(P0), 2], [list(P1), 5]],
                ]
            finally:
                reader.communicate(timeout=10)
            assert reader.returncode == 0
            assert writer.get("a") == 2

    def test_kill_9_leaves_states_consistent_with_offsets(self, tmp_path: Path) -> None:
        path, n_keys = tmp_path / "s", 2000
        rng = random.Random()
        last = 0
        for _round in range(3):
            child = spawn(KILLED_WRITER, str(path), str(n_keys))
            int(read_line(child))  # it is committing
            delay = rng.uniform(0.0, 0.4)
            time.sleep(delay)
            os.kill(child.pid, signal.SIGKILL)
            child.communicate(timeout=10)
            assert child.returncode == -signal.SIGKILL
            with RocksStore.open(path, read_only=True) as store:
                offset = store.offsets()[("t", 0)]
                where = f"after kill at {delay:.3f}s: offset {offset}"
                assert offset > last, where
                states = store.get_many(f"k{i:04}" for i in range(n_keys))
                assert set(states.values()) == {offset} and len(states) == n_keys, where
                batch_keys = [k for k, _ in store.scan("b", limit=offset + 10)]
                assert batch_keys == [f"b{b:06}" for b in range(1, offset + 1)], where
                assert store.meta("batch") == offset, where
            last = offset
