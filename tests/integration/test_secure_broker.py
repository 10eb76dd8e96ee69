"""A secured local broker (`refold broker start --secure`, 1 node and 3): TLS, SASL/SCRAM per
role, ACLs.

Against it, as a user would run refold: a client without credentials is refused with a clear
error and no hang; the publisher publishes and cannot read; the reader reads and cannot
publish; a worker with the worker role decides a command and folds and serves it.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from refold.cli import broker
from refold.core.config import Config

from tests.integration.test_commands import _free_port

ROOT = Path(__file__).resolve().parents[2]
# One pytest process runs this module (`make test` runs two): its clusters start once per run.
pytestmark = pytest.mark.xdist_group("secure")
BANK = "refold.examples.bank"


class Secured:
    def __init__(self, data_dir: Path, bootstrap: str) -> None:
        self.data_dir = data_dir
        self.bootstrap = bootstrap

    def env(self, role: str | None, **extra: str) -> dict[str, str]:
        """The environment of a refold command run as `role` (None: no credentials at all)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("REFOLD_")}
        env.update({"REFOLD_APP": BANK, "PYTHONPATH": str(ROOT)})
        env.update({"REFOLD_DATA_DIR": str(self.data_dir / "client"), **extra})
        env["REFOLD_BOOTSTRAP_SERVERS"] = self.bootstrap
        if role is not None:
            lines = self.refold(None, "broker", "credentials", role, data_dir=self.data_dir)
            assert lines.returncode == 0, lines.stderr
            for line in lines.stdout.splitlines():
                name, _, value = line.partition("=")
                env[name] = value.strip("'")
        return env

    def refold(
        self, role: str | None, *args: str, data_dir: Path | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        env = (
            self.env(role)
            if data_dir is None
            else {**os.environ, "REFOLD_DATA_DIR": str(data_dir), "PYTHONPATH": str(ROOT)}
        )
        cmd = [sys.executable, "-m", "refold.cli.main", *args]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module", params=[1, 3], ids=["1-node", "3-nodes"])
def secured(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Secured]:
    data_dir = tmp_path_factory.mktemp("secured")
    config = Config(data_dir=data_dir)
    info = broker.start(
        config, nodes=request.param, port=broker.free_port(), heap_mb=384, secure=True, timeout=120
    )
    try:
        yield Secured(data_dir, info.bootstrap_servers)
    finally:
        broker.stop(config, timeout=20)


def _deposit(key: str) -> list[str]:
    data = json.dumps({"account_id": key, "amount_cents": 250})
    return ["--type", "bank.MoneyDeposited", "--key", key, "--data", data]


def test_credentials_are_the_owners_alone_and_per_role(secured: Secured) -> None:
    folder = secured.data_dir / "broker" / "secure"
    for name in ("credentials.json", "server.pem", "ca.key"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name
    out = secured.refold(None, "broker", "credentials", "reader", data_dir=secured.data_dir)
    assert out.returncode == 0 and "REFOLD_KAFKA_SASL_USERNAME=reader" in out.stdout, out
    bad = secured.refold(None, "broker", "credentials", "root", data_dir=secured.data_dir)
    assert bad.returncode != 0 and "no role 'root'" in bad.stderr, bad.stderr


def test_no_credentials_no_entry_and_each_role_its_own_rights(secured: Secured) -> None:
    topic = f"secure-{uuid.uuid4().hex[:8]}"
    made = secured.refold("admin", "topics", "ensure", topic)
    assert made.returncode == 0, made.stderr
    anonymous = secured.refold(None, "publish", topic, *_deposit("a-1"))
    assert anonymous.returncode == 1 and "refold: error:" in anonymous.stderr, anonymous.stderr
    assert "Traceback" not in anonymous.stderr
    published = secured.refold("publisher", "publish", topic, *_deposit("a-1"))
    assert published.returncode == 0, published.stderr
    peek = secured.refold("publisher", "tail", topic, "--from-beginning")
    assert peek.returncode == 1 and "not allowed to read" in peek.stderr, peek.stderr
    read = secured.refold("reader", "tail", topic, "--from-beginning")
    assert read.returncode == 0, read.stderr
    [event] = [json.loads(line) for line in read.stdout.splitlines()]
    assert (event["key"], event["data"]["amount_cents"]) == ("a-1", 250)
    write = secured.refold("reader", "publish", topic, *_deposit("a-2"))
    assert write.returncode == 1 and "refused" in write.stderr, write.stderr
    assert "Traceback" not in write.stderr


@pytest.mark.timeout(300)
def test_a_worker_with_the_worker_role_decides_folds_and_serves(
    secured: Secured, tmp_path: Path
) -> None:
    made = secured.refold("worker", "topics", "ensure")
    assert made.returncode == 0, made.stderr
    port = _free_port()
    env = secured.env("worker", REFOLD_DATA_DIR=str(tmp_path / "worker"))
    log = (tmp_path / "worker.log").open("ab")
    cmd = [sys.executable, "-m", "refold.cli.main", "worker", "--http", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    owner = f"sec-{uuid.uuid4().hex[:6]}"
    try:
        deadline = time.monotonic() + 180
        body = json.dumps(
            {"key": f"{owner}-acc", "type": "bank.OpenAccount", "data": {"owner": owner}}
        ).encode()
        while True:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/commands/accounts?wait_ms=10000", body, method="POST"
                )
                with urllib.request.urlopen(request, timeout=30) as response:
                    result = json.loads(response.read())
                break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
                time.sleep(0.5)
        while result["status"] == "pending":  # the processor may still be joining its group
            assert time.monotonic() < deadline, result
            url = f"http://127.0.0.1:{port}{result['status_url']}?wait_ms=10000"
            with urllib.request.urlopen(url, timeout=30) as response:
                result = json.loads(response.read())
        assert result["status"] == "accepted", result
        while True:
            try:
                url = f"http://127.0.0.1:{port}/projections/owners/{owner}"
                with urllib.request.urlopen(url, timeout=10) as response:
                    state = json.loads(response.read())["state"]
                break
            except urllib.error.HTTPError:
                assert time.monotonic() < deadline
                time.sleep(0.3)
        assert state["accounts"] == {f"{owner}-acc": 0}, state
    finally:
        proc.terminate()
        proc.wait(30)
    # the role may read its topics' configs: the processors know the record size they take
    assert "event records are checked against" not in (tmp_path / "worker.log").read_text()
