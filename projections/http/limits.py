"""Connection limits of the query server: timeouts for idle, slow-header and half-sent-body
connections, and a cap on open connections below the descriptor limit.

Every accepted connection starts on the fast path (refold.http.fastpath), which times out its own
idle and partial heads; a connection handed to aiohttp is wrapped in `Watched`, which forwards
everything to aiohttp's protocol and notes when bytes arrive, so the same sweep closes it when it
stays idle between requests, stalls in a head or stalls in a body. A request being answered (a
read-your-writes wait, a publish) is never timed out here: its own limits apply.

The cap keeps descriptors for the worker itself (RocksDB files, Kafka sockets): a connection
beyond it gets a 503 and is closed at once, so an accepted request is never lost to a full table.
"""

from __future__ import annotations

import asyncio
import os
import resource
from dataclasses import dataclass
from time import monotonic
from typing import Any, cast

from refold.core.errors import ConfigError

# The environment variables, their defaults (seconds) and what they bound.
KEEPALIVE_ENV = "REFOLD_HTTP_KEEPALIVE_S"  # idle between requests (and before the first)
HEADER_ENV = "REFOLD_HTTP_HEADER_TIMEOUT_S"  # a request head started but not finished
BODY_ENV = "REFOLD_HTTP_BODY_TIMEOUT_S"  # no byte of an announced body for this long
MAX_CONNECTIONS_ENV = "REFOLD_HTTP_MAX_CONNECTIONS"
KEEPALIVE_S, HEADER_S, BODY_S = 75.0, 10.0, 30.0
TIMEOUT_KINDS = ("idle", "header", "body")


def _descriptor_cap() -> int:
    """The soft RLIMIT_NOFILE less a reserve for the worker's own files and sockets."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    reserve = max(soft // 4, min(256, soft // 2))
    return max(1, soft - reserve)


@dataclass(frozen=True, slots=True)
class Limits:
    keepalive_s: float = KEEPALIVE_S
    header_s: float = HEADER_S
    body_s: float = BODY_S
    max_connections: int = 0  # 0: derived from the descriptor limit

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Limits:
        env = dict(os.environ) if env is None else env

        def number(name: str, default: float) -> float:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = float(raw)
            except ValueError:
                value = -1.0
            if not value > 0:
                raise ConfigError(f"{name} must be a positive number of seconds, not {raw!r}")
            return value

        cap = env.get(MAX_CONNECTIONS_ENV, "").strip()
        if cap and not (cap.isdigit() and int(cap) > 0):
            raise ConfigError(f"{MAX_CONNECTIONS_ENV} must be a positive integer, not {cap!r}")
        return cls(
            number(KEEPALIVE_ENV, KEEPALIVE_S),
            number(HEADER_ENV, HEADER_S),
            number(BODY_ENV, BODY_S),
            int(cap) if cap else _descriptor_cap(),
        )

    @property
    def tick_s(self) -> float:
        """How often the sweep runs: a quarter of the shortest timeout, within [0.05, 1] s."""
        return min(1.0, max(0.05, min(self.keepalive_s, self.header_s, self.body_s) / 4))


class ConnectionStats:
    """Counters of one listener's connections, shown in /metrics."""

    __slots__ = ("open", "refused", "timeouts")

    def __init__(self) -> None:
        self.open = 0
        self.refused = 0
        self.timeouts = dict.fromkeys(TIMEOUT_KINDS, 0)

    def as_list(self) -> list[int]:
        """[open, refused, then the timeouts by kind]: what a reader process reports."""
        return [self.open, self.refused, *self.timeouts.values()]

    def add(self, reported: list[int]) -> None:
        """Add what `as_list` gave elsewhere (a reader process's connections) to these."""
        self.open += reported[0]
        self.refused += reported[1]
        for kind, n in zip(TIMEOUT_KINDS, reported[2:], strict=True):
            self.timeouts[kind] += n

    def metrics(self) -> str:
        lines = [
            "# HELP refold_http_connections_open Connections open on the query server.",
            "# TYPE refold_http_connections_open gauge",
            f"refold_http_connections_open {self.open}",
            "# HELP refold_http_connections_refused_total Connections refused beyond the cap.",
            "# TYPE refold_http_connections_refused_total counter",
            f"refold_http_connections_refused_total {self.refused}",
            "# HELP refold_http_timeouts_total Connections closed by a timeout, by kind.",
            "# TYPE refold_http_timeouts_total counter",
        ]
        lines += [f'refold_http_timeouts_total{{kind="{k}"}} {n}' for k, n in self.timeouts.items()]
        return "\n".join(lines) + "\n"


class Watched(asyncio.Protocol):
    """A connection handed to aiohttp's protocol: forwards every event, notes arrival times.

    The sweep reads aiohttp's RequestHandler state (`_waiter`: waiting for the next request;
    `_request_count`; `_current_request`); a handler without them (the reader processes' relay)
    is only closed by the cap, never by a timeout here.
    """

    __slots__ = ("handler", "head_since", "idle_since", "received", "stats", "transport")

    def __init__(
        self,
        handler: asyncio.Protocol,
        transport: asyncio.Transport,
        now: float,
        stats: ConnectionStats,
    ) -> None:
        self.handler = handler
        self.stats = stats  # its open count drops when this connection ends
        self.transport: asyncio.Transport | None = transport
        self.received = now  # when the last bytes arrived
        self.head_since: float | None = None  # a head begun, not yet complete
        self.idle_since: float | None = None  # first seen waiting for a request

    def _waiting(self) -> bool:
        waiter = getattr(self.handler, "_waiter", None)
        return waiter is not None and not waiter.done()

    def data_received(self, data: bytes) -> None:
        now = monotonic()
        self.received = now
        handler = cast(Any, self.handler)
        before = getattr(handler, "_request_count", None)
        handler.data_received(data)
        if before is None:
            return
        if handler._request_count != before:  # a head completed
            self.head_since = None
        elif (
            self.head_since is None
            and not handler._messages  # no request queued whose body this could be
            and handler._current_request is None  # nor one being answered
        ):
            self.head_since = now  # bytes of a head not complete yet

    def eof_received(self) -> bool | None:
        return self.handler.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.stats.open -= 1
        self.transport = None
        self.handler.connection_lost(exc)

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()

    def expired(self, limits: Limits, now: float) -> str | None:
        """The kind of timeout this connection ran into, if any."""
        if not hasattr(self.handler, "_waiter"):
            return None
        if self._waiting():
            if self.head_since is not None:
                return "header" if now - self.head_since > limits.header_s else None
            if self.idle_since is None:
                self.idle_since = now
            idle = now - max(self.idle_since, self.received)
            return "idle" if idle > limits.keepalive_s else None
        self.idle_since = None
        self.head_since = None  # busy: a head begun meanwhile is timed as idle from its end
        request = getattr(self.handler, "_current_request", None)
        content = getattr(request, "content", None)
        if content is not None and not content.is_eof() and now - self.received > limits.body_s:
            return "body"
        return None
