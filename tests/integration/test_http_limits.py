"""Connection limits over real sockets: idle, slow-head and half-sent-body connections are closed
by their timeouts (short ones, set through the environment), a request being answered is not,
and connections beyond the cap are refused without losing an acknowledged request.

No timing is asserted beyond generous bounds: a closed connection is one whose read returns EOF
before a 30 s guard, and the /metrics counters say which timeout closed it.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from refold.cli.broker_nodes import free_port
from refold.core.config import Config

from tests.integration.http_wire import parse_answers
from tests.integration.test_http import (  # noqa: F401  (serve: a fixture used here)
    WAIT,
    Served,
    min_offset,
    serve,
)
from tests.integration.test_projections import WorkerProcess

GUARD_S = 30.0


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=GUARD_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (TimeoutError after GUARD_S: not closed)."""
    raw = b""
    try:
        while chunk := sock.recv(65536):
            raw += chunk
    except ConnectionResetError:
        pass
    return raw


def metric(s: Served, name: str) -> float:
    text = s.get("/metrics").body
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


@pytest.fixture
def limited(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Served]]:
    """`limited(procs, **env)`: a served worker whose query server (and its reader processes)
    read `env` (limits) at start."""
    factory: Callable[..., Served] = request.getfixturevalue("serve")

    def make(procs: int = 1, **env: str) -> Served:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return factory(procs)

    yield make


def test_idle_slow_head_and_half_sent_body_connections_are_closed(
    limited: Callable[..., Served], caplog: pytest.LogCaptureFixture
) -> None:
    s = limited(
        REFOLD_HTTP_KEEPALIVE_S="1",
        REFOLD_HTTP_HEADER_TIMEOUT_S="1",
        REFOLD_HTTP_BODY_TIMEOUT_S="1",
    )
    positions = s.publish([("k1", 5, "one")])
    assert s.get_key("k1", min_offset=min_offset(positions), wait_ms=WAIT).status == 200
    port, lookup = s.server.port, f"/projections/{s.name}/k1".encode()
    topic = s.topic.encode()
    opened = {
        "idle": connect(port),  # sends nothing
        "answered then idle": connect(port),  # a fast-path lookup, then nothing
        "aiohttp answered then idle": connect(port),  # a handed-over request, then nothing
        "head unfinished": connect(port),  # the fast path holds it
        "aiohttp head unfinished": connect(port),  # handed over at once (POST)
        "body unfinished": connect(port),  # 10 of 100 announced bytes
    }
    opened["answered then idle"].sendall(b"GET %b HTTP/1.1\r\nHost: x\r\n\r\n" % lookup)
    opened["aiohttp answered then idle"].sendall(
        b"GET %b?x=1 HTTP/1.1\r\nHost: x\r\n\r\n" % lookup  # a query string: aiohttp's
    )
    opened["head unfinished"].sendall(b"GET %b HTTP/1.1\r\nHost: x\r\n" % lookup)
    opened["aiohttp head unfinished"].sendall(b"POST /events/%b HTTP/1.1\r\nHost: x\r\n" % topic)
    opened["body unfinished"].sendall(
        b"POST /events/%b HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789" % topic
    )
    # A request being answered is not timed out: a read-your-writes wait longer than them all.
    waiting = connect(port)
    ahead = ",".join(f"{p.partition}:{p.offset + 1}" for p in positions)
    waiting.sendall(
        b"GET %b?min_offset=%b&wait_ms=3000 HTTP/1.1\r\nHost: x\r\n\r\n" % (lookup, ahead.encode())
    )

    answers = {name: parse_answers(read_until_closed(sock))[0] for name, sock in opened.items()}
    for sock in opened.values():
        sock.close()
    assert [a.status_line for a in answers["answered then idle"]] == [b"HTTP/1.1 200 OK"]
    assert [a.status_line for a in answers["aiohttp answered then idle"]] == [b"HTTP/1.1 200 OK"]
    for name in ("idle", "head unfinished", "aiohttp head unfinished", "body unfinished"):
        assert answers[name] == [], (name, answers[name])

    waited, _ = parse_answers(read_until_closed_or_answer(waiting))
    waiting.close()
    assert len(waited) == 1 and waited[0].status_line != b"", waited
    assert json.loads(waited[0].body)["error"], waited  # the wait's own answer, not a close

    assert metric(s, 'refold_http_timeouts_total{kind="header"}') == 2
    assert metric(s, 'refold_http_timeouts_total{kind="body"}') == 1
    assert metric(s, 'refold_http_timeouts_total{kind="idle"}') >= 3
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no tracebacks


def read_until_closed_or_answer(sock: socket.socket) -> bytes:
    """Bytes until one complete answer arrived (or the server closed)."""
    raw = b""
    while not parse_answers(raw)[0]:
        chunk = sock.recv(65536)
        if not chunk:
            break
        raw += chunk
    return raw


def test_connections_beyond_the_cap_are_refused_and_accepted_requests_kept(
    limited: Callable[..., Served],
) -> None:
    s = limited(REFOLD_HTTP_MAX_CONNECTIONS="8")
    stats = s.server.connections
    assert stats is not None
    port = s.server.port
    held = [connect(port) for _ in range(8)]
    deadline = time.monotonic() + GUARD_S
    while stats.open < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stats.open == 8

    refused = connect(port)
    answers, _ = parse_answers(read_until_closed(refused))
    refused.close()
    assert [a.status_line for a in answers] == [b"HTTP/1.1 503 Service Unavailable"]
    assert json.loads(answers[0].body)["error"] == "too many connections"
    assert stats.refused == 1

    # A held connection publishes and reads its write back: nothing accepted is lost.
    body = json.dumps(
        {
            "type": "bank.MoneyDeposited",
            "key": "capped",
            "data": {"account_id": "capped", "amount_cents": 42, "memo": "at the cap"},
        }
    ).encode()
    conn = held[0]
    conn.sendall(
        b"POST /events/%b HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (s.topic.encode(), len(body), body)
    )
    posted = parse_answers(read_until_closed_or_answer(conn))[0][0]
    assert posted.status_line == b"HTTP/1.1 201 Created", posted
    where = json.loads(posted.body)
    conn.sendall(
        b"GET /projections/%b/capped?min_offset=%d:%d&wait_ms=%b HTTP/1.1\r\nHost: x\r\n"
        b"Connection: close\r\n\r\n"
        % (s.name.encode(), where["partition"], where["offset"], WAIT.encode())
    )
    read = parse_answers(read_until_closed(conn))[0]
    assert read[-1].status_line == b"HTTP/1.1 200 OK", read
    assert json.loads(read[-1].body)["state"]["balance_cents"] == 42

    for sock in held:
        sock.close()
    deadline = time.monotonic() + GUARD_S
    while stats.open > 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stats.open == 0
    assert metric(s, "refold_http_connections_refused_total") == 1


def test_a_flood_beyond_the_descriptor_limit_loses_no_accepted_request(
    config: Config, ledger_topic: str, unique: Callable[[str], str], tmp_path: Path
) -> None:
    """`refold worker` under a 384-descriptor limit (the default cap: 192 connections) and 400
    idle connections: it refuses the excess, and a deposit posted at the flood's height is
    acknowledged and folded."""
    name = unique("ledger")
    worker = WorkerProcess(config, name, ledger_topic, tmp_path / "w")
    port = free_port()
    worker.data_dir.mkdir(parents=True)
    command = [sys.executable, "-m", "refold.cli.main", "worker", "--only", name]
    command += ["--http", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(
        ["sh", "-c", 'ulimit -n 384 && exec "$@"', "sh", *command],
        env=worker.env,
        stdout=worker.log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    flood: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 90
        while True:  # until the worker serves
            try:
                control = connect(port)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, worker.log.read_text()
                time.sleep(0.2)
        flood = [connect(port) for _ in range(400)]
        # The first refusals show the cap was reached (accepted connections stay silent).
        readable, _, _ = select.select(flood, [], [], GUARD_S)
        assert readable, "no connection was refused"
        first = parse_answers(read_until_closed(readable[0]))[0]
        assert first[0].status_line == b"HTTP/1.1 503 Service Unavailable"

        body = json.dumps(
            {
                "type": "bank.MoneyDeposited",
                "key": "flooded",
                "data": {"account_id": "flooded", "amount_cents": 42, "memo": "in a flood"},
            }
        ).encode()
        control.sendall(
            b"POST /events/%b HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (ledger_topic.encode(), len(body), body)
        )
        posted = parse_answers(read_until_closed_or_answer(control))[0][0]
        assert posted.status_line == b"HTTP/1.1 201 Created", posted
        where = json.loads(posted.body)
        control.sendall(
            b"GET /projections/%b/flooded?min_offset=%d:%d&wait_ms=%b HTTP/1.1\r\nHost: x\r\n"
            b"Connection: close\r\n\r\n"
            % (name.encode(), where["partition"], where["offset"], WAIT.encode())
        )
        read = parse_answers(read_until_closed(control))[0]
        assert read[-1].status_line == b"HTTP/1.1 200 OK", read
        assert json.loads(read[-1].body)["state"]["balance_cents"] == 42
        control.close()
        for sock in flood:
            sock.close()
        flood = []
        after = connect(port)
        after.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        text = parse_answers(read_until_closed(after))[0][0].body.decode()
        after.close()
        refused = [ln for ln in text.splitlines() if ln.startswith("refold_http_connections_ref")]
        assert refused and int(refused[0].split()[-1]) >= 1, text
    finally:
        for sock in flood:
            sock.close()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_reader_processes_time_out_connections_and_report_them(
    limited: Callable[..., Served],
) -> None:
    """With reader processes the kernel spreads connections over them and the worker; every
    idle one is closed, and /metrics counts them all, whichever process closed it."""
    s = limited(2, REFOLD_HTTP_KEEPALIVE_S="1")
    socks = [connect(s.server.port) for _ in range(8)]
    for sock in socks:
        assert read_until_closed(sock) == b""
        sock.close()
    deadline = time.monotonic() + GUARD_S
    while True:  # the readers report about once a second
        idle = metric(s, 'refold_http_timeouts_total{kind="idle"}')
        if idle >= 8 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert idle == 8
