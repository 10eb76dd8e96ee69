"""The JSON bodies of read answers, shared by the query server and its reader processes.

Both build them here so that a lookup answers the same bytes whichever process serves it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

TP = tuple[str, int]
Answer = tuple[int, bytes]  # HTTP status, JSON body

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


def key_found(key: str, state: Any, encoded_position: bytes) -> bytes:
    """The 200 body of `GET /projections/{name}/{key}` (the position encoded once per commit)."""
    return b'{"key":%b,"state":%b,"position":%b}' % (dumps(key), dumps(state), encoded_position)


def key_missing(name: str, key: str, positions: Mapping[TP, int]) -> bytes:
    """The 404 body of a lookup of a key without state."""
    return error_body(
        "no state for key",
        f"projection {name!r} has no state for key {key!r}",
        position=position(positions),
    )


def health(states: Mapping[str, str]) -> Answer:
    """`GET /healthz`: 200 while no projection failed, else 503; each runner's state."""
    failed = any(state == "failed" for state in states.values())
    body = {"status": "failed" if failed else "ok", "projections": dict(states)}
    return 503 if failed else 200, dumps(body)
