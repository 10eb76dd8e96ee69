"""An index whose entries need only outlive a window, in bounded disk: two generations.

The claims of command and task ids (refold.engine.claims) and the command results
(refold.kafka.command_client.ResultsIndex) matter for a window only: the idempotency window,
the results' retention. Their topics drop what is older; a single RocksDB store would keep every
id ever seen, a few hundred bytes each, for the life of the worker (at 500 commands/s, some
40 GB a week in each index).

`Generations` keeps two RocksStores under one directory, `gen-<start ms>/`: the current one,
which takes every write, and the previous one, which is only read. Once the current one is a
window old, the next commit starts a new current generation (the read offsets carried over in
its first WriteBatch), the previous one is closed and its directory removed. An entry is thus
kept for at least one window and at most two, and the disk holds at most two windows of
entries whatever the age of the worker. A lookup asks the current generation, then the
previous one.

Crash safety: a new generation is opened and given the offsets before the oldest is removed.
A crash between the two leaves three directories; opening keeps the newest two, and reads on
from the newest offsets found. A store of the old single-directory layout (files directly in
the directory) becomes a generation begun when it is first opened this way.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from refold.store.encoding import TopicPartition
from refold.store.rocksdb import RocksStore

log = logging.getLogger(__name__)

PREFIX = "gen-"


class Generations:
    """Entries by key for at least `window_ms`, at most twice that; thread-safe reads."""

    def __init__(
        self,
        path: Path,
        window_ms: int,
        *,
        clock: Callable[[], float] = time.time,
        cache_mb: int = 16,
        write_buffer_mb: int = 8,
    ) -> None:
        self.path = Path(path)
        self.window_ms = max(int(window_ms), 1)
        self._clock = clock
        self._cache_mb = cache_mb
        self._write_buffer_mb = write_buffer_mb
        self._lock = threading.Lock()  # reads against a rotation's close
        self.path.mkdir(parents=True, exist_ok=True)
        self._adopt_single_store()
        found = sorted(self._starts())
        for start in found[:-2]:  # a rotation interrupted before its oldest went
            self._remove(start)
        kept = found[-2:] or [self._now_ms()]
        self._stores: list[tuple[int, RocksStore]] = [(s, self._open(s)) for s in kept]
        current = self._stores[-1][1]
        if not current.offsets() and len(self._stores) > 1:
            carried = self._stores[0][1].offsets()
            if carried:
                current.commit({}, carried)

    # -- reading ----------------------------------------------------------------------------

    def get(self, key: str) -> Any | None:
        with self._lock:
            for _start, store in reversed(self._stores):
                found = store.get(key)
                if found is not None:
                    return found
            return None

    def offsets(self) -> dict[TopicPartition, int]:
        """The next offset to read of each partition (the current generation holds them all)."""
        with self._lock:
            return self._stores[-1][1].offsets()

    def generations(self) -> list[Path]:
        """The directories in use, oldest first."""
        with self._lock:
            return [self._dir(start) for start, _ in self._stores]

    # -- writing (one writer thread) --------------------------------------------------------

    def commit(self, states: Mapping[str, Any], offsets: Mapping[TopicPartition, int]) -> None:
        """Write to the current generation (a new one first, when it is a window old)."""
        now = self._now_ms()
        if now - self._stores[-1][0] >= self.window_ms:
            self._rotate(now)
        self._stores[-1][1].commit(states, offsets)

    def _rotate(self, now: int) -> None:
        start = max(now, self._stores[-1][0] + 1)
        fresh = self._open(start)
        fresh.commit({}, self._stores[-1][1].offsets())
        with self._lock:
            dropped = self._stores[:-1]
            self._stores = [self._stores[-1], (start, fresh)]
            for _start, store in dropped:
                store.close()
        for old, _store in dropped:
            self._remove(old)
        log.info("%s: generation %s begun, the one before the last removed", self.path, start)

    def close(self) -> None:
        with self._lock:
            for _start, store in self._stores:
                store.close()

    # -- layout -----------------------------------------------------------------------------

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _dir(self, start: int) -> Path:
        return self.path / f"{PREFIX}{start}"

    def _open(self, start: int) -> RocksStore:
        return RocksStore.open(
            self._dir(start), cache_mb=self._cache_mb, write_buffer_mb=self._write_buffer_mb
        )

    def _starts(self) -> list[int]:
        starts = []
        for entry in self.path.iterdir():
            digits = entry.name[len(PREFIX) :]
            if entry.is_dir() and entry.name.startswith(PREFIX) and digits.isdigit():
                starts.append(int(digits))
        return starts

    def _remove(self, start: int) -> None:
        shutil.rmtree(self._dir(start), ignore_errors=True)

    def _adopt_single_store(self) -> None:
        """A store of the single-directory layout becomes a generation begun now (also when a
        crash cut the move short: it goes through `<path>.adopting`)."""
        moving = self.path.with_name(self.path.name + ".adopting")
        if (self.path / "CURRENT").exists():
            self.path.rename(moving)
            self.path.mkdir()
        if not moving.is_dir():
            return
        start = self._now_ms()
        moving.rename(self._dir(start))
        log.info("%s: the single store became generation %s", self.path, start)
