"""Opening a store's RocksDB (its column families and their options) and reading key ranges."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import rocksdict
from refold.core.errors import StoreError, StoreLocked

log = logging.getLogger(__name__)

META_CF = "meta"


def key_range(
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


def open_error(path: Path, exc: Exception) -> StoreError:
    text = str(exc)
    if "LOCK" in text and "lock hold by current process" in text:
        return StoreLocked(
            f"store {path} is already open in this process: {text}",
            holder=None,
            hint="close the other RocksStore on this path first",
        )
    if "LOCK" in text:
        return _locked(path, lock_holder(path))
    if text.startswith("Corruption"):
        return StoreError(
            f"store {path} is corrupted: {text}",
            hint="move the directory aside and rebuild the projection from Kafka (refold replay)",
        )
    return StoreError(f"cannot open store {path}: {text}")


def _locked(path: Path, holder: int | None) -> StoreLocked:
    who = f"process {holder} ({describe_process(holder)})" if holder else "another process"
    return StoreLocked(
        f"store {path} is locked by {who}",
        holder=holder,
        hint="a replay or a worker is writing it: wait for it, or stop it; two workers need "
        "a REFOLD_DATA_DIR each",
    )


def refuse_if_locked(path: Path) -> None:
    """Raise StoreLocked when another process holds the store's LOCK, without asking RocksDB:
    a failed open moves the holder's info LOG aside first (LOG.old.*, only 3 kept), so a
    process that retries, like a worker waiting for a replay's store, would erase the
    holder's log every time."""
    holder = lock_holder(path)
    if holder is not None and holder != os.getpid():
        raise _locked(path, holder)


def lock_holder(path: Path) -> int | None:
    """The pid of the process holding the store's RocksDB LOCK (a POSIX record lock), from the
    kernel's table of locks, or None when nobody holds it (or there is no /proc to ask). Read,
    not asked with fcntl: closing a descriptor of the LOCK file would drop any lock this very
    process holds on it."""
    try:
        lock = os.stat(path / "LOCK")
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    # "3: POSIX  ADVISORY  WRITE 8134 fe:00:10421751 0 EOF" (waiters read "3: -> POSIX ...")
    where = f"{os.major(lock.st_dev):02x}:{os.minor(lock.st_dev):02x}:{lock.st_ino}"
    for line in table.splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "POSIX" and fields[5] == where:
            return int(fields[4]) if fields[4].isdigit() else None
    return None


def describe_process(pid: int) -> str:
    """A process's command line, shortened to what names it (`refold replay balances ...`)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "gone"
    args = [a for a in args if a]
    for i, arg in enumerate(args):  # from `refold` (or `-m refold.cli.main`) on
        if arg.endswith("/refold") or arg == "refold" or arg == "refold.cli.main":
            return " ".join(["refold", *args[i + 1 :]])[:120]
    return " ".join(args)[:120]


def cf_options(cache: rocksdict.Cache, write_buffer_mb: int, lz4: bool) -> rocksdict.Options:
    """The options of one column family; `open_rdict` adds the database-wide ones."""
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


def open_rdict(
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
        opts = cf_options(cache, write_buffer_mb, lz4)
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
        meta_opts = cf_options(cache, max(1, write_buffer_mb // 4), lz4)
        try:
            return rocksdict.Rdict(
                str(path), opts, column_families={META_CF: meta_opts}, access_type=access
            )
        except Exception as exc:
            if lz4 and "not linked" in str(exc):
                log.warning("this rocksdict build lacks lz4; store %s is uncompressed", path)
                lz4 = False
                continue
            raise open_error(path, exc) from exc
