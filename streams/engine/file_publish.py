"""Reading a JSON-lines file of events for `refold publish --file`, in worker processes.

Parsing, validating and Avro-encoding cost more per event than sending (under the GIL a thread
cannot help), so a large file is read by several processes. The steps, in order:

1. the input is cut into chunks at line ends (byte ranges: about a sixteenth of a worker's
   share, between `MIN_CHUNK` and `MAX_CHUNK` bytes: small enough that the last chunks end
   together, and that results come back, and are unpickled here, while later chunks are parsed);
2. worker processes (forked: they inherit the codec, and stdin's bytes, without a copy) each read
   their chunk, and parse, validate and encode it with `LineEncoder`; each sends back an
   `EncodedBatch` (columns of keys, types and encoded values, as one `marshal` blob), its
   problems and its line count;
3. the parent numbers the problems' lines across chunks. EVERY chunk is validated before the
   first event is sent (validated first, not staged in a transaction): a file with any bad line
   publishes nothing, and no consumer, whatever its isolation level, ever sees part of it;
4. the batches are sent in file order by one idempotent producer (`Publisher.publish_batches`),
   so events of one key keep their order.

A small input (below `PARALLEL_FROM` bytes), one job, or a platform without `fork` takes the same
steps in this process.
"""

from __future__ import annotations

import marshal
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from refold.core.inputs import EncodedBatch, LineEncoder, LineProblem
from refold.core.serde import Codec

MIN_CHUNK = 64 * 1024
MAX_CHUNK = 2 * 1024 * 1024
PARALLEL_FROM = 8 * 1024 * 1024  # ~60k bank events: below this, forking costs more than it saves
MAX_JOBS = 4


@dataclass(slots=True)
class FileEvents:
    """Every valid event of the input in order (in chunks), and every problem found."""

    batches: list[EncodedBatch]
    problems: list[LineProblem]
    lines: int
    #: With `read_events(shares=N)`, N > 1: the events as N shares instead of `batches` (share i:
    #: the events whose key hashes to i, `marshal` blobs in file order) and how many there are.
    shares: list[list[bytes]] = field(default_factory=list)
    shared: int = 0

    @property
    def count(self) -> int:
        return sum(len(b) for b in self.batches) + self.shared


def default_jobs(size: int) -> int:
    """Worker processes for an input of `size` bytes: 1 below `PARALLEL_FROM`, else one per
    CPU (at most `MAX_JOBS`)."""
    if size < PARALLEL_FROM or not can_fork():
        return 1
    return max(1, min(MAX_JOBS, os.cpu_count() or 1))


def chunk_ranges(
    size: int, find_line_end: Callable[[int], int], jobs: int
) -> list[tuple[int, int]]:
    """Byte ranges [start, end) covering `size` bytes, each ending just after a line end (or at
    the end of the input)."""
    target = min(MAX_CHUNK, max(MIN_CHUNK, size // max(1, 16 * jobs)))
    ranges = []
    start = 0
    while start < size:
        end = find_line_end(min(size, start + target))
        ranges.append((start, end))
        start = end
    return ranges


def planned_jobs(source: Path | bytes, jobs: int | None = None) -> int:
    """The processes `read_events` will use for `source` (`jobs`, or `default_jobs`)."""
    size = source.stat().st_size if isinstance(source, Path) else len(source)
    jobs = default_jobs(size) if jobs is None else max(1, jobs)
    return jobs if can_fork() and size > MIN_CHUNK else 1


def read_events(
    source: Path | bytes,
    codec: Codec,
    jobs: int | None = None,
    *,
    under_way: Callable[[], object] | None = None,
    shares: int = 1,
) -> FileEvents:
    """Parse, validate and encode every line of a file (or of bytes already read, e.g. stdin)
    with `jobs` processes (default: `default_jobs`). Raises OSError if the file cannot be read.

    `under_way` is called once in this process while the lines are being read: after the worker
    processes are forked (so that a Kafka client it makes is never inherited by them), or before
    reading in this process. `refold publish` makes its producer there: the producer connects and
    gets its idempotent producer id (about a second) while the file is parsed.

    `shares` > 1: the events come back as that many shares by key (`FileEvents.shares`), for
    that many senders (`refold.engine.file_senders`); every event of one key is in one share."""
    size = source.stat().st_size if isinstance(source, Path) else len(source)
    jobs = planned_jobs(source, jobs)
    shares = max(1, shares)
    if isinstance(source, Path):
        with source.open("rb") as fh:
            ranges = chunk_ranges(size, lambda at: _file_line_end(fh, at, size), jobs)
    else:
        data = source
        ranges = chunk_ranges(size, lambda at: _bytes_line_end(data, at, size), jobs)
    if jobs == 1 or len(ranges) == 1:
        if under_way is not None:
            under_way()
        _start(codec, source, shares)
        packed = [_encode_range_packed(start, end) for start, end in ranges]
    else:
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(
            jobs, mp_context=context, initializer=_start, initargs=(codec, source, shares)
        ) as pool:
            starts, ends = zip(*ranges, strict=True)
            results = pool.map(_encode_range_packed, starts, ends)  # forks every worker first
            if under_way is not None:
                under_way()
            packed = list(results)
    if shares > 1:  # kept as blobs: each goes to its sender as it is
        read = _numbered(
            [(EncodedBatch(), problems, lines) for _blobs, _n, problems, lines in packed]
        )
        read.shares = [[blobs[i] for blobs, _n, _p, _l in packed] for i in range(shares)]
        read.shared = sum(n for _blobs, n, _p, _l in packed)
        read.batches = []
        return read
    return _numbered(
        [(unpack_batch(blobs[0]), problems, lines) for blobs, _n, problems, lines in packed]
    )


def _numbered(parts: list[tuple[EncodedBatch, list[LineProblem], int]]) -> FileEvents:
    """Chunk-relative line numbers made file line numbers."""
    batches, problems = [], []
    before = 0
    for batch, chunk_problems, lines in parts:
        batches.append(batch)
        problems += [LineProblem(p.line + before, p.reason) for p in chunk_problems]
        before += lines
    return FileEvents(batches, problems, before)


# -- in each worker process (or in this one) -------------------------------------------------

_encoder: LineEncoder | None = None
_source: Path | bytes = b""
_shares = 1


def _start(codec: Codec, source: Path | bytes, shares: int = 1) -> None:
    global _encoder, _source, _shares
    _encoder, _source, _shares = LineEncoder(codec), source, shares


def _encode_range(start: int, end: int) -> tuple[EncodedBatch, list[LineProblem], int]:
    """One chunk: its events, its problems (line 1 = the chunk's first line), its line count."""
    assert _encoder is not None, "_start first"
    if isinstance(_source, Path):
        with _source.open("rb") as fh:
            fh.seek(start)
            chunk = fh.read(end - start)
    else:
        chunk = _source[start:end]
    lines = chunk.count(b"\n") + (0 if chunk.endswith(b"\n") else 1)
    batch, problems = _encoder.encode(chunk)
    return batch, problems, lines


def _encode_range_packed(start: int, end: int) -> tuple[list[bytes], int, list[LineProblem], int]:
    """`_encode_range` with the batch's columns as `marshal` blobs, one per share (see `_start`),
    and its event count: pickling the columns (a memo entry per object) cost a worker 1.1-1.3 µs
    per event, marshal 0.17, and the parent reads them back in 0.26 instead of 0.37 (200k bank
    events, loaded machine). Only this package's processes make the blobs `unpack_batch` reads."""
    batch, problems, lines = _encode_range(start, end)
    if _shares == 1:
        return [marshal.dumps((batch.types, batch.keys, batch.values))], len(batch), problems, lines
    # The share of a key is its str hash: the same in every process forked from one parent.
    columns: list[tuple[list[str], list[str], list[bytes]]] = [([], [], []) for _ in range(_shares)]
    for type_name, key, value in zip(batch.types, batch.keys, batch.values, strict=True):
        types, keys, values = columns[hash(key) % _shares]
        types.append(type_name)
        keys.append(key)
        values.append(value)
    return [marshal.dumps(c) for c in columns], len(batch), problems, lines


def unpack_batch(packed: bytes) -> EncodedBatch:
    """A blob of `_encode_range_packed` (or of `FileEvents.shares`) as columns again."""
    types, keys, values = marshal.loads(packed)
    return EncodedBatch(types, keys, values)


# -- chunk boundaries --------------------------------------------------------------------------


def _file_line_end(fh: BinaryIO, at: int, size: int) -> int:
    """The offset just after the first b"\\n" at or after `at` (or `size`)."""
    if at >= size:
        return size
    seek, read = fh.seek, fh.read
    seek(at)
    position = at
    while True:
        block = read(65536)
        if not block:
            return size
        found = block.find(b"\n")
        if found >= 0:
            return position + found + 1
        position += len(block)


def _bytes_line_end(data: bytes, at: int, size: int) -> int:
    if at >= size:
        return size
    found = data.find(b"\n", at)
    return size if found < 0 else found + 1


def can_fork() -> bool:
    return "fork" in multiprocessing.get_all_start_methods()
