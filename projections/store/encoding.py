"""What one commit of a store writes, as bytes: its keys, its values as JSON, its source offsets.

Shared by `RocksStore` and `MemoryStore`, so that both refuse the same values and offsets the
same way (see refold.store.rocksdb for the invariants).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson
from refold.core.errors import StoreError

TopicPartition = tuple[str, int]

OFFSET = b"offset/"
LINK = b"link/"
META = b"meta/"


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


def offset_key(tp: TopicPartition) -> bytes:
    return b"%s%s/%d" % (OFFSET, tp[0].encode(), tp[1])


def check_offsets(
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


def prefix_end(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string starting with `prefix`."""
    stripped = prefix.rstrip(b"\xff")
    return stripped[:-1] + bytes([stripped[-1] + 1]) if stripped else None


def encode_commit(
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
                delete(LINK + key.encode(), meta_cf)
            elif isinstance(target, str):
                put(LINK + key.encode(), dumps(target), meta_cf)
            else:
                raise TypeError(f"a link target must be str or None, not {type(target).__name__}")
        kind = "meta"
        for key, value in meta.items():
            if value is None:
                delete(META + key.encode(), meta_cf)
            else:
                put(META + key.encode(), dumps(value), meta_cf)
    except (TypeError, ValueError, AttributeError) as exc:  # orjson, str.encode, non-str keys
        raise UnstorableValue(
            f"store {path}: cannot encode the value of {key!r} as JSON: {exc}", key, kind
        ) from exc
