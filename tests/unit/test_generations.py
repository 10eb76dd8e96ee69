"""refold.store.generations: claims and results kept for their window, in bounded disk."""

from __future__ import annotations

from pathlib import Path

from refold.store.generations import Generations
from refold.store.rocksdb import RocksStore

WINDOW_MS = 1_000


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_entry_lives_one_window_at_least_and_two_at_most(tmp_path: Path) -> None:
    clock = Clock()
    index = Generations(tmp_path / "ix", WINDOW_MS, clock=clock)
    index.commit({"a": 1}, {("t", 0): 1})
    clock.now += 0.9
    index.commit({"b": 2}, {("t", 0): 2})
    assert (index.get("a"), index.get("b")) == (1, 2)

    clock.now += 0.2  # the first generation is a window old: the next write begins another
    index.commit({"c": 3}, {("t", 0): 3})
    assert (index.get("a"), index.get("b"), index.get("c")) == (1, 2, 3)
    assert len(index.generations()) == 2

    clock.now += 1.0  # again: the generation holding a and b is dropped, a window after c's
    index.commit({"d": 4}, {("t", 1): 7})
    assert (index.get("a"), index.get("b")) == (None, None)
    assert (index.get("c"), index.get("d")) == (3, 4)
    assert index.offsets() == {("t", 0): 3, ("t", 1): 7}
    dirs = sorted(p.name for p in (tmp_path / "ix").iterdir())
    assert dirs == [p.name for p in index.generations()] and len(dirs) == 2
    index.close()


def test_reopened_it_keeps_its_entries_and_offsets(tmp_path: Path) -> None:
    clock = Clock()
    index = Generations(tmp_path / "ix", WINDOW_MS, clock=clock)
    index.commit({"a": 1}, {("t", 0): 5})
    clock.now += 1.5
    index.commit({"b": 2}, {("t", 0): 6})
    index.close()

    again = Generations(tmp_path / "ix", WINDOW_MS, clock=clock)
    assert (again.get("a"), again.get("b")) == (1, 2)
    assert again.offsets() == {("t", 0): 6}
    again.close()


def test_a_rotation_cut_short_leaves_the_newest_two_and_their_offsets(tmp_path: Path) -> None:
    clock = Clock()
    index = Generations(tmp_path / "ix", WINDOW_MS, clock=clock)
    index.commit({"a": 1}, {("t", 0): 1})
    clock.now += 1.0
    index.commit({"b": 2}, {("t", 0): 2})
    index.close()
    # A crash after a third generation's directory was made, before its first write.
    newest = tmp_path / "ix" / "gen-999999999999"
    RocksStore.open(newest).close()

    again = Generations(tmp_path / "ix", WINDOW_MS, clock=clock)
    assert len(again.generations()) == 2 and again.generations()[-1] == newest
    assert again.get("b") == 2  # in the generation before the newest
    assert again.get("a") is None  # the oldest went, as the rotation meant
    assert again.offsets() == {("t", 0): 2}  # carried into the newest
    again.close()


def test_a_store_of_the_single_directory_layout_is_adopted(tmp_path: Path) -> None:
    old = RocksStore.open(tmp_path / "ix")
    old.commit({"a": 1}, {("t", 0): 9})
    old.close()

    index = Generations(tmp_path / "ix", WINDOW_MS, clock=Clock())
    assert index.get("a") == 1
    assert index.offsets() == {("t", 0): 9}
    assert [p.name.startswith("gen-") for p in (tmp_path / "ix").iterdir()] == [True]
    index.close()


def test_an_adoption_cut_short_is_finished(tmp_path: Path) -> None:
    old = RocksStore.open(tmp_path / "ix.adopting")  # moved aside, then the process died
    old.commit({"a": 1}, {("t", 0): 9})
    old.close()

    index = Generations(tmp_path / "ix", WINDOW_MS, clock=Clock())
    assert index.get("a") == 1 and index.offsets() == {("t", 0): 9}
    assert not (tmp_path / "ix.adopting").exists()
    index.close()
