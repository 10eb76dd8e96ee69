"""The store contract suite: behaviour every `Store` implementation must have.

Subclass `StoreContract` in a pytest module and implement `make_store`; pytest collects the
inherited tests (name the subclass `Test...`). refold runs it against `RocksStore` and
`MemoryStore`; a third-party store runs the same suite. Needs pytest (a test dependency).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from refold.core.errors import StoreError
from refold.store.rocksdb import Store, UnstorableValue, unstorable

P0 = ("bank.accounts", 0)
P1 = ("bank.accounts", 1)


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

    def test_an_unstorable_value_is_named(self, store: Store) -> None:
        """The runtime finds the record behind an unstorable state by the key named here."""
        cases = [
            (dict(states={"ok": 1, "big": 2**64}), "big", "state"),
            (dict(states={"small": -(2**63) - 1}), "small", "state"),
            (dict(states={"s": {1}}), "s", "state"),
            (dict(states={}, meta={"m": object()}), "m", "meta"),
        ]
        for kwargs, key, kind in cases:
            with pytest.raises(UnstorableValue) as caught:
                store.commit(offsets={P0: 1}, **kwargs)  # type: ignore[arg-type]
            assert (caught.value.key, caught.value.kind) == (key, kind)
        store.commit({"edge": [2**64 - 1, -(2**63)]}, {P0: 1})  # the extremes fit
        assert store.get("edge") == [2**64 - 1, -(2**63)]
        assert unstorable({"x": 2**64}) is not None and unstorable({"x": 2**64 - 1}) is None

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
