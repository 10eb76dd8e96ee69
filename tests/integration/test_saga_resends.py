"""What a saga runner re-sends, and what it remembers, when it drives many waiting sagas
(refold.engine.saga_runner), against the real broker.

The runner sweeps a real RocksDB store of saga states written by the test (as its state
projection would have folded them: each saga's first step sent, its result not come) and sends
to a decider whose processor does not run, so the sagas wait. The oracle: the runner's own
counters, and the command topic's record count."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from refold.core.commands import Decider
from refold.core.config import Config
from refold.core.saga_decision import advance
from refold.core.sagas import apply_event, initial_state
from refold.engine import saga_runner
from refold.engine.saga_runner import SagaRunner
from refold.engine.timetravel import murmur2_partition
from refold.examples.bank import Transfers
from refold.kafka.command_client import CommandClient, ResultsIndex
from refold.kafka.registry import codec_for
from refold.kafka.saga_log import ensure_saga_topics
from refold.kafka.topics import Topics
from refold.store.rocksdb import RocksStore

#: More waiting sagas than the runner once remembered (10,000: past that it forgot the oldest,
#: re-sent them on the next sweep and remembered them in place of others, every sweep).
WAITING = 10_050
NEW = 20  # sagas started, no step sent yet: the runner appends their `step_sent`


def _states(saga: Transfers, now_ms: int) -> dict[str, dict[str, Any]]:
    """WAITING sagas whose first step was sent (by a runner before this one), NEW just started."""
    data = json.dumps({"from": "acc-0", "to": "acc-1", "amount_cents": 5})
    states = {}
    for i in range(WAITING + NEW):
        saga_id = f"s-{i}"
        state = initial_state(saga_id)
        apply_event(saga, state, {"kind": "started", "data": data})
        if i < WAITING:
            for event in advance(saga, state, lambda _cid: None, now_ms).events:
                apply_event(saga, state, event)
        states[saga_id] = state
    return states


@pytest.mark.timeout(300)
def test_a_runner_resends_each_waiting_command_once_a_bounded_number_a_sweep(
    config: Config, vault: Decider, client: CommandClient, unique, tmp_path: Path, monkeypatch
) -> None:
    """A runner that takes over 10,050 waiting sagas re-sends each one's command once, at
    most RESEND_PER_SWEEP a sweep (4,000 here), then nothing however often it sweeps; it
    re-sent all at once and then 50 more on every sweep, for ever. When it loses a partition
    it forgets that partition's sagas at once: the commands it sent and the events it
    appended and waits to see folded (`_pending` kept those for ever)."""
    monkeypatch.setattr(saga_runner, "RESEND_PER_SWEEP", 4000)
    saga = type("Waits", (Transfers,), {"name": unique("transfers"), "aggregate": vault.name})()
    topics = Topics(config)
    ensure_saga_topics(topics, {saga.name: saga})
    partitions = topics.partitions(saga.topic)
    store = RocksStore.open(tmp_path / "states")
    states = _states(saga, int(time.time() * 1000))
    store.commit(states, {})
    owned = SimpleNamespace(assigned=tuple((saga.topic, p) for p in range(partitions)))
    serving = SimpleNamespace(stats=owned, store=store)
    results = ResultsIndex(
        config,
        [vault.results_topic],
        store_path=tmp_path / "results",
        window_ms=vault.result_retention_ms,
    ).start()
    runner = SagaRunner(
        config,
        codec_for(config),
        saga,
        lambda: serving,
        partitions=partitions,
        commands=client,
        results=results,
        claims=lambda _aggregate: None,
    )
    runner._log.register(runner._producer)  # as run() does before its first sweep
    try:
        resent, deferred = [], []
        for _ in range(5):
            runner.sweep(int(time.time() * 1000))
            resent.append(runner.stats.resent)
            deferred.append(runner.stats.resend_deferred)
        assert resent == [4000, 8000, WAITING, WAITING, WAITING]
        assert deferred == [WAITING - 4000, WAITING - 8000, 0, 0, 0]
        assert runner.stats.commands == WAITING + NEW  # the new ones sent once, not re-sent
        assert runner.stats.sent_here == WAITING + NEW
        assert runner.stats.unfolded == NEW  # this store folds nothing: never seen folded

        # Partition 0 moves to another worker: its sagas are forgotten, nothing of them sent.
        owned.assigned = tuple((saga.topic, p) for p in range(1, partitions))
        runner.sweep(int(time.time() * 1000))
        kept = {s for s in states if murmur2_partition(s.encode(), partitions) != 0}
        assert runner.stats.sent_here == len(kept)
        assert runner.stats.unfolded == len(
            kept & {f"s-{i}" for i in range(WAITING, WAITING + NEW)}
        )
        assert set(runner._pending) <= kept
        assert (runner.stats.resent, runner.stats.commands) == (WAITING, WAITING + NEW)
    finally:
        runner.stop()
        results.stop()
        store.close()
    # what the counters say is what the command topic holds: each command once, no more
    assert sum(topics.end_offsets(vault.command_topic).values()) == WAITING + NEW
