"""The store of one projection version: states, source offsets, links and meta values.

Each projection version owns one store directory. `Store` is the port that the runtime and the
query server use; `RocksStore` is the product's implementation (RocksDB through rocksdict) and
`MemoryStore` (refold.store.memory) is a dict-based stand-in for unit-testing folds.

Every implementation keeps these invariants:

- `commit` is atomic: the states, deletions, links, meta values and source offsets of one call
  become visible and durable together or not at all. Because the offsets are in the same write
  as the states they describe, after any crash the stored offsets say exactly which events the
  states include. The runtime resumes from them; the Kafka group offset is only advisory.
- Per source partition, the stored offset is the next offset to consume (last folded + 1). It
  only moves forward; only `reset_offsets` may move it back (replay).
- Values are JSON-compatible and come back as fresh objects: changing a returned state does not
  change the store until it is committed.
"""

from __future__ import annotations

import functools
import logging
import shutil
import threading
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar, cast, runtime_checkable

import orjson
import rocksdict
from refold.core.errors import StoreError
from refold.store.scratch import make_scratch

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]

META_CF = "meta"
_OFFSET = b"offset/"
_LINK = b"link/"
_META = b"meta/"


@runtime_checkable
class Store(Protocol):
    """The store port. Keys are str; they scan in the byte order of their UTF-8 encoding."""

    path: Path

    def get(self, key: str) -> Any | None:
        """The state of `key`, or None if it has none."""

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The states of those keys that have one; keys without a state are left out."""

    def scan(
        self, prefix: str = "", after: str | None = None, limit: int = 100
    ) -> list[tuple[str, Any]]:
        """Up to `limit` (key, state) pairs in key order with key > `after` and the prefix."""

    def link(self, source_key: str) -> str | None:
        """The key that `source_key` was folded under, as recorded by `commit(links=...)`."""

    def offsets(self) -> dict[TopicPartition, int]:
        """The next offset to consume for each source partition (last folded + 1)."""

    def meta(self, name: str) -> Any | None:
        """A small named JSON value (counters, version info), or None."""

    def commit(
        self,
        states: Mapping[str, Any],
        offsets: Mapping[TopicPartition, int],
        *,
        links: Mapping[str, str | None] = {},
        meta: Mapping[str, Any] = {},
        deletes: Iterable[str] = (),
    ) -> None:
        """Write everything atomically; a None link or meta value deletes that entry.

        Raises StoreError and writes nothing if a value is not JSON, a key is both set and
        deleted, or an offset would move backwards.
        """

    def reset_offsets(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Set these partitions' offsets even if that moves them backwards (replay)."""

    def approximate_keys(self) -> int:
        """An estimate of the number of keys that have a state."""

    def close(self) -> None:
        """Release the store. Calling it again does nothing; any other later call raises."""


class UnstorableValue(StoreError):
    """A commit refused because one value cannot be stored as JSON (not JSON-compatible, an
    integer beyond 64 bits); `key` names it, `kind` says where it was going (state, link, meta).
    Nothing of the commit was written."""

    def __init__(self, message: str, key: object, kind: str) -> None:
        super().__init__(message)
        self.key = key
        self.kind = kind


def unstorable(value: Any) -> str | None:
    """Why `value` cannot be stored as a state (None if it can): the check `commit` makes."""
    try:
        orjson.dumps(value)
    except (TypeError, ValueError) as exc:  # orjson.JSONEncodeError is a TypeError
        return str(exc)
    return None


def _offset_key(tp: TopicPartition) -> bytes:
    return b"%s%s/%d" % (_OFFSET, tp[0].encode(), tp[1])


def _check_offsets(
    path: Path,
    current: Mapping[TopicPartition, int],
    offsets: Mapping[TopicPartition, int],
    *,
    forward_only: bool,
) -> None:
    """Raise StoreError for malformed offsets and, if `forward_only`, for backward moves."""
    for tp, offset in offsets.items():
        if not (
            isinstance(tp, tuple)
            and len(tp) == 2
            and isinstance(tp[0], str)
            and "/" not in tp[0]
            and type(tp[1]) is int
        ):
            raise StoreError(f"store {path}: bad topic-partition {tp!r}; expected (topic, int)")
        if type(offset) is not int or offset < 0:
            raise StoreError(f"store {path}: bad offset {offset!r} for {tp[0]}[{tp[1]}]")
        previous = current.get(tp)
        if forward_only and previous is not None and offset < previous:
            raise StoreError(
                f"store {path}: offset of {tp[0]}[{tp[1]}] would move backwards from "
                f"{previous} to {offset}, so events would be folded twice",
                hint="a runtime bug; a deliberate replay uses reset_offsets()",
            )


def _prefix_end(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string starting with `prefix`."""
    stripped = prefix.rstrip(b"\xff")
    return stripped[:-1] + bytes([stripped[-1] + 1]) if stripped else None


def _encode_commit(
    path: Path,
    states: Mapping[str, Any],
    deletes: list[str],
    links: Mapping[str, str | None],
    meta: Mapping[str, Any],
    put: Callable[..., None],
    delete: Callable[..., None],
    meta_cf: Any,
) -> None:
    """Turn one commit (all but its offsets) into put/delete calls on a batch.

    States go to the default column family; links and meta values go to `meta_cf`. Raises
    StoreError, naming the key, if a key is not a str or a value is not JSON.
    """
    if deletes and not states.keys().isdisjoint(deletes):
        both = sorted(states.keys() & set(deletes))
        raise StoreError(f"store {path}: keys both set and deleted in one commit: {both}")
    dumps = orjson.dumps
    key: object = ""
    kind = "state"
    try:
        for key, state in states.items():
            put(key.encode(), dumps(state))
        for key in deletes:
            delete(key.encode())
        kind = "link"
        for key, target in links.items():
            if target is None:
                delete(_LINK + key.encode(), meta_cf)
            elif isinstance(target, str):
                put(_LINK + key.encode(), dumps(target), meta_cf)
            else:
                raise TypeError(f"a link target must be str or None, not {type(target).__name__}")
        kind = "meta"
        for key, value in meta.items():
            if value is None:
                delete(_META + key.encode(), meta_cf)
            else:
                put(_META + key.encode(), dumps(value), meta_cf)
    except (TypeError, ValueError, AttributeError) as exc:  # orjson, str.encode, non-str keys
        raise UnstorableValue(
            f"store {path}: cannot encode the value of {key!r} as JSON: {exc}", key, kind
        ) from exc


def _range(
    db: rocksdict.Rdict, start: bytes, end: bytes | None, limit: int | None
) -> list[tuple[bytes, bytes]]:
    """Up to `limit` pairs with start <= key < end, raising if RocksDB hit an error.

    rocksdict's items() ends silently at a corrupted block, so iterate by hand and check status.
    """
    read_opts = rocksdict.ReadOptions()
    if end is not None:
        read_opts.set_iterate_upper_bound(end)
    it = db.iter(read_opts)
    it.seek(start)
    out: list[tuple[bytes, bytes]] = []
    while it.valid() and (limit is None or len(out) < limit):
        out.append((it.key(), it.value()))
        it.next()
    it.status()
    return out


def _open_error(path: Path, exc: Exception) -> StoreError:
    text = str(exc)
    if "LOCK" in text and "lock hold by current process" in text:
        return StoreError(
            f"store {path} is already open in this process: {text}",
            hint="close the other RocksStore on this path first",
        )
    if "LOCK" in text:
        return StoreError(
            f"store {path} is locked by another process: {text}",
            hint="another worker uses this data dir; give each worker its own REFOLD_DATA_DIR",
        )
    if text.startswith("Corruption"):
        return StoreError(
            f"store {path} is corrupted: {text}",
            hint="move the directory aside and rebuild the projection from Kafka (refold replay)",
        )
    return StoreError(f"cannot open store {path}: {text}")


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _reading(
    method: Callable[Concatenate[RocksStore, _P], _R],
) -> Callable[Concatenate[RocksStore, _P], _R]:
    """Refuse calls on a closed store; turn RocksDB read errors (corruption, I/O) into
    StoreError naming the store."""

    @functools.wraps(method)
    def read(self: RocksStore, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        if self._closed:
            raise StoreError(f"store {self.path} is closed")
        try:
            return method(self, *args, **kwargs)
        except (StoreError, TypeError, AttributeError):
            raise  # ours, or the caller passed a key that is not a str
        except Exception as exc:
            raise StoreError(f"store {self.path}: {method.__name__} failed: {exc}") from exc

    return read


class RocksStore:
    """One projection version's RocksDB database, used through rocksdict in raw (bytes) mode.

    Layout: states are in the default column family (key = UTF-8 key, value = orjson bytes).
    The `meta` column family holds `offset/<topic>/<partition>` -> int, `link/<key>` -> str
    and `meta/<name>` -> JSON. Each commit is one WriteBatch across both column families.

    Durability: the WAL is on but, unless `sync=True`, not fsynced after each batch. Killing the
    process (even kill -9) loses no commit that has returned. An OS crash or power loss may lose
    the last batches that were not yet synced; their offsets are lost with them, so those
    events are folded again from Kafka.

    Memory stays bounded whatever the number of keys: data, index and filter blocks share one
    LRU block cache of `cache_mb`. Each column family has at most two memtables of
    `write_buffer_mb` (the meta family's are a quarter of that size). Atomic flush keeps the two
    families' files in step.

    Threads: rocksdict opens RocksDB in multi-threaded mode, and an `Rdict` may be used from any
    thread, so the query server may read while the runtime commits. A reader sees each commit
    either entirely or not at all. `get_many` (one MultiGet) and `scan` (one iterator) each read
    one consistent snapshot, but two separate calls may see different commits. To get states at
    least as new as some offsets, read `offsets()` first, then the states. rocksdict 0.3.x
    holds the GIL while it writes a batch or reads a single key, and releases it during a
    MultiGet. Do not call `close()` while other threads may still read.
    """

    def __init__(
        self, path: Path, db: rocksdict.Rdict, *, writable: bool, secondary: bool, sync: bool
    ) -> None:
        """Wrap an open Rdict. Use `open` or `open_secondary` to create one."""
        self.path = path
        self._db = db
        self._meta_db = db.get_column_family(META_CF)
        self._meta_cf: rocksdict.ColumnFamily | None = db.get_column_family_handle(META_CF)
        self._writable = writable
        self._secondary = secondary
        self._write_opts = rocksdict.WriteOptions()
        self._write_opts.sync = sync
        self._lock = threading.Lock()
        self._closed = False
        self._scratch: Path | None = None  # a secondary's own temporary directory
        # The read-write handle is the only writer (RocksDB's LOCK), so it can cache offsets.
        self._offsets = self._read_offsets() if writable else {}

    @classmethod
    def open(
        cls,
        path: Path | str,
        *,
        read_only: bool = False,
        cache_mb: int = 64,
        write_buffer_mb: int = 16,
        sync: bool = False,
    ) -> RocksStore:
        """Open the store at `path`, creating it unless `read_only` is set.

        A read-only store sees the data as it was when opened, and it may run beside a live
        writer. Raises StoreError if another writer holds the path, or the store is corrupted
        or missing.
        """
        path = Path(path)
        if read_only:
            if not path.is_dir():
                raise StoreError(f"no store at {path}", hint="check REFOLD_DATA_DIR")
            access = rocksdict.AccessType.read_only(False)
        else:
            path.mkdir(parents=True, exist_ok=True)
            access = rocksdict.AccessType.read_write()
        db = _open_rdict(path, access, cache_mb, write_buffer_mb, secondary=False)
        log.info("opened store %s (read_only=%s, sync=%s)", path, read_only, sync)
        return cls(path, db, writable=not read_only, secondary=False, sync=sync)

    @classmethod
    def open_secondary(
        cls,
        path: Path | str,
        secondary_path: Path | str | None = None,
        *,
        scratch_root: Path | None = None,
        cache_mb: int = 16,
    ) -> RocksStore:
        """Open a read-only view of a store that another process is writing.

        The view starts at the writer's latest commit and moves forward only on `catch_up()`.
        `secondary_path` is a private scratch directory for this reader's files; without one, a
        directory of this process is made under `scratch_root` (the data dir's `scratch/`, see
        refold.store.scratch) and removed again by `close()`.
        """
        path = Path(path)
        if not path.is_dir():
            raise StoreError(f"no store at {path}", hint="check REFOLD_DATA_DIR")
        scratch = None
        if secondary_path is None:
            if scratch_root is None:
                raise StoreError(
                    f"a secondary view of {path} needs a scratch dir",
                    hint="pass secondary_path or scratch_root (the data dir's scratch/)",
                )
            secondary_path = scratch = make_scratch(scratch_root, "view")
        Path(secondary_path).mkdir(parents=True, exist_ok=True)
        access = rocksdict.AccessType.secondary(str(secondary_path))
        try:
            db = _open_rdict(path, access, cache_mb, 1, secondary=True)
        except StoreError:  # e.g. a store being created right now: no scratch dir left behind
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            raise
        log.info("opened store %s as a secondary (scratch dir %s)", path, secondary_path)
        store = cls(path, db, writable=False, secondary=True, sync=False)
        store._scratch = scratch
        store.catch_up()
        return store

    @_reading
    def catch_up(self) -> None:
        """For secondary stores only: apply what the writer has committed since the last call."""
        if not self._secondary:
            raise StoreError(f"store {self.path}: catch_up() needs a store opened as secondary")
        self._db.try_catch_up_with_primary()

    @_reading
    def get(self, key: str) -> Any | None:
        """The state of `key`, or None."""
        raw = self._db.get(key.encode())
        return None if raw is None else orjson.loads(raw)

    @_reading
    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The states of those keys that have one, read with one MultiGet."""
        # Sorted keys let RocksDB read the memtable and blocks in order (~10% faster, measured).
        wanted = sorted(keys)
        raws = cast(list[bytes | None], self._db.get([k.encode() for k in wanted]))
        loads = orjson.loads
        return {k: loads(raw) for k, raw in zip(wanted, raws, strict=True) if raw is not None}

    @_reading
    def scan(
        self, prefix: str = "", after: str | None = None, limit: int = 100
    ) -> list[tuple[str, Any]]:
        """Up to `limit` states in key byte order, with key > `after` and the given prefix."""
        low = prefix.encode()
        skip = None if after is None else after.encode()
        start = max(low, skip) if skip is not None else low
        pairs = _range(self._db, start, _prefix_end(low), limit + (skip is not None))
        loads = orjson.loads
        return [(k.decode(), loads(v)) for k, v in pairs if k != skip][: max(limit, 0)]

    def link(self, source_key: str) -> str | None:
        """The key that `source_key` was last linked to, or None."""
        value = self._meta_get(_LINK + source_key.encode())
        return value if isinstance(value, str) else None

    @_reading
    def offsets(self) -> dict[TopicPartition, int]:
        """The next offset to consume for each source partition, as last committed."""
        return dict(self._offsets) if self._writable else self._read_offsets()

    def meta(self, name: str) -> Any | None:
        """The named meta value, or None."""
        return self._meta_get(_META + name.encode())

    @_reading
    def approximate_keys(self) -> int:
        """RocksDB's estimate of the number of states (overwrites count until compacted)."""
        return self._db.property_int_value("rocksdb.estimate-num-keys") or 0

    def commit(
        self,
        states: Mapping[str, Any],
        offsets: Mapping[TopicPartition, int],
        *,
        links: Mapping[str, str | None] = {},
        meta: Mapping[str, Any] = {},
        deletes: Iterable[str] = (),
    ) -> None:
        """Write states, deletions, links, meta and offsets in one WriteBatch.

        Everything is checked and encoded before the write, so a failure writes nothing.
        """
        self._check_writable()
        dels = deletes if isinstance(deletes, list) else list(deletes)
        batch = rocksdict.WriteBatch(raw_mode=True)
        _encode_commit(self.path, states, dels, links, meta, batch.put, batch.delete, self._meta_cf)
        with self._lock:
            _check_offsets(self.path, self._offsets, offsets, forward_only=True)
            for tp, offset in offsets.items():
                batch.put(_offset_key(tp), b"%d" % offset, self._meta_cf)
            if not batch.is_empty():
                self._write(batch)
                self._offsets.update(offsets)
        log.debug("store %s committed %d states, offsets %s", self.path, len(states), offsets)

    def copy_states(self, part: RocksStore, *, chunk: int = 20_000) -> None:
        """Copy the states and links of `part` into this store, which must hold no offsets yet:
        the first step of `absorb`, taken early for a part that is done before the others."""
        self._check_writable()
        with self._lock:
            if self._offsets:
                raise StoreError(f"store {self.path}: holds offsets, it cannot absorb parts")
            self._copy(part._db, b"", None, chunk)
            self._copy(part._meta_db, _LINK, _prefix_end(_LINK), chunk, self._meta_cf)

    def absorb(
        self,
        parts: Sequence[RocksStore],
        *,
        meta: Mapping[str, Any] = {},
        chunk: int = 20_000,
        copied: Collection[Path] = (),
    ) -> None:
        """Copy the states and links of `parts` (stores of disjoint keys and partitions, built
        side by side) into this store, which must hold no offsets yet; parts whose path is in
        `copied` went through `copy_states` already.

        The copy goes in batches of `chunk` records; the parts' offsets and `meta` go in one last
        batch. A crash before that batch leaves this store without offsets, so the caller simply
        absorbs again (the same keys get the same values)."""
        self._check_writable()
        offsets: dict[TopicPartition, int] = {}
        for part in parts:
            theirs = part.offsets()
            if not offsets.keys().isdisjoint(theirs):
                raise StoreError(f"store {self.path}: parts overlap on {offsets.keys() & theirs}")
            offsets.update(theirs)
        for part in parts:
            if part.path not in copied:
                self.copy_states(part, chunk=chunk)
        with self._lock:
            if self._offsets:
                raise StoreError(f"store {self.path}: holds offsets, it cannot absorb parts")
            batch = rocksdict.WriteBatch(raw_mode=True)
            _encode_commit(self.path, {}, [], {}, meta, batch.put, batch.delete, self._meta_cf)
            for tp, offset in offsets.items():
                batch.put(_offset_key(tp), b"%d" % offset, self._meta_cf)
            self._write(batch)
            self._offsets.update(offsets)
        log.info("store %s absorbed %d parts", self.path, len(parts))

    def _copy(
        self,
        source: rocksdict.Rdict,
        start: bytes,
        end: bytes | None,
        chunk: int,
        cf: rocksdict.ColumnFamily | None = None,
    ) -> None:
        """Every raw pair of `source` in [start, end) into this store, `chunk` pairs a batch."""
        while True:
            pairs = _range(source, start, end, chunk)
            if not pairs:
                return
            batch = rocksdict.WriteBatch(raw_mode=True)
            if cf is None:
                for key, value in pairs:
                    batch.put(key, value)
            else:
                for key, value in pairs:
                    batch.put(key, value, cf)
            self._write(batch)
            start = pairs[-1][0] + b"\x00"  # the next key after the last one copied

    def reset_offsets(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Set these partitions' offsets, backwards too (a deliberate replay)."""
        self._check_writable()
        with self._lock:
            _check_offsets(self.path, self._offsets, offsets, forward_only=False)
            batch = rocksdict.WriteBatch(raw_mode=True)
            for tp, offset in offsets.items():
                batch.put(_offset_key(tp), b"%d" % offset, self._meta_cf)
            self._write(batch)
            self._offsets.update(offsets)
        log.info("store %s: offsets reset to %s", self.path, dict(offsets))

    def close(self) -> None:
        """Flush, then release the database and its LOCK. Calling it again does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            # Column-family views keep RocksDB (and its LOCK) alive, so they go first.
            self._meta_cf = None
            try:
                self._meta_db.close()
                self._db.close()
            except Exception as exc:
                raise StoreError(f"store {self.path}: close failed: {exc}") from exc
            finally:
                if self._scratch is not None:
                    shutil.rmtree(self._scratch, ignore_errors=True)
        log.info("closed store %s", self.path)

    def __enter__(self) -> RocksStore:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "secondary" if self._secondary else "read-write" if self._writable else "read-only"
        return f"RocksStore({str(self.path)!r}, {mode}{', closed' if self._closed else ''})"

    def _write(self, batch: rocksdict.WriteBatch) -> None:
        try:
            self._db.write(batch, self._write_opts)
        except Exception as exc:
            raise StoreError(f"store {self.path}: write failed: {exc}") from exc

    @_reading
    def _meta_get(self, raw_key: bytes) -> Any | None:
        raw = self._meta_db.get(raw_key)
        return None if raw is None else orjson.loads(raw)

    def _read_offsets(self) -> dict[TopicPartition, int]:
        offsets: dict[TopicPartition, int] = {}
        for raw_key, raw in _range(self._meta_db, _OFFSET, b"offset0", None):  # "0" follows "/"
            topic, _, partition = raw_key[len(_OFFSET) :].decode().rpartition("/")
            offsets[topic, int(partition)] = int(raw)
        return offsets

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"store {self.path} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if not self._writable:
            raise StoreError(f"store {self.path} is open read-only; it cannot be written")


def _options(cache: rocksdict.Cache, write_buffer_mb: int, lz4: bool) -> rocksdict.Options:
    """The options of one column family; `_open_rdict` adds the database-wide ones."""
    opts = rocksdict.Options(raw_mode=True)
    table = rocksdict.BlockBasedOptions()
    table.set_block_cache(cache)
    table.set_bloom_filter(10, False)  # a full filter: ~1% false positives for absent keys
    table.set_cache_index_and_filter_blocks(True)  # index and filter memory count in the cache
    table.set_pin_l0_filter_and_index_blocks_in_cache(True)
    # Partitioned filters and a two-level index: a lookup loads 4 KiB filter partitions instead
    # of a whole file's filter (MBs at millions of keys), which a capped cache kept evicting.
    # Measured with 4M random keys (get_many + commit per 5,000): without, 147k -> 20k keys/s
    # as the store grew; with, 99k -> 88k keys/s, flat.
    table.set_partition_filters(True)
    table.set_index_type(rocksdict.BlockBasedIndexType.two_level_index_search())
    table.set_pin_top_level_index_and_filter(True)
    table.set_metadata_block_size(4096)
    opts.set_block_based_table_factory(table)
    opts.set_write_buffer_size(write_buffer_mb << 20)
    opts.set_max_write_buffer_number(2)
    kind = rocksdict.DBCompressionType.lz4() if lz4 else rocksdict.DBCompressionType.none()
    opts.set_compression_type(kind)
    return opts


def _open_rdict(
    path: Path,
    access: rocksdict.AccessType,
    cache_mb: int,
    write_buffer_mb: int,
    *,
    secondary: bool,
) -> rocksdict.Rdict:
    """Open the RocksDB at `path` with both column families; failures become StoreError."""
    if cache_mb < 1 or write_buffer_mb < 1:
        raise StoreError(f"store {path}: cache_mb and write_buffer_mb must be at least 1")
    cache = rocksdict.Cache(cache_mb << 20)
    lz4 = True
    while True:
        opts = _options(cache, write_buffer_mb, lz4)
        opts.create_if_missing(True)
        opts.create_missing_column_families(True)
        opts.set_atomic_flush(True)
        opts.set_max_total_wal_size(4 * (write_buffer_mb << 20))
        opts.set_keep_log_file_num(3)
        opts.set_max_log_file_size(4 << 20)
        if secondary:
            opts.set_max_open_files(-1)  # RocksDB requires this of secondary instances
            # Else every catch-up starts 16 threads per column family to open table files:
            # 3 ms per catch_up() with nothing new, 0.13 ms with one (measured).
            opts.set_max_file_opening_threads(1)
        meta_opts = _options(cache, max(1, write_buffer_mb // 4), lz4)
        try:
            return rocksdict.Rdict(
                str(path), opts, column_families={META_CF: meta_opts}, access_type=access
            )
        except Exception as exc:
            if lz4 and "not linked" in str(exc):
                log.warning("this rocksdict build lacks lz4; store %s is uncompressed", path)
                lz4 = False
                continue
            raise _open_error(path, exc) from exc
