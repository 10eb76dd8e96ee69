"""Bearer tokens with scopes on the HTTP API (refold.http.auth), over real HTTP against a worker
folding a real topic: through aiohttp, the fast path and a reader process alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from refold.http.auth import ENV

from tests.integration.test_http import Served, serve  # noqa: F401 - `serve` is a fixture

ROOT = Path(__file__).resolve().parents[2]
READ, PUBLISH, ADMIN, LATER = "r" * 24, "p" * 24, "a" * 24, "n" * 24


def _call(s: Served, method: str, path: str, token: str | None, body: Any = None) -> tuple:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(s.server.url + path, data, headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


@pytest.fixture
def tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# who may do what\n{READ} read\n{PUBLISH} publish\n{ADMIN} admin\n")
    monkeypatch.setenv(ENV, str(path))
    return path


@pytest.mark.parametrize("procs", [1, 2])
def test_each_route_wants_its_scope(
    serve: Callable[..., Served],  # noqa: F811
    tokens: Path,
    procs: int,
) -> None:
    s = serve(procs=procs)
    s.publish([("acc-1", 500, "m1")])
    key = f"/projections/{s.name}/acc-1"
    deadline = time.monotonic() + 60
    while _call(s, "GET", key, READ)[0] != 200:
        assert time.monotonic() < deadline, "not folded"
        time.sleep(0.2)
    for _ in range(20):  # new connections: the kernel spreads them over the processes
        status, body, headers = _call(s, "GET", key, None)
        assert status == 401 and json.loads(body)["error"] == "unauthorized", body
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert _call(s, "GET", key, "x" * 24)[0] == 401  # an unknown token
        assert _call(s, "GET", key, PUBLISH)[0] == 403  # a token without `read`
        status, body, _ = _call(s, "GET", key, READ)
        assert status == 200 and json.loads(body)["state"]["balance_cents"] == 500
        assert _call(s, "GET", key, ADMIN)[0] == 200
    event = {"type": "bank.MoneyDeposited", "key": "acc-2"}
    event["data"] = {"account_id": "acc-2", "amount_cents": 7, "memo": "t"}
    assert _call(s, "POST", f"/events/{s.topic}", READ, event)[0] == 403
    assert _call(s, "POST", f"/events/{s.topic}", None, event)[0] == 401
    assert _call(s, "POST", f"/events/{s.topic}", PUBLISH, event)[0] in (200, 201, 202)
    # POST /commands is the fast path's too (refold.http.fastpath): the same scope rules.
    command = {"key": "acc-1", "type": "bank.Deposit", "data": {"amount_cents": 1}}
    for _ in range(5):
        assert _call(s, "POST", "/commands/none", None, command)[0] == 401
        assert _call(s, "POST", "/commands/none", READ, command)[0] == 403
        status, body, _ = _call(s, "POST", "/commands/none", ADMIN, command)
        assert status == 404 and json.loads(body)["error"] == "unknown aggregate", body
    assert _call(s, "GET", "/healthz", None)[0] in (200, 503)  # open: no 401 (503: behind)
    assert _call(s, "GET", "/", None)[0] == 200  # the page holds no data
    assert _call(s, "GET", "/dashboard.json", None)[0] == 401
    assert _call(s, "GET", "/dashboard.json", READ)[0] == 200
    assert _call(s, "GET", "/metrics", None)[0] == 401
    assert _call(s, "GET", "/metrics", READ)[0] == 200


def test_the_tokens_file_is_read_again_when_it_changes(
    serve: Callable[..., Served],  # noqa: F811
    tokens: Path,
) -> None:
    s = serve()
    assert _call(s, "GET", "/projections", LATER)[0] == 401
    tokens.write_text(f"{LATER} read\n{PUBLISH} publish\n")  # LATER added, READ revoked
    deadline = time.monotonic() + 10
    while _call(s, "GET", "/projections", LATER)[0] != 200:
        assert time.monotonic() < deadline, "the new token was not picked up"
        time.sleep(0.2)
    assert _call(s, "GET", "/projections", READ)[0] == 401


def test_a_worker_will_not_listen_beyond_loopback_without_tokens(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    env.update({"REFOLD_APP": "refold.examples.bank", "REFOLD_DATA_DIR": str(tmp_path)})
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "refold.cli.main", "worker", "--http", "0.0.0.0:0"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "refusing to serve HTTP on 0.0.0.0" in done.stderr, done
    assert "Traceback" not in done.stderr
