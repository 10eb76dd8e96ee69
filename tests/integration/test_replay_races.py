"""Replay in the situations operators meet on a system of record: replays interrupted or run
twice at once, swaps and rollbacks racing a worker that switches, events still arriving. Real
broker, the real CLI and worker as subprocesses, results against an oracle fold."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

from refold.engine.rebuild import stored_offsets
from refold.engine.timetravel import murmur2_partition
from refold.engine.version_switch import SWITCH_GRACE_S
from refold.store.rocks_open import lock_holder
from refold.store.versions import live_version, rollback, store_path

from tests.integration.test_projections import end_offsets
from tests.integration.test_replay import Env, fold, publish, story


def test_a_replay_without_swap_never_makes_its_version_live(config, ledger_topic, unique, tmp_path):
    """With no LIVE pointer yet (v1 was built by `refold replay`, no worker ever ran), v1 is
    live as the only version on disk. Building v2 beside it must not make v2 live by making it
    the newest on disk: only --swap does that."""
    env = Env(config, unique("repair"), ledger_topic, tmp_path / "data")
    events = story(300, seed=71)
    publish(config, ledger_topic, events)
    done = env.refold("1", "replay", env.name, "--quiet")
    assert done.returncode == 0, done.stderr
    assert live_version(env.config, env.name) == 1

    done = env.refold("1,2", "replay", env.name, "--quiet")
    assert done.returncode == 0, done.stderr
    assert live_version(env.config, env.name) == 1
    buggy, fixed = fold(events, buggy=True), fold(events, buggy=False)
    key = next(k for k in fixed if fixed[k] != buggy[k])
    done = env.refold("1,2", "query", env.name, key)
    assert done.returncode == 0 and json.loads(done.stdout)["state"] == buggy[key], done.stderr
    done = env.refold("1,2", "replay", env.name, "--diff", "--quiet")
    assert done.returncode == 0, done.stderr
    changed = sum(1 for k in fixed if fixed[k] != buggy[k])
    assert f"{changed} changed, 0 added, 0 removed" in done.stdout


def slow_replay(env: Env, versions: str, *args: str, fold_s: float) -> subprocess.Popen:
    """`refold replay NAME ...` whose every fold takes `fold_s` (still running when the test
    acts on it), in a session of its own: a signal to its group is what a terminal's Ctrl-C
    sends (the replay and every process it started)."""
    return subprocess.Popen(
        [sys.executable, "-m", "refold.cli.main", "replay", env.name, *args],
        env={**env.env(versions), "REPAIR_SLOW_S": str(fold_s)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def until_every_key_reads(env: Env, expected: dict, timeout_s: float = 30.0) -> None:
    """Wait until every key of `expected` is answered with its state: after a switch every
    reader process moves to the new version, each when it has opened it (for that moment,
    reads over different connections may answer from either version)."""
    deadline = time.monotonic() + timeout_s
    while (served := {k: env.get(k)[1]["state"] for k in expected}) != expected:
        assert time.monotonic() < deadline, f"not every key reads the new version: {served}"
        time.sleep(0.2)


def interrupt_after_a_write(
    env: Env, replay: subprocess.Popen, version: int, then_s: float = 0.0
) -> str:
    """Ctrl-C to `replay` once it has stored a first write of `version` (and `then_s` more);
    asserts it exited 130 and returns what it said on stderr."""
    try:
        deadline = time.monotonic() + 60
        while not stored_offsets(env.config, env.name, version):  # a first write stored
            assert time.monotonic() < deadline and replay.poll() is None, replay.communicate()
            time.sleep(0.05)
        time.sleep(then_s)
        os.killpg(replay.pid, signal.SIGINT)
        _out, err = replay.communicate(timeout=60)
    finally:
        if replay.poll() is None:
            replay.kill()
    assert replay.returncode == 130, err
    return err


def test_ctrl_c_in_the_middle_of_a_fold_loses_no_event(config, ledger_topic, unique, tmp_path):
    """Ctrl-C lands while the replay folds a batch (most of its time). What the interrupted
    replay stored must be whole batches: the rerun resumes from it and equals the oracle."""
    env = Env(config, unique("repair"), ledger_topic, tmp_path / "data")
    events = story(20_000, seed=73)  # 10 s of folds: time to act before it ends
    publish(config, ledger_topic, events)
    done = env.refold("1", "replay", env.name, "--quiet")
    assert done.returncode == 0, done.stderr

    replay = slow_replay(env, "1,2", "--procs", "1", "--quiet", fold_s=0.0005)
    err = interrupt_after_a_write(env, replay, 2, then_s=0.3)  # into the next batches
    assert f"interrupted: {env.name} v2 is not live (v1 is); what this replay folded is kept" in err
    assert 0 < sum(stored_offsets(env.config, env.name, 2).values()) < len(events)

    done = env.refold("1,2", "replay", env.name, "--quiet")
    assert done.returncode == 0, done.stderr
    assert env.states(2)[0] == fold(events, buggy=False)


def test_a_worker_deployed_while_a_replay_builds_serves_and_takes_the_build_over(
    config, ledger_topic, unique, tmp_path
):
    """The deploy restarts the worker with v2's code while an operator's `refold replay`
    builds v2. The worker must come up serving v1 (it exited: v2's store was locked); once the
    operator stops the replay with Ctrl-C, the worker builds v2 itself, `replay --diff --swap`
    waits for that build and names it, and every answer after the swap equals the oracle."""
    env = Env(config, unique("repair"), ledger_topic, tmp_path / "data")
    events = story(12_000, seed=75)
    publish(config, ledger_topic, events)
    done = env.refold("1", "replay", env.name, "--quiet")
    assert done.returncode == 0, done.stderr
    buggy, fixed = fold(events, buggy=True), fold(events, buggy=False)

    replay = slow_replay(env, "1,2", "--procs", "1", "--quiet", fold_s=0.005)
    v2 = store_path(env.config, env.name, 2)
    deadline = time.monotonic() + 60
    while lock_holder(v2) != replay.pid:
        assert time.monotonic() < deadline and replay.poll() is None, replay.communicate()
        time.sleep(0.05)
    try:
        env.start_worker("1,2")
        assert replay.poll() is None  # the worker came up while the replay held v2
        for key in ("biz-001", "per-002"):
            status, body = env.get(key)
            assert status == 200 and body["state"] == buggy[key], body

        os.killpg(replay.pid, signal.SIGINT)
        _out, err = replay.communicate(timeout=60)
        assert replay.returncode == 130, err
        deadline = time.monotonic() + 30
        while lock_holder(v2) != env.proc.pid:  # the worker took the build over
            assert time.monotonic() < deadline, "the worker did not take v2's build over"
            time.sleep(0.05)
        done = env.refold("1,2", "replay", env.name, "--diff", "--swap", "--quiet")
        assert done.returncode == 0, done.stderr
        assert f"built by process {env.proc.pid}" in done.stdout, done.stdout
        changed = sum(1 for k in fixed if fixed[k] != buggy[k])
        assert f"{changed} changed, 0 added, 0 removed" in done.stdout
        assert live_version(env.config, env.name) == 2
        until_every_key_reads(env, fixed)
    finally:
        if replay.poll() is None:
            replay.kill()
        env.stop_worker()
    assert env.states(2)[0] == fixed


def test_two_replays_of_one_version_serialize_and_the_second_takes_over_a_stopped_first(
    config, ledger_topic, unique, tmp_path
):
    """Two operators run `refold replay NAME --swap` at once. The second never writes the
    store the first builds: it says which process builds it and waits; when the first is
    stopped (Ctrl-C) before catching up, the second builds on from what the first stored,
    swaps, and the result equals the oracle."""
    env = Env(config, unique("repair"), ledger_topic, tmp_path / "data")
    events = story(12_000, seed=77)
    publish(config, ledger_topic, events)
    done = env.refold("1", "replay", env.name, "--quiet")
    assert done.returncode == 0, done.stderr

    first = slow_replay(env, "1,2", "--procs", "1", "--swap", "--quiet", fold_s=0.005)
    v2 = store_path(env.config, env.name, 2)
    deadline = time.monotonic() + 60
    while lock_holder(v2) != first.pid:
        assert time.monotonic() < deadline and first.poll() is None, first.communicate()
        time.sleep(0.05)
    second = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "refold.cli.main",
            "replay",
            env.name,
            "--swap",
            "--diff",
            "--stall-timeout",
            "20",
        ],
        env=env.env("1,2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = second.stderr.readline()  # the one line it says before waiting
        assert f"v2 of {env.name} is being built by process {first.pid} (refold replay" in line
        assert lock_holder(v2) == first.pid and live_version(env.config, env.name) == 1
        os.killpg(first.pid, signal.SIGINT)
        assert first.wait(60) == 130
        out, err = second.communicate(timeout=120)
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()
    assert second.returncode == 0, err
    assert "caught up with the live version" in out and "v2 is live" in out
    assert live_version(env.config, env.name) == 2
    assert env.states(2)[0] == fold(events, buggy=False)


def test_a_read_your_writes_wait_across_a_swap_is_answered_by_the_new_version(
    config, ledger_topic, unique, tmp_path
):
    """A client waits (min_offset, wait_ms) for an event that is published only after a swap
    moved queries to v2 and v1 was stopped (SWITCH_GRACE_S later). The key and the scan it
    asked for are answered by v2, with the event in them: not a 503 from v1's closed store."""
    env = Env(config, unique("repair"), ledger_topic, tmp_path / "data")
    events = story(500, seed=79)
    publish(config, ledger_topic, events)
    done = env.refold("1", "replay", env.name, "--quiet")
    assert done.returncode == 0, done.stderr
    key = "biz-003"
    partition = murmur2_partition(key.encode(), 4)
    wanted = end_offsets(config, ledger_topic)[(ledger_topic, partition)]
    wait = f"min_offset={partition}:{wanted}&wait_ms=25000"
    asked = {
        "key": f"http://127.0.0.1:{env.port}/projections/{env.name}/{key}?{wait}",
        "scan": f"http://127.0.0.1:{env.port}/projections/{env.name}?prefix={key}&{wait}",
    }
    answers: dict[str, tuple[int, dict]] = {}

    def ask(what: str) -> None:
        try:
            with urllib.request.urlopen(asked[what], timeout=40) as response:
                answers[what] = (response.status, json.loads(response.read()))
        except urllib.error.HTTPError as exc:
            answers[what] = (exc.code, json.loads(exc.read() or b"{}"))

    env.start_worker("1,2")
    askers = [threading.Thread(target=ask, args=(what,)) for what in asked]
    try:
        env.wait_folded(2, end_offsets(config, ledger_topic))  # built by the worker
        for asker in askers:
            asker.start()
        done = env.refold("1,2", "replay", env.name, "--swap", "--quiet")
        assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + 30
        while served_version(env) != 2:
            assert time.monotonic() < deadline, "queries did not move to v2"
            time.sleep(0.1)
        time.sleep(SWITCH_GRACE_S + 1)  # v1 is stopped, its store closed
        deposit = ("bank.MoneyDeposited", key, {"account_id": key, "amount_cents": 7, "memo": "w"})
        publish(config, ledger_topic, [deposit])
        for asker in askers:
            asker.join(40)
    finally:
        env.stop_worker()
    expected = fold([*events, deposit], buggy=False)[key]
    status, body = answers["key"]
    assert status == 200 and body["state"] == expected, body
    assert body["position"][f"{ledger_topic}:{partition}"] > wanted
    status, body = answers["scan"]
    assert status == 200 and body["items"] == [{"key": key, "state": expected}], body


def served_version(env: Env, name: str | None = None) -> int:
    """The version the worker's queries read, as `GET /projections` says."""
    url = f"http://127.0.0.1:{env.port}/projections"
    with urllib.request.urlopen(url, timeout=5) as response:
        return {p["name"]: p for p in json.loads(response.read())}[name or env.name]["version"]


def test_a_rollback_right_after_a_swap_is_followed_at_once(config, ledger_topic, unique, tmp_path):
    """Swap, then roll back within SWITCH_GRACE_S (the operator saw a bad number): v1 is still
    open in the worker, answering and folding. The worker must serve it again at once, not fail
    to open its store a second time (logged every 0.3 s until v1 had closed, while v2, rolled
    back, kept answering); every answer meanwhile is a 200."""
    env = Env(config, unique("repair"), ledger_topic, tmp_path / "data")
    events = story(500, seed=83)
    publish(config, ledger_topic, events)
    done = env.refold("1", "replay", env.name, "--quiet")
    assert done.returncode == 0, done.stderr
    env.start_worker("1,2")
    failures: list = []
    stop = threading.Event()

    def query_loop() -> None:
        while not stop.is_set():
            status, body = env.get("biz-001")
            if status != 200:
                failures.append((status, body))

    loop = threading.Thread(target=query_loop)
    try:
        env.wait_folded(2, end_offsets(config, ledger_topic))  # built by the worker
        loop.start()
        done = env.refold("1,2", "replay", env.name, "--swap", "--quiet")
        assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + 30
        while env.get("biz-001")[1].get("state") != fold(events, buggy=False)["biz-001"]:
            assert time.monotonic() < deadline, "queries did not move to v2"
            time.sleep(0.01)
        rollback(env.config, env.name)  # what `refold rollback` does, without its start-up time
        while served_version(env) != 1:
            assert time.monotonic() < deadline, "queries did not move back to v1"
            time.sleep(0.05)
        while env.get("biz-001")[1].get("state") != fold(events, buggy=True)["biz-001"]:
            assert time.monotonic() < deadline, "the reader processes did not follow"
            time.sleep(0.05)
    finally:
        stop.set()
        if loop.is_alive():
            loop.join()
        env.stop_worker()
    worker_log = (env.data_dir.parent / "worker.log").read_text(errors="replace")
    assert "could not follow the LIVE pointer" not in worker_log, worker_log[-3000:]
    assert failures == []


def test_dropping_a_version_a_replay_builds_is_refused(config, ledger_topic, unique, tmp_path):
    """`refold drop NAME --version 2` while a replay builds v2 would delete the files under a
    writer, and the replay's --swap would then point LIVE at a store that is gone (a worker
    opening it makes an empty one). It is refused naming the builder; the replay completes."""
    env = Env(config, unique("repair"), ledger_topic, tmp_path / "data")
    events = story(2000, seed=85)
    publish(config, ledger_topic, events)
    done = env.refold("1", "replay", env.name, "--quiet")
    assert done.returncode == 0, done.stderr
    replay = slow_replay(env, "1,2", "--procs", "1", "--swap", "--quiet", fold_s=0.004)
    v2 = store_path(env.config, env.name, 2)
    try:
        deadline = time.monotonic() + 60
        while lock_holder(v2) != replay.pid:
            assert time.monotonic() < deadline and replay.poll() is None, replay.communicate()
            time.sleep(0.05)
        done = env.refold("1,2", "drop", env.name, "--version", "2")
        assert done.returncode != 0 and f"process {replay.pid}" in done.stderr, done.stderr
        assert replay.wait(120) == 0, replay.communicate()
    finally:
        if replay.poll() is None:
            replay.kill()
    assert live_version(env.config, env.name) == 2
    assert env.states(2)[0] == fold(events, buggy=False)


def test_a_rollback_does_not_repeat_the_side_effects_of_what_it_catches_up(
    config, ledger_topic, unique, tmp_path
):
    """After a swap, v2 acts on the events published meanwhile. A rollback catches v1 up on
    them: they must reach v1 as replay (`event.replay`), or every notification that v2 sent for
    them is sent again."""
    env = Env(config, unique("repair"), ledger_topic, tmp_path / "data")
    fx = f"{env.name}-fx"
    before, during = story(300, seed=87), story(200, seed=88)
    publish(config, ledger_topic, before)
    env.start_worker("1")
    try:
        env.wait_folded(1, end_offsets(config, ledger_topic), name=fx)
    finally:
        env.stop_worker()
    env.start_worker("1,2")
    try:
        env.wait_folded(2, end_offsets(config, ledger_topic), name=fx)  # built beside v1
        done = env.refold("1,2", "replay", fx, "--swap", "--quiet")
        assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + 30
        while served_version(env, fx) != 2:
            assert time.monotonic() < deadline, "queries did not move to v2"
            time.sleep(0.1)
        time.sleep(SWITCH_GRACE_S + 1)  # v1 stopped: from now on only v2 acts
        publish(config, ledger_topic, during)
        env.wait_folded(2, end_offsets(config, ledger_topic), name=fx)
        done = env.refold("1,2", "rollback", fx)
        assert done.returncode == 0, done.stderr
        env.wait_folded(1, end_offsets(config, ledger_topic), name=fx)
    finally:
        env.stop_worker()
    v1 = env.states(1, fx)[0]
    assert sum(s["live_effects"] for s in v1.values()) == len(before)
    assert sum(s["replayed"] for s in v1.values()) == len(during)
