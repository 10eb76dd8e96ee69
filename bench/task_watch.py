"""What a task benchmark reads back from a queue's status topic: when each task succeeded, its
batch, and (while asked) when each of its transitions was produced, for where its time goes."""

from __future__ import annotations

import logging
import threading
import time
import uuid

from confluent_kafka import Consumer, TopicPartition
from refold.core.config import Config
from refold.kafka.registry import codec_for

from bench.common import latency_summary

log = logging.getLogger("bench.tasks")


#: The transitions whose first event's time (the record's CreateTime) `StatusWatch.steps` notes.
STEPS = ("accepted", "dispatched", "running", "succeeded")


class StatusWatch:
    """Reads a queue's status topic (read_committed, as the projection does) and notes when each
    watched task's first `succeeded` arrived, and its batch; while `steps` is on, also when each
    task's first `accepted`, `dispatched`, `running` and `succeeded` events were produced (ms
    since the epoch), for where a task's time goes."""

    def __init__(self, config: Config, topic: str, partitions: int) -> None:
        self.codec = codec_for(config)
        self.done: dict[str, float] = {}
        self.batches: dict[str, str] = {}
        self.steps = False
        self.times: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()
        group = f"bench-watch-{uuid.uuid4().hex[:8]}"
        self._consumer = Consumer(
            config.kafka(
                **{
                    "group.id": group,
                    "isolation.level": "read_committed",
                    "enable.auto.commit": False,
                }
            )
        )
        self._consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        self._thread = threading.Thread(target=self._run, name="status-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        decode, done, batches = self.codec.decode, self.done, self.batches
        consumer = self._consumer
        while not self._stop.is_set():
            # The first record at once, then what else is there: consume(5000, 0.05) alone
            # held every record until 5,000 came or 50 ms passed (at 600 tasks/s, 0-50 ms added
            # to each task's read-back time, ~25 ms at p50: the bench's cost, not refold's).
            first = consumer.poll(0.05)
            if first is None:
                continue
            msgs = [first, *consumer.consume(5000, 0)]
            now = time.monotonic()
            for msg in msgs:
                value = msg.value()
                if msg.error() is not None or not value:
                    continue
                if self.steps:
                    _, data = decode(value)
                    if data["status"] in STEPS:
                        noted = self.times.setdefault(data["task_id"], {})
                        noted.setdefault(data["status"], msg.timestamp()[1])
                elif b"succeeded" not in value:
                    continue  # Avro strings are plain UTF-8: skip the other statuses undecoded
                else:
                    _, data = decode(value)
                if data["status"] == "succeeded" and data["task_id"] not in done:
                    done[data["task_id"]] = now
                    batches[data["task_id"]] = data.get("batch_id") or ""

    def wait(self, ids: list[str], timeout: float) -> float | None:
        """Monotonic time of the last of `ids` to succeed; None on timeout."""
        deadline = time.monotonic() + timeout
        for task_id in ids:
            while task_id not in self.done:
                if time.monotonic() > deadline:
                    missing = sum(1 for i in ids if i not in self.done)
                    log.error("%d of %d tasks unfinished after %.0f s", missing, len(ids), timeout)
                    return None
                time.sleep(0.01)
        return max(self.done[i] for i in ids)

    def merge_factor(self, ids: list[str]) -> float:
        batches = {self.batches[i] for i in ids if i in self.batches}
        return len(ids) / len(batches) if batches else float("nan")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._consumer.close()


def task_steps(
    watch: StatusWatch, ids: list[str], started: dict[str, float]
) -> dict[str, dict[str, float]]:
    """p50/p99 of each step of the tasks' trips: due -> `accepted` produced (the intake: claim,
    read-back, append), -> `dispatched` (the dispatcher's merge window and transaction), ->
    `running` (the work item's commit, a task worker's fetch), -> `succeeded` (the handler and
    the status append), -> read here (the status transaction's commit, this read)."""
    to_wall = time.time() - time.monotonic()  # one machine: monotonic -> epoch seconds
    legs: dict[str, list[float]] = {}
    for task_id in ids:
        at = watch.times.get(task_id, {})
        if len(at) < len(STEPS) or task_id not in watch.done:
            continue
        marks = [(started[task_id] + to_wall) * 1000, *(at[k] for k in STEPS)]
        marks.append((watch.done[task_id] + to_wall) * 1000)
        names = ["intake", "to_dispatched", "to_running", "to_succeeded", "to_read"]
        for name, begin, end in zip(names, marks, marks[1:], strict=False):
            legs.setdefault(name, []).append((end - begin) / 1000)
    out = {}
    for name, values in legs.items():
        summary = latency_summary(values)
        out[name] = {"p50": round(summary["p50"], 1), "p99": round(summary["p99"], 1)}
    return out
