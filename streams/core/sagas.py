"""The saga API: a business transaction across aggregates as ordered steps with compensations.

A `Saga` names its steps for one run (`steps(saga_id, data)`, pure: the same input gives the same
steps); each step is a command to an aggregate (`Send`) with an optional compensating command.
A saga's state is the fold of its own events (`SagaEvent`, on `<name>.saga`, keyed by saga id),
and what happens next is the pure function `advance(saga, state, results, now_ms)`: from the
state and the command results known so far, the events to record and the commands to send. The
saga runner in `refold.engine.saga_runner` does the I/O; everything here is unit-tested without
Kafka.

Every command a saga sends has a deterministic id (`command_id`): `saga:<name>/<saga id>/<step>/do`
for the step, `.../undo` for its compensation (`.../undo-<n>` for attempt n > 1, because the
command processor answers a repeated id with its first result). Sending it again after a crash
is answered by the command processor's idempotency and applies nothing twice.

The rules:
- steps run one at a time, in order; a step's result `accepted` moves on, `rejected` (or no
  result within the step's timeout) fails it;
- after a failed step, the accepted steps before it are compensated in reverse order (steps
  without a compensation are skipped); then the saga is `compensated`, or `failed` when there
  was nothing to undo (the first step failed);
- a step that timed out is fenced first: its command id is claimed for nothing, so the command
  processor never decides it (when the processor claimed it first, it will be decided: the saga
  waits for that result instead);
- a rejected compensation is tried again after a backoff (a new command id per attempt); past
  `max_compensation_attempts` the saga is `failed` with the reason (and the runner writes a
  dead letter). A compensation never times out: it is re-sent (same id) until it is decided.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from refold.core.commands import Decider
from refold.core.config import BUNDLED_SCHEMAS
from refold.core.errors import InputError, SagaError, SagaStepsError
from refold.core.projection import Projection
from refold.core.serde import Event
from refold.core.strict_json import strict_json

#: The Avro schema of saga events, shipped in the package and loaded by every codec.
SAGA_SCHEMAS = Path(BUNDLED_SCHEMAS) / "sagas"
SAGA_EVENT = "refold.sagas.SagaEvent"
TERMINAL = frozenset({"completed", "compensated", "failed"})
STATUSES = ("running", "compensating", "completed", "compensated", "failed")
MAX_SAGA_ID = 120
MAX_DATA_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Send:
    """A command a saga sends: to `aggregate` (a decider's name), for aggregate id `key`."""

    aggregate: str
    key: str
    type: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Step:
    """One step: `do`, and `undo` to compensate it once it was accepted (None: nothing to undo)."""

    name: str
    do: Send
    undo: Send | None = None
    #: No result within this long fails the step (None: the saga's step_timeout_s).
    timeout_s: float | None = None


class Saga:
    """Subclass, set `name`, override `steps(saga_id, data)`; optionally `fields` to check data."""

    name: ClassVar[str] = ""
    #: The data a start must carry, like a decider's command fields: {"from": str, ...}.
    fields: ClassVar[Mapping[str, type]] = {}
    step_timeout_s: ClassVar[float] = 60.0
    max_compensation_attempts: ClassVar[int] = 5
    #: Wait before compensation attempt n+1 after a rejection: backoff * 2**(n-1), at most 60 s.
    compensation_backoff_s: ClassVar[float] = 1.0
    partitions: ClassVar[int] = 6

    def steps(self, saga_id: str, data: dict[str, Any]) -> Sequence[Step]:
        raise NotImplementedError(f"{type(self).__name__}.steps")

    @property
    def topic(self) -> str:
        return f"{self.name}.saga"

    @property
    def dead_topic(self) -> str:
        return f"{self.name}.saga.dead"

    def backoff_s(self, attempt: int) -> float:
        return float(min(self.compensation_backoff_s * 2 ** max(attempt - 1, 0), 60.0))

    @classmethod
    def validate(cls) -> None:
        where = f"{cls.__module__}.{cls.__qualname__}"
        if not cls.name or not all(ch.isalnum() or ch in "-_" for ch in cls.name):
            raise SagaError(
                f"{where}: a saga needs a name of letters, digits, - or _",
                hint='set name = "transfers"',
            )
        if cls.steps is Saga.steps:
            raise SagaError(f"{where}: saga {cls.name!r} does not define steps(saga_id, data)")
        for attr in ("step_timeout_s", "compensation_backoff_s"):
            value = getattr(cls, attr)
            # A number, checked before it is compared: "10" raised a TypeError (a traceback for
            # the CLI's user), and NaN passed the comparison's negation.
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or not value >= 0 or (value == 0 and attr == "step_timeout_s"):
                raise SagaError(
                    f"{where}: {attr} must be a number of seconds "
                    f"({'> 0' if attr == 'step_timeout_s' else '>= 0'}), not {value!r}"
                )
        for attr in ("max_compensation_attempts", "partitions"):
            value = getattr(cls, attr)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SagaError(f"{where}: {attr} must be a positive int, not {value!r}")


def command_id(saga: Saga, saga_id: str, step: str, undo_attempt: int = 0) -> str:
    """The deterministic id of a step's command (undo_attempt 0) or of its compensation."""
    base = f"saga:{saga.name}/{saga_id}/{step}/"
    if undo_attempt == 0:
        return base + "do"
    return base + ("undo" if undo_attempt == 1 else f"undo-{undo_attempt}")


# -- starting ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Start:
    """A checked start request: what the `started` event carries."""

    saga_id: str
    data: dict[str, Any]

    @property
    def data_json(self) -> str:
        """The data as canonical JSON; InputError naming where it has none: a NaN or an
        Infinity (json wrote `NaN`, which strict readers refuse), a value json cannot encode."""
        return strict_json(self.data, "data")


def data_json(data: Any) -> str:
    """A start's data as canonical JSON: what its `started` event carries, and what tells a
    repeat of a saga id (the same text) from a conflicting start (another)."""
    return json.dumps(data, separators=(",", ":"), sort_keys=True)


def start_from_json(saga: Saga, obj: Any, deciders: Mapping[str, Decider] | None = None) -> Start:
    """`{"saga_id"?, "data": {...}}` -> Start; InputError says what is wrong. With the app's
    `deciders`, the commands of its steps are checked against them too (`check_sends`)."""
    if not isinstance(obj, dict):
        raise InputError('a saga start is a JSON object {"data": {...}, "saga_id"?}')
    unknown = set(obj) - {"saga_id", "data"}
    if unknown:
        raise InputError(f"unknown field(s) {sorted(unknown)}; a saga start has saga_id, data")
    data = obj.get("data")
    if not isinstance(data, dict):
        raise InputError(f"data must be a JSON object, not {type(data).__name__}")
    saga_id = obj.get("saga_id")
    if saga_id is None:
        saga_id = uuid.uuid4().hex
    if not isinstance(saga_id, str) or not saga_id.strip() or len(saga_id) > MAX_SAGA_ID:
        raise InputError(f"saga_id must be a non-empty string of at most {MAX_SAGA_ID} characters")
    check_saga_id(saga_id)
    for name, kind in saga.fields.items():
        value = data.get(name)
        if (
            value is None
            or not isinstance(value, kind)
            or isinstance(value, bool) != (kind is bool)
        ):
            raise InputError(f"data.{name} must be {kind.__name__}, not {value!r}")
    start = Start(saga_id, data)
    if len(start.data_json) > MAX_DATA_BYTES:
        raise InputError(f"data is larger than {MAX_DATA_BYTES} bytes as JSON")
    try:
        steps = planned_steps(saga, saga_id, data)
    except SagaStepsError as exc:
        raise InputError(f"saga {saga.name!r} cannot run with this data: {exc}") from exc
    if deciders is not None:
        check_sends(saga, steps, deciders)
    return start


def check_sends(saga: Saga, steps: Sequence[Step], deciders: Mapping[str, Decider]) -> None:
    """InputError unless each step's command and compensation names a decider of the app, a
    command type it declares, and data its fields accept. Found only when the runner sent it,
    such a step failed the saga after the steps before it had run (or a compensation could
    never be decided); the runner still answers one it cannot send as rejected (a decider
    whose topics are missing, a command too large for a record)."""
    for step in steps:
        for send, role in ((step.do, "command"), (step.undo, "compensation")):
            if send is None:
                continue
            where = f"saga {saga.name!r}, step {step.name!r}: its {role}"
            decider = deciders.get(send.aggregate)
            if decider is None:
                known = ", ".join(sorted(deciders)) or "none"
                raise InputError(
                    f"{where} goes to aggregate {send.aggregate!r}, which no decider of the app "
                    f"is; known aggregates: {known}"
                )
            if send.type not in decider.commands:
                known = ", ".join(sorted(decider.commands)) or "none"
                raise InputError(
                    f"{where} is of type {send.type!r}, which aggregate {send.aggregate!r} does "
                    f"not declare; known command types: {known}"
                )
            try:
                decider.check_command(send.type, send.data)
            except InputError as exc:
                raise InputError(f"{where} would be refused: {exc}") from exc


def check_saga_id(saga_id: str) -> None:
    """A saga id is a record key: UTF-8 text. A lone surrogate (from argv or Python, never from
    JSON) raised UnicodeEncodeError deep in the producer: a traceback for the CLI's user."""
    try:
        saga_id.encode()
    except UnicodeEncodeError as exc:
        raise InputError(f"saga_id {saga_id!r} is not UTF-8 text: {exc.reason}") from exc


def planned_steps(saga: Saga, saga_id: str, data: dict[str, Any]) -> list[Step]:
    """`saga.steps(saga_id, data)`, checked: at least one `Step`, unique names. Whatever the
    user's code raises becomes SagaStepsError, so one saga's bug is that saga's failure (a 422
    at its start, `failed` later), never a 500 or a saga runner stopped for every saga."""
    try:
        steps = list(saga.steps(saga_id, data))
    except Exception as exc:  # user code: any error means this saga cannot run
        raise SagaStepsError(f"steps() raised {exc!r}") from exc
    if not steps or not all(isinstance(s, Step) for s in steps):
        raise SagaStepsError(f"steps() must give at least one Step, not {steps!r:.200}")
    if len({s.name for s in steps}) != len(steps):
        raise SagaStepsError(f"steps() gave two steps of one name: {[s.name for s in steps]}")
    return steps


def saga_event(saga_id: str, kind: str, **fields: Any) -> dict[str, Any]:
    """A SagaEvent's data; `data` must already be JSON text."""
    return {"saga_id": saga_id, "kind": kind, **fields}


# -- the fold ---------------------------------------------------------------------------------


def initial_state(saga_id: str) -> dict[str, Any]:
    return {
        "saga_id": saga_id,
        "status": None,
        "data": None,
        "steps": [],
        "reason": None,
        "started_ms": 0,
        "updated_ms": 0,
        "events": 0,
        "duplicates": 0,
    }


def apply_event(saga: Saga, state: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """Fold one SagaEvent (its data) into a saga's state. Events after the end, a second
    `started`, events of an unknown step and stale step events (`_stale`) change nothing but
    `duplicates`: the first of each counts, so a repeat from any runner is a no-op."""
    kind, at = data["kind"], int(data.get("at_ms") or 0)
    state["events"] += 1
    if state["status"] in TERMINAL or (kind == "started") == (state["status"] is not None):
        state["duplicates"] += 1
        return state
    if kind == "started":
        state["data"] = json.loads(data.get("data") or "{}")
        state["status"] = "running"
        state["started_ms"] = at
        state["steps"] = [
            {
                "name": s.name,
                "status": "pending",
                "command_id": command_id(saga, state["saga_id"], s.name),
                "reason": None,
                "sent_ms": 0,
                "undo_command_id": None,
                "undo_attempts": 0,
                "undo_ms": 0,
            }
            for s in _started_steps(saga, state)
        ]
    elif kind == "finished":
        state["status"] = data.get("status") or "failed"
        state["reason"] = data.get("reason") or state["reason"]
    else:
        index = int(data.get("step", -1))
        if not 0 <= index < len(state["steps"]):
            state["duplicates"] += 1
            return state
        step = state["steps"][index]
        if _stale(state, step, kind, data):
            state["duplicates"] += 1
            return state
        _apply_step(state, step, kind, data, at)
    state["updated_ms"] = max(state["updated_ms"], at)
    return state


def _started_steps(saga: Saga, state: dict[str, Any]) -> list[Step]:
    """The steps a start folds in; none when steps() fails (the runner then ends the saga
    `failed` with the reason: the fold itself must never raise on a user's bug)."""
    try:
        return planned_steps(saga, state["saga_id"], state["data"])
    except SagaStepsError:
        return []


#: Each step event's allowed (saga phase, step status) before it; any other is stale.
_FROM: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "step_sent": (frozenset({"running"}), frozenset({"pending"})),
    # a step accepted after its timeout (unfenced) is learnt while compensating
    "step_accepted": (frozenset({"running", "compensating"}), frozenset({"sent", "timed_out"})),
    "step_rejected": (frozenset({"running"}), frozenset({"sent"})),
    "step_timed_out": (frozenset({"running"}), frozenset({"sent"})),
    "compensation_sent": (
        frozenset({"compensating"}),
        frozenset({"accepted", "compensation_rejected"}),
    ),
    "compensation_done": (frozenset({"compensating"}), frozenset({"compensating"})),
    "compensation_rejected": (frozenset({"compensating"}), frozenset({"compensating"})),
}


def _stale(state: dict[str, Any], step: dict[str, Any], kind: str, data: dict[str, Any]) -> bool:
    """Whether a step event no longer fits the saga: a repeat, or one decided from an older state
    (two runners drive a saga for a moment when its partition moves between workers). Folding it
    could move a step backwards (a second `step_sent` after `step_accepted`), or let a late
    rejection of attempt n count against attempt n+1; the fold keeps the first of each instead."""
    phases, statuses = _FROM.get(kind, (frozenset(), frozenset()))
    if state["status"] not in phases or step["status"] not in statuses:
        return True
    if kind == "step_accepted" and state["status"] == "compensating":
        return step["status"] != "timed_out"
    attempt = int(data.get("attempt") or 0)
    if kind == "compensation_sent":
        return attempt != int(step["undo_attempts"]) + 1
    if kind in ("compensation_done", "compensation_rejected"):
        return attempt not in (0, int(step["undo_attempts"]))  # 0: written before attempts
    return False


def _apply_step(
    state: dict[str, Any], step: dict[str, Any], kind: str, data: dict[str, Any], at: int
) -> None:
    if kind == "step_sent":
        step.update(status="sent", sent_ms=at)
    elif kind == "step_accepted":
        # accepted after its timeout: the saga was already compensating without it
        step["late"] = step["status"] == "timed_out"
        step["status"] = "accepted"
    elif kind in ("step_rejected", "step_timed_out"):
        step.update(status="rejected" if kind == "step_rejected" else "timed_out")
        step["reason"] = data.get("reason")
        state["status"] = "compensating"
        state["reason"] = f"step {step['name']} {step['status']}: {step['reason']}"
    elif kind == "compensation_sent":
        step.update(status="compensating", undo_command_id=data.get("command_id"), undo_ms=at)
        step["undo_attempts"] = int(data.get("attempt") or 1)
    elif kind == "compensation_done":
        step["status"] = "compensated"
    elif kind == "compensation_rejected":
        step.update(status="compensation_rejected", reason=data.get("reason"), undo_ms=at)


def public_state(state: dict[str, Any], name: str) -> dict[str, Any]:
    """What `GET /sagas/{name}/{saga_id}` answers."""
    steps = []
    for s in state["steps"]:
        entry = {"name": s["name"], "status": s["status"], "command_id": s["command_id"]}
        if s.get("reason"):
            entry["reason"] = s["reason"]
        if s.get("undo_command_id"):
            entry["compensation_command_id"] = s["undo_command_id"]
            entry["compensation_attempts"] = s["undo_attempts"]
        steps.append(entry)
    status = state["status"]
    return {
        "saga_id": state["saga_id"],
        "saga": name,
        # compensating is still running for a caller: the four statuses
        "status": "running" if status == "compensating" else status,
        "phase": status,
        "steps": steps,
        "reason": state.get("reason"),
        "data": state.get("data"),
        "started_ms": state.get("started_ms"),
        "updated_ms": state.get("updated_ms"),
    }


class SagaStateProjection(Projection):
    """The built-in state projection of one saga: `saga_projection(saga)` makes it."""

    saga: ClassVar[Saga]

    def initial(self, key: str) -> dict[str, Any]:
        return initial_state(key)

    def apply(self, state: Any, event: Event) -> Any:
        return apply_event(self.saga, state, event.data)


def saga_projection_name(saga: str) -> str:
    return f"sagas.{saga}"


def saga_projection(saga: Saga, version: int = 1) -> SagaStateProjection:
    """The state projection of `saga`: named `sagas.<name>`, reading `<name>.saga`. Its fold is
    built in, so every version folds alike; another `version` is a rebuild beside the live one
    (`refold saga rebuild`)."""
    cls = type(
        f"SagaState_{saga.name}",
        (SagaStateProjection,),
        {
            "name": saga_projection_name(saga.name),
            "topics": (saga.topic,),
            "version": version,
            "saga": saga,
            "__module__": __name__,
        },
    )
    return cls()
