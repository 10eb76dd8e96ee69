"""Replay in the situations operators meet on a system of record: replays interrupted or run
twice at once, swaps and rollbacks racing a worker that switches, events still arriving. Real
broker, the real CLI and worker as subprocesses, results against an oracle fold."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from refold.engine.rebuild import stored_offsets
from refold.store.versions import live_version

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


def test_ctrl_c_in_the_middle_of_a_fold_loses_no_event(config, ledger_topic, unique, tmp_path):
    """Ctrl-C lands while the replay folds a batch (most of its time). What the interrupted
    replay stored must be whole batches: the rerun resumes from it and equals the oracle."""
    env = Env(config, unique("repair"), ledger_topic, tmp_path / "data")
    events = story(12_000, seed=73)
    publish(config, ledger_topic, events)
    done = env.refold("1", "replay", env.name, "--quiet")
    assert done.returncode == 0, done.stderr

    replay = slow_replay(env, "1,2", "--procs", "1", "--quiet", fold_s=0.0005)
    deadline = time.monotonic() + 60
    while not stored_offsets(env.config, env.name, 2):  # a first write stored
        assert time.monotonic() < deadline and replay.poll() is None, replay.communicate()
        time.sleep(0.05)
    time.sleep(0.3)  # into the next batches
    os.killpg(replay.pid, signal.SIGINT)
    _out, err = replay.communicate(timeout=60)
    assert replay.returncode == 130, err
    assert 0 < sum(stored_offsets(env.config, env.name, 2).values()) < len(events)

    done = env.refold("1,2", "replay", env.name, "--quiet")
    assert done.returncode == 0, done.stderr
    assert env.states(2)[0] == fold(events, buggy=False)
