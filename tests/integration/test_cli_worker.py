"""`refold worker`, `query`, `status` and `dead-letters` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.integration.test_projections import (
    WorkerProcess,
    end_offsets,
    events_for,
    oracle,
    publish,
    wait_caught_up,
)


def run(worker: WorkerProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "refold.cli.main", *args],
        env=worker.env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_missing_source_topic_is_a_clear_startup_error(config, unique, tmp_path):
    worker = WorkerProcess(config, unique("ledger"), unique("no-such-topic"), tmp_path / "w")
    done = run(worker, "worker", "--only", worker.name)
    assert done.returncode == 1
    assert "does not exist on the broker" in done.stderr and "topics ensure" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_query_status_and_dead_letters_after_a_run(config, ledger_topic, unique, tmp_path):
    events = events_for(400, accounts=9, seed=5)
    events[7] = (events[7][0], events[7][1], {**events[7][2], "memo": "boom"})
    publish(config, ledger_topic, events)
    worker = WorkerProcess(config, unique("ledger"), ledger_topic, tmp_path / "w")
    worker.start()
    try:
        wait_caught_up([worker], end_offsets(config, ledger_topic))
        expected = oracle(events)
        key = sorted(expected)[0]
        done = run(worker, "query", worker.name, key)  # while the worker holds the store
        assert done.returncode == 0, done.stderr
        state = json.loads(done.stdout)["state"]
        assert (state["balance_cents"], state["events"]) == expected[key]
    finally:
        worker.stop()

    done = run(worker, "query", worker.name, "--prefix", "acc-", "--limit", "1000")
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["key"] for r in rows] == sorted(expected)

    done = run(worker, "query", worker.name, "nobody")
    assert done.returncode == 2 and "no state for key" in done.stderr

    done = run(worker, "status", "--json")
    assert done.returncode == 0, done.stderr
    row = next(json.loads(x) for x in done.stdout.splitlines() if worker.name in x)
    assert row["events_folded"] == 399 and row["dead_letters"] == 1 and row["lag"] == 0

    done = run(worker, "dead-letters", worker.name)
    letters = [json.loads(x) for x in done.stdout.splitlines()]
    assert len(letters) == 1 and "boom" in letters[0]["reason"]
    assert letters[0]["key"] == events[7][1]
