"""The health monitor's membership watch: when it tells a runner to replace its consumer (no
Kafka: the group's description is given as the broker would answer it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from refold.core.config import Config
from refold.engine.health import HealthMonitor, _GroupView
from refold.engine.membership import rejoin_after_s


@dataclass
class FakeRunner:
    instance_id: str | None
    projection: Any = field(default_factory=lambda: type("P", (), {"topics": ("t",)})())
    topics: tuple[str, ...] = ("t",)  # what the runner folds (a re-keyed one: not the source)
    reasons: list[str] = field(default_factory=list)

    def rejoin(self, reason: str) -> None:
        self.reasons.append(reason)


def watch(runner: FakeRunner, view: _GroupView, instances: set[str | None]) -> None:
    monitor = HealthMonitor(Config(), lambda: {})
    monitor._counts = {"t": 2}
    monitor._watch_membership(runner, view, instances)  # type: ignore[arg-type]


def test_a_runner_in_its_group_owning_every_partition_is_left_alone() -> None:
    runner, view = FakeRunner("w1.p.v1"), _GroupView(owners={("t", 0): "w1", ("t", 1): "w1"})
    watch(runner, view, {"w1.p.v1"})
    assert view.stranded_since is None and runner.reasons == []


def test_a_runner_missing_from_its_group_rejoins_after_two_session_timeouts() -> None:
    runner, view = FakeRunner("w1.p.v1"), _GroupView(owners={("t", 0): "w2", ("t", 1): "w2"})
    watch(runner, view, {"w2.p.v1"})
    assert view.stranded_since is not None and runner.reasons == []  # not yet
    view.stranded_since -= rejoin_after_s(Config()) + 1
    watch(runner, view, {"w2.p.v1"})
    assert len(runner.reasons) == 1 and "not a member" in runner.reasons[0]


def test_partitions_nobody_owns_make_a_dynamic_member_rejoin_too() -> None:
    runner, view = FakeRunner(None), _GroupView(owners={("t", 0): "x"})
    watch(runner, view, {None})
    view.stranded_since -= rejoin_after_s(Config()) + 1
    watch(runner, view, {None})
    assert runner.reasons and "t:1 unowned" in runner.reasons[0]
    view.owners = {("t", 0): "x", ("t", 1): "x"}  # the group is whole again: the watch resets
    watch(runner, view, {None})
    assert view.stranded_since is None


def test_healthz_is_503_when_a_command_processor_or_task_dispatcher_failed() -> None:
    import orjson
    from refold.http.answers import health

    ok = health({"balances": "running"}, "ok", {}, None, {"accounts": "running"},
                {"statements": {"dispatch": "running", "reconcile": "running"}})  # fmt: skip
    assert ok[0] == 200
    assert orjson.loads(ok[1])["commands"] == {"accounts": "running"}
    for commands, tasks in (
        ({"accounts": "failed"}, {}),
        ({}, {"statements": {"dispatch": "failed", "reconcile": "running"}}),
        ({}, {"statements": {"dispatch": "running", "reconcile": "failed"}}),
    ):
        status, body = health({"balances": "running"}, "ok", {}, None, commands, tasks)
        assert status == 503 and orjson.loads(body)["status"] == "failed", (commands, tasks)
