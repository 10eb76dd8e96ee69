"""The JSON bodies of read answers, shared by the query server and its reader processes.

Both build them here so that a lookup answers the same bytes whichever process serves it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web
from refold.engine.timetravel import murmur2_partition

TP = tuple[str, int]
Answer = tuple[int, bytes]  # HTTP status, JSON body
#: An answer to a POST however it is sent (aiohttp's response, or refold.http.fastpath's
#: bytes): HTTP status, JSON body, extra headers.
Reply = tuple[int, bytes, tuple[tuple[str, str], ...]]

# A runner in these states has closed (or is closing) its store; reading it would race the close.
DOWN = frozenset({"stopped", "failed"})


def _json_dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


dumps: Callable[[Any], bytes]
loads: Callable[[bytes], Any]
try:
    import orjson

    dumps, loads = orjson.dumps, orjson.loads
except ImportError:  # optional here: json gives the same bytes, only slower
    dumps, loads = _json_dumps, json.loads


def position(positions: Mapping[TP, int]) -> dict[str, int]:
    """`{"topic:partition": next offset}` in partition order, as every answer carries it."""
    return {f"{t}:{p}": o for (t, p), o in sorted(positions.items())}


def error_body(error: str, detail: Any, **extra: Any) -> bytes:
    """The one error shape: `{"error": short phrase, "detail": what exactly, ...extra}`."""
    return dumps({"error": error, "detail": detail, **extra})


def reply(status: int, body: Any, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return status, dumps(body), headers


def error_reply(status: int, error: str, detail: Any) -> Reply:
    return status, error_body(error, detail), ()


def web_response(answer: Reply) -> web.Response:
    """`answer` as aiohttp's response, for the routes that also answer on the fast path."""
    status, body, headers = answer
    response = web.Response(status=status, body=body, content_type="application/json")
    for name, value in headers:
        response.headers[name] = value
    return response


def key_found(key: str, state: Any, encoded_position: bytes, fresh: bytes) -> bytes:
    """The 200 body of `GET /projections/{name}/{key}` (the position encoded once per commit;
    `fresh` is `Freshness.fragment(key)`)."""
    return b'{"key":%b,"state":%b,"position":%b%b}' % (
        dumps(key),
        dumps(state),
        encoded_position,
        fresh,
    )


def key_missing(name: str, key: str, positions: Mapping[TP, int], fresh: bytes) -> bytes:
    """The 404 body of a lookup of a key without state (which may be missing because the
    answer is stale: `fresh` says)."""
    body = error_body(
        "no state for key",
        f"projection {name!r} has no state for key {key!r}",
        position=position(positions),
    )
    return body[:-1] + fresh + b"}"


_PARTITIONS: dict[int, dict[str, int]] = {}  # partition count -> key -> its partition
_PARTITIONS_MAX = 100_000  # keys remembered per partition count (then forgotten at once)


def partition_of(key: str, count: int) -> int:
    """murmur2 of the key, as the producer placed it; remembered, since a pure-Python murmur2
    costs several µs, more than the rest of a lookup (hot keys are looked up again and again)."""
    known = _PARTITIONS.get(count)
    if known is None:
        known = _PARTITIONS[count] = {}
    found = known.get(key)
    if found is None:
        if len(known) >= _PARTITIONS_MAX:
            known.clear()
        found = known[key] = murmur2_partition(key.encode(), count)
    return found


#: Per partition of a source topic: (lag, None) when folded here, (None, why) when stale.
Entry = tuple[int | None, str | None]
#: Per source topic, in the projection's order: (partition count, an Entry per partition).
Parts = list[tuple[int, list[Entry]]]


def _fragment(entries: list[Entry]) -> bytes:
    """`,"lag":N,"stale":false` or `,"lag":null,"stale":true,"stale_reason":"..."` for a key
    whose state depends on these partitions (one per source topic)."""
    for _lag, why in entries:
        if why is not None:
            return b',"lag":null,"stale":true,"stale_reason":%b' % dumps(why)
    lags = [lag for lag, _ in entries]
    total = None if None in lags else sum(lag for lag in lags if lag is not None)
    return b',"lag":%b,"stale":false' % (b"null" if total is None else b"%d" % total)


class Freshness:
    """What a key lookup says about how current its answer is: `"lag"`, the records of the
    key's partition not folded yet (as of the last second), and `"stale": true` with a reason
    when that partition is not folded here or the broker is unreachable. Built from the
    worker's health (`refold.engine.health`) a few times a second; `fragment(key)` is on the
    lookup path, so when one answer fits every key (the usual case: all partitions here, none
    behind) it is one attribute read, and only otherwise a murmur2 of the key per topic."""

    __slots__ = ("_owners", "_tables", "parts", "uniform")

    def __init__(
        self,
        parts: Parts,
        rekeys: bool = False,
        stale: str | None = None,
        owners: list[str | None] | None = None,
    ) -> None:
        self.parts = parts
        # Which member folds each partition another worker folds: for routing a lookup to it
        # (single-topic projections that keep their keys; a re-keyed state has no one owner).
        self._owners: list[str | None] | None = None
        if owners is not None and len(parts) == 1 and not rekeys and any(owners):
            self._owners = owners
        self._tables = [(count, [_fragment([e]) for e in entries]) for count, entries in parts]
        flat = {e for _count, entries in parts for e in entries}
        self.uniform: bytes | None = None
        if stale is not None or not parts:
            why = stale or "this worker does not know the source partitions yet"
            self.uniform = _fragment([(None, why)])
        elif rekeys:  # a re-keyed state may hold events of any partition
            self.uniform = _fragment([e for _count, entries in parts for e in entries])
        elif len(flat) == 1:
            self.uniform = _fragment(list(flat) * len(parts))

    def fragment(self, key: str) -> bytes:
        if self.uniform is not None:
            return self.uniform
        if len(self._tables) == 1:
            count, fragments = self._tables[0]
            return fragments[partition_of(key, count)]
        return _fragment([entries[partition_of(key, n)] for n, entries in self.parts])

    @property
    def owners(self) -> list[str | None] | None:
        """Per partition, the member that folds it when another worker does (None: here)."""
        return self._owners

    def here(self, key: str) -> bool:
        """Whether this worker folds `key`'s partition (or no one else does)."""
        return self.owner(key) is None

    def owner(self, key: str) -> str | None:
        """The group member (its instance id) that folds `key`'s partition when another
        worker does; None when this one does, or when no single member holds the key."""
        if self._owners is None:
            return None
        return self._owners[partition_of(key, self.parts[0][0])]

    def to_json(self) -> dict[str, Any]:
        """For the reader processes, which rebuild it with `from_json`."""
        uniform = None if self.uniform is None else self.uniform.decode()
        return {"parts": self.parts, "uniform": uniform, "owners": self._owners}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Freshness:
        parts = [(int(n), [(e[0], e[1]) for e in entries]) for n, entries in obj["parts"]]
        fresh = cls(parts, owners=obj.get("owners"))
        if obj.get("uniform") is not None:
            fresh.uniform = str(obj["uniform"]).encode()
        return fresh


UNKNOWN = Freshness([], stale="this worker does not know the source partitions yet")


def health(
    states: Mapping[str, str],
    status: str,
    summary: Mapping[str, Any],
    sagas: Mapping[str, str] | None = None,
    commands: Mapping[str, str] | None = None,
    tasks: Mapping[str, Mapping[str, str]] | None = None,
) -> Answer:
    """`GET /healthz`: 200 only while every answer is current (`status` "ok", no projection
    runner, saga runner, command processor, task dispatcher or reconciler failed), else 503;
    each one's state and what is not current (refold.engine.health)."""
    every = [*states.values(), *(sagas or {}).values(), *(commands or {}).values()]
    every += [state for parts in (tasks or {}).values() for state in parts.values()]
    if any(state == "failed" for state in every):
        status = "failed"
    body = {"status": status, "projections": dict(states), **summary}
    if sagas:
        body["sagas"] = dict(sagas)
    if commands:
        body["commands"] = dict(commands)
    if tasks:
        body["tasks"] = {queue: dict(parts) for queue, parts in tasks.items()}
    return 200 if status == "ok" else 503, dumps(body)
