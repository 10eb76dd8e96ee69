"""Sagas driven by two `refold worker` processes that share the saga's partitions (and the
vault's command partitions): a second worker joins while sagas run, one is killed with kill -9
and its partitions move to the other, then it comes back and takes some of them again. Starts
go to either worker, and some saga ids are started on both (the second time with other data).

The oracle is the test's own, as in test_sagas: the accounts it funded and the events read back
from Kafka. On top: every saga ends final once (one final status in the log, whichever worker
wrote it), the first start's data wins, and a store rebuilt from offset zero agrees.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from refold.core.commands import Decider
from refold.core.config import Config
from refold.kafka.command_client import CommandClient
from refold.kafka.topics import Topics

from tests.integration.test_sagas import (
    ACCOUNTS,
    ENDED,
    SAGAS,
    Worker,
    _check,
    _fund,
    _plan,
    _runner_until,
    assert_rebuilt_alike,
    events,
)


def post(
    workers: list[Worker], saga: str, saga_id: str, data: dict, conflicts: list[str] | None = None
) -> Worker:
    """POST the start to the first worker that answers 202 (or, with `conflicts`, 409: the id
    was started with other data, which goes into `conflicts`); returns it."""
    deadline = time.monotonic() + 180
    while True:
        for worker in workers:
            try:
                code, body = worker.http(
                    "POST", f"/sagas/{saga}", {"saga_id": saga_id, "data": data}
                )
            except OSError:
                continue
            if code == 202:
                assert body["saga_id"] == saga_id and body["status"] == "running", body
                return worker
            if code == 409 and conflicts is not None:
                url = f"/sagas/{saga}/{saga_id}"
                assert (body["saga_id"], body["status_url"]) == (saga_id, url), body
                conflicts.append(saga_id)
                return worker
            assert code == 503, body
        assert time.monotonic() < deadline, f"saga {saga_id} never accepted"
        time.sleep(0.3)


def drives(workers: list[Worker], partitions: int, timeout: float = 120) -> list[set[int]]:
    """Wait until each worker drives some saga partitions and together all of them, each once."""
    deadline = time.monotonic() + timeout
    while True:
        ready = [set(w.runner().get("ready", ())) for w in workers]
        split = sum(len(r) for r in ready) == partitions and all(ready)
        if split and len(set().union(*ready)) == partitions:
            return ready
        assert time.monotonic() < deadline, f"partitions never split: {ready}"
        time.sleep(0.3)


def ended(workers: list[Worker], ids: list[str], timeout: float = 300) -> dict[str, dict]:
    """Each saga's final state, from whichever worker folds its partition; where both answer a
    final state, they agree."""
    deadline = time.monotonic() + timeout
    found: dict[str, dict] = {}
    while len(found) < len(ids):
        assert time.monotonic() < deadline, f"{len(ids) - len(found)} saga(s) not ended"
        for saga_id in ids:
            for worker in workers:
                try:
                    code, body = worker.http("GET", f"/sagas/{worker.saga}/{saga_id}")
                except OSError:
                    continue
                if code == 200 and body["status"] in ENDED:
                    assert found.setdefault(saga_id, body) == body, (found[saga_id], body)
        time.sleep(0.5)
    return found


@pytest.mark.timeout(900 + SAGAS)
def test_two_workers_share_sagas_through_rebalances_and_a_kill(
    config: Config, vault: Decider, client: CommandClient, unique, tmp_path: Path
) -> None:
    saga = unique("transfers")
    a = Worker(config, vault, saga, tmp_path)
    b = Worker(config, vault, saga, tmp_path)
    accounts = [f"acc-{i}" for i in range(ACCOUNTS)]  # what _fund opens
    plan = _plan(accounts, SAGAS, random.Random(28))
    ids = list(plan)
    quarters = [ids[i * len(ids) // 4 : (i + 1) * len(ids) // 4] for i in range(4)]
    repeated: list[str] = []
    conflicts: list[str] = []  # repeats refused: the worker knew the first start
    lock = threading.Lock()

    def start_all(chunk: list[str], up: list[Worker]) -> None:
        def one(i: int, saga_id: str) -> None:
            order = up[i % len(up) :] + up[: i % len(up)]  # alternate between the workers up
            first = post(order, saga, saga_id, plan[saga_id])
            if len(up) > 1 and i % 5 == 0:  # the same saga id on the other worker, other data
                other = [w for w in up if w is not first]
                changed = {**plan[saga_id], "amount_cents": plan[saga_id]["amount_cents"] + 1}
                post(other, saga, saga_id, changed, conflicts)
                with lock:
                    repeated.append(saga_id)

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(one, range(len(chunk)), chunk))

    try:
        a.start("a")  # its command processor decides the funding too
        assert _fund(client, vault) == accounts
        partitions = Topics(config).partitions(f"{saga}.saga")  # made by the worker
        start_all(quarters[0], [a])
        b.start("b")  # joins while the first quarter runs: the partitions split
        split = drives([a, b], partitions)
        start_all(quarters[1], [a, b])
        a.kill()  # for good, for now: its partitions move to b once its session expires
        start_all(quarters[2], [b])
        drives([b], partitions)
        a.start("a")  # back: the partitions split again
        again = drives([a, b], partitions)
        start_all(quarters[3], [a, b])
        states = ended([a, b], ids)
        for worker in (a, b):  # either worker answers every saga: the owner's state, forwarded
            for saga_id in ids:
                answer = worker.http("GET", f"/sagas/{saga}/{saga_id}")
                assert answer == (200, states[saga_id]), (worker.port, saga_id, answer)
        commands_end = Topics(config).end_offsets(vault.command_topic)
        saga_end = Topics(config).end_offsets(f"{saga}.saga")
    finally:
        a.stop()
        b.stop()
    assert split and again and repeated

    _check(plan, states, events(config, vault.events_topic), accounts)
    for saga_id, t in plan.items():  # the first start's data, not a repeat's
        assert states[saga_id]["data"] == t, (saga_id, states[saga_id])
    # One final status per saga in the log, whichever worker (or both, once) wrote it.
    finals: dict[str, set[str]] = defaultdict(set)
    starts: Counter[str] = Counter()
    for key, _type, data in events(config, f"{saga}.saga"):
        if data["kind"] == "finished":
            finals[key].add(data["status"])
        elif data["kind"] == "started":
            starts[key] += 1
    assert {k: v for k, v in finals.items()} == {k: {s["status"]} for k, s in states.items()}
    assert set(starts) == set(plan) and max(starts.values()) <= 2, starts.most_common(3)

    assert_rebuilt_alike(config, a, vault, states, commands_end, saga_end)


@pytest.mark.timeout(600)
def test_a_worker_without_the_command_processor_drives_and_fences_sagas(
    config: Config, vault: Decider, client: CommandClient, unique, tmp_path: Path
) -> None:
    """One worker runs only the vault's command processor (`--only <vault>`), another only the
    saga's state (`--only sagas.<name>,...`): the saga runner sends to a decider that runs
    elsewhere, and fences the steps that time out (50 ms, against a processor that takes 100 ms
    per decision) through a claims index of its own."""
    saga = unique("transfers")
    slow = {"timeout_s": 0.05, "decide_delay_s": 0.1}
    processor = Worker(config, vault, saga, tmp_path, **slow)
    sagas = Worker(config, vault, saga, tmp_path, **slow)
    try:
        processor.start("processor", "--only", vault.name)
        sagas.start("sagas", "--only", f"sagas.{saga},sagas.{saga}-stubborn")
        accounts = _fund(client, vault)
        plan = _plan(accounts, 60, random.Random(7))
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda item: sagas.start_saga(*item), plan.items()))
        states = sagas.states(list(plan))
        # every saga ended: the runner remembers no command of theirs (it kept them all)
        stats = _runner_until(sagas, lambda r: r["sent_here"] == r["claimed"] == 0)
        assert processor.http("GET", f"/sagas/{saga}")[0] == 404  # no saga runs there
    finally:
        sagas.stop()
        processor.stop()
    _check(plan, states, events(config, vault.events_topic), accounts, timeouts=True)
    assert stats["fenced"] > 0, stats  # timed-out steps fenced from the saga's own worker


@pytest.mark.timeout(400)
def test_the_runner_remembers_a_saga_s_commands_while_it_runs_and_forgets_them_at_its_end(
    config: Config, vault: Decider, client: CommandClient, unique, tmp_path: Path
) -> None:
    """The runner kept the id of every command it sent (to re-send only those it did not) and
    of every timed-out one the processor had claimed before the fence (not to fence it
    again) in sets that shrank only when a partition moved: they grew for the worker's life.
    Here a saga's steps wait on a processor that takes 3 s per decision, past their 1 s
    timeout: while the saga runs both are remembered, and once it ends neither is."""
    saga = unique("transfers")
    fast = Worker(config, vault, saga, tmp_path)
    slow = Worker(config, vault, saga, tmp_path, decide_delay_s=3)
    sagas = Worker(config, vault, saga, tmp_path, timeout_s=1)
    try:
        fast.start("fast", "--only", vault.name)  # funds the accounts at full speed
        _fund(client, vault)
        fast.stop()
        slow.start("slow", "--only", vault.name)
        sagas.start("sagas", "--only", f"sagas.{saga}")
        sagas.start_saga("t-1", {"from": "acc-0", "to": "acc-1", "amount_cents": 5})
        running = _runner_until(sagas, lambda r: r["sent_here"] == r["claimed"] == 1)
        state = sagas.states(["t-1"], timeout=120)["t-1"]
        ended = _runner_until(sagas, lambda r: r["sent_here"] == r["claimed"] == 0)
    finally:
        sagas.stop()
        slow.stop()
        fast.stop()
    assert state["status"] == "completed", state  # the claimed steps were awaited, not fenced
    assert running["unfenced"] >= 1 and ended["unfenced"] == 2, (running, ended)
    assert (ended["commands"], ended["fenced"], ended["resent"]) == (2, 0, 0), ended


@pytest.mark.timeout(400)
def test_a_saga_id_started_again_on_either_worker_is_answered_by_the_one_that_folds_it(
    config: Config, vault: Decider, unique, tmp_path: Path
) -> None:
    """Two workers share the saga's partitions. A start of a saga id sent to the worker that
    did not fold its partition was checked against that worker's store alone: a repeat with
    other data was answered 202 and appended a second `started` (folded as a duplicate). A
    start naming its id is now answered by the worker that folds the id's partition, whose
    state and own starts know the first one: 409 from either worker, nothing appended."""
    from refold.engine.timetravel import murmur2_partition

    saga = unique("transfers")
    a = Worker(config, vault, saga, tmp_path)
    b = Worker(config, vault, saga, tmp_path)
    first = {"from": "acc-0", "to": "acc-1", "amount_cents": 5}
    other = {**first, "amount_cents": 6}
    try:
        a.start("a")
        b.start("b")
        partitions = Topics(config).partitions(f"{saga}.saga")
        drives([a, b], partitions)
        ids: dict[int, str] = {}  # a saga id in each partition: either worker owns some
        for i in range(1000):
            ids.setdefault(murmur2_partition(f"s-{i}".encode(), partitions), f"s-{i}")
        assert len(ids) == partitions
        for saga_id in ids.values():
            post([a], saga, saga_id, first)
        for worker in (a, b):  # each finds every one (forwarded where the other folds it)
            _states_found(worker, saga, list(ids.values()))
        answers = {
            (saga_id, name, amount): worker.http(
                "POST", f"/sagas/{saga}", {"saga_id": saga_id, "data": data}
            )
            for saga_id in ids.values()
            for name, worker in (("a", a), ("b", b))
            for amount, data in ((5, first), (6, other))
        }
    finally:
        a.stop()
        b.stop()
    for (saga_id, name, amount), (code, body) in answers.items():
        url = f"/sagas/{saga}/{saga_id}"
        if amount == 5:  # the same data: the first answer
            assert (code, body) == (
                202, {"saga_id": saga_id, "status": "running", "status_url": url}
            ), (saga_id, name, body)  # fmt: skip
        else:
            assert code == 409, (saga_id, name, amount, body)
            assert (body["saga_id"], body["status_url"]) == (saga_id, url), body
    # One `started` per saga id, with the first data: no repeat was appended anywhere.
    starts = [
        (k, d["data"]) for k, _t, d in events(config, f"{saga}.saga") if d["kind"] == "started"
    ]
    assert sorted(k for k, _data in starts) == sorted(ids.values()), starts
    assert all(json.loads(data) == first for _k, data in starts), starts


def _states_found(worker: Worker, saga: str, ids: list[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    for saga_id in ids:
        while worker.http("GET", f"/sagas/{saga}/{saga_id}")[0] != 200:
            assert time.monotonic() < deadline, (worker.port, saga_id)
            time.sleep(0.2)
