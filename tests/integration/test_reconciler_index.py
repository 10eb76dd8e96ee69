"""The reconciler's due index: a tick looks at the due tasks only, not at every task.

A real status runner (not started: its store is written here, as its fold would, and its commit
hook called) and a real reconciler whose actions are recorded instead of produced. The oracle is
computed from the states the test writes.
"""

from __future__ import annotations

from typing import Any

from refold.core.config import Config
from refold.core.task_status import status_projection
from refold.engine.reconciler import RECHECK_MS, Reconciler
from refold.engine.runtime import ProjectionRunner
from refold.engine.timetravel import murmur2_partition
from refold.kafka import clients
from refold.kafka.registry import codec_for
from refold.store.memory import MemoryStore
from refold.tasks import TaskQueue


class Slow(TaskQueue):
    name = "slow"
    timeout_s = 10
    retry_backoff_s = 1.0
    max_attempts = 3

    def handle(self, batch):
        return None


def _state(task_id: str, status: str, attempts: int, updated_ms: int) -> dict[str, Any]:
    return {"task_id": task_id, "status": status, "attempts": attempts, "updated_ms": updated_ms}


def test_a_tick_reads_only_the_due_tasks_and_follows_the_fold(config: Config) -> None:
    queue = Slow()
    codec = codec_for(config)
    store = MemoryStore()
    runner = ProjectionRunner(
        config, codec, status_projection(queue), dead_letters=clients.producer(config), store=store
    )
    topic = queue.status_topic
    runner.stats.assigned = tuple((topic, p) for p in range(6))
    reconciler = Reconciler(config, codec, queue, lambda: runner, partitions=6)
    acted: list[str] = []
    reconciler._reconcile = lambda task_id, state, now, acks: acted.append(task_id)  # type: ignore[method-assign]
    read: list[str] = []
    get_many = store.get_many
    store.get_many = lambda keys: (read.extend(keys), get_many(keys))[1]  # type: ignore[method-assign]

    states = {f"done-{i}": _state(f"done-{i}", "succeeded", 1, 0) for i in range(5000)}
    running = {f"run-{i}": _state(f"run-{i}", "running", 1, 0) for i in range(10)}
    failed = {f"fail-{i}": _state(f"fail-{i}", "failed", 1, 0) for i in range(5)}
    store.commit({**states, **running, **failed}, {(topic, 0): 1})

    reconciler.sweep(500)  # builds the index by one scan; nothing is due yet
    assert acted == [] and reconciler.stats.open == 15
    read.clear()
    reconciler.sweep(1000)  # the failed ones, after their 1 s backoff
    assert sorted(acted) == sorted(failed) and sorted(read) == sorted(failed)

    # The fold moves one running task to succeeded: the hook tells the index.
    store.commit({"run-0": _state("run-0", "succeeded", 1, 900)}, {(topic, 0): 2})
    runner.on_commit(["run-0"])  # what the runner's write does after each commit
    acted.clear()
    read.clear()
    reconciler.sweep(10_000)
    assert sorted(acted) == sorted({*running, *failed} - {"run-0"})  # failed: looked at again
    assert set(read) == {"run-0", *acted}  # the changed key, then the due ones: never "done-*"
    assert reconciler.stats.open == 14
    acted.clear()
    reconciler.sweep(10_000 + RECHECK_MS - 1)
    assert acted == []

    # Half the partitions: the index is rebuilt for the owned ones only.
    owned = {0, 1, 2}
    runner.stats.assigned = tuple((topic, p) for p in sorted(owned))
    reconciler.sweep(20_000)
    mine = {t for t in {*running, *failed} - {"run-0"} if murmur2_partition(t.encode(), 6) in owned}
    assert set(acted) == mine and reconciler.stats.open == len(mine)
