"""The command path at its edges, against the real broker: records the broker refuses, a
decider slower than the consumer's poll interval, malformed commands and their ids.

Each test runs `refold worker` (tests/integration/apps/vault.py: the bank's rules on the test's
own topics) and asks for results as a caller would, through `POST /commands` and
`GET /commands/{id}`; the oracles are the event and results topics themselves.
"""

from __future__ import annotations

import json
from urllib.parse import quote

from confluent_kafka import Producer
from refold.core.commands import Decider
from refold.core.config import Config

from tests.integration.test_commands import WorkerProcess

WAIT = "?wait_ms=30000"


def produce_raw(config: Config, topic: str, records: list[tuple[bytes, list]]) -> list[str]:
    """Write command records around the API, as any Kafka client can (key `acc-1`, so they land
    in its partition); their positions as `<topic>-<partition>-<offset>`."""
    producer = Producer(
        {"bootstrap.servers": config.bootstrap_servers, "partitioner": "murmur2_random"}
    )
    where: list[str] = []

    def delivered(err, msg) -> None:
        assert err is None, err
        where.append(f"{msg.topic()}-{msg.partition()}-{msg.offset()}")

    for value, headers in records:
        producer.produce(topic, value, b"acc-1", headers=headers, on_delivery=delivered)
        producer.flush(30)  # one at a time: `where` is in the records' order
    return where


def test_a_malformed_command_is_answered_under_its_id_when_it_has_one(
    config: Config, vault: Decider, tmp_path
) -> None:
    """A malformed command's rejection was keyed by its record's position even when its id
    could be read, so `GET /commands/{id}` answered 404 for ever and a sender waiting on its id
    never learned why. Now: under the JSON `command_id`, else the `ce_id` header, else (nothing
    readable) the position."""
    worker = WorkerProcess(config, vault, tmp_path / "w", http=True).start()
    try:
        worker.wait_http()
        status, opened = worker.http(
            "POST",
            f"/commands/{vault.name}{WAIT}",
            {"key": "acc-1", "type": "bank.OpenAccount", "data": {"owner": "ada"}},
        )
        assert (status, opened["status"]) == (200, "accepted"), opened
        body = {"key": "acc-1", "type": "bank.Deposit", "data": {"amount_cents": 7}}
        positions = produce_raw(
            config,
            vault.command_topic,
            [
                (json.dumps({**body, "command_id": "bad-data", "data": [7]}).encode(), []),
                (json.dumps({**body, "expected_version": "1"}).encode(), [("ce_id", b"bad-ver")]),
                (b"\xff, not JSON", []),
            ],
        )
        for cid in ("bad-data", "bad-ver", positions[2]):
            status, result = worker.http("GET", f"/commands/{quote(cid, safe='')}{WAIT}")
            assert status == 200 and result["status"] == "rejected", (cid, result)
            assert result["command_id"] == cid
            assert result["reason"].startswith("malformed command: "), result
        # only the unreadable one is under its position
        for position in positions[:2]:
            status, _ = worker.http("GET", f"/commands/{quote(position, safe='')}")
            assert status == 404
        status, deposit = worker.http("POST", f"/commands/{vault.name}{WAIT}", body)
        assert (status, deposit["status"], deposit["version"]) == (200, "accepted", 2), deposit
    finally:
        worker.stop()
