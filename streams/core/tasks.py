"""The task API: a queue declared in user code, the tasks its handler receives, and intake checks.

A `TaskQueue` names three topics (`<name>.tasks` intake, `<name>.work` work items, `<name>.status`
status events keyed by task id) plus `<name>.dead` for tasks that can never succeed. Everything
here is pure: the dispatcher, workers and reconciler in `refold.engine` do the I/O, and the batch
planner (`plan_batches`) is a function of the submitted tasks alone, so it is unit-tested
without Kafka.

The handler idempotency contract: a task may be handed to `handle` more than once (a worker died
after the handler ran, a status was lost, the reconciler re-drove it after `timeout_s`); the first
`succeeded` status counts and later ones change nothing. A handler must therefore make its effect
idempotent by `task.id` (an upsert keyed by it, a check-then-write in one transaction, an
idempotency key passed to the downstream API).
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from refold.core.config import BUNDLED_SCHEMAS
from refold.core.errors import InputError, TaskError
from refold.core.strict_json import NOT_FINITE_HINT, not_finite, strict_json

log = logging.getLogger(__name__)

#: The Avro schemas of the task events, shipped in the package and loaded by every codec.
TASK_SCHEMAS = Path(BUNDLED_SCHEMAS) / "tasks"
SUBMITTED = "refold.tasks.TaskSubmitted"
WORK_ITEM = "refold.tasks.WorkItem"
STATUS = "refold.tasks.TaskStatus"

#: Statuses after which nothing changes a task (the first one wins).
TERMINAL = frozenset({"succeeded", "dead", "cancelled"})
STATUSES = (
    "accepted",
    "dispatched",
    "running",
    "succeeded",
    "failed",
    "retrying",
    "dead",
    "cancelled",
)
MAX_TASK_ID = 200
#: Kafka's 249 characters for a topic name, less the longest suffix, `.cancels`.
MAX_QUEUE_NAME = 241
MAX_DATA_BYTES = 256 * 1024
#: At most this much (task data as JSON, ids and keys) in one merged work item, beside
#: `merge_max`: a work item is one Kafka record, and a few tasks near MAX_DATA_BYTES with one
#: merge key passed the producer's message.max.bytes (1 MB), so the dispatcher's transaction
#: failed and was redone with the same window for good. A lone task always fits.
MAX_BATCH_BYTES = 512 * 1024


class Retry(Exception):
    """Raised by a handler: this attempt failed, try again after the backoff (up to
    `max_attempts`). Any other exception does the same; Retry just says it was expected."""


#: Reports a task's progress: (task, the progress as `Task.progress` builds it).
ProgressSink = Callable[["Task", dict[str, Any]], None]


@dataclass(slots=True)
class Task:
    """One task as a handler sees it.

    - `cancelled()` says whether a cancel arrived since it was handed over (a long handler may
      check it and stop early; a task whose handler was told ends `cancelled`);
    - `progress(done, total, message)` reports how far it got: a `progress` status event, shown
      by `GET /tasks/{queue}/{id}`; it also counts as a sign of life for `timeout_s`;
    - `result`, when the handler sets it, is this task's own result (else the batch's return
      value is every task's result): a merged batch answers each task apart.
    """

    id: str
    key: str
    data: dict[str, Any]
    attempt: int = 1
    parent_id: str | None = None
    _cancelled: Callable[[str], bool] = field(default=lambda _id: False, repr=False)
    _progress: ProgressSink | None = field(default=None, repr=False)
    result: Any = None
    _told: bool = field(default=False, repr=False)

    def cancelled(self) -> bool:
        if not self._told and self._cancelled(self.id):
            self._told = True  # the worker ends it `cancelled`, whatever handle returns
        return self._told

    @property
    def told_cancelled(self) -> bool:
        """Whether `cancelled()` said yes to the handler (what the worker reports)."""
        return self._told

    def progress(self, done: float, total: float | None = None, message: str | None = None) -> None:
        """Report progress: `task.progress(3, 10, "3 of 10 months")`, or a fraction,
        `task.progress(0.3)`. Each call is one status event: report at a human pace."""
        report: dict[str, Any] = {"done": done}
        if total is not None:
            report["total"] = total
        if message is not None:
            report["message"] = str(message)
        if self._progress is not None:
            self._progress(self, report)


class TaskQueue:
    """Subclass, set `name`, override `handle(batch)`; optionally `merge_key` and `split`."""

    name: ClassVar[str] = ""
    #: A data field: tasks with the same value are merged into one batch (None: no merging).
    merge_key: ClassVar[str | None] = None
    merge_window_ms: ClassVar[int] = 200
    merge_max: ClassVar[int] = 100
    max_attempts: ClassVar[int] = 3
    #: A running task with no status for this long (a hung handler, a worker that died
    #: mid-run): the reconciler re-drives it.
    timeout_s: ClassVar[float] = 30.0
    #: A dispatched (or re-driven) task that no worker started for this long is re-driven too.
    #: Longer than timeout_s: the share group itself hands a dead worker's items to another
    #: when their record lock expires, and time spent waiting behind a backlog is no failure
    #: (re-driving it only lengthens the queue: measured, 3,647 of 5,000 tasks dead with a 20 s
    #: timeout counted from dispatch under a backlog).
    queued_timeout_s: ClassVar[float] = 600.0
    #: Wait before attempt n+1 after a failure: retry_backoff_s * 2**(n-1), at most 60 s.
    retry_backoff_s: ClassVar[float] = 1.0
    #: The task-id idempotency window: a repeat within it queues nothing (7 days).
    id_retention_ms: ClassVar[int] = 7 * 24 * 3600 * 1000
    partitions: ClassVar[int] = 6
    #: Partitions of the work topic. One by default: a share group's assignor gives each
    #: partition to one member while there are no more members than partitions, so a worker
    #: busy with a long handler holds back every item in its partitions (measured: re-driven
    #: items waited behind a hung handler past timeout_s). One partition is shared by every
    #: task worker, so a free one takes the next item.
    work_partitions: ClassVar[int] = 1

    def split(self, data: dict[str, Any]) -> list[dict[str, Any]] | None:
        """One task's data into parts that run separately (None: keep it whole)."""
        return None

    def handle(self, batch: list[Task]) -> dict[str, Any] | None:
        """Do the work of one batch (or one part); raise to fail the attempt."""
        raise NotImplementedError(f"{type(self).__name__}.handle")

    # -- names ------------------------------------------------------------------------------

    @property
    def intake_topic(self) -> str:
        return f"{self.name}.tasks"

    @property
    def work_topic(self) -> str:
        return f"{self.name}.work"

    @property
    def status_topic(self) -> str:
        return f"{self.name}.status"

    @property
    def dead_topic(self) -> str:
        return f"{self.name}.dead"

    @property
    def claims_topic(self) -> str:
        """Task ids claimed by the intake nodes, keyed by id, never compacted: the first claim
        of an id wins (`refold.engine.claims`), within `id_retention_ms`."""
        return f"{self.name}.ids"

    @property
    def cancel_topic(self) -> str:
        """Compacted: the ids of cancelled tasks, which task workers read before running one."""
        return f"{self.name}.cancels"

    def backoff_s(self, attempt: int) -> float:
        return float(min(self.retry_backoff_s * 2 ** max(attempt - 1, 0), 60.0))

    @classmethod
    def validate(cls) -> None:
        where = f"{cls.__module__}.{cls.__qualname__}"
        name = cls.name
        # ASCII only, and room for the longest topic suffix (`.cancels`) within Kafka's 249
        # characters: else `refold topics ensure` failed on the topics, not here.
        if (
            not isinstance(name, str)
            or not 0 < len(name) <= MAX_QUEUE_NAME
            or not all(ch.isascii() and (ch.isalnum() or ch in "-_") for ch in name)
        ):
            raise TaskError(
                f"{where}: a task queue needs a name of 1-{MAX_QUEUE_NAME} ASCII letters, "
                f"digits, - or _, not {name!r}",
                hint='set name = "shipping"',
            )
        for attr in (
            "merge_window_ms",
            "merge_max",
            "max_attempts",
            "partitions",
            "work_partitions",
            "id_retention_ms",
        ):
            value = getattr(cls, attr)
            least = 0 if attr == "merge_window_ms" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise TaskError(f"{where}: {attr} must be an int >= {least}, not {value!r}")
        for attr in ("timeout_s", "queued_timeout_s", "retry_backoff_s"):
            value = getattr(cls, attr)
            # A number, checked before it is compared: "10" raised a TypeError (a traceback
            # for the CLI's user); NaN passed every comparison's negation.
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or not value >= 0 or (value == 0 and attr != "retry_backoff_s"):
                raise TaskError(
                    f"{where}: {attr} must be a number of seconds "
                    f"({'>= 0' if attr == 'retry_backoff_s' else '> 0'}), not {value!r}"
                )
        if cls.handle is TaskQueue.handle:
            raise TaskError(f"{where}: task queue {cls.name!r} does not define handle(batch)")


# -- intake ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Submission:
    """A checked intake request: what goes on the intake topic."""

    task_id: str
    key: str
    data: dict[str, Any]
    #: The data as canonical JSON, made once: the intake record, the `accepted` status, the
    #: size check and the fingerprint all use it (made per use, it was 4 `json.dumps` per
    #: submit, 40% of a bulk submitter's CPU, py-spy).
    data_json: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # NaN and Infinity refused: an HTTP body cannot carry them (orjson refuses it), but
        # the Python client and `refold task submit --data` wrote them as `NaN`.
        object.__setattr__(self, "data_json", strict_json(self.data, "data"))

    @property
    def fingerprint(self) -> str:
        """What makes two submits of one task id the same task: its key and data (canonical
        JSON, SHA-256). A repeat with another fingerprint is a conflict, never queued."""
        return _fingerprint_of(self.key, self.data_json)


def canonical_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def fingerprint(key: str, data: Any) -> str:
    """The fingerprint of a task's key and data (see `Submission.fingerprint`)."""
    return _fingerprint_of(key, canonical_json(data))


def _fingerprint_of(key: str, data_json: str) -> str:
    # The canonical JSON of {"data": data, "key": key} (sorted keys: "data" comes first),
    # built from the data's own canonical JSON instead of encoding the data again.
    body = f'{{"data":{data_json},"key":{json.dumps(key)}}}'
    return hashlib.sha256(body.encode()).hexdigest()[:32]


def submission_from_json(obj: Any) -> Submission:
    """`{"task_id"?, "key"?, "data": {...}}` -> Submission; InputError says what is wrong."""
    if not isinstance(obj, dict):
        raise InputError('a task is a JSON object {"data": {...}, "task_id"?, "key"?}')
    unknown = set(obj) - {"task_id", "key", "data"}
    if unknown:
        raise InputError(f"unknown field(s) {sorted(unknown)}; a task has task_id, key, data")
    data = obj.get("data")
    if not isinstance(data, dict):
        raise InputError(f"data must be a JSON object, not {type(data).__name__}")
    task_id = obj.get("task_id")
    if task_id is None:
        task_id = uuid.uuid4().hex
    key = obj.get("key")
    for what, value in (("task_id", task_id), ("key", key)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise InputError(f"{what} must be a non-empty string, not {value!r}")
        if isinstance(value, str) and len(value) > MAX_TASK_ID:
            raise InputError(f"{what} is longer than {MAX_TASK_ID} characters")
    submission = Submission(task_id, key or task_id, data)
    if len(submission.data_json) > MAX_DATA_BYTES:
        raise InputError(f"data is larger than {MAX_DATA_BYTES} bytes as JSON")
    return submission


def intake_key(queue: TaskQueue, submission: Submission) -> str:
    """The intake record's key: the merge key's value, so tasks to merge meet in one partition
    (one dispatcher); else the task's key."""
    if queue.merge_key is not None:
        value = submission.data.get(queue.merge_key)
        if value is not None:
            return f"{queue.merge_key}={value}"
    return submission.key


# -- dispatch planning ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Planned:
    """One work item (a merged batch, a lone task or a part), and the parents split into parts."""

    batch_id: str
    tasks: tuple[Task, ...]


@dataclass(frozen=True, slots=True)
class Plan:
    batches: tuple[Planned, ...]
    #: parent task id -> its part ids (parents are never handed to a worker themselves)
    parents: dict[str, tuple[str, ...]]


def plan_batches(
    queue: TaskQueue,
    tasks: Sequence[Task],
    batch_prefix: str,
    texts: Mapping[str, str] | None = None,
) -> Plan:
    """Split what `split` divides, then merge the rest by merge-key value in arrival order,
    at most `merge_max` and MAX_BATCH_BYTES per batch (`texts`: each task's data as JSON text,
    when known). Pure: the same input gives the same batches and ids, so a dispatcher that
    redoes an aborted transaction writes the same work items."""
    parents: dict[str, tuple[str, ...]] = {}
    groups: dict[object, list[Task]] = {}
    singles: list[Task] = []
    for task in tasks:
        parts = _parts(queue, task)
        if parts:
            ids = tuple(f"{task.id}.part-{i}" for i in range(len(parts)))
            parents[task.id] = ids
            singles.extend(
                Task(pid, task.key, dict(part), 1, task.id)
                for pid, part in zip(ids, parts, strict=True)
            )
            continue
        value = task.data.get(queue.merge_key) if queue.merge_key is not None else None
        if value is None:
            singles.append(task)
        else:
            groups.setdefault(json.dumps(value, sort_keys=True), []).append(task)
    batches: list[Planned] = []
    for members in groups.values():
        chunk: list[Task] = []
        size = 0
        for task in members:
            text = texts.get(task.id) if texts is not None else None
            n = len(text if text is not None else json.dumps(task.data)) + len(task.id + task.key)
            if chunk and (len(chunk) == queue.merge_max or size + n > MAX_BATCH_BYTES):
                batches.append(Planned(f"{batch_prefix}-{len(batches)}", tuple(chunk)))
                chunk, size = [], 0
            chunk.append(task)
            size += n
        if chunk:
            batches.append(Planned(f"{batch_prefix}-{len(batches)}", tuple(chunk)))
    for task in singles:
        batches.append(Planned(f"{batch_prefix}-{len(batches)}", (task,)))
    return Plan(tuple(batches), parents)


def _parts(queue: TaskQueue, task: Task) -> list[dict[str, Any]] | None:
    """What `split` divides a task's data into, or None: it runs whole. User code: a split that
    raises, or answers anything but a list of JSON objects (a NaN or an Infinity in a part: no
    JSON form), leaves the task whole, and the log says why (such an answer, taken as parts,
    stopped the queue's dispatcher for good: it read the same intake record again at each
    start)."""
    try:
        parts = queue.split(task.data)
    except Exception:
        log.exception("%s: split() failed for task %r; it runs whole", queue.name, task.id)
        return None
    if not parts:
        return None
    if not isinstance(parts, list | tuple) or not all(isinstance(p, dict) for p in parts):
        log.error(
            "%s: split() of task %r returned %s, not a list of dicts; it runs whole",
            queue.name, task.id, type(parts).__name__,
        )  # fmt: skip
        return None
    try:  # NaN and Infinity too: json writes them as `NaN`, which strict readers refuse
        largest = max(len(json.dumps(part, allow_nan=False)) for part in parts)
    except (TypeError, ValueError, RecursionError) as exc:
        where = _not_finite_part(list(parts)) if isinstance(exc, ValueError) else None
        why = str(exc) if where is None else f"{where}: {NOT_FINITE_HINT}"
        log.error("%s: a part of task %r is not JSON (%s); it runs whole", queue.name, task.id, why)
        return None
    if largest > MAX_DATA_BYTES:  # each part is a work item of its own: one Kafka record
        log.error(
            "%s: a part of task %r is larger than %d bytes as JSON; it runs whole",
            queue.name, task.id, MAX_DATA_BYTES,
        )  # fmt: skip
        return None
    return list(parts)


def _not_finite_part(parts: list[dict[str, Any]]) -> str | None:
    """Where the first NaN or Infinity of split() parts is (`parts[1].qty = nan`), if any."""
    try:
        return not_finite(parts, "parts")
    except RecursionError:  # too deep to say where
        return None
