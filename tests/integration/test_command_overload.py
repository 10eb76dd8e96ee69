"""Overload: a flood of `POST /commands` against a processor that decides 50 commands a second
is answered 429 with Retry-After for what would wait too long, and every command answered 202
is decided exactly once while no refused one is ever appended (refold.http.admission).

The oracle is the test's own: the ids it sent and how each was answered, against the command
and results topics read back from Kafka.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from confluent_kafka import OFFSET_BEGINNING
from refold.core.commands import Decider
from refold.core.config import Config
from refold.kafka import clients
from refold.kafka.log import read_to_end

from tests.integration.test_commands import WorkerProcess

FLOOD = 900


def _ids_in(config: Config, topic: str, ids: set[str]) -> Counter[str]:
    """How many records of `topic` name each of `ids` (by the bytes of the id)."""
    consumer = clients.consumer(config, config.group("overload-oracle"))
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        starts = {(topic, p): OFFSET_BEGINNING for p in partitions}
        found: Counter[str] = Counter()
        for batch in read_to_end(consumer, starts):
            for msg in batch:
                raw = (msg.key() or b"") + b" " + (msg.value() or b"")
                for command_id in ids:
                    if command_id.encode() in raw:
                        found[command_id] += 1
        return found
    finally:
        consumer.close()


@pytest.mark.timeout(400)
def test_a_flood_is_refused_early_and_nothing_admitted_is_lost(
    config: Config, vault: Decider, tmp_path
) -> None:
    worker = WorkerProcess(config, vault, tmp_path / "w", http=True)
    worker.env["VAULT_DECIDE_DELAY_S"] = "0.02"  # 50 decisions a second
    worker.env["REFOLD_COMMAND_MAX_QUEUE_S"] = "1"
    worker.start()
    try:
        worker.wait_http()
        base = f"/commands/{vault.name}"
        run = str(time.time_ns())

        def post(i: int) -> tuple[str, int, dict, str | None]:
            command_id = f"flood-{run}-{i:04d}"
            body = {"command_id": command_id, "key": f"acc-{i % 20}", "type": "bank.Deposit"}
            body["data"] = {"amount_cents": 1 + i}
            request = urllib.request.Request(
                f"http://127.0.0.1:{worker.port}{base}", json.dumps(body).encode(), method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    return command_id, response.status, json.loads(response.read()), None
            except urllib.error.HTTPError as exc:
                retry = exc.headers.get("Retry-After")
                return command_id, exc.code, json.loads(exc.read()), retry

        with ThreadPoolExecutor(32) as pool:
            sent = list(pool.map(post, range(FLOOD)))
        answered = Counter(status for _, status, _, _ in sent)
        assert set(answered) <= {202, 429}, answered
        assert answered[429] and answered[202] >= 256, answered  # the door closed, and opened
        refused = {cid for cid, status, _, _ in sent if status == 429}
        admitted = {cid for cid, status, _, _ in sent if status == 202}
        for _cid, status, answer, retry in sent:
            if status == 429:
                assert answer["error"] == "too many commands", answer
                assert retry is not None and int(retry) >= 1, retry
        # Every admitted command gets its result; then the topics say what happened.
        deadline = time.monotonic() + 180
        for command_id in sorted(admitted):
            while True:
                status, result = worker.http("GET", f"/commands/{command_id}")
                if status == 200 and result["status"] in ("accepted", "rejected"):
                    break
                assert time.monotonic() < deadline, (command_id, status, result)
                time.sleep(0.2)
        appended = _ids_in(config, vault.command_topic, admitted | refused)
        results = _ids_in(config, vault.results_topic, admitted | refused)
        assert {cid for cid in appended} == admitted, "a refused command was appended"
        assert all(appended[cid] == 1 for cid in admitted), "an admitted command went twice"
        assert {cid for cid in results} == admitted and set(results.values()) == {1}
    finally:
        worker.stop()
