"""The task client from Python and the command line, on the real broker: what a submit refuses
before anything is appended, and `refold task cancel`.

Oracles: the records of the queue's own topics, read back from Kafka, and the CLI's exit codes
and output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from refold.core.config import Config
from refold.core.errors import InputError
from refold.kafka.task_log import TaskClient, ensure_task_topics
from refold.kafka.topics import Topics, internal_topics

from tests.integration.apps.shipping import Shipping
from tests.integration.test_tasks import Processes, records


def test_nan_and_infinity_in_task_data_are_refused_at_submit_and_nothing_is_appended(
    config: Config, unique, tmp_path: Path
) -> None:
    """HTTP refuses them (no JSON body carries them); the Python client took them and wrote
    `NaN` into the intake and status records, and so did `refold task submit --data`, whose
    JSON reader accepts `NaN`."""
    queue = unique("nan")
    shipping = type("Q", (Shipping,), {"name": queue})()
    topics = Topics(config)
    topics.ensure(internal_topics(config))
    ensure_task_topics(topics, {queue: shipping})
    client = TaskClient(config, {queue: shipping})
    try:
        for data, where in (
            ({"product_id": "p", "qty": float("nan")}, "data.qty = nan"),
            ({"product_id": "p", "weights": [1.5, float("inf")]}, "data.weights[1] = inf"),
        ):
            with pytest.raises(InputError, match="NaN and Infinity have no JSON form") as refused:
                client.submit(queue, client.prepare(queue, {"task_id": "t-nan", "data": data}))
            assert str(refused.value).startswith(where), refused.value
        ok = client.submit(queue, client.prepare(queue, {"task_id": "t-ok", "data": {"qty": 1}}))
    finally:
        client.close()
    run = Processes(config, queue, tmp_path)
    cli = run.cli("task", "submit", queue, "--id", "t-cli", "--data", '{"qty": -Infinity}')

    assert ok.task_id == "t-ok" and not ok.repeated, ok
    assert cli.returncode == 2, cli
    assert cli.stderr.startswith("refold: error: data.qty = -inf is not JSON"), cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1, cli.stderr
    # Only the good task reached the log: the refused ones left no intake or status record.
    assert [v["task_id"] for _k, v in records(config, f"{queue}.tasks")] == ["t-ok"]
    statuses = [(v["task_id"], v["status"]) for _k, v in records(config, f"{queue}.status")]
    assert statuses == [("t-ok", "accepted")], statuses


def test_refold_task_cancel_cancels_a_waiting_task_once_and_says_which_cannot_be(
    config: Config, unique, tmp_path: Path
) -> None:
    """`refold task cancel QUEUE TASK_ID`, with no worker running (the state is folded from the
    status topic, as `task status` does): exit 0 and the HTTP route's answer for a task that
    waits; exit 1 for one that ended (the route's 409), recording nothing; exit 2 for an id the
    queue never had (the route's 404), as `task status` answers it."""
    queue = unique("cancel")
    run = Processes(config, queue, tmp_path)
    ensured = run.cli("topics", "ensure")
    assert ensured.returncode == 0, ensured.stderr
    submitted = run.cli("task", "submit", queue, "--id", "c-1", "--data", '{"product_id": "p"}')
    assert submitted.returncode == 0, submitted.stderr

    cancelled = run.cli("task", "cancel", queue, "c-1")
    status = run.cli("task", "status", queue, "c-1")
    again = run.cli("task", "cancel", queue, "c-1")
    unknown = run.cli("task", "cancel", queue, "never-submitted")

    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout) == {"task_id": "c-1", "status": "cancelled"}
    assert json.loads(status.stdout)["status"] == "cancelled", status.stdout
    assert again.returncode == 1, again
    assert again.stderr.startswith("refold: error: task 'c-1' already ended cancelled"), again
    assert unknown.returncode == 2, unknown
    assert f"no task 'never-submitted' in queue '{queue}'" in unknown.stderr, unknown
    for done in (again, unknown):
        assert len(done.stderr.strip().splitlines()) == 1 and not done.stdout, done
    # One cancel on the topic task workers read, one `cancelled` status: the refused second
    # cancel recorded nothing.
    assert [k for k, _v in records(config, f"{queue}.cancels")] == ["c-1"]
    statuses = [v["status"] for _k, v in records(config, f"{queue}.status")]
    assert statuses == ["accepted", "cancelled"], statuses
