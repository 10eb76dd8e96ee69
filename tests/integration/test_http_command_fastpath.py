"""`POST /commands/{aggregate}` and `POST /tasks/{queue}` on the fast path (refold.http.fastpath)
answer exactly as aiohttp's routes do: the same byte streams, sent to a worker's server with the
fast path and to a server of the same worker where aiohttp answers everything, get the same
answers in the same order (status lines, headers but Date, bodies). Commands and tasks are
idempotent by id, so the second server answers from what the first one appended: the same.

And the fast path really serves what it may (no hand-over to aiohttp), including a head and a
body in separate writes, a body byte by byte, and a second POST sent while the first one's
answer is pending; what it may not serve (chunked bodies, odd lengths, query strings other than
`wait_ms` digits, pipelined requests after a POST) it hands over.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from refold.core.commands import Decider
from refold.core.config import Config
from refold.engine.worker import Worker
from refold.http.server import QueryServer

from tests.integration.apps.shipping import Shipping
from tests.integration.http_wire import Answer, exchange


@dataclass
class Pair:
    name: str
    fast: QueryServer
    full: QueryServer
    kind: bytes = b"commands"

    def post(
        self, body: object, wait: bytes = b"?wait_ms=20000", extra: bytes = b"", close: bool = False
    ) -> bytes:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        closing = b"Connection: close\r\n" if close else b""
        return b"POST /%b/%b%b HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%b%b\r\n%b" % (
            self.kind, self.name.encode(), wait, len(raw), extra, closing, raw,
        )  # fmt: skip

    def agree(self, chunks: list[bytes], served_fast: bool) -> list[Answer]:
        """Send `chunks` to the fast server, then to the full one; assert the same answers,
        and whether the fast path served the stream itself. The answers."""
        front = self.fast._front
        assert front is not None
        before = front.handed_over
        fast = exchange(self.fast.port, chunks)
        assert (front.handed_over == before) is served_fast, (chunks, fast)
        full = exchange(self.full.port, chunks)
        assert fast == full, (chunks, fast, full)
        return fast


def _pair(worker: Worker, name: str, kind: bytes) -> Iterator[Pair]:
    """`worker` started, with a fast-path server and an aiohttp-only one; all stopped after."""
    worker.start()
    fast = QueryServer(worker, "127.0.0.1", 0)
    full = QueryServer(worker, "127.0.0.1", 0, fast_path=False)
    try:
        fast.start()
        full.start()
        yield Pair(name, fast, full, kind)
    finally:
        full.stop()
        fast.stop()
        worker.stop()


@pytest.fixture
def pair(config: Config, vault: Decider) -> Iterator[Pair]:
    yield from _pair(Worker(config, [], deciders=[vault]), vault.name, b"commands")


def _halves(stream: bytes) -> list[bytes]:
    """A request's head (with its blank line) and its body, as two writes."""
    cut = stream.index(b"\r\n\r\n") + 4
    return [stream[:cut], stream[cut:]]


def _statuses(answers: list[Answer]) -> list[bytes]:
    return [a.status_line for a in answers]


def test_posts_are_answered_as_aiohttp_answers_them(pair: Pair) -> None:
    opened = {"command_id": "fp-open", "key": "a1", "type": "bank.OpenAccount"}
    opened["data"] = {"owner": "fp"}
    # The result, read-your-writes: decided, then answered with the result (200).
    answers = pair.agree([pair.post(opened, close=True)], served_fast=True)
    assert _statuses(answers) == [b"HTTP/1.1 200 OK"]
    assert json.loads(answers[0].body)["status"] == "accepted"
    deposit = {"command_id": "fp-dep", "key": "a1", "type": "bank.Deposit"}
    deposit["data"] = {"amount_cents": 5}
    cases: dict[str, tuple[list[bytes], bool, list[bytes]]] = {
        "202 without wait_ms": (
            [pair.post(deposit, wait=b"", close=True)], True, [b"HTTP/1.1 202 Accepted"]
        ),
        "not JSON": ([pair.post(b"{nope", close=True)], True, [b"HTTP/1.1 400 Bad Request"]),
        "not a command": (
            [pair.post({"key": "a1"}, close=True)], True, [b"HTTP/1.1 422 Unprocessable Entity"]
        ),
        "a conflicting reuse of an id": (
            [pair.post({**deposit, "key": "a2"}, close=True)], True, [b"HTTP/1.1 409 Conflict"]
        ),
        "an unknown aggregate": (
            [pair.post(opened, close=True).replace(pair.name.encode(), b"nosuch", 1)],
            True,
            [b"HTTP/1.1 404 Not Found"],
        ),
        "head and body in two writes": (
            _halves(pair.post({**opened, "command_id": "fp-2"}, close=True)), True,
            [b"HTTP/1.1 200 OK"],
        ),
        "keep-alive, then a second POST while the first waits": (
            [pair.post({**opened, "command_id": "fp-3", "key": "a3"}),
             pair.post({**opened, "command_id": "fp-4", "key": "a4"}, close=True)],
            True,
            [b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK"],
        ),
        "a command too large for a Kafka record (its key is in it twice)": (
            [pair.post({**opened, "command_id": "fp-big", "key": "k" * 520_000}, close=True)],
            True,
            [b"HTTP/1.1 413 Request Entity Too Large"],
        ),
        "a bad wait_ms": (
            [pair.post(opened, wait=b"?wait_ms=soon", close=True)], False,
            [b"HTTP/1.1 400 Bad Request"],
        ),
        "another query (a decided id: its result at once)": (
            [pair.post(opened, wait=b"?x=1", close=True)], False, [b"HTTP/1.1 200 OK"]
        ),
        "a chunked body": (
            [b"POST /commands/%b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
             b"Connection: close\r\n\r\n2\r\n{}\r\n0\r\n\r\n" % pair.name.encode()],
            False,
            [b"HTTP/1.1 422 Unprocessable Entity"],
        ),
        "a leading zero in Content-Length": (
            [pair.post(opened, close=True).replace(b"Content-Length: ", b"Content-Length: 0")],
            False,
            [b"HTTP/1.1 200 OK"],
        ),
        "two Content-Lengths": (
            [pair.post(opened, extra=b"Content-Length: 3\r\n", close=True)], False,
            [b"HTTP/1.0 400 Bad Request"],
        ),
        "a request after the body": (
            [pair.post(opened) + pair.post(deposit, close=True)], False,
            [b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK"],
        ),
    }  # fmt: skip
    for name, (chunks, served_fast, wanted) in cases.items():
        assert _statuses(pair.agree(chunks, served_fast)) == wanted, name


def test_a_body_in_pieces_waits_for_its_last_byte(pair: Pair) -> None:
    opened = {"command_id": "fp-bytes", "key": "b1", "type": "bank.OpenAccount"}
    stream = pair.post({**opened, "data": {"owner": "fp"}}, close=True)
    head_end = stream.index(b"\r\n\r\n") + 4
    # The head whole, then the body one byte a write: the fast path holds the head until the
    # body is all there (a head split across writes is aiohttp's: see the module's rules).
    chunks = [stream[:head_end], *(stream[i : i + 1] for i in range(head_end, len(stream)))]
    answers = pair.agree(chunks, served_fast=True)
    assert _statuses(answers) == [b"HTTP/1.1 200 OK"]
    assert json.loads(answers[0].body)["command_id"] == "fp-bytes"


@pytest.fixture
def task_pair(config: Config, unique: Callable[[str], str]) -> Iterator[Pair]:
    queue = type("Queue", (Shipping,), {"name": unique("fpq")})()
    worker = Worker(config, [], deciders=[], task_queues=[queue])
    yield from _pair(worker, queue.name, b"tasks")


def test_task_posts_are_answered_as_aiohttp_answers_them(task_pair: Pair) -> None:
    pair = task_pair
    task = {"task_id": "fp-t1", "data": {"product_id": "p1", "qty": 1}}
    accepted = [b"HTTP/1.1 202 Accepted"]
    cases: dict[str, tuple[list[bytes], bool, list[bytes]]] = {
        # A repeated task id answers the same and appends nothing: the second server's answer.
        "a task": ([pair.post(task, wait=b"", close=True)], True, accepted),
        "head and body in two writes": (
            _halves(pair.post({**task, "task_id": "fp-t2"}, wait=b"", close=True)), True, accepted
        ),
        "not JSON": ([pair.post(b"[", wait=b"", close=True)], True, [b"HTTP/1.1 400 Bad Request"]),
        "data not an object": (
            [pair.post({"data": [1]}, wait=b"", close=True)], True,
            [b"HTTP/1.1 422 Unprocessable Entity"],
        ),
        "another body for a known id": (
            [pair.post({**task, "data": {"product_id": "p2"}}, wait=b"", close=True)], True,
            [b"HTTP/1.1 409 Conflict"],
        ),
        "an unknown queue": (
            [pair.post(task, wait=b"", close=True).replace(pair.name.encode(), b"nosuch", 1)],
            True,
            [b"HTTP/1.1 404 Not Found"],
        ),
        "a query": ([pair.post(task, wait=b"?x=1", close=True)], False, accepted),
    }  # fmt: skip
    for name, (chunks, served_fast, wanted) in cases.items():
        assert _statuses(pair.agree(chunks, served_fast)) == wanted, name
