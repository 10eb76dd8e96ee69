"""A saga's pure decision: from its state and the command results known now, the next events
to record and commands to send (`advance`), forward through its steps or backward through their
compensations. `refold.engine.saga_runner` asks it for every saga not ended; the rules a saga
follows are at the top of `refold.core.sagas`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from refold.core.errors import SagaStepsError
from refold.core.sagas import (
    TERMINAL,
    Saga,
    Send,
    Step,
    command_id,
    planned_steps,
    saga_event,
)

#: A command result as the results topic holds it (`status`: accepted | rejected | ...).
Result = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A command to send with its deterministic id."""

    command_id: str
    send: Send


@dataclass(frozen=True, slots=True)
class Advance:
    """What to do now: record `events` (in order), then send `commands`; `waiting` are commands
    sent before whose results are awaited (a runner re-sends them once after a restart)."""

    events: tuple[dict[str, Any], ...] = ()
    commands: tuple[Outgoing, ...] = ()
    waiting: tuple[Outgoing, ...] = ()
    dead: str | None = None  # the reason, when the saga ends failed for a person to look at
    #: A timed-out step's command, to fence before recording `events`: the runner claims its
    #: id first (refold.engine.claims) so it is never decided; when the command processor
    #: claimed it already, it will be decided, and the runner records nothing and waits.
    fence: Outgoing | None = None


def advance(
    saga: Saga,
    state: dict[str, Any],
    results: Callable[[str], Result | None],
    now_ms: int,
    *,
    since_ms: int = 0,
) -> Advance:
    """The next events and commands of a saga, from its state and the results known now.
    A step's timeout counts from when it was sent, or from `since_ms` if later (when the runner
    took the saga over: a worker that was down does not time out every step at once)."""
    status = state.get("status")
    if status is None or status in TERMINAL:
        return Advance()
    steps = planned_steps(saga, state["saga_id"], state["data"])
    if [s.name for s in steps] != [s["name"] for s in state["steps"]]:
        raise SagaStepsError(
            f"steps() gave {[s.name for s in steps]}, not the steps of its start "
            f"{[s['name'] for s in state['steps']]}: steps() must be pure"
        )
    if status == "running":
        return _forward(saga, state, steps, results, now_ms, since_ms)
    return _backward(saga, state, steps, results, now_ms)


def _rejected(result: Result) -> str:
    return str(result.get("reason") or result.get("status"))


def _forward(
    saga: Saga,
    state: dict[str, Any],
    steps: list[Step],
    results: Callable[[str], Result | None],
    now_ms: int,
    since_ms: int,
) -> Advance:
    sid = state["saga_id"]
    for i, (step, s) in enumerate(zip(steps, state["steps"], strict=True)):
        out = Outgoing(s["command_id"], step.do)
        if s["status"] == "accepted":
            continue
        if s["status"] == "pending":
            sent = saga_event(sid, "step_sent", step=i, command_id=out.command_id, at_ms=now_ms)
            return Advance(events=(sent,), commands=(out,))
        result = results(out.command_id)
        if result is None:
            limit_s = step.timeout_s or saga.step_timeout_s
            if now_ms - max(s["sent_ms"], since_ms) >= limit_s * 1000:
                reason = f"no result within {limit_s:g} s"
                timed_out = saga_event(sid, "step_timed_out", step=i, reason=reason, at_ms=now_ms)
                return Advance(events=(timed_out,), fence=out)
            return Advance(waiting=(out,))
        if result.get("status") == "accepted":
            return Advance(events=(saga_event(sid, "step_accepted", step=i, at_ms=now_ms),))
        reason = _rejected(result)
        return Advance(
            events=(saga_event(sid, "step_rejected", step=i, reason=reason, at_ms=now_ms),)
        )
    return Advance(events=(saga_event(sid, "finished", status="completed", at_ms=now_ms),))


def _backward(
    saga: Saga,
    state: dict[str, Any],
    steps: list[Step],
    results: Callable[[str], Result | None],
    now_ms: int,
) -> Advance:
    """Compensate accepted steps from the last to the first, one at a time; then finish."""
    sid = state["saga_id"]
    for i in reversed(range(len(steps))):
        nxt = _undo(saga, sid, i, steps[i], state["steps"][i], results, now_ms)
        if nxt is not None:
            return nxt
    undone = any(s["status"] == "compensated" for s in state["steps"])
    final = "compensated" if undone else "failed"
    return Advance(events=(saga_event(sid, "finished", status=final, at_ms=now_ms),))


def _undo(
    saga: Saga,
    sid: str,
    i: int,
    step: Step,
    s: dict[str, Any],
    results: Callable[[str], Result | None],
    now_ms: int,
) -> Advance | None:
    """What compensating step i needs now (an empty Advance: wait), or None: nothing, go on."""
    if s["status"] == "timed_out":
        # not fenced (no claims index for it), so it may be decided late: learn how, undo it too
        late = results(s["command_id"])
        if late is not None and late.get("status") == "accepted":
            return Advance(events=(saga_event(sid, "step_accepted", step=i, at_ms=now_ms),))
        return None
    if s["status"] not in ("accepted", "compensating", "compensation_rejected"):
        return None
    if step.undo is None:
        if s["status"] == "accepted" and s.get("late"):
            # a timed-out step applied late and cannot be undone: a person must look
            reason = f"step {step.name} was applied after its timeout and has no compensation"
            return _fail(sid, reason, now_ms)
        return None
    attempt = int(s["undo_attempts"])
    if s["status"] == "compensating":
        out = Outgoing(s["undo_command_id"], step.undo)
        result = results(out.command_id)
        if result is None:
            return Advance(waiting=(out,))
        if result.get("status") == "accepted":
            done = saga_event(sid, "compensation_done", step=i, attempt=attempt, at_ms=now_ms)
            return Advance(events=(done,))
        rejected = saga_event(
            sid,
            "compensation_rejected",
            step=i,
            attempt=attempt,
            reason=_rejected(result),
            at_ms=now_ms,
        )
        return Advance(events=(rejected,))
    if s["status"] == "compensation_rejected":  # again after the backoff, or give up
        if attempt >= saga.max_compensation_attempts:
            reason = f"compensation of step {step.name} rejected {attempt} time(s): {s['reason']}"
            return _fail(sid, reason, now_ms)
        if now_ms - int(s["undo_ms"]) < saga.backoff_s(attempt) * 1000:
            return Advance()
    out = Outgoing(command_id(saga, sid, step.name, attempt + 1), step.undo)
    sent = saga_event(
        sid,
        "compensation_sent",
        step=i,
        command_id=out.command_id,
        attempt=attempt + 1,
        at_ms=now_ms,
    )
    return Advance(events=(sent,), commands=(out,))


def steps_failed(saga: Saga, saga_id: str, error: SagaStepsError, now_ms: int) -> Advance:
    """What a saga whose steps() failed does (`advance` raised SagaStepsError): it ends
    `failed` with a dead letter, for a person to look at; its accepted steps are not undone,
    since which they are and how to undo them is what steps() could not say."""
    return _fail(saga_id, f"saga {saga.name!r}: {error}", now_ms)


def _fail(saga_id: str, reason: str, now_ms: int) -> Advance:
    done = saga_event(saga_id, "finished", status="failed", reason=reason, at_ms=now_ms)
    return Advance(events=(done,), dead=reason)
