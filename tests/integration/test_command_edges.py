"""The command path at its edges, against the real broker: records the broker refuses, a
decider slower than the consumer's poll interval or one that never returns, malformed commands
and their ids.

Each test runs `refold worker` (tests/integration/apps/vault.py: the bank's rules on the test's
own topics) and asks for results as a caller would, through `POST /commands` and
`GET /commands/{id}`; the oracles are the event and results topics themselves.
"""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.request
from typing import Any
from urllib.parse import quote

from confluent_kafka import Producer
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    ResourceType,
)
from refold.core.commands import Decider
from refold.core.config import Config
from refold.engine.timetravel import murmur2_partition
from refold.kafka.command_client import CommandClient

from tests.integration.conftest import PARTITIONS
from tests.integration.test_command_ids import two_keys_in_different_partitions
from tests.integration.test_commands import (
    WorkerProcess,
    balances,
    check_log_matches_results,
    read_events,
    read_results,
)

WAIT = "?wait_ms=30000"


def produce_raw(
    config: Config, topic: str, records: list[tuple[bytes, list]], key: bytes = b"acc-1"
) -> list[str]:
    """Write command records around the API, as any Kafka client can (key `acc-1` unless told,
    so they land in its partition); their positions as `<topic>-<partition>-<offset>`."""
    producer = Producer(
        {"bootstrap.servers": config.bootstrap_servers, "partitioner": "murmur2_random"}
    )
    where: list[str] = []

    def delivered(err, msg) -> None:
        assert err is None, err
        where.append(f"{msg.topic()}-{msg.partition()}-{msg.offset()}")

    for value, headers in records:
        producer.produce(topic, value, key, headers=headers, on_delivery=delivered)
        producer.flush(30)  # one at a time: `where` is in the records' order
    return where


def set_max_message_bytes(config: Config, topic: str, limit: int) -> None:
    """Lower what the broker takes on `topic`, as a cluster operator may."""
    entry = ConfigEntry(
        "max.message.bytes", str(limit), incremental_operation=AlterConfigOpType.SET
    )
    resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[entry])
    admin = AdminClient({"bootstrap.servers": config.bootstrap_servers})
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(30)


def incompressible(size: int) -> str:
    """A memo lz4 cannot shrink: the broker checks the compressed batch against its limit."""
    return base64.b64encode(os.urandom(size * 3 // 4)).decode()


def test_an_event_the_topic_refuses_rejects_its_command_and_the_batch_goes_on(
    config: Config, vault: Decider, tmp_path
) -> None:
    """An event topic whose max.message.bytes is below the producer's limit: the broker refused
    the record in the delivery report, the transaction was aborted and the same batch tried
    again for ever, its partition blocked. Now the command whose event is refused is rejected,
    saying why; the other commands of its batch are decided once; the partition goes on.

    The limit is lowered while the worker runs, so the first refusal comes from the broker
    (the processor read the topic's limit at its start); the second command is rejected up
    front, the processor having read the limit again."""
    a, b = two_keys_in_different_partitions()
    worker = WorkerProcess(config, vault, tmp_path / "w", http=True).start()
    try:
        worker.wait_http()

        def post(key: str, type_name: str, data: dict, wait: str = WAIT) -> dict:
            body = {"key": key, "type": type_name, "data": data}
            status, answer = worker.http("POST", f"/commands/{vault.name}{wait}", body)
            assert status == (200 if wait else 202), answer
            return answer

        for key in (a, b):
            assert post(key, "bank.OpenAccount", {"owner": key})["status"] == "accepted"
        set_max_message_bytes(config, vault.events_topic, 20_000)
        # One slow decision keeps the processor busy while the next four queue up: they are
        # decided as one batch, the big one amid the others of its partition.
        post(a, "bank.Deposit", {"amount_cents": 1, "memo": "sleep:3"}, wait="")
        sent = [
            post(a, "bank.Deposit", {"amount_cents": 10}, wait="")["command_id"],
            post(a, "bank.Deposit", {"amount_cents": 20, "memo": incompressible(30_000)}, wait="")[
                "command_id"
            ],
            post(b, "bank.Deposit", {"amount_cents": 30}, wait="")["command_id"],
            post(a, "bank.Deposit", {"amount_cents": 40}, wait="")["command_id"],
        ]
        outcome = {}
        for cid in sent:
            status, outcome[cid] = worker.http("GET", f"/commands/{cid}{WAIT}")
            assert status == 200 and outcome[cid]["status"] != "pending", outcome[cid]
        big = outcome[sent[1]]
        assert big["status"] == "rejected" and big["events"] == [], big
        assert big["reason"].startswith("the broker refused its event: bank.MoneyDeposited is 3")
        assert f"topic {vault.events_topic!r} takes at most 19488" in big["reason"], big
        assert "(max.message.bytes=20000)" in big["reason"], big
        assert [outcome[cid]["status"] for cid in sent] == ["accepted", "rejected"] + [
            "accepted"
        ] * 2
        # known now: refused before anything is sent, with the same limits named
        again = post(a, "bank.Deposit", {"amount_cents": 50, "memo": incompressible(30_000)})
        assert again["status"] == "rejected", again
        assert "produced an invalid event: bank.MoneyDeposited is 3" in again["reason"], again
        assert "(max.message.bytes=20000)" in again["reason"], again
        later = post(a, "bank.Deposit", {"amount_cents": 60, "memo": incompressible(10_000)})
        assert (later["status"], later["version"]) == ("accepted", 5), later
    finally:
        worker.stop()
    events = read_events(config, vault.events_topic)
    check_log_matches_results(events, read_results(config, vault.results_topic))
    assert balances(events)[a] == [0, 1, 11, 51, 111]  # opened, then 1, 10, 40, 60 exactly once
    assert balances(events)[b] == [0, 30]


def test_a_rejection_reason_too_long_for_a_result_record_is_cut(
    config: Config, vault: Decider, client: CommandClient
) -> None:
    """A decider may reject with any reason (or fail with any message); one of 1.2 MB made the
    command's result larger than a record: the producer refused it, and the batch was aborted
    and tried again for ever, every command of it pending. The reason is cut now."""
    from refold.core.commands import Rejected
    from refold.engine.worker import Worker

    class Wordy(type(vault)):  # type: ignore[misc]
        def decide_Deposit(self, command: Any, state: Any) -> Any:
            if command.data.get("memo") == "wordy":
                raise Rejected("no " * 400_000)
            return super().decide_Deposit(command, state)

    wordy = Wordy()
    worker = Worker(config, [], deciders=[wordy])
    worker.start()
    try:
        sent = [
            client.send(wordy.name, "acc-1", "bank.OpenAccount", {"owner": "ada"}),
            client.send(wordy.name, "acc-1", "bank.Deposit", {"amount_cents": 7, "memo": "wordy"}),
            client.send(wordy.name, "acc-1", "bank.Deposit", {"amount_cents": 5}),
        ]
        opened, refused, deposit = (client.wait(cid, 60) for cid in sent)
        outcome = (opened["status"], deposit["status"], deposit.get("version"))
        assert outcome == ("accepted", "accepted", 2), (opened, deposit)
        assert refused["status"] == "rejected", refused
        assert refused["reason"] == "no " * 1333 + "n... (1196000 more characters)"
    finally:
        worker.stop()


def test_a_batch_slower_than_the_poll_interval_is_decided_in_smaller_batches(
    config: Config, vault: Decider, client: CommandClient, tmp_path
) -> None:
    """A batch decided for longer than the consumer's max.poll.interval.ms got the processor
    kicked out of its group: the broker refused the transaction's offsets (UNKNOWN_MEMBER_ID),
    the batch was aborted and decided again, as slowly, for ever. Now a command whose decide
    alone takes half the interval or more is rejected, saying so, and a batch slow only as a
    whole is decided again in smaller batches; every other command is decided once.

    The interval is 6 s (REFOLD_KAFKA_MAX_POLL_INTERVAL_MS; the broker's least session timeout
    is 6 s); the commands are queued before the worker starts, so they come as one batch."""
    a, b = two_keys_in_different_partitions()
    sent = [client.send(vault.name, k, "bank.OpenAccount", {"owner": k}) for k in (a, b)]
    sent.append(client.send(vault.name, a, "bank.Deposit", {"amount_cents": 1}))
    slow = client.send(vault.name, a, "bank.Deposit", {"amount_cents": 2, "memo": "sleep:8"})
    sent.append(client.send(vault.name, a, "bank.Deposit", {"amount_cents": 3}))
    sent.append(client.send(vault.name, b, "bank.Deposit", {"amount_cents": 5}))
    # 7.5 s together, 1.25 s each: only smaller batches fit
    sent += [
        client.send(vault.name, a, "bank.Deposit", {"amount_cents": 10, "memo": "sleep:1.25"})
        for _ in range(6)
    ]
    worker = WorkerProcess(config, vault, tmp_path / "w", http=True)
    worker.env.update(
        REFOLD_KAFKA_MAX_POLL_INTERVAL_MS="6000", REFOLD_KAFKA_SESSION_TIMEOUT_MS="6000"
    )
    worker.start()
    try:
        worker.wait_http()
        status, refused = worker.http("GET", f"/commands/{slow}{WAIT}")
        assert (status, refused.get("status")) == (200, "rejected"), refused
        assert refused["reason"].startswith("decide took 8"), refused
        assert "max.poll.interval.ms (6000 ms)" in refused["reason"], refused
        for cid in sent:
            status, result = worker.http("GET", f"/commands/{cid}{WAIT}")
            assert (status, result.get("status")) == (200, "accepted"), result
        status, later = worker.http(
            "POST",
            f"/commands/{vault.name}{WAIT}",
            {"key": a, "type": "bank.Deposit", "data": {"amount_cents": 100}},
        )
        assert (status, later["status"], later["version"]) == (200, "accepted", 10), later
    finally:
        worker.stop()
    events = read_events(config, vault.events_topic)
    check_log_matches_results(events, read_results(config, vault.results_topic))
    assert balances(events)[a] == [0, 1, 4, 14, 24, 34, 44, 54, 64, 164]
    assert balances(events)[b] == [0, 5]


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


def keys_owned_by(workers: list[WorkerProcess], name: str) -> list[str]:
    """Once the workers' processors share the command partitions, one key per worker in a
    partition it decides (their `/dashboard.json`)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        owned = []
        for worker in workers:
            _status, page = worker.http("GET", "/dashboard.json")
            owned += [set(c["partitions"]) for c in page["commands"] if c["name"] == name]
        if all(owned) and len(set.union(*owned)) == sum(map(len, owned)) == PARTITIONS:
            return [
                next(k for i in range(999) if murmur2_partition((k := f"acc-{i}").encode(),
                                                                PARTITIONS) in mine)
                for mine in owned
            ]  # fmt: skip
        time.sleep(0.5)
    raise AssertionError("the workers did not share the command partitions")


def test_a_malformed_command_claims_its_id_so_no_other_worker_decides_it_again(
    config: Config, vault: Decider, client: CommandClient, tmp_path
) -> None:
    """A malformed command was rejected under its readable id without claiming it: a
    well-formed command with that id on a partition another worker decides was then decided
    as well (its deposit made), two results for one id. Now a malformed record claims its id
    (with a fingerprint of its bytes) like any command: the later one is a conflict, never
    executed; and a malformed record reusing an id won elsewhere gets no result of its own."""
    workers = [WorkerProcess(config, vault, tmp_path / f"w{i}", http=True) for i in (1, 2)]
    try:
        for worker in workers:
            worker.start().wait_http()
        a, b = keys_owned_by(workers, vault.name)
        for key in (a, b):
            opened = client.send(vault.name, key, "bank.OpenAccount", {"owner": key})
            assert client.wait(opened, 60)["status"] == "accepted"
        bad = {"key": a, "type": "bank.Deposit", "data": [7]}  # the data is no object
        record = [(json.dumps({**bad, "command_id": "m-1"}).encode(), [])]
        produce_raw(config, vault.command_topic, record, key=a.encode())
        assert client.wait("m-1", 60)["status"] == "rejected"
        reused = client.send(vault.name, b, "bank.Deposit", {"amount_cents": 7}, command_id="m-1")
        assert client.wait(reused, 60)["status"] == "conflict"
        behind = client.send(vault.name, b, "bank.Deposit", {"amount_cents": 1})
        assert client.wait(behind, 60)["status"] == "accepted"  # decided after the reused id
        # the other way round: the well-formed one first, then a malformed one elsewhere
        won = client.send(vault.name, a, "bank.Deposit", {"amount_cents": 5}, command_id="m-2")
        assert client.wait(won, 60)["status"] == "accepted"
        record = [(json.dumps({**bad, "command_id": "m-2"}).encode(), [])]
        produce_raw(config, vault.command_topic, record, key=b.encode())
        after = client.send(vault.name, b, "bank.Deposit", {"amount_cents": 3})
        assert client.wait(after, 60)["status"] == "accepted"  # decided after the malformed one
    finally:
        for worker in workers:
            worker.stop()
    events = read_events(config, vault.events_topic)
    results = check_log_matches_results(events, read_results(config, vault.results_topic))
    assert (results["m-1"]["key"], results["m-1"]["status"]) == (a, "rejected")
    assert (results["m-2"]["key"], results["m-2"]["status"]) == (a, "accepted")
    assert balances(events) == {a: [0, 5], b: [0, 1, 4]}


def test_an_event_whose_key_makes_its_record_too_large_rejects_its_command(
    config: Config, vault: Decider, tmp_path
) -> None:
    """The processor checked an event's value against the record limit (MAX_EVENT_BYTES), not
    what Kafka counts: key, value and headers. With a 300 kB key, an 860 kB value passed the
    check, the producer refused the 1.16 MB record, and the transaction was aborted and tried
    again for ever, blocking the partition. Now the command is rejected and the key goes on."""
    big_key = "k" * 300_000
    worker = WorkerProcess(config, vault, tmp_path / "w", http=True).start()
    try:
        worker.wait_http()

        def post(key: str, type_name: str, data: dict) -> dict:
            body = {"key": key, "type": type_name, "data": data}
            status, result = worker.http("POST", f"/commands/{vault.name}{WAIT}", body)
            assert status == 200, result  # decided within wait_ms, not 202 pending
            return result

        for key in ("acc-1", big_key):
            assert post(key, "bank.OpenAccount", {"owner": "ada"})["status"] == "accepted"
        # the same value size under a short key fits: it is the key that tips it over
        small = post("acc-1", "bank.Deposit", {"amount_cents": 1, "memo": "pad:860000"})
        assert small["status"] == "accepted", small
        big = post(big_key, "bank.Deposit", {"amount_cents": 2, "memo": "pad:560000"})
        assert big["status"] == "rejected", big
        assert "bank.MoneyDeposited is 116" in big["reason"], big["reason"]
        assert "bytes as a record (key, value and headers)" in big["reason"], big["reason"]
        assert "at most 900000 fit in a record" in big["reason"], big["reason"]
        status, again = worker.http("GET", f"/commands/{big['command_id']}")
        assert (status, again["status"]) == (200, "rejected"), again
        after = post(big_key, "bank.Deposit", {"amount_cents": 3})
        assert (after["status"], after["version"]) == ("accepted", 2), after
    finally:
        worker.stop()
    events = read_events(config, vault.events_topic)
    check_log_matches_results(events, read_results(config, vault.results_topic))
    assert sorted(e.type for e in events if e.key == big_key) == [
        "bank.AccountOpened",
        "bank.MoneyDeposited",
    ]


def hang(client: CommandClient, vault: Decider, key: str) -> str:
    """A command whose decision does not return (for a day: no test waits that long)."""
    return client.send(vault.name, key, "bank.Deposit", {"amount_cents": 1, "memo": "sleep:86400"})


def test_a_decide_that_never_returns_is_given_up_and_the_partitions_go_on(
    config: Config, vault: Decider, client: CommandClient, tmp_path
) -> None:
    """A decide stuck in one command held the processor's only thread: none of its partitions
    was decided again, and nothing said why. Now the decision is given up after
    REFOLD_DECIDE_TIMEOUT_S, the command rejected saying so, every other command decided once;
    /healthz and /metrics show the thread left behind."""
    a, b = two_keys_in_different_partitions()
    worker = WorkerProcess(config, vault, tmp_path / "w", http=True)
    worker.env["REFOLD_DECIDE_TIMEOUT_S"] = "3"
    worker.start()
    try:
        worker.wait_http()
        for key in (a, b):
            opened = client.send(vault.name, key, "bank.OpenAccount", {"owner": key})
            assert client.wait(opened, 60)["status"] == "accepted"
        stuck = hang(client, vault, a)
        sent = [client.send(vault.name, k, "bank.Deposit", {"amount_cents": c})
                for k, c in ((a, 10), (b, 30), (a, 20))]  # fmt: skip
        given_up = client.wait(stuck, 60)
        assert given_up["status"] == "rejected", given_up
        assert given_up["reason"].startswith("decide did not return within 3 s"), given_up
        assert [client.wait(cid, 60)["status"] for cid in sent] == ["accepted"] * 3
        later = client.wait(client.send(vault.name, a, "bank.Deposit", {"amount_cents": 100}), 60)
        assert (later["status"], later["version"]) == ("accepted", 4), later
        status, health = worker.http("GET", "/healthz")
        assert (status, health["stuck_decisions"]) == (200, {vault.name: 1}), health
        with urllib.request.urlopen(f"http://127.0.0.1:{worker.port}/metrics") as response:
            metrics = response.read().decode()
        label = f'{{aggregate="{vault.name}"}}'
        assert f"refold_command_decide_timeouts_total{label} 1\n" in metrics
        assert f"refold_command_stuck_decisions{label} 1\n" in metrics
    finally:
        worker.stop()
    assert "did not return within 3 s" in worker.log.read_text()
    events = read_events(config, vault.events_topic)
    results = check_log_matches_results(events, read_results(config, vault.results_topic))
    assert results[stuck]["status"] == "rejected"
    assert balances(events)[a] == [0, 10, 30, 130]
    assert balances(events)[b] == [0, 30]


def test_a_decide_still_stuck_when_its_worker_is_killed_is_given_up_after_the_restart(
    config: Config, vault: Decider, client: CommandClient, tmp_path
) -> None:
    """kill -9 while a decision hangs, before its command's rejection is committed: the
    restarted worker decides it again, gives it up again after the timeout and rejects it
    once; the commands queued behind it are decided once."""
    worker = WorkerProcess(config, vault, tmp_path / "w", http=True)
    worker.env["REFOLD_DECIDE_TIMEOUT_S"] = "6"
    worker.start()
    worker.wait_http()
    opened = client.send(vault.name, "acc-1", "bank.OpenAccount", {"owner": "ada"})
    assert client.wait(opened, 60)["status"] == "accepted"
    stuck = hang(client, vault, "acc-1")
    behind = client.send(vault.name, "acc-1", "bank.Deposit", {"amount_cents": 10})
    time.sleep(2)  # the decision is under way, well within its 6 s
    worker.kill9()
    assert client.wait(stuck, 0.1)["status"] == "pending"
    worker.start()
    try:
        given_up = client.wait(stuck, 90)
        assert given_up["status"] == "rejected", given_up
        assert given_up["reason"].startswith("decide did not return within 6 s"), given_up
        assert client.wait(behind, 60)["status"] == "accepted"
    finally:
        worker.stop()
    events = read_events(config, vault.events_topic)
    results = check_log_matches_results(events, read_results(config, vault.results_topic))
    assert {cid: r["status"] for cid, r in results.items()} == {
        opened: "accepted",
        stuck: "rejected",
        behind: "accepted",
    }
    assert balances(events)["acc-1"] == [0, 10]


def test_a_poll_interval_below_the_session_timeout_is_the_command_processor_s_alone(
    config: Config, vault: Decider, client: CommandClient, tmp_path
) -> None:
    """REFOLD_KAFKA_MAX_POLL_INTERVAL_MS went to every client: at 7 s, below librdkafka's
    45 s session timeout that the claims index, the readers and the results index keep, those
    consumers could not be created ("`max.poll.interval.ms`must be >= `session.timeout.ms`")
    and the worker did not start. It is the command processor's batch budget only now (its
    session timeout follows it down); the other clients keep librdkafka's default."""
    worker = WorkerProcess(config, vault, tmp_path / "w", http=True)
    worker.env["REFOLD_KAFKA_MAX_POLL_INTERVAL_MS"] = "7000"
    worker.start()
    try:
        worker.wait_http()
        opened = client.send(vault.name, "acc-1", "bank.OpenAccount", {"owner": "ada"})
        assert client.wait(opened, 60)["status"] == "accepted"
    finally:
        worker.stop()
    assert "must be >=" not in worker.log.read_text()
