"""Task-id claims when an intake node dies between its claim and its append (claim-then-crash).

The fault is injected exactly: the test writes to the queue's claims topic the claim a dead
node leaves (the id, the body's fingerprint, its claimer and claim time) with nothing on the
intake topic, the state a `kill -9` between the two steps leaves. Then the same POST, retried on
a live worker, must queue the task once: at once when the claim was this data dir's own
(a previous run: it is dead), after the takeover delay when another node's (its append could
still land before that: until then a 503 says to retry, never a silent repeat). A retry of a task
that was appended stays a repeat, and another body for the id stays a 409.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
from refold.core.config import Config
from refold.core.errors import TaskConflict
from refold.core.tasks import Submission, submission_from_json
from refold.engine.claims import ClaimRequest
from refold.engine.membership import worker_id
from refold.engine.task_queues import TaskService, claims_index
from refold.kafka import clients
from refold.kafka.registry import codec_for
from refold.kafka.task_log import CLAIM_ROUNDS, TaskClient
from refold.kafka.topics import Topics

from tests.integration.apps.shipping import Shipping
from tests.integration.test_tasks import Processes, records


def _leave_claim(config: Config, queue: str, task_id: str, data: dict, claimer: str, age_s: float):
    """Write the claim a node that died right after claiming `task_id` leaves behind."""
    submission = submission_from_json({"task_id": task_id, "data": data})
    claim = {
        "command_id": task_id,
        "fingerprint": submission.fingerprint,
        "key": submission.key,
        "type": queue,
        "claimed_at_ms": int((time.time() - age_s) * 1000),
        "claimer": claimer,
    }
    producer = clients.producer(config)
    producer.produce(f"{queue}.ids", orjson.dumps(claim), task_id.encode())
    assert producer.flush(30) == 0


def test_a_task_claimed_by_a_node_that_died_before_appending_is_queued_by_a_retry(
    config: Config, unique, tmp_path: Path
) -> None:
    queue = unique("claimed")
    node = Processes(config, queue, tmp_path)
    tmp_path.joinpath("worker").mkdir(parents=True)
    body = {"product_id": "p1"}
    try:
        node.worker()
        node.task_worker("tw")
        node.warm_up()  # the queue's topics exist, its task worker has joined
        me = worker_id(Config(data_dir=tmp_path / "worker"))
        # Another node claimed these 2 minutes ago and died: past the takeover delay (65 s).
        _leave_claim(config, queue, "other-old", body, "node-b/run-1", age_s=120)
        # This data dir's previous run claimed this one just now and was killed.
        _leave_claim(config, queue, "mine-new", body, f"{me}/run-0", age_s=0)
        # Another node claimed this one just now: its append may still land, so 503 for now.
        _leave_claim(config, queue, "other-new", body, "node-c/run-1", age_s=0)
        retried = {t: node.http("POST", f"/tasks/{queue}", {"task_id": t, "data": body})
                   for t in ("other-old", "mine-new", "other-new")}  # fmt: skip
        # Another body for a claimed id is still a conflict, whoever claimed it.
        conflict = node.http(
            "POST", f"/tasks/{queue}", {"task_id": "other-old", "data": {"product_id": "x"}}
        )
        states = node.wait_ended(["other-old", "mine-new"])
        # Retried again once queued: a repeat, nothing more appended.
        again = node.http("POST", f"/tasks/{queue}", {"task_id": "mine-new", "data": body})
        calls = node.calls()
    finally:
        node.stop()

    assert retried["other-old"][0] == 202, retried
    assert retried["mine-new"][0] == 202, retried
    assert retried["other-new"][0] == 503, retried
    assert "not queued yet" in retried["other-new"][1]["detail"], retried
    assert conflict[0] == 409 and conflict[1]["error"] == "task id conflict", conflict
    assert again[0] == 202, again
    assert {t: s["status"] for t, s in states.items()} == {
        "other-old": "succeeded",
        "mine-new": "succeeded",
    }
    intake = Counter(v["task_id"] for _, v in records(config, f"{queue}.tasks"))
    assert intake == Counter({"warm-up": 1, "other-old": 1, "mine-new": 1}), intake
    ran = Counter(t for call in calls for t, *_ in call.get("tasks", ()))
    assert ran["other-old"] >= 1 and ran["mine-new"] >= 1 and ran["other-new"] == 0, ran


def test_submits_waiting_for_a_claim_round_are_claimed_together_each_with_its_own_answer(
    config: Config, unique, tmp_path: Path
) -> None:
    """Group commit, forced deterministically: every claims thread is held inside a round (one
    id each), 10 more submits queue meanwhile, and the next round claims all 10 in one call
    to the claims topic; each submit gets its own answer (a new id 202, one claimed before
    with another body TaskConflict, a repeat of an id in flight the first one's answer)."""
    queue = type("Q", (Shipping,), {"name": unique("grouped")})()
    codec = codec_for(config)
    service = TaskService(config, codec, {queue.name: queue})
    service.ensure_topics(Topics(config))
    index = service.claims[queue.name] = claims_index(config, queue, tmp_path / "ids").start()
    # Another body claimed "taken" first (another node's submit).
    other = submission_from_json({"task_id": "taken", "data": {"product_id": "other"}})
    index.claim([ClaimRequest("taken", other.fingerprint, other.key, queue.name, "node-b/1")])

    rounds: list[list[str]] = []
    entered = threading.Semaphore(0)
    release = threading.Event()

    def claim_many(name: str, subs):
        rounds.append([s.task_id for s in subs])
        entered.release()
        assert release.wait(60)
        return service._claim_many(name, subs)  # the worker's own: one ClaimsIndex.claim

    client = TaskClient(config, {queue.name: queue}, codec=codec, claim_many=claim_many)
    try:

        def sub(task_id: str) -> Submission:
            return client.prepare(queue.name, {"task_id": task_id, "data": {"product_id": "p1"}})

        held = []
        for i in range(CLAIM_ROUNDS):  # one round per claims thread, each held in the gate
            held += client.submit_nowait(queue.name, [sub(f"held-{i}")])
            assert entered.acquire(timeout=60)
        queued = client.submit_nowait(queue.name, [sub(f"queued-{i}") for i in range(8)])
        queued += client.submit_nowait(queue.name, [sub("taken"), sub("held-0")])
        release.set()
        answers = [p.wait(60) for p in held + queued[:8]]
        with pytest.raises(TaskConflict):
            queued[8].wait(60)
        repeat = queued[9].wait(60)
    finally:
        release.set()
        client.close()
        index.stop()

    assert sorted(rounds[:CLAIM_ROUNDS]) == [[f"held-{i}"] for i in range(CLAIM_ROUNDS)]
    assert rounds[CLAIM_ROUNDS:] == [[f"queued-{i}" for i in range(8)] + ["taken"]], rounds
    assert all(a.status == "accepted" and not a.repeated for a in answers), answers
    assert repeat.repeated and repeat.task_id == "held-0"
    intake = Counter(v["task_id"] for _, v in records(config, f"{queue.name}.tasks"))
    expected = [f"held-{i}" for i in range(CLAIM_ROUNDS)] + [f"queued-{i}" for i in range(8)]
    assert intake == Counter(expected), intake
