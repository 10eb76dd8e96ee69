"""Hypothesis: generated request streams (paths, query strings, headers, bodies; pipelined and
split into reads) get the same answers from the fast path as from aiohttp alone.

The bytes are fed to each server's own connection protocol on its own loop through an in-memory
transport, one `data_received` per piece, so the split into reads is exactly the generated one
(over a socket the kernel may merge pieces, and aiohttp itself answers a read holding a bad
request as a whole). The socket-level differential is tests/integration/test_http_framing.py.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from refold.http.server import QueryServer

from tests.integration.http_wire import Answer, parse_answers
from tests.integration.test_http import serve  # noqa: F401  (fixtures used here)
from tests.integration.test_http_framing import (
    Pair,
    masked,
    pair,  # noqa: F401
)

FEED_TIMEOUT_S = 20.0


class MemoryTransport(asyncio.Transport):
    """What a connection protocol needs of a transport, writing into a buffer."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.out = bytearray()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.protocol: asyncio.BaseProtocol | None = None

    def write(self, data: Any) -> None:
        if not self.closed.done():
            self.out += data

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def close(self) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
            protocol = self.protocol
            if protocol is not None:
                self.loop.call_soon(protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def is_closing(self) -> bool:
        return self.closed.done()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_reading(self) -> bool:
        return not self.closed.done()

    def get_write_buffer_size(self) -> int:
        return 0

    def can_write_eof(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8080)}.get(
            name, default
        )


async def _feed(server: QueryServer, pieces: list[bytes]) -> bytes:
    front = server._front
    assert front is not None
    transport = MemoryTransport(asyncio.get_running_loop())
    protocol = front.protocol()
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    for piece in pieces:
        if transport.is_closing():
            break
        cast(asyncio.Protocol, transport.get_protocol()).data_received(piece)
        await asyncio.sleep(0.001)  # let aiohttp's handler run, as between two reads
    try:
        await asyncio.wait_for(asyncio.shield(transport.closed), FEED_TIMEOUT_S)
    except TimeoutError:
        transport.out += b"\r\n\r\n<no close>"
        transport.close()
    return bytes(transport.out)


def feed(server: QueryServer, pieces: list[bytes]) -> list[Answer]:
    loop = server._loop
    assert loop is not None
    raw = asyncio.run_coroutine_threadsafe(_feed(server, pieces), loop).result(60)
    answers, rest = parse_answers(raw)
    return answers + ([Answer(b"<unparsed>", (), rest)] if rest else [])


# -- what requests are made of --------------------------------------------------------------

_TOKEN = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_!#$%&'*+.^`|~",
    min_size=1,
    max_size=12,
)
_ODD_BYTES = st.sampled_from(
    [
        b"",
        b" ",
        b"\t",
        b"\r",
        b"\n",
        b"\x00",
        b"\x7f",
        b"\xff",
        b":",
        b"%",
        b"%2F",
        b"/",
        b"..",
        b"?",
        b"#",
    ]
)


def _bytes_of(text_strategy: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
    return text_strategy.map(lambda t: t.encode("latin-1", "replace"))


_PLAIN_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=16)
_WORD = _bytes_of(_PLAIN_TEXT) | st.builds(bytes.__add__, _bytes_of(_PLAIN_TEXT), _ODD_BYTES)


@st.composite
def requests(draw: st.DrawFn, name: bytes, topic: bytes) -> bytes:
    method = draw(st.sampled_from([b"GET", b"GET", b"GET", b"POST", b"HEAD", b"get", b"PUT"]))
    kind = draw(st.sampled_from(["lookup", "lookup", "healthz", "scan", "events", "other"]))
    key = draw(st.sampled_from([b"k1", b"k2", b"nobody"]) | _WORD)
    path = {
        "lookup": b"/projections/" + name + b"/" + key,
        "healthz": b"/healthz",
        "scan": b"/projections/" + name,
        "events": b"/events/" + topic,
        "other": b"/" + key,
    }[kind]
    if draw(st.booleans()):
        path += b"?" + draw(_WORD)
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2"]))
    headers: list[bytes] = []
    if draw(st.integers(0, 9)):  # usually a Host
        headers.append(b"Host: " + draw(st.sampled_from([b"x", b"127.0.0.1:8080", b""]) | _WORD))
    for _ in range(draw(st.integers(0, 3))):
        header_name = draw(
            st.sampled_from([b"Connection", b"Accept", b"X-A", b"Authorization", b"Host"])
            | _bytes_of(_TOKEN)
            | _WORD
        )
        value = draw(st.sampled_from([b"close", b"keep-alive", b"Upgrade", b"*/*"]) | _WORD)
        separator = draw(st.sampled_from([b": ", b":", b" : ", b":\t"]))
        headers.append(header_name + separator + value)
    body = b""
    if draw(st.integers(0, 3)) == 0:
        body = draw(st.sampled_from([b"{}", b'{"type":"bank.MoneyDeposited"}', b"not json"]))
        length = draw(st.sampled_from([len(body), len(body), 0, len(body) + 2]))
        headers.append(b"Content-Length: %d" % length)
    ending = draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"]))
    return (
        method
        + b" "
        + path
        + b" "
        + version
        + ending
        + ending.join(headers)
        + ending * (2 if headers else 1)
        + body
    )


@st.composite
def streams(draw: st.DrawFn, name: bytes, topic: bytes) -> list[bytes]:
    stream = b"".join(draw(st.lists(requests(name, topic), min_size=1, max_size=3)))
    stream += b"GET /projections/%b/k2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % name
    cuts = sorted(draw(st.sets(st.integers(1, len(stream) - 1), max_size=3)))
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


@pytest.mark.timeout(300)
def test_generated_request_streams_get_the_same_answers(request: pytest.FixtureRequest) -> None:
    both: Pair = request.getfixturevalue("pair")
    fast_server, full_server = both.served.server, both.full_server
    name, topic = both.served.name.encode(), both.served.topic.encode()

    @settings(
        max_examples=500,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(pieces=streams(name, topic))
    def agree(pieces: list[bytes]) -> None:
        fast, full = masked(feed(fast_server, pieces)), masked(feed(full_server, pieces))
        assert fast == full, (pieces, fast, full)

    agree()
