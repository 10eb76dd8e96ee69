"""Replay in the situations operators meet on a system of record: replays interrupted or run
twice at once, swaps and rollbacks racing a worker that switches, events still arriving. Real
broker, the real CLI and worker as subprocesses, results against an oracle fold."""

from __future__ import annotations

import json

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
