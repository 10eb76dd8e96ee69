"""Task status as a projection: the status events of one queue, folded by task id.

The fold is pure, so a replay of the status topic rebuilds every task's status. Its rules:
- a terminal status (`succeeded`, `dead`, `cancelled`) is final: the first one wins and every
  later event for that task is counted in `duplicates`, changing nothing else — which is what
  makes a late duplicate success (a re-driven task whose first run finally returned) harmless;
- `attempts` is the highest attempt any event named;
- a `progress` event (a handler's `task.progress(...)`) keeps the status, sets `progress` and
  `updated_ms` (a sign of life the reconciler's `timeout_s` counts from), and shows in the
  history as one entry, the latest, however many came in a row; one from an earlier attempt
  is counted in `duplicates`;
- a `retrying` event of an attempt that already reported `running` or `failed` (it landed
  after them) is counted in `duplicates`, changing nothing else;
- a split parent holds its `parts`; each part's terminal status also reaches the parent as a
  `part-succeeded` / `part-dead` event (keyed by the parent): the parent succeeds once every
  part has, and is dead as soon as one part is.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, ClassVar

from refold.core.projection import Projection
from refold.core.serde import Event
from refold.core.tasks import TERMINAL, TaskQueue

MAX_HISTORY = 50


def time_ms(event: Event) -> int:
    """The event's time in epoch ms: its record's timestamp (refold's producers stamp it as they
    write the CloudEvents `time`, to the ms), else that `time`. Reading the envelope's headers
    for the `time` was a quarter of the status fold's CPU (py-spy), the timestamp is free."""
    if event.timestamp_ms > 0:
        return event.timestamp_ms
    try:
        return int(datetime.fromisoformat(event.time.replace("Z", "+00:00")).timestamp() * 1000)
    except (ValueError, AttributeError):
        return 0


def initial_status(task_id: str) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "status": None,
        "attempts": 0,
        "batch_id": None,
        "parent_id": None,
        "parts": [],
        "parts_done": [],
        "key": None,
        "data": None,
        "result": None,
        "error": None,
        "progress": None,
        "duplicates": 0,
        "updated_ms": 0,
        "history": [],
    }


def _loads(text: str | None) -> Any:
    if text is None or text == "null":  # a handler that returned nothing: no parse
        return None
    return json.loads(text)


def task_data(state: dict[str, Any]) -> Any:
    """A task's data from its state: kept as the JSON text its events carry (the fold does not
    parse it: nothing it answers shows it, and parsing it was a fifth of the fold's CPU,
    py-spy); a state folded before that holds it parsed."""
    data = state.get("data")
    return json.loads(data) if isinstance(data, str) else data


def task_data_json(state: dict[str, Any]) -> str:
    """A task's data as JSON text (`{}` when unknown), for a work item or a dead letter."""
    data = state.get("data")
    if isinstance(data, str):
        return data
    return json.dumps(data if data is not None else {})


def apply_status(state: dict[str, Any], data: dict[str, Any], at_ms: int) -> dict[str, Any]:
    """Fold one TaskStatus event (its data) into a task's state."""
    status = data["status"]
    if state["status"] in TERMINAL:
        state["duplicates"] += 1
        return state
    if status in ("part-succeeded", "part-dead"):
        return _apply_part(state, data, at_ms)
    if status == "accepted" and state["status"] is not None:
        state["duplicates"] += 1  # a second accepted (a retried intake) changes nothing
        return state
    if status == "progress":
        return _apply_progress(state, data, at_ms)
    if (
        status == "retrying"
        and state["status"] in ("running", "failed")
        and int(data.get("attempt") or 0) <= state["attempts"]
    ):
        # Late: the reconciler writes a re-drive's work item before its `retrying`, and a quick
        # task worker's `running` (even `failed`) of that attempt can land first. Folded, it
        # hid them: the failed attempt waited `queued_timeout_s`, then went on as "no status".
        state["duplicates"] += 1
        return state
    state["status"] = status
    state["attempts"] = max(state["attempts"], int(data.get("attempt") or 0))
    for name in ("batch_id", "parent_id", "key"):
        if data.get(name) is not None:
            state[name] = data[name]
    if data.get("parts"):
        state["parts"] = list(data["parts"])
    if data.get("data") is not None:
        state["data"] = data["data"]  # JSON text: see task_data
    if status == "running":
        state["progress"] = None  # a new run reports its own
    if status == "succeeded":
        state["result"] = _loads(data.get("result"))
    if data.get("error") is not None:
        state["error"] = data["error"]
    _record(state, status, at_ms, data)
    return state


def _apply_part(state: dict[str, Any], data: dict[str, Any], at_ms: int) -> dict[str, Any]:
    part = data.get("part_id")
    if data["status"] == "part-dead":
        state["status"] = "dead"
        state["error"] = f"part {part} is dead: {data.get('error')}"
        _record(state, "dead", at_ms, {"part_id": part})
        return state
    if part not in state["parts_done"]:
        state["parts_done"].append(part)
    # Parts end on several threads and workers, so the log's order of their reports is not
    # the order of their clocks: the parent ends at the latest part's time, not before it.
    done_ms = max(at_ms, int(state.get("updated_ms") or 0))
    state["updated_ms"] = done_ms
    if state["parts"] and set(state["parts"]) <= set(state["parts_done"]):
        state["status"] = "succeeded"
        state["result"] = {"parts": len(state["parts"])}
        _record(state, "succeeded", done_ms, {})
    return state


def _apply_progress(state: dict[str, Any], data: dict[str, Any], at_ms: int) -> dict[str, Any]:
    if int(data.get("attempt") or 0) < state["attempts"]:
        state["duplicates"] += 1  # an earlier attempt still running: not this attempt's progress
        return state
    state["progress"] = _loads(data.get("progress"))
    history = state["history"]
    if history and history[-1]["status"] == "progress":
        history.pop()  # a run of progress reports shows as its latest
    _record(state, "progress", at_ms, {"progress": state["progress"]})
    state["updated_ms"] = at_ms
    return state


def _record(state: dict[str, Any], status: str, at_ms: int, data: dict[str, Any]) -> None:
    state["updated_ms"] = at_ms
    entry: dict[str, Any] = {"status": status, "at_ms": at_ms}
    for name in ("attempt", "batch_id", "error", "part_id", "progress"):
        if data.get(name):
            entry[name] = data[name]
    history = state["history"]
    history.append(entry)
    if len(history) > MAX_HISTORY:  # the first entries and the last ones tell the story
        del history[1 : len(history) - MAX_HISTORY + 1]


def public_status(state: dict[str, Any]) -> dict[str, Any]:
    """What `GET /tasks/{queue}/{id}` answers."""
    return {
        name: state.get(name)
        for name in (
            "task_id",
            "status",
            "attempts",
            "batch_id",
            "parent_id",
            "parts",
            "result",
            "error",
            "progress",
            "history",
        )
    }


class TaskStatusProjection(Projection):
    """The built-in status projection of one queue: `status_projection(queue)` makes it."""

    queue: ClassVar[str] = ""

    def initial(self, key: str) -> dict[str, Any]:
        return initial_status(key)

    def apply(self, state: Any, event: Event) -> Any:
        return apply_status(state, event.data, time_ms(event))


def status_projection_name(queue: str) -> str:
    return f"tasks.{queue}"


def status_projection(queue: TaskQueue) -> TaskStatusProjection:
    """The status projection of `queue`: named `tasks.<queue>`, reading `<queue>.status`."""
    cls = type(
        f"TaskStatus_{queue.name}",
        (TaskStatusProjection,),
        {
            "name": status_projection_name(queue.name),
            "topics": (queue.status_topic,),
            "version": 1,
            "queue": queue.name,
            "__module__": __name__,
        },
    )
    return cls()


# -- reconciliation ---------------------------------------------------------------------------


def due_ms(queue: TaskQueue, state: dict[str, Any]) -> int | None:
    """When `next_step` may first act on this task (epoch ms), or None if it never will in its
    current state: the reconciler's index keeps open tasks by this time, so a sweep looks at
    the due ones only."""
    status = state.get("status")
    if status in TERMINAL or status in (None, "accepted") or state.get("parts"):
        return None
    attempts = int(state.get("attempts") or 0)
    updated = int(state.get("updated_ms") or 0)
    if status == "failed":
        if attempts >= queue.max_attempts:
            return updated
        return updated + int(queue.backoff_s(attempts) * 1000)
    limit_s = queue.timeout_s if status == "running" else queue.queued_timeout_s
    return updated + int(limit_s * 1000)


def next_step(queue: TaskQueue, state: dict[str, Any], now_ms: int) -> tuple[str, str] | None:
    """What the reconciler does for a task now: ("redrive", reason), ("dead", error) or None.

    A failed attempt is re-driven after its backoff; a running task with no status for
    `timeout_s`, or a dispatched or retrying one that no worker started for `queued_timeout_s`,
    counts as a failed attempt ("no status"). Either way, a task
    that has had `max_attempts` attempts is dead instead. Split parents are never handed to a
    worker (their parts are), and accepted tasks are the dispatcher's.
    """
    status = state.get("status")
    if status in TERMINAL or status in (None, "accepted") or state.get("parts"):
        return None
    attempts = int(state.get("attempts") or 0)
    idle_ms = now_ms - int(state.get("updated_ms") or 0)
    if status == "failed":
        if attempts >= queue.max_attempts:
            return "dead", str(state.get("error"))
        if idle_ms >= queue.backoff_s(attempts) * 1000:
            return "redrive", str(state.get("error"))
        return None
    limit_s = queue.timeout_s if status == "running" else queue.queued_timeout_s
    if idle_ms < limit_s * 1000:
        return None
    error = f"no status for {limit_s:g} s after {status} (attempt {attempts})"
    return ("dead", error) if attempts >= queue.max_attempts else ("redrive", error)
