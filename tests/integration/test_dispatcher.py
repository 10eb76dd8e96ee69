"""The task dispatcher (`refold.engine.dispatcher`) on the real broker, run in the test's own
process: what it does when the broker refuses its transactions.

Oracles: the records of the queue's own topics, read back from Kafka (read_committed), and the
dispatcher's counters and log lines.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType
from refold.core.config import Config
from refold.engine.dispatcher import Dispatcher
from refold.kafka import clients
from refold.kafka.registry import codec_for
from refold.kafka.task_log import TaskClient, ensure_task_topics
from refold.kafka.topics import Topics, internal_topics

from tests.integration.apps.shipping import Shipping
from tests.integration.test_tasks import records


def _until(ok: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _set_max_message_bytes(config: Config, topic: str, value: str) -> None:
    entry = ConfigEntry("max.message.bytes", value, incremental_operation=AlterConfigOpType.SET)
    resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[entry])
    admin = clients.admin(config)
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(30)


@pytest.mark.timeout(180)
def test_a_dispatch_the_broker_refuses_backs_off_says_so_once_and_loses_nothing(
    config: Config, unique: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A work item over the work topic's max.message.bytes fails every transaction at once.
    It was aborted, rewound and tried again at once (about every 0.5 s), with a warning each
    time, for as long as it lasted; the tasks behind it in the intake partition waited too.
    Now the tries back off (0.5 s doubling, to 30 s), one warning per kind of error says so,
    and once the topic takes the item (an operator raises its limit) every task is
    dispatched, once, and a line says after how many aborts."""
    queue = unique("refused")
    shipping = type("Q", (Shipping,), {"name": queue})()
    topics = Topics(config)
    topics.ensure(internal_topics(config))
    ensure_task_topics(topics, {queue: shipping})
    _set_max_message_bytes(config, shipping.work_topic, "2000")
    big = {"product_id": "p", "blob": os.urandom(3000).hex()}  # too large even compressed
    client = TaskClient(config, {queue: shipping})
    try:  # one merge key: one intake partition, the small task behind the big one
        for task_id, data in (("big", big), ("small", {"product_id": "p", "qty": 1})):
            client.submit(queue, client.prepare(queue, {"task_id": task_id, "data": data}))
    finally:
        client.close()
    dispatcher = Dispatcher(config, codec_for(config), shipping)
    thread = threading.Thread(target=dispatcher.run, daemon=True)
    with caplog.at_level(logging.INFO, logger="refold.engine"):
        thread.start()
        try:
            _until(lambda: dispatcher.stats.aborts >= 1, 60, "a first aborted transaction")
            first = time.monotonic()
            _until(lambda: dispatcher.stats.aborts >= 4, 60, "4 aborted transactions")
            fourth = time.monotonic()
            aborted = [
                r.getMessage()
                for r in caplog.records
                if r.name.startswith("refold.") and "transaction aborted" in r.getMessage()
            ]
            assert dispatcher.stats.tasks == 0, dispatcher.stats
            _set_max_message_bytes(config, shipping.work_topic, "10000000")
            _until(lambda: dispatcher.stats.tasks == 2, 60, "both tasks once the topic took them")
        finally:
            dispatcher.stop()
            thread.join(60)
    assert dispatcher.stats.state == "stopped", dispatcher.stats
    # Paused 0.5 + 1 + 2 s between the first and the fourth try (tried at once: 1.5 s).
    assert fourth - first >= 3.0, fourth - first
    # One line per kind of error (the broker's refusal, or the transaction state it left),
    # not one per try.
    codes = [line.split("code=", 1)[1].split(",", 1)[0] for line in aborted]
    assert len(codes) == len(set(codes)) and "MSG_SIZE_TOO_LARGE" in codes, aborted
    assert "trying again in 0.5s" in aborted[0], aborted
    aborts = dispatcher.stats.aborts
    said = [r.getMessage() for r in caplog.records if "committed after" in r.getMessage()]
    assert said == [f"dispatcher {queue}: a transaction committed after {aborts} aborted"], said
    # Nothing lost, nothing twice: each task in one work item and dispatched once.
    worked = [
        t["task_id"] for _k, item in records(config, shipping.work_topic) for t in item["tasks"]
    ]
    assert sorted(worked) == ["big", "small"], worked
    statuses = [(v["task_id"], v["status"]) for _k, v in records(config, shipping.status_topic)]
    assert sorted(s for s in statuses if s[1] == "dispatched") == [
        ("big", "dispatched"),
        ("small", "dispatched"),
    ], statuses
