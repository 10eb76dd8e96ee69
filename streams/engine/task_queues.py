"""The task queues a `refold worker` runs: per queue, its built-in status projection (a runner
like any other, named `tasks.<queue>`), a dispatcher and a reconciler; and the reads, submits and
cancels the HTTP routes call.

The worker mounts this in three places: the status projections join its projections, the
queue topics are ensured before its source check, and `start`/`stop` follow its own.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from refold.core.config import Config
from refold.core.errors import CommandError, InputError, TaskConflict, TaskError
from refold.core.serde import Codec
from refold.core.task_status import (
    TaskStatusProjection,
    apply_status,
    initial_status,
    public_status,
    status_projection,
    status_projection_name,
)
from refold.core.tasks import STATUSES, TERMINAL, Submission, TaskQueue
from refold.engine.claims import ClaimRequest, ClaimsIndex
from refold.engine.dispatcher import Dispatcher
from refold.engine.frozen import Serving
from refold.engine.membership import worker_id
from refold.engine.reconciler import Reconciler
from refold.kafka.task_answers import Accepted, Pending
from refold.kafka.task_log import TaskClient, Verdict, ensure_task_topics, intake_holds
from refold.kafka.topics import Topics

log = logging.getLogger(__name__)

#: How long a status read waits for the projection to fold a task this worker just accepted.
RYW_WAIT_S = 2.0
#: How long another node's claim of a task id may go without its task on the intake before a
#: repeat here queues it (that node died between claim and append): past the producer's
#: message timeout (60 s), its append can no longer land.
TAKEOVER_AFTER_S = 65.0
#: How far before its claim a task's intake record is looked for (clocks of two nodes).
CLOCK_MARGIN_MS = 5_000
#: How long a repeat of a task id another node claimed looks for its intake record (its append
#: lands milliseconds after its claim, unless that node is gone) before answering 503.
SETTLE_S = 3.0


def claim_task_id(index: ClaimsIndex, claimer: str, queue: str, submission: Submission) -> bool:
    """Claim a new task id for `claimer` (a data dir's worker id, so its claims still count as
    its own after a restart): True when its claim is the first (append the task), False when
    another's claim of the same body is (a repeat: append nothing); TaskConflict for another
    body, TaskError when the claims topic cannot be written or read."""
    request = ClaimRequest(
        submission.task_id, submission.fingerprint, submission.key, queue, claimer
    )
    try:
        first = index.claim([request])[submission.task_id]
    except (CommandError, KeyError) as exc:
        raise TaskError(f"task id {submission.task_id!r} could not be claimed: {exc}") from exc
    _same_body(first, submission)
    return bool(first.get("claimer") == claimer)


def _same_body(first: dict[str, Any], submission: Submission) -> None:
    """TaskConflict unless the winning claim names this submission's body."""
    if first["fingerprint"] != submission.fingerprint:
        raise TaskConflict(
            f"task id {submission.task_id!r} was submitted before with another body "
            f"(first claimed with key {first.get('key')!r})",
            hint="use a new task id for another task",
        )


def claims_index(config: Config, queue: TaskQueue, path: Path) -> ClaimsIndex:
    """The (not yet started) index of a queue's task-id claims, stored at `path`."""
    group = config.group("tasks", queue.name, "ids")
    return ClaimsIndex(config, queue.claims_topic, group, queue.id_retention_ms, path)


class TaskService:
    """The task queues of one worker process."""

    def __init__(self, config: Config, codec: Codec, queues: Mapping[str, TaskQueue]) -> None:
        self.config = config
        self.codec = codec
        self.queues = dict(queues)
        self.projections: list[TaskStatusProjection] = [
            status_projection(q) for q in self.queues.values()
        ]
        self.dispatchers: dict[str, Dispatcher] = {}
        self.reconcilers: dict[str, Reconciler] = {}
        self._runners: Mapping[str, Serving] = {}
        self._threads: list[threading.Thread] = []
        self._client: TaskClient | None = None
        self._client_lock = threading.Lock()
        self._partitions: dict[str, int] = {}
        # Task-id claims (refold.engine.claims): the first intake node to claim an id queues it.
        # A claim names this process run (`<worker id>/<run>`): a claim from another run, of
        # this data dir or another node's, may have been left by a crash before its append.
        self._worker = worker_id(config)
        self._claimer = f"{self._worker}/{uuid.uuid4().hex[:12]}"
        self.claims: dict[str, ClaimsIndex] = {}
        self.takeover_after_s = TAKEOVER_AFTER_S

    def ensure_topics(self, topics: Topics) -> None:
        if not self.queues:
            return
        ensure_task_topics(topics, self.queues)
        for q in self.queues.values():
            self._partitions[q.name] = topics.partitions(q.status_topic)

    def start(self, runners: Mapping[str, Serving]) -> None:
        """Dispatchers and reconcilers; `runners` is the worker's live runner per projection
        (looked up at each use: a replay swap replaces the entry)."""
        self._runners = runners
        for name, queue in self.queues.items():
            path = self.config.data_dir / "tasks" / name / "ids"
            self.claims[name] = claims_index(self.config, queue, path).start()
        if self.queues:
            self.client.register()  # so a submit never waits for the registry (on a loop)
        for name, queue in self.queues.items():
            dispatcher = Dispatcher(self.config, self.codec, queue)
            reconciler = Reconciler(
                self.config,
                self.codec,
                queue,
                lambda n=name: self.runner(n),  # type: ignore[misc]
                partitions=self._partitions[name],
            )
            self.dispatchers[name] = dispatcher
            self.reconcilers[name] = reconciler
            for what, target in (("dispatch", dispatcher.run), ("reconcile", reconciler.run)):
                thread = threading.Thread(target=target, name=f"{what}-{name}", daemon=True)
                self._threads.append(thread)
                thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        for dispatcher in self.dispatchers.values():
            dispatcher.stop()
        for reconciler in self.reconcilers.values():
            reconciler.stop()
        for thread in self._threads:
            thread.join(timeout)
        if self._client is not None:
            self._client.close()
        for index in self.claims.values():
            index.stop()

    # -- what the HTTP routes call ------------------------------------------------------------

    def runner(self, queue: str) -> Serving:
        return self._runners[status_projection_name(queue)]

    def queue(self, name: str) -> TaskQueue:
        try:
            return self.queues[name]
        except KeyError:
            known = ", ".join(sorted(self.queues)) or "none"
            raise InputError(f"unknown task queue {name!r}; known: {known}") from None

    @property
    def client(self) -> TaskClient:
        with self._client_lock:
            if self._client is None:
                self._client = TaskClient(
                    self.config,
                    self.queues,
                    codec=self.codec,
                    known=self._state,
                    claim_many=self._claim_many,
                )
            return self._client

    def _claim_many(self, queue: str, subs: Sequence[Submission]) -> list[Verdict]:
        """Claim new task ids together (a TaskClient claims thread calls this with every
        id that waited for the previous round): per id, append it, a repeat, or its error."""
        requests = [
            ClaimRequest(s.task_id, s.fingerprint, s.key, queue, self._claimer) for s in subs
        ]
        try:
            won = self.claims[queue].claim(requests)
        except CommandError as exc:
            return [TaskError(f"task ids could not be claimed: {exc}")] * len(subs)
        out: list[Verdict] = []
        for submission in subs:
            first = won.get(submission.task_id)
            try:
                if first is None:
                    raise TaskError(f"task id {submission.task_id!r} could not be claimed")
                _same_body(first, submission)
                if first.get("claimer") == self._claimer:
                    out.append(True)
                else:  # rare: it reads the intake (off the claims threads)
                    out.append(partial(self._unqueued, queue, submission, first))
            except TaskError as exc:
                out.append(exc)
        return out

    def _unqueued(self, queue: str, submission: Submission, first: dict[str, Any]) -> bool:
        """A repeat of a task id another run claimed first, for the same body: whether to queue
        it here (True), because that run died between its claim and its append (the intake
        holds no record of the task since the claim). Answered as a repeat when the intake has
        it (looked for again for up to SETTLE_S: a live claimer's append is on its way);
        TaskError (retry later) while another node's append may still land."""
        task_id = submission.task_id
        claimed_ms = int(first.get("claimed_at_ms") or 0)
        q = self.queues[queue]
        claimer = str(first.get("claimer") or "")
        mine = claimer.split("/")[0] == self._worker  # this data dir's previous run: it died
        settle = time.monotonic() + (0 if mine else SETTLE_S)
        while True:
            since = claimed_ms - CLOCK_MARGIN_MS
            if intake_holds(self.config, self.codec, q, submission, since):
                return False
            if time.monotonic() >= settle:
                break
            time.sleep(0.1)
        age_s = time.time() - claimed_ms / 1000
        if not mine and age_s < self.takeover_after_s:
            raise TaskError(
                f"task id {task_id!r} was claimed by {claimer or 'another node'} {age_s:.0f} s "
                "ago and is not queued yet",
                hint=f"retry later: after {self.takeover_after_s:g} s this node queues it",
            )
        log.warning(
            "task %s/%s: claimed by %s %.0f s ago, never queued: queued here",
            queue, task_id, claimer or "another node", age_s,
        )  # fmt: skip
        return True

    def _state(self, queue: str, task_id: str) -> dict[str, Any] | None:
        state: dict[str, Any] | None = self.runner(queue).store.get(task_id)
        return state

    def submit(self, queue: str, obj: Any) -> Accepted:
        """Check and append one task (InputError for bad input, TaskError if not acked)."""
        return self.submit_nowait(queue, obj).wait()

    def submit_nowait(self, queue: str, obj: Any) -> Pending:
        """Check and append one task (InputError for bad input) without waiting for Kafka:
        the answer is final when the Pending is done."""
        client = self.client
        submission: Submission = client.prepare(queue, obj)
        return client.submit_nowait(queue, [submission])[0]

    def status(self, queue: str, task_id: str) -> dict[str, Any] | None:
        """The task's status as the status projection has folded it (None: not yet, or never)."""
        self.queue(queue)
        state = self._state(queue, task_id)
        return None if state is None else public_status(state)

    def submitted(self, queue: str, task_id: str) -> bool:
        """Whether this worker's intake accepted the task recently (its status is due)."""
        client = self._client
        return client is not None and client.remembered(queue, task_id) is not None

    def status_after_submit(
        self, queue: str, task_id: str, wait_s: float = RYW_WAIT_S
    ) -> dict[str, Any] | None:
        """Read-your-writes for a task this worker accepted: wait (at most `wait_s`) until the
        status projection has folded its `accepted` event, when this worker folds that
        partition; else, or if the fold is behind, answer that event folded alone, so a read
        after the 202 is never a 404. May block: off the event loop."""
        client = self._client
        seen = None if client is None else client.remembered(queue, task_id)
        if seen is None:
            return self.status(queue, task_id)
        runner = self.runner(queue)
        tp = (seen.topic, seen.partition)
        if tp in runner.stats.assigned and runner.wait_for({tp: seen.offset}, wait_s):
            state = self._state(queue, task_id)
            if state is not None:
                return public_status(state)
        return public_status(apply_status(initial_status(task_id), seen.event, seen.at_ms))

    def list(
        self,
        queue: str,
        status: str | None,
        after: str | None,
        limit: int,
        only: Callable[[str], bool] | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """A page of tasks in id order, optionally only those with `status` (and with `only`,
        those whose id it accepts: the status partitions folded here); and the next `after`
        (None at the end)."""
        self.queue(queue)
        if status is not None and status not in STATUSES:
            raise InputError(f"status must be one of {', '.join(STATUSES)}, not {status!r}")
        store = self.runner(queue).store
        found: list[dict[str, Any]] = []
        cursor = after
        while len(found) < limit:
            page = store.scan("", cursor, 1000)
            for task_id, state in page:
                cursor = task_id
                if only is not None and not only(task_id):
                    continue
                if status is None or state.get("status") == status:
                    found.append(public_status(state))
                    if len(found) == limit:
                        return found, task_id
            if len(page) < 1000:
                return found, None
        return found, cursor

    def cancel(self, queue: str, task_id: str) -> dict[str, Any]:
        """Cancel a task that has not ended; TaskError names its end otherwise."""
        self.queue(queue)
        state = self._state(queue, task_id)
        if state is None:
            raise InputError(f"no task {task_id!r} in queue {queue!r}")
        if state["status"] in TERMINAL:
            raise TaskError(f"task {task_id!r} already ended {state['status']}")
        self.client.cancel(queue, [task_id, *state.get("parts", ())])
        return {"task_id": task_id, "status": "cancelled"}
