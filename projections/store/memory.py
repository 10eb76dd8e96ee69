"""`MemoryStore`: the Store port on two dicts, for unit tests of folds (never the product's)."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson
from refold.core.errors import StoreError
from refold.store.encoding import LINK, META, TopicPartition, check_offsets, encode_commit


class MemoryStore:
    """FOR UNIT TESTS ONLY: a dict-based Store for testing folds without RocksDB.

    This is never the product's store, and it keeps nothing on disk. It keeps the port's
    semantics by encoding like RocksStore into two dicts that mirror its column families: non-JSON
    states fail the same way, returned states are fresh copies, commits are atomic under a lock,
    and offsets only move forward.
    """

    def __init__(self, path: Path | str = "<memory>") -> None:
        self.path = Path(path)
        self._data: dict[bytes, bytes] = {}  # the default column family: states
        self._meta: dict[bytes, bytes] = {}  # the meta column family: links, meta values
        self._offsets: dict[TopicPartition, int] = {}
        self._lock = threading.Lock()
        self._closed = False

    def get(self, key: str) -> Any | None:
        return self.get_many([key]).get(key)

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        self._check_open()
        with self._lock:
            raws = [(k, self._data.get(k.encode())) for k in keys]
        return {k: orjson.loads(raw) for k, raw in raws if raw is not None}

    def scan(
        self, prefix: str = "", after: str | None = None, limit: int = 100
    ) -> list[tuple[str, Any]]:
        self._check_open()
        low, skip = prefix.encode(), b"" if after is None else after.encode()
        with self._lock:
            keys = sorted(
                k for k in self._data if k.startswith(low) and (k > skip or after is None)
            )
            return [(k.decode(), orjson.loads(self._data[k])) for k in keys[: max(limit, 0)]]

    def link(self, source_key: str) -> str | None:
        value = self._meta_get(LINK + source_key.encode())
        return value if isinstance(value, str) else None

    def offsets(self) -> dict[TopicPartition, int]:
        self._check_open()
        with self._lock:
            return dict(self._offsets)

    def meta(self, name: str) -> Any | None:
        return self._meta_get(META + name.encode())

    def commit(
        self,
        states: Mapping[str, Any],
        offsets: Mapping[TopicPartition, int],
        *,
        links: Mapping[str, str | None] = {},
        meta: Mapping[str, Any] = {},
        deletes: Iterable[str] = (),
    ) -> None:
        self._check_open()
        batch: list[tuple[bytes, bytes | None, dict[bytes, bytes]]] = []

        def put(key: bytes, value: bytes, table: dict[bytes, bytes] = self._data) -> None:
            batch.append((key, value, table))

        def delete(key: bytes, table: dict[bytes, bytes] = self._data) -> None:
            batch.append((key, None, table))

        encode_commit(self.path, states, list(deletes), links, meta, put, delete, self._meta)
        with self._lock:
            check_offsets(self.path, self._offsets, offsets, forward_only=True)
            for key, value, table in batch:
                if value is None:
                    table.pop(key, None)
                else:
                    table[key] = value
            self._offsets.update(offsets)

    def reset_offsets(self, offsets: Mapping[TopicPartition, int]) -> None:
        self._check_open()
        with self._lock:
            check_offsets(self.path, self._offsets, offsets, forward_only=False)
            self._offsets.update(offsets)

    def approximate_keys(self) -> int:
        self._check_open()
        return len(self._data)

    def close(self) -> None:
        self._closed = True

    def _meta_get(self, raw_key: bytes) -> Any | None:
        self._check_open()
        raw = self._meta.get(raw_key)
        return None if raw is None else orjson.loads(raw)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"store {self.path} is closed")
