"""A user's own app, written outside the repo: its own topic, its own Avro schema, no bank.

The app module and its `.avsc` live in a temp folder, the commands run from another one (no
`schemas/` there), and the broker never gets a `bank.accounts` topic: refold runs the app it is
given and nothing else.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient
from refold.cli.broker import free_port

APP = '''\
"""A shop: orders placed, folded into what each customer bought."""

from pathlib import Path

from refold import Event, Projection

{schemas_dirs}


class Orders(Projection):
    name = {name!r}
    topics = ({topic!r},)
    version = 1

    def initial(self, key: str) -> dict:
        return {{"items": 0, "total_cents": 0, "orders": []}}

    def on_OrderPlaced(self, state: dict, event: Event) -> dict:
        state["items"] += event.data["quantity"]
        state["total_cents"] += event.data["quantity"] * event.data["price_cents"]
        state["orders"].append(event.data["order_id"])
        return state
'''

ORDER_PLACED = {
    "type": "record",
    "namespace": "shop",
    "name": "OrderPlaced",
    "fields": [
        {"name": "order_id", "type": "string"},
        {"name": "item", "type": "string"},
        {"name": "quantity", "type": "int"},
        {"name": "price_cents", "type": "long"},
    ],
}


def topic_names(bootstrap: str) -> set[str]:
    return set(AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.mark.parametrize("schemas_from", ["SCHEMAS_DIRS", "REFOLD_SCHEMAS_DIR"])
def test_a_worker_runs_a_users_app_with_no_bank_topic(bootstrap, unique, tmp_path, schemas_from):
    """The app's schema folder is declared in the module (SCHEMAS_DIRS) or in the environment."""
    if "bank.accounts" in topic_names(bootstrap):
        pytest.skip("this broker already has bank.accounts (a reused one?): nothing to show")
    module = f"shopapp_{uuid.uuid4().hex[:8]}"
    name, topic = unique("orders"), unique("shop.orders")
    app_dir, run_dir = tmp_path / "app", tmp_path / "run"
    (app_dir / "schemas" / "shop").mkdir(parents=True)
    run_dir.mkdir()
    declared = 'SCHEMAS_DIRS = (Path(__file__).parent / "schemas",)'
    in_module = declared if schemas_from == "SCHEMAS_DIRS" else ""
    (app_dir / f"{module}.py").write_text(
        APP.format(name=name, topic=topic, schemas_dirs=in_module)
    )
    (app_dir / "schemas" / "shop" / "OrderPlaced.avsc").write_text(json.dumps(ORDER_PLACED))
    env = {  # none of the repo's settings but the Kafka client's (REFOLD_KAFKA_*)
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("REFOLD_", "PYTHONPATH")) or k.startswith("REFOLD_KAFKA")
    }
    env |= {
        "REFOLD_APP": module,
        "REFOLD_BOOTSTRAP_SERVERS": bootstrap,
        "REFOLD_DATA_DIR": str(tmp_path / "data"),
        "PYTHONPATH": str(app_dir),
    }
    if schemas_from == "REFOLD_SCHEMAS_DIR":
        env["REFOLD_SCHEMAS_DIR"] = str(app_dir / "schemas")

    def refold(*args: str) -> subprocess.CompletedProcess[str]:
        cli = [sys.executable, "-m", "refold.cli.main", *args]
        return subprocess.run(cli, cwd=run_dir, env=env, capture_output=True, text=True, timeout=60)

    done = refold("topics", "ensure")
    assert done.returncode == 0, done.stderr
    assert topic in done.stdout and "bank." not in done.stdout, done.stdout

    orders = [(f"cust-{i % 3}", f"o-{i}", 1 + i % 4, 250 * (1 + i % 5)) for i in range(12)]
    expected: dict[str, dict[str, Any]] = {}
    lines = []
    for customer, order_id, quantity, price in orders:
        data = {"order_id": order_id, "item": "tea", "quantity": quantity, "price_cents": price}
        lines.append(json.dumps({"type": "shop.OrderPlaced", "key": customer, "data": data}))
        state = expected.setdefault(customer, {"items": 0, "total_cents": 0, "orders": []})
        state["items"] += quantity
        state["total_cents"] += quantity * price
        state["orders"].append(order_id)
    (run_dir / "orders.jsonl").write_text("\n".join(lines) + "\n")
    done = refold("publish", topic, "--file", "orders.jsonl")
    assert done.returncode == 0, done.stderr
    assert "published 12 event(s)" in done.stdout

    port = free_port()
    log = tmp_path / "worker.log"
    cli = [sys.executable, "-m", "refold.cli.main", "worker", "--http", f"127.0.0.1:{port}"]
    with log.open("w") as out:
        worker = subprocess.Popen(
            [*cli, "--http-procs", "1"], cwd=run_dir, env=env, stdout=out, stderr=out
        )
    try:
        base = f"http://127.0.0.1:{port}"
        states = _wait_for_states(base, name, expected, worker, log)
        assert states == expected
        assert [p["name"] for p in get_json(f"{base}/projections")] == [name]
        topics = topic_names(bootstrap)
        assert topic in topics and "bank.accounts" not in topics
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0, log.read_text()
    assert "bank." not in log.read_text()
    assert f"worker running {name} v1; HTTP on {base}" in log.read_text()


def _wait_for_states(
    base: str, name: str, expected: dict[str, Any], worker: subprocess.Popen, log: Path
) -> dict[str, Any]:
    """Every expected key's state over HTTP, once the worker has folded all of them (60 s)."""
    deadline = time.monotonic() + 60
    states: dict[str, Any] = {}
    while time.monotonic() < deadline:
        assert worker.poll() is None, f"worker exited:\n{log.read_text()}"
        try:
            states = {k: get_json(f"{base}/projections/{name}/{k}")["state"] for k in expected}
        except (urllib.error.URLError, ConnectionError):
            states = {}  # not listening yet, or a key not folded yet (404)
        if states == expected:
            return states
        time.sleep(0.2)
    raise AssertionError(f"states {states} never reached {expected}:\n{log.read_text()}")
