"""A lean HTTP/1.1 front for the hottest reads; every other request goes to the full aiohttp app.

aiohttp spends about 150 µs of CPU on a key lookup (request and response objects, routing,
the writer's coroutines), more than five times what answering it takes. `FastHTTP` is the
asyncio protocol of every accepted connection: a plain keep-alive `GET /projections/{name}/{key}`
or `GET /healthz` without a body, query string, percent escape or dot segment is answered here
with the same bytes the app would send; the first request that is anything else hands the
connection, with all bytes not answered yet, to aiohttp's own protocol for the rest of its life.
So the full API and its error handling stay aiohttp's, and the fast path only ever answers
requests whose meaning is unambiguous.

Framing parity with aiohttp (its llhttp parser): the fast path answers a batch of bytes (what one
read brought, plus a head left over from the previous read) only when every complete head in it
is one it serves and the unfinished rest is a clean start of one; otherwise the whole batch goes
to aiohttp, which then sees exactly what it would have seen alone (it refuses a batch with an
error as a whole, dropping the requests before the error). A head it serves has CRLF line
endings only, a `GET /plain/path HTTP/1.1` line, token-character header names, visible-ASCII
values, exactly one `Host`, no repeated header, no body headers, at most MAX_HEAD bytes and
MAX_HEADERS headers, and nothing after it when it says `Connection: close`.

`POST /commands/{aggregate}[?wait_ms=N]` and `POST /tasks/{queue}` are answered here too
(`Front.posts`: the `intake` of refold.http.command_routes and task_routes, the same code
aiohttp's routes run): under overload most command POSTs are refused, and a refusal through
aiohttp's request and response objects cost about as much as the command itself. Such a POST is
served only with a head held to the rules above (with exactly one `Content-Length`, digits
without a leading zero, under aiohttp's 1 MiB body limit, instead of no body headers; no
`Transfer-Encoding`, `Expect` or `Upgrade`), a plain aggregate or queue name, a token with the
`command` scope when tokens are on, as the last request of its batch (bytes after its body go,
with it, to aiohttp), and is answered asynchronously: the connection reads nothing more until
its answer is written, so answers keep their order.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus
from time import monotonic
from typing import Protocol, cast

import orjson
from aiohttp.http import SERVER_SOFTWARE
from refold.http.answers import Answer, Reply
from refold.http.auth import Tokens
from refold.http.limits import ConnectionStats, Limits, Watched

log = logging.getLogger(__name__)

# The route labels the full app counts these requests under (aiohttp's canonical paths).
LOOKUP_ROUTE = "/projections/{name}/{key}"
HEALTHZ_ROUTE = "/healthz"
COMMANDS_ROUTE = "/commands/{name}"
TASKS_ROUTE = "/tasks/{queue}"

MAX_HEAD = 4096  # longer request heads go to aiohttp (its limit is 8190 bytes a line)
MAX_HEADERS = 64  # more go to aiohttp (its limit is 128)
_PREFIX = b"/projections/"
# Bytes a path may hold to be answered here: RFC 3986 pchar and "/", without "%" (escapes are
# decoded by aiohttp) — the rest ("?", "#", spaces, controls, non-ASCII) goes to aiohttp.
_PLAIN = bytes(range(0x30, 0x3A)) + bytes(range(0x41, 0x5B)) + bytes(range(0x61, 0x7B))
_PLAIN += b"-._~!$&'()*+,;=:@/"
_TCHAR = bytes(range(0x30, 0x3A)) + bytes(range(0x41, 0x5B)) + bytes(range(0x61, 0x7B))
_TCHAR += b"!#$%&'*+-.^_`|~"  # RFC 9110 token characters: what a header name may hold
_VALUE = bytes(range(0x20, 0x7F)) + b"\t"  # visible ASCII, space and tab; no CR, LF, NUL
_HOST = bytes(range(0x30, 0x3A)) + bytes(range(0x41, 0x5B)) + bytes(range(0x61, 0x7B)) + b"-.:[]"
# A head the fast path may serve, whole: the request line, then CRLF-separated fields whose
# names are tokens and whose values are visible ASCII, space or tab.
_HEAD = re.compile(
    b"GET (/[%b]*) HTTP/1\\.1((?:\r\n[%b]+:[%b]*)*)"
    % (re.escape(_PLAIN), re.escape(_TCHAR), re.escape(_VALUE))
)
_FIELD = re.compile(b"\r\n([^:]+):([^\r]*)")
# `POST /commands/{aggregate}` (at most `?wait_ms=` digits) or `POST /tasks/{queue}`: the name
# one plain segment.
_SEGMENT = _PLAIN.replace(b"/", b"")
_POST_HEAD = re.compile(
    b"POST /(commands|tasks)/([%b]+)(?:\\?wait_ms=([0-9]{1,9}))? HTTP/1\\.1((?:\r\n[%b]+:[%b]*)*)"
    % (re.escape(_SEGMENT), re.escape(_TCHAR), re.escape(_VALUE))
)
_LENGTH = re.compile(b"0|[1-9][0-9]{0,6}")
MAX_BODY = 1 << 20  # aiohttp's client_max_size in refold.http.server: a larger body is its 413
_POST_REFUSED = frozenset({b"transfer-encoding", b"upgrade", b"expect"})
_REFUSED_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"upgrade", b"expect"})
_FULL = b"\r\n\r\n"
_CLOSE = b"Connection: close\r\n"
_BUSY = b'{"error":"too many connections","detail":"the server is at its connection cap"}'
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


#: `POST /{kind}/{name}?wait_ms={wait}` with a body -> its reply.
Intake = Callable[[str, str, bytes], Awaitable[Reply]]
#: What the fast path answers POSTs for: b"commands" / b"tasks" -> (route label, intake).
Posts = dict[bytes, tuple[str, Intake]]


class Front:
    """Shared by a listener's connections: the reads, the full app, counters, limits, the clock."""

    def __init__(
        self,
        reads: Reads,
        full_app: Callable[[], asyncio.Protocol],
        counts: dict[tuple[str, int], int],
        tokens: Tokens | None = None,
        limits: Limits | None = None,
        *,
        fast: bool = True,  # False: every connection goes to the full app at its first byte
        posts: Posts | None = None,  # POSTs answered here (None: all aiohttp's)
    ) -> None:
        self.reads = reads
        self.fast = fast
        self.posts = posts
        self.tokens = tokens  # lookups need a `read` token (refold.http.auth); else aiohttp says so
        self.full_app = full_app  # a new aiohttp RequestHandler per call
        self.counts = counts
        self.limits = limits or Limits.from_env()
        self.stats = ConnectionStats()
        self.connections: set[FastHTTP] = set()
        self.watched: set[Watched] = set()
        self.handed_over = 0  # connections given to aiohttp
        self._sweeper: asyncio.TimerHandle | None = None
        self._second = 0
        self._date = b""

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._date = formatdate(now, usegmt=True).encode()
        return self._date

    def protocol(self) -> FastHTTP:
        if self._sweeper is None:
            self._sweep()
        return FastHTTP(self)

    def close_all(self) -> None:
        """Close the connections still on the fast path (aiohttp closes the handed-over ones)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            conn.close()

    def _sweep(self) -> None:
        """Close the connections past a timeout (refold.http.limits); runs every tick."""
        loop = asyncio.get_running_loop()
        now = monotonic()
        limits, timeouts = self.limits, self.stats.timeouts
        for conn in list(self.connections):
            kind = conn.expired(limits, now)
            if kind is not None:
                timeouts[kind] += 1
                conn.close()
        for watched in list(self.watched):
            if watched.transport is None:
                self.watched.discard(watched)
                continue
            kind = watched.expired(limits, now)
            if kind is not None:
                timeouts[kind] += 1
                watched.transport.close()
        self._sweeper = loop.call_later(limits.tick_s, self._sweep)


class FastHTTP(asyncio.Protocol):
    """One connection, answered here until a request needs the full app."""

    __slots__ = ("_buffer", "_front", "_paused", "_pending", "_reads", "_since", "_transport")

    def __init__(self, front: Front) -> None:
        self._front = front
        self._transport: asyncio.Transport | None = None
        self._buffer = b""  # an unfinished head
        self._reads: list[bytes] = []  # the reads it came in (aiohttp is fed them one by one)
        self._paused = False
        self._since = 0.0  # idle since (no partial head), else when the partial head began
        self._pending: asyncio.Future[Reply] | None = None  # a POST being answered

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        front = self._front
        self._since = monotonic()
        tcp = cast(asyncio.Transport, transport)
        stats = front.stats
        if stats.open >= front.limits.max_connections:  # at the cap: refuse, keep descriptors
            stats.refused += 1
            tcp.write(_head(503, len(_BUSY), front.date(), True) + _BUSY)
            tcp.close()
            return
        stats.open += 1
        self._transport = tcp
        front.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._front.stats.open -= 1
            self._front.connections.discard(self)
            self._transport = None

    def pause_writing(self) -> None:  # the client does not read: stop reading its requests
        if self._transport is not None and not self._paused:
            self._paused = True
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and self._paused:
            self._paused = False
            if self._pending is None:
                self._transport.resume_reading()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def expired(self, limits: Limits, now: float) -> str | None:
        if self._pending is not None:  # answering a POST (?wait_ms= waits up to 30 s)
            return None
        if self._buffer:
            return "header" if now - self._since > limits.header_s else None
        return "idle" if now - self._since > limits.keepalive_s else None

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        if self._pending is not None:  # reading is paused; kept for after the POST's answer
            self._buffer += data
            self._reads.append(data)
            return
        buf = self._buffer + data if self._buffer else data
        if not self._front.fast:
            return self._hand_over(transport, [*self._reads, data])
        # First decide the whole batch, then answer: aiohttp refuses a batch with an error as a
        # whole, so one request not ours sends every unanswered byte to it.
        answers: list[tuple[str, Answer, bool]] = []
        post: tuple[tuple[str, Intake], str, str, bytes, bool] | None = None  # ends the batch
        body_due = False  # a POST's head is in, its body is still coming
        start = 0
        while (end := buf.find(_FULL, start)) >= 0:
            if end - start > MAX_HEAD:
                return self._hand_over(transport, [*self._reads, data])
            if buf.startswith(b"POST ", start):
                parsed = self._post(buf[start:end])
                if parsed is None:
                    return self._hand_over(transport, [*self._reads, data])
                handler, name, wait, length, close = parsed
                body_at = end + 4
                if len(buf) - body_at < length:
                    body_due = True
                    break
                if len(buf) != body_at + length:  # more after its body: aiohttp's to frame
                    return self._hand_over(transport, [*self._reads, data])
                post = (handler, name, wait, buf[body_at:], close)
                start = len(buf)
                break
            answered = self._answer(buf[start:end])
            if answered is None:
                return self._hand_over(transport, [*self._reads, data])
            answers.append(answered)
            start = end + 4
            if answered[2] and start < len(buf):  # aiohttp refuses data after Connection: close
                return self._hand_over(transport, [*self._reads, data])
        rest = buf[start:]
        if rest and not body_due and not _clean_start(rest):
            return self._hand_over(transport, [*self._reads, data])
        front = self._front
        counts = front.counts
        for route, (status, body), close in answers:
            counter = (route, status)
            counts[counter] = counts.get(counter, 0) + 1
            transport.write(_head(status, len(body), front.date(), close) + body)
            if close:
                transport.close()
                self._buffer, self._reads = b"", []
                return
        if answers or not self._buffer:
            self._since = monotonic()
        self._buffer = rest
        self._reads = ([rest] if answers else [*self._reads, data]) if rest else []
        if post is not None:
            self._start_post(transport, *post)

    def _start_post(
        self,
        transport: asyncio.Transport,
        route: tuple[str, Intake],
        name: str,
        wait: str,
        body: bytes,
        close: bool,
    ) -> None:
        """Answer a POST once its reply is ready; read nothing more on this connection until
        then (what comes is kept, in order, for after the answer)."""
        label, intake = route
        pending = asyncio.ensure_future(intake(name, wait, body))
        self._pending = pending
        transport.pause_reading()
        pending.add_done_callback(lambda done: self._posted(done, label, name, close))

    def _posted(self, done: asyncio.Future[Reply], label: str, name: str, close: bool) -> None:
        self._pending = None
        transport = self._transport
        if transport is None:  # the client went: the command still counts, its answer not
            return
        try:
            status, body, headers = done.result()
        except Exception as exc:  # as aiohttp's route answers it (refold.http.server._guard)
            log.exception("POST %s failed", label.split("{")[0] + name)
            status, headers = 500, ()
            body = orjson.dumps(
                {"error": "internal error", "detail": f"{type(exc).__name__}: {exc}"}
            )
        front = self._front
        counter = (label, status)
        front.counts[counter] = front.counts.get(counter, 0) + 1
        extra = b"".join(b"%b: %b\r\n" % (k.encode(), v.encode()) for k, v in headers)
        transport.write(_head(status, len(body), front.date(), close, extra) + body)
        if close:
            transport.close()
            self._buffer, self._reads = b"", []
            return
        self._since = monotonic()
        if not self._paused:
            transport.resume_reading()
        if self._buffer:  # what came while the answer was pending (a pipelining client)
            data = self._buffer
            self._buffer, self._reads = b"", []
            self.data_received(data)

    def _fields(self, fields: bytes) -> tuple[dict[bytes, bytes], bool] | None:
        """A head's fields by lowercase name and whether it asks to close, if the fast path
        may serve it: no repeated name, a plain `Host`, `Connection` close or keep-alive."""
        pairs = _FIELD.findall(fields)
        headers = {name.lower(): value for name, value in pairs}
        if len(pairs) > MAX_HEADERS or len(headers) != len(pairs):  # too many, or a repeat
            return None
        host = headers.get(b"host")  # aiohttp refuses an HTTP/1.1 request without one
        if host is None:
            return None
        host = host.strip(b" \t")
        if not host or host.translate(None, _HOST):
            return None
        close = False
        option = headers.get(b"connection")
        if option is not None:
            option = option.strip(b" \t").lower()
            if option == b"close":
                close = True
            elif option != b"keep-alive":
                return None
        return headers, close

    def _post(self, head: bytes) -> tuple[tuple[str, Intake], str, str, int, bool] | None:
        """(route, name, wait_ms, body length, close) of a POST served here."""
        front = self._front
        if front.posts is None:
            return None
        matched = _POST_HEAD.fullmatch(head)
        if matched is None:
            return None
        kind, name, wait, fields = matched.groups()
        route = front.posts.get(kind)
        if route is None:
            return None
        if name.startswith(b"."):  # "." and ".." are dot segments to aiohttp
            return None
        checked = self._fields(fields)
        if checked is None:
            return None
        headers, close = checked
        if not _POST_REFUSED.isdisjoint(headers):
            return None
        length = headers.get(b"content-length", b"").strip(b" \t")
        if not _LENGTH.fullmatch(length) or int(length) >= MAX_BODY:
            return None
        tokens = front.tokens
        if tokens is not None and tokens.allows(headers.get(b"authorization"), "command") != 200:
            return None  # aiohttp answers 401 / 403 in the API's error shape
        return route, name.decode(), (wait or b"0").decode(), int(length), close

    def _answer(self, head: bytes) -> tuple[str, Answer, bool] | None:
        """(route, answer, close after it) for a request of ours, None for the full app."""
        matched = _HEAD.fullmatch(head)  # the request line and every field's bytes, in C
        if matched is None:
            return None
        target, fields = matched.groups()
        if b"/." in target or b"//" in target:
            return None
        checked = self._fields(fields)
        if checked is None:
            return None
        headers, close = checked
        if not _REFUSED_HEADERS.isdisjoint(headers):
            return None
        authorization = headers.get(b"authorization")
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

    def _hand_over(self, transport: asyncio.Transport, reads: list[bytes]) -> None:
        """Give the connection and the bytes not answered yet, in the reads they came in, to
        aiohttp's protocol (its error answers quote the read they failed in)."""
        front = self._front
        front.connections.discard(self)
        front.handed_over += 1
        self._transport = None
        self._buffer, self._reads = b"", []
        if self._paused:  # aiohttp does its own flow control from here on
            self._paused = False
            transport.resume_reading()
        handler = front.full_app()
        watched = Watched(handler, transport, monotonic(), front.stats)
        front.watched.add(watched)
        handler.connection_made(transport)
        transport.set_protocol(watched)
        for data in reads:
            if transport.is_closing():
                break
            watched.data_received(data)


def _head(status: int, length: int, date: bytes, close: bool, extra: bytes = b"") -> bytes:
    """A JSON answer's head as aiohttp writes it (`extra`: more header lines, after the type)."""
    return (
        b"HTTP/1.1 %d %b\r\nContent-Type: application/json\r\n%bContent-Length: %d\r\n"
        b"Date: %b\r\nServer: %b\r\n%b\r\n"
        % (status, _REASONS[status], extra, length, date, _SERVER, _CLOSE if close else b"")
    )


def _clean_start(rest: bytes) -> bool:
    """Whether `rest`, an unfinished head, is the start of one the fast path could serve (so
    aiohttp, given the same bytes, would not refuse them yet either)."""
    if len(rest) > MAX_HEAD:
        return False
    lines = rest.split(b"\r\n")
    last = lines[-1]
    if last.endswith(b"\r"):  # the CR of a CRLF still to come
        lines[-1] = last[:-1]
    line = lines[0]
    if len(lines) == 1 and len(line) < 5:
        return b"GET /".startswith(line)
    if not line.startswith(b"GET /"):
        return False
    target, _, version = line[4:].partition(b" ")
    if target.translate(None, _PLAIN) or not b"HTTP/1.1".startswith(version):
        return False
    if len(lines) > 1 and version != b"HTTP/1.1":
        return False
    for header in lines[1:]:
        name, colon, value = header.partition(b":")
        if name.translate(None, _TCHAR) or value.translate(None, _VALUE) or (colon and not name):
            return False
    return len(lines) <= MAX_HEADERS + 2
