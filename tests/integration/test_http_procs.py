"""The query server's fast path and its reader processes, over real HTTP against a real broker.

Connections are spread over the processes by the kernel (SO_REUSEPORT), so the reader tests
open many fresh connections and require every answer to be right, whichever process gave it.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from refold.core.config import Config
from refold.http.replica import READ_LAG_S

from tests.integration.test_http import (  # noqa: F401  (serve: a fixture used here)
    WAIT,
    Served,
    expected_states,
    min_offset,
    serve,
    wait_healthy,
)
from tests.integration.test_projections import WorkerProcess, end_offsets

CLI = [sys.executable, "-m", "refold.cli.main"]


@pytest.fixture
def serve_procs(request: pytest.FixtureRequest) -> Callable[..., Served]:
    """test_http's `serve` factory: `serve_procs(n)` starts a worker and a server of n processes."""
    factory: Callable[..., Served] = request.getfixturevalue("serve")
    return factory


HEALTHY = {"status": "ok", "broker": "reachable", "unowned": {}, "behind": {}}


def fetch(port: int, path: str, conn: http.client.HTTPConnection | None = None) -> Any:
    """GET on `conn` (kept alive) or on a fresh connection; (status, parsed body, raw body)."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        raw = resp.read()
        assert resp.getheader("Content-Type") == "application/json", raw
        return resp.status, json.loads(raw), raw
    finally:
        if own:
            conn.close()


def key_path(s: Served, key: str) -> str:
    return f"/projections/{s.name}/{urllib.parse.quote(key, safe='')}"


def counted(text: str, route: str, status: int) -> int:
    prefix = f'refold_http_requests_total{{route="{route}",status="{status}"}} '
    return sum(int(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


def test_fast_path_answers_as_the_full_app_and_hands_over_on_one_connection(
    serve_procs: Callable[..., Served],
) -> None:
    s = serve_procs(1)
    keys = ["plain-1", "a/b", "ü ber%20?#&", "x:y,z"]
    deposits = [(k, 10 + i, f"m{i}") for i, k in enumerate(keys)]
    positions = s.publish(deposits)
    wanted = min_offset(positions)
    port = s.server.port
    assert fetch(port, key_path(s, "plain-1") + f"?min_offset={wanted}&wait_ms={WAIT}")[0] == 200
    assert wait_healthy(s).status == 200

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    # A plain lookup (fast path), a missing key, /healthz, then requests only aiohttp serves,
    # then plain lookups again: all on one keep-alive connection, in order.
    fast = fetch(port, key_path(s, "plain-1"), conn)
    missing = fetch(port, key_path(s, "nobody"), conn)
    health = fetch(port, "/healthz", conn)
    escaped = [fetch(port, key_path(s, k), conn) for k in keys[1:]]
    conn.request("POST", f"/events/{s.topic}", b"{not json", {"Content-Type": "application/json"})
    refused = conn.getresponse()
    assert (refused.status, json.loads(refused.read())["error"]) == (400, "invalid JSON")
    again = fetch(port, key_path(s, "plain-1"), conn)
    conn.close()

    states = expected_states(deposits)
    assert fast[0] == 200 and fast[1]["state"] == states["plain-1"]
    assert fast[2] == again[2]  # the same bytes from the fast path and from aiohttp
    assert fast[2] == fetch(port, key_path(s, "plain-1") + "?x=1")[2]  # a query: aiohttp
    assert missing[0] == 404 and missing[1]["error"] == "no state for key"
    assert health[:2] == (200, {**HEALTHY, "projections": {s.name: "running"}})
    for key, (status, body, _) in zip(keys[1:], escaped, strict=True):
        assert status == 200 and body["key"] == key and body["state"] == states[key]

    # Pipelined: three requests in one write, a body-carrying one between plain lookups.
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        post = b'{"type": "bank.MoneyDeposited"}'
        sock.sendall(
            b"GET %b HTTP/1.1\r\nHost: x\r\n\r\n" % key_path(s, "plain-1").encode()
            + b"POST /events/%b HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b"
            % (s.topic.encode(), len(post), post)
            + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", received)
    assert statuses == [b"200", b"422", b"200"], received

    text = fetch_text(port, "/metrics")
    # min_offset, fast, 3 escaped, again, ?x=1, pipelined
    assert counted(text, "/projections/{name}/{key}", 200) == 1 + 1 + 3 + 1 + 1 + 1
    assert counted(text, "/projections/{name}/{key}", 404) == 1
    assert counted(text, "/healthz", 200) == 3  # wait_healthy, then two here


def fetch_text(port: int, path: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def test_reader_processes_answer_what_the_worker_folded_with_true_positions(
    serve_procs: Callable[..., Served],
) -> None:
    s = serve_procs(3)
    assert s.server.readers is not None and len(s.server.readers.pids) == 2
    port = s.server.port
    deposits = [(f"acc-{i % 7}", 100 + i, f"m{i}") for i in range(70)]
    positions = s.publish(deposits)
    runner = s.worker.runners[s.name]
    assert runner.wait_for({(s.topic, p.partition): p.offset for p in positions}, 60)

    def check_all(deposits: list[tuple[str, int, str]], offsets: list[Any]) -> None:
        time.sleep(2 * READ_LAG_S)  # reads see what was committed READ_LAG_S before them
        states = expected_states(deposits)
        for _ in range(3):
            for key, state in states.items():
                status, body, _ = fetch(port, key_path(s, key))
                assert status == 200 and body["state"] == state, body
                # The position is the one of exactly this state: the key's events below it.
                below = sum(
                    1
                    for (k, _, _), where in zip(deposits, offsets, strict=True)
                    if k == key and where.offset < body["position"][f"{s.topic}:{where.partition}"]
                )
                assert below == state["deposits"], body

    check_all(deposits, positions)
    # State folded after the readers started, and after their last catch-up, is seen too.
    more = [(f"acc-{i % 7}", 1, f"late{i}") for i in range(14)]
    later = s.publish(more)
    assert runner.wait_for({(s.topic, p.partition): p.offset for p in later}, 60)
    check_all(deposits + more, positions + later)

    # The readers answered some of these themselves, and every answer reaches /metrics (the
    # readers report their counts a few times a second).
    deadline = time.monotonic() + 30
    while (
        sum(s.server.readers.counts().values()) == 0
        or counted(fetch_text(port, "/metrics"), "/projections/{name}/{key}", 200) < 3 * 7 * 2
    ):
        if time.monotonic() > deadline:  # a deadline for the wait, not a speed check
            raise AssertionError("reader answers missing from /metrics")
        time.sleep(0.1)


def test_min_offset_waits_work_through_reader_processes(
    serve_procs: Callable[..., Served],
) -> None:
    s = serve_procs(3)
    port = s.server.port
    positions = s.publish([("rw", 5, "first")])
    for n in range(1, 13):  # fresh connections: the kernel spreads them over the processes
        [where] = s.publish([("rw", 1, f"p{n}")])
        path = key_path(s, "rw") + f"?min_offset={where.partition}:{where.offset}&wait_ms={WAIT}"
        status, body, _ = fetch(port, path)
        assert status == 200, body
        assert body["state"]["deposits"] == 1 + n and body["state"]["memos"][-1] == f"p{n}"
        assert body["position"][f"{s.topic}:{where.partition}"] > where.offset
    partition = positions[0].partition
    status, body, _ = fetch(port, key_path(s, "rw") + f"?min_offset={partition}:99999")
    assert status == 409 and body["error"] == "position not reached"


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc")
def test_reader_processes_die_with_the_worker_even_on_kill_9(
    config: Config, ledger_topic: str, unique: Callable[[str], str], tmp_path: Path
) -> None:
    worker = WorkerProcess(config, unique("ledger"), ledger_topic, tmp_path / "w")
    worker.data_dir.mkdir(parents=True)
    port = free_port()
    proc = subprocess.Popen(
        [*CLI, "worker", "--only", worker.name, "--http", f"127.0.0.1:{port}", "--http-procs", "3"],
        env=worker.env,
        stdout=subprocess.PIPE,
        stderr=worker.log.open("ab"),
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once every process listens
        assert f"HTTP on http://127.0.0.1:{port}" in line, line
        kids = children(proc.pid)  # the readers, and the health thread's group probe
        readers = [pid for pid in kids if b"refold.engine.group_probe" not in cmdline(pid)]
        assert len(readers) == 2
        health = fetch(port, "/healthz")[1]  # maybe still catching up: "behind"
        assert health["projections"] == {worker.name: "running"}
        assert end_offsets(config, ledger_topic)  # the broker is there; the readers too
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in kids):
            if time.monotonic() > deadline:
                raise AssertionError("child processes outlived the worker")
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
