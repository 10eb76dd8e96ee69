"""The store contract: every Store implementation must pass `StoreContract`.

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
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from projections.memory_store import MemoryStore
from projections.store import RocksStore, Store
from streams.errors import StoreError

REPO = Path(__file__).resolve().parents[2]
P0 = ("bank.accounts", 0)
P1 = ("bank.accounts", 1)


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


class StoreContract:
    """Behaviour every Store must have. Subclasses implement `make_store`."""

    def make_store(self, tmp_path: Path) -> Store:
        raise NotImplementedError

    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[Store]:
        store = self.make_store(tmp_path)
        yield store
        store.close()

    def test_implements_the_port(self, store: Store) -> None:
        assert isinstance(store, Store)

    def test_missing_keys(self, store: Store) -> None:
        assert store.get("nope") is None
        assert store.get_many(["a", "b"]) == {}
        assert store.get_many([]) == {}
        assert store.offsets() == {}
        assert store.link("nope") is None
        assert store.meta("nope") is None
        assert store.scan() == []

    def test_commit_then_get(self, store: Store) -> None:
        state = {"balance_cents": 1250, "events": 3, "tags": ["a", "é"], "ok": True, "x": None}
        store.commit({"acc-1": state, "acc-ü": 7, "acc-3": [1.5, "s"]}, {P0: 4})
        assert store.get("acc-1") == state
        assert store.get("acc-ü") == 7
        assert store.get("acc-3") == [1.5, "s"]
        assert store.offsets() == {P0: 4}

    def test_returned_states_are_copies(self, store: Store) -> None:
        store.commit({"a": {"n": 1}}, {})
        got = store.get("a")
        assert got is not None
        got["n"] = 99
        store.get_many(["a"])["a"]["n"] = 98
        assert store.get("a") == {"n": 1}

    def test_get_many_returns_only_present_keys(self, store: Store) -> None:
        store.commit({f"k{i}": i for i in range(10)}, {P0: 1})
        wanted = (k for k in ["k1", "k9", "zz", "k1", "k0"])  # any iterable, duplicates
        assert store.get_many(wanted) == {"k1": 1, "k9": 9, "k0": 0}

    def test_failed_encoding_writes_nothing(self, store: Store) -> None:
        store.commit({"a": 1}, {P0: 1})
        bad = [
            dict(states={"a": 2, "b": object(), "c": 3}),
            dict(states={"a": 2, "d": {1, 2}}),
            dict(states={"a": 2}, meta={"m": object()}),
            dict(states={"a": 2}, links={"src": 5}),
        ]
        for kwargs in bad:
            with pytest.raises(StoreError, match="encode"):
                store.commit(offsets={P0: 2, P1: 9}, **kwargs)  # type: ignore[arg-type]
        assert store.get("a") == 1
        assert store.get_many(["b", "c", "d"]) == {}
        assert store.meta("m") is None
        assert store.link("src") is None
        assert store.offsets() == {P0: 1}
        store.commit({"a": 2}, {P0: 2})  # the store is still usable
        assert store.get("a") == 2

    def test_key_both_set_and_deleted_is_refused(self, store: Store) -> None:
        with pytest.raises(StoreError, match="both set and deleted"):
            store.commit({"a": 1}, {P0: 1}, deletes=["a"])
        assert store.get("a") is None
        assert store.offsets() == {}

    def test_offsets_only_move_forward(self, store: Store) -> None:
        store.commit({"a": 1}, {P0: 5, P1: 2})
        store.commit({"a": 2}, {P0: 5})  # same offset: allowed
        with pytest.raises(StoreError, match="backwards") as caught:
            store.commit({"a": 3, "b": 3}, {P0: 4, P1: 3}, meta={"n": 1})
        assert "bank.accounts[0]" in str(caught.value)
        assert store.offsets() == {P0: 5, P1: 2}
        assert store.get("a") == 2
        assert store.get("b") is None
        assert store.meta("n") is None
        store.commit({}, {P1: 3, ("other", 0): 0})
        assert store.offsets() == {P0: 5, P1: 3, ("other", 0): 0}

    def test_reset_offsets_may_move_backwards(self, store: Store) -> None:
        store.commit({"a": 1}, {P0: 50, P1: 7})
        store.reset_offsets({P0: 0})
        assert store.offsets() == {P0: 0, P1: 7}
        store.commit({"a": 2}, {P0: 1})
        assert store.offsets() == {P0: 1, P1: 7}

    @pytest.mark.parametrize(
        "offsets", [{P0: -1}, {P0: "3"}, {P0: True}, {("t/x", 0): 1}, {("t", "0"): 1}]
    )
    def test_malformed_offsets_are_refused(self, store: Store, offsets: dict) -> None:
        with pytest.raises(StoreError):
            store.commit({"a": 1}, offsets)
        assert store.get("a") is None

    def test_scan_order_prefix_after_limit(self, store: Store) -> None:
        keys = ["a", "a/1", "a/10", "a/2", "ab", "b", "z", "é", "\U0001f600", "a/1/x", "a\x7f"]
        store.commit({k: i for i, k in enumerate(keys)}, {})
        by_bytes = sorted(keys, key=str.encode)
        assert [k for k, _ in store.scan(limit=100)] == by_bytes
        assert store.scan(limit=100)[0] == ("a", 0)
        assert [k for k, _ in store.scan("a/")] == ["a/1", "a/1/x", "a/10", "a/2"]
        assert [k for k, _ in store.scan("a/", after="a/1/x")] == ["a/10", "a/2"]
        assert [k for k, _ in store.scan("a/", after="a")] == ["a/1", "a/1/x", "a/10", "a/2"]
        assert [k for k, _ in store.scan("a/", limit=2)] == ["a/1", "a/1/x"]
        assert store.scan("a/", after="a/2") == []
        assert store.scan("a/", after="b") == []
        assert store.scan("nope") == []
        assert store.scan(limit=0) == []
        assert [k for k, _ in store.scan(after="z")] == ["é", "\U0001f600"]
        pages: list[str] = []
        after = None  # paging with after/limit visits every key once
        while page := store.scan(after=after, limit=3):
            pages.extend(k for k, _ in page)
            after = page[-1][0]
        assert pages == by_bytes

    def test_links(self, store: Store) -> None:
        store.commit({"acc-1": {"n": 1}}, {P0: 1}, links={"evt-9": "acc-1", "evt-8": "acc-1"})
        assert store.link("evt-9") == "acc-1"
        store.commit({}, {P0: 2}, links={"evt-9": "acc-2", "evt-8": None})
        assert store.link("evt-9") == "acc-2"
        assert store.link("evt-8") is None
        assert store.get("evt-9") is None  # links live apart from states
        assert [k for k, _ in store.scan()] == ["acc-1"]

    def test_meta(self, store: Store) -> None:
        store.commit({}, {}, meta={"events": 10, "version": {"fold": 2, "name": "balances"}})
        assert store.meta("events") == 10
        assert store.meta("version") == {"fold": 2, "name": "balances"}
        store.commit({}, {}, meta={"events": 11, "version": None})
        assert store.meta("events") == 11
        assert store.meta("version") is None
        assert store.scan() == []

    def test_deletes(self, store: Store) -> None:
        store.commit({"a": 1, "b": 2, "c": 3}, {P0: 1})
        store.commit({"d": 4}, {P0: 2}, deletes=iter(["b", "never-existed"]))
        assert store.get("b") is None
        assert store.get_many(["a", "b", "c", "d"]) == {"a": 1, "c": 3, "d": 4}
        assert [k for k, _ in store.scan()] == ["a", "c", "d"]

    def test_approximate_keys(self, store: Store) -> None:
        assert store.approximate_keys() == 0
        store.commit({f"k{i:03}": i for i in range(100)}, {})
        assert 50 <= store.approximate_keys() <= 200

    def test_readers_on_other_threads_see_whole_commits(self, store: Store) -> None:
        keys = [f"k{i}" for i in range(50)]
        errors: list[str] = []
        seen: set[int] = set()
        reading, done = threading.Event(), threading.Event()

        def read() -> None:
            while not done.is_set():
                offset = store.offsets().get(P0, 0)  # offsets first, then states
                values = set(store.get_many(keys).values())
                if len(values) > 1 or (values and min(values) < offset):
                    errors.append(f"offset {offset} states {sorted(values)}")
                seen.update(values)
                reading.set()

        readers = [threading.Thread(target=read) for _ in range(2)]
        for t in readers:
            t.start()
        reading.wait(5)
        for batch in range(1, 301):
            store.commit(dict.fromkeys(keys, batch), {P0: batch})
            time.sleep(0)  # let the readers run between commits
        done.set()
        for t in readers:
            t.join()
        assert errors == []
        assert len(seen) > 10  # the readers really overlapped the commits
        assert store.get_many(keys) == dict.fromkeys(keys, 300)

    def test_closed_store_refuses_calls(self, store: Store) -> None:
        store.commit({"a": 1}, {P0: 1})
        store.close()
        store.close()  # idempotent
        for call in (
            lambda: store.get("a"),
            lambda: store.get_many(["a"]),
            lambda: store.scan(),
            lambda: store.offsets(),
            lambda: store.commit({"a": 2}, {}),
        ):
            with pytest.raises(StoreError, match="closed"):
                call()


class TestMemoryStore(StoreContract):
    def make_store(self, tmp_path: Path) -> Store:
        return MemoryStore()


LOCK_HOLDER = """
import sys
from projections.store import RocksStore
store = RocksStore.open(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
store.close()
"""

SECONDARY_READER = """
import json, sys
from projections.store import RocksStore
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
from projections.store import RocksStore
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
            reader = RocksStore.open_secondary(path)
            scratch = reader._scratch
            assert scratch is not None and scratch.is_dir()
            writer.commit({"a": 2}, {P0: 2})
            reader.catch_up()
            assert reader.get("a") == 2 and reader.offsets() == {P0: 2}
            reader.close()
            assert not scratch.exists()

    def test_a_secondary_that_fails_to_open_leaves_no_scratch_dir(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        temp = tmp_path / "temp"
        temp.mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(temp))
        (tmp_path / "half").mkdir()  # a store directory being created: no CURRENT yet
        with pytest.raises(StoreError):
            RocksStore.open_secondary(tmp_path / "half")
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
