"""The task client from Python and the command line, on the real broker: what a submit refuses
before anything is appended, and `refold task cancel`.

Oracles: the records of the queue's own topics, read back from Kafka, and the CLI's exit codes
and output.
"""

from __future__ import annotations

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
