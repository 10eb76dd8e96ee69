"""A lean HTTP/1.1 front for the hottest reads; every other request goes to the full aiohttp app.

aiohttp spends about 150 µs of CPU on a key lookup (request and response objects, routing,
the writer's coroutines), more than five times what answering it takes. `FastHTTP` is the
asyncio protocol of every accepted connection: a plain keep-alive `GET /projections/{name}/{key}`
or `GET /healthz` without a body, query string, percent escape or dot segment is answered here
with the same bytes the app would send; the first request that is anything else hands the
connection, with all bytes not answered yet, to aiohttp's own protocol for the rest of its life.
So the full API and its error handling stay aiohttp's, and the fast path only ever answers
requests whose meaning is unambiguous.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Protocol, cast

from aiohttp.http import SERVER_SOFTWARE
from refold.http.answers import Answer
from refold.http.auth import Tokens

# The route labels the full app counts these requests under (aiohttp's canonical paths).
LOOKUP_ROUTE = "/projections/{name}/{key}"
HEALTHZ_ROUTE = "/healthz"

MAX_HEAD = 8190  # longer request heads go to aiohttp, which refuses them properly
_PREFIX = b"/projections/"
# Bytes a path may hold to be answered here: RFC 3986 pchar and "/", without "%" (escapes are
# decoded by aiohttp) — the rest ("?", "#", spaces, controls, non-ASCII) goes to aiohttp.
_PLAIN = bytes(range(0x30, 0x3A)) + bytes(range(0x41, 0x5B)) + bytes(range(0x61, 0x7B))
_PLAIN += b"-._~!$&'()*+,;=:@/"
_REFUSED_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"upgrade", b"expect"})
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_SERVER = SERVER_SOFTWARE.encode()

new_loop: Callable[[], asyncio.AbstractEventLoop]
try:
    import uvloop

    new_loop = uvloop.new_event_loop
except ImportError:  # optional: asyncio's own loop costs more CPU per request
    new_loop = asyncio.new_event_loop


class Reads(Protocol):
    """What the fast path answers from; None means "let the full app answer this one"."""

    def lookup(self, name: str, key: str) -> Answer | None: ...

    def healthz_answer(self) -> Answer | None: ...


class Front:
    """Shared by a listener's connections: the reads, the full app, counters and the clock."""

    def __init__(
        self,
        reads: Reads,
        full_app: Callable[[], asyncio.Protocol],
        counts: dict[tuple[str, int], int],
        tokens: Tokens | None = None,
    ) -> None:
        self.reads = reads
        self.tokens = tokens  # lookups need a `read` token (refold.http.auth); else aiohttp says so
        self.full_app = full_app  # a new aiohttp RequestHandler per call
        self.counts = counts
        self.connections: set[FastHTTP] = set()
        self._second = 0
        self._date = b""

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._date = formatdate(now, usegmt=True).encode()
        return self._date

    def protocol(self) -> FastHTTP:
        return FastHTTP(self)

    def close_all(self) -> None:
        """Close the connections still on the fast path (aiohttp closes the handed-over ones)."""
        for conn in list(self.connections):
            conn.close()


class FastHTTP(asyncio.Protocol):
    """One connection, answered here until a request needs the full app."""

    __slots__ = ("_buffer", "_front", "_paused", "_transport")

    def __init__(self, front: Front) -> None:
        self._front = front
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._front.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._front.connections.discard(self)
        self._transport = None

    def pause_writing(self) -> None:  # the client does not read: stop reading its requests
        if self._transport is not None and not self._paused:
            self._paused = True
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and self._paused:
            self._paused = False
            self._transport.resume_reading()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        buf = self._buffer + data if self._buffer else data
        front = self._front
        start = 0
        while True:
            end = buf.find(b"\r\n\r\n", start)
            if end < 0:
                if len(buf) - start > MAX_HEAD:
                    return self._hand_over(transport, buf[start:])
                break
            answered = self._answer(buf[start:end])
            if answered is None:
                return self._hand_over(transport, buf[start:])
            route, (status, body), close = answered
            counter = (route, status)
            front.counts[counter] = front.counts.get(counter, 0) + 1
            transport.write(
                b"HTTP/1.1 %d %b\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                b"Date: %b\r\nServer: %b\r\n%b\r\n%b"
                % (
                    status,
                    _REASONS[status],
                    len(body),
                    front.date(),
                    _SERVER,
                    b"Connection: close\r\n" if close else b"",
                    body,
                )
            )
            start = end + 4
            if close:
                transport.close()
                self._buffer = b""
                return
        self._buffer = buf[start:]

    def _answer(self, head: bytes) -> tuple[str, Answer, bool] | None:
        """(route, answer, close after it) for a request of ours, None for the full app."""
        line_end = head.find(b"\r\n")
        line = head if line_end < 0 else head[:line_end]
        if not (line.startswith(b"GET /") and line.endswith(b" HTTP/1.1")):
            return None
        target = line[4:-9]
        if target.translate(None, _PLAIN) or b"/." in target or b"//" in target:
            return None
        close = False
        authorization = None
        if line_end >= 0:
            for header in head[line_end + 2 :].split(b"\r\n"):
                name, colon, value = header.partition(b":")
                lowered = name.lower()
                if not colon or lowered in _REFUSED_HEADERS or name != name.strip():
                    return None
                if lowered == b"authorization":
                    authorization = value
                elif lowered == b"connection":
                    option = value.strip().lower()
                    if option == b"close":
                        close = True
                    elif option != b"keep-alive":
                        return None
        reads = self._front.reads
        if target.startswith(_PREFIX):
            name, slash, key = target[len(_PREFIX) :].partition(b"/")
            if not (name and slash and key):
                return None
            tokens = self._front.tokens
            if tokens is not None and tokens.allows(authorization, "read") != 200:
                return None  # aiohttp answers 401 / 403 in the API's error shape
            answer = reads.lookup(name.decode(), key.decode())
            return None if answer is None else (LOOKUP_ROUTE, answer, close)
        if target == b"/healthz":
            answer = reads.healthz_answer()
            return None if answer is None else (HEALTHZ_ROUTE, answer, close)
        return None

    def _hand_over(self, transport: asyncio.Transport, rest: bytes) -> None:
        """Give the connection and the bytes not answered yet to aiohttp's protocol."""
        self._front.connections.discard(self)
        self._transport = None
        self._buffer = b""
        if self._paused:  # aiohttp does its own flow control from here on
            self._paused = False
            transport.resume_reading()
        handler = self._front.full_app()
        handler.connection_made(transport)
        transport.set_protocol(handler)
        if rest:
            handler.data_received(rest)
