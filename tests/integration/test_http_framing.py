"""The fast path frames requests exactly as aiohttp does: the same byte streams, sent to a
worker's server with the fast path and to a server of the same worker where aiohttp answers
everything, get the same answers in the same order (status lines, headers but Date, bodies).

Each stream ends with a `Connection: close` request, so both servers close once they are done.
A lookup's `lag`, `stale` and `stale_reason` move with the worker's health thread, not with
framing: they are masked before comparing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import pytest
from refold.http.server import QueryServer

from tests.integration.http_wire import Answer, exchange
from tests.integration.test_http import (  # noqa: F401  (serve: a fixture used here)
    WAIT,
    Served,
    min_offset,
    serve,
)

_FRESHNESS = re.compile(rb'"lag":[^,]*,"stale":(true|false)(,"stale_reason":"[^"]*")?')


def masked(answers: list[Answer]) -> list[Answer]:
    """`answers` with the freshness fields masked (and Content-Length left out with them)."""
    return [
        replace(
            a,
            headers=tuple(h for h in a.headers if h[0] != b"content-length"),
            body=_FRESHNESS.sub(b'"lag":_,"stale":_', a.body),
        )
        for a in answers
    ]


@dataclass
class Pair:
    served: Served
    fast: int  # the port of the server with the fast path
    full: int  # the port of the server where aiohttp answers everything
    full_server: QueryServer

    def path(self, key: str) -> bytes:
        return f"/projections/{self.served.name}/{key}".encode()

    def get(self, key: str, extra: bytes = b"", close: bool = False) -> bytes:
        closing = b"Connection: close\r\n" if close else b""
        return b"GET %b HTTP/1.1\r\nHost: x\r\n%b%b\r\n" % (self.path(key), extra, closing)

    def agree(self, chunks: list[bytes]) -> list[bytes]:
        """Send `chunks` to both servers; assert the same answers; their status lines."""
        fast, full = masked(exchange(self.fast, chunks)), masked(exchange(self.full, chunks))
        assert fast == full, (chunks, fast, full)
        return [a.status_line for a in fast]


@pytest.fixture
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    factory: Callable[..., Served] = request.getfixturevalue("serve")
    s = factory()
    positions = s.publish([("k1", 5, "one"), ("k2", 7, "two")])
    assert s.get_key("k1", min_offset=min_offset(positions), wait_ms=WAIT).status == 200
    full = QueryServer(s.worker, "127.0.0.1", 0, fast_path=False)
    full.start()
    try:
        yield Pair(s, s.server.port, full.port, full)
    finally:
        full.stop()


OK, BAD = b"HTTP/1.1 200 OK", b"HTTP/1.0 400 Bad Request"


def test_the_issues_byte_streams_get_the_same_answers(pair: Pair) -> None:
    k1, last = pair.path("k1"), pair.get("k2", close=True)
    cases: dict[str, tuple[bytes, list[bytes]]] = {
        # A bare LF ends "Host", so aiohttp sees Content-Length and refuses; the fast path
        # used to answer both requests.
        "bare LF then Content-Length": (
            b"GET %b HTTP/1.1\r\nHost: x\nContent-Length: %d\r\n\r\n%b" % (k1, len(last), last),
            [BAD],
        ),
        "bare CR in a value": (pair.get("k1", b"X-A: a\rb\r\n") + last, [BAD]),
        "NUL in a name": (pair.get("k1", b"X\x00A: a\r\n") + last, [BAD]),
        "tab in a name": (pair.get("k1", b"X\tA: a\r\n") + last, [BAD]),
        "space in a name": (pair.get("k1", b"X A: a\r\n") + last, [BAD]),
        "space before the colon": (pair.get("k1", b"X-A : a\r\n") + last, [BAD]),
        "empty name": (pair.get("k1", b": a\r\n") + last, [BAD]),
        "no Host": (b"GET %b HTTP/1.1\r\n\r\n" % k1 + last, [BAD]),
        "two Hosts": (pair.get("k1", b"Host: y\r\n") + last, [BAD]),
        "data after Connection: close": (pair.get("k1", close=True) + last, [BAD]),
        "20 KB head": (pair.get("k1", b"X-A: " + b"a" * 20_000 + b"\r\n") + last, [BAD]),
        "200 headers": (pair.get("k1", b"X-A: a\r\n" * 200) + last, [BAD]),
        "an error after a good request": (pair.get("k1") + b"GE\x01T / HTTP/1.1\r\n", [BAD]),
        "an unfinished bad head after a good one": (
            pair.get("k1") + b"GET / HTTP/1.1\r\nHost: x\nA",
            [BAD],
        ),
        "obs-text value": (pair.get("k1", b"X-A: \xff\r\n") + last, [OK, OK]),
        "HTTP/1.0": (b"GET %b HTTP/1.0\r\n\r\n" % k1, [b"HTTP/1.0 200 OK"]),
        "leading CRLF": (b"\r\n" + pair.get("k1") + last, [OK, OK]),
        "obs-fold": (pair.get("k1", b"X-A: a\r\n b\r\n") + last, None),
        "lowercase method": (b"get %b HTTP/1.1\r\nHost: x\r\n\r\n" % k1 + last, None),
        "pipelined": (pair.get("k1") + pair.get("nobody") + pair.get("k1") + last, None),
        "handed over midway": (
            pair.get("k1")
            + pair.get("k1?x=1")
            + pair.get("k2", b"Connection: keep-alive\r\n")
            + b"POST /events/x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
            + last,
            None,
        ),
    }
    for name, (stream, wanted) in cases.items():
        statuses = pair.agree([stream])
        if wanted is not None:
            assert statuses == wanted, (name, statuses)


def test_streams_split_at_every_byte_agree(pair: Pair) -> None:
    """Well-formed streams, pipelined, split in two at every byte, and in one-byte pieces."""
    post = b'{"type":"bank.MoneyDeposited"}'
    stream = (
        pair.get("k1")
        + pair.get("nobody", b"Connection: keep-alive\r\n")
        + b"POST /events/%b HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b"
        % (pair.served.topic.encode(), len(post), post)
        + pair.get("k2", close=True)
    )
    for cut in range(1, len(stream)):
        statuses = pair.agree([stream[:cut], stream[cut:]])
        assert statuses == [OK, b"HTTP/1.1 404 Not Found", b"HTTP/1.1 422 Unprocessable Entity", OK]
    byte_by_byte = [stream[i : i + 1] for i in range(len(stream))]
    assert len(pair.agree(byte_by_byte)) == 4
    # A 20 KB head is refused however it is cut (the fast path used to answer it whole).
    big = pair.get("k1", b"X-A: " + b"a" * 20_000 + b"\r\n")
    for cut in (10, 4000, 4200, 8000, 8300, 19_000, len(big) - 2):
        assert pair.agree([big[:cut], big[cut:]]) == [BAD]
