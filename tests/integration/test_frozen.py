"""A store is folded only by its own version's code: deploying v2 without v1's class freezes v1
(it answers at its last offsets, read-only), v2 builds beside it, a swap moves to v2, and a
rollback serves exactly what v1 held. Every expectation is an oracle computed here."""

from __future__ import annotations

import json
import time
import urllib.request

from refold.store.versions import live_version

from tests.integration.test_projections import end_offsets
from tests.integration.test_replay import Env, fold, publish, story


def listed(env: Env) -> dict[str, dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{env.port}/projections", timeout=5) as r:
        return {p["name"]: p for p in json.loads(r.read())}


def served(env: Env, keys: list[str]) -> dict[str, dict]:
    out = {}
    for key in keys:
        status, body = env.get(key)
        assert status == 200, body
        out[key] = body["state"]
    return out


def wait_served(env: Env, wanted: dict[str, dict], what: str) -> None:
    deadline = time.monotonic() + 30  # a deadline for the switch, not a speed check
    while served(env, sorted(wanted)) != wanted:
        if time.monotonic() > deadline:
            raise AssertionError(f"HTTP did not serve {what}")
        time.sleep(0.2)


def test_a_version_whose_class_is_gone_is_frozen_swapped_away_and_rolled_back_to(
    config, ledger_topic, unique, tmp_path
):
    env = Env(config, unique("frozen"), ledger_topic, tmp_path / "data")
    before, during, after = story(800, seed=71), story(300, seed=72), story(100, seed=73)
    publish(config, ledger_topic, before)
    env.start_worker("1")
    try:
        env.wait_folded(1, end_offsets(config, ledger_topic))
    finally:
        env.stop_worker()
    frozen_at = end_offsets(config, ledger_topic)
    v1 = fold(before, buggy=True)
    assert env.states(1) == (v1, frozen_at)

    # Deploy only v2's class: v1 is frozen, v2 builds beside it while more events arrive.
    env.start_worker("2")
    try:
        entry = listed(env)[env.name]
        assert entry["version"] == 1 and entry["state"] == "frozen"
        assert "code has no class for v1" in entry["error"]
        assert "the newest is v2" in entry["error"]
        assert entry["rebuild"]["version"] == 2
        publish(config, ledger_topic, during)
        env.wait_folded(2, end_offsets(config, ledger_topic))
        assert served(env, sorted(v1)) == v1  # not one event more than before the restart
        assert env.states(1) == (v1, frozen_at)
        _status, body = env.get(sorted(v1)[0])
        assert body["position"] == {f"{t}:{p}": o for (t, p), o in sorted(frozen_at.items())}

        done = env.refold("2", "status", "--json")
        assert done.returncode == 0, done.stderr
        row = {r["projection"]: r for r in map(json.loads, done.stdout.splitlines())}[env.name]
        assert row["version"] == 1 and row["state"] == "frozen", row
        assert "code has no class for v1" in row["frozen"]
        assert row["events_folded"] == len(before) and row["lag"] == len(during)
        done = env.refold("2", "replay", env.name, "--version", "1", "--quiet")
        assert done.returncode == 2 and "code has no class for v1" in done.stderr

        done = env.refold("2", "replay", env.name, "--diff", "--swap", "--quiet")
        assert done.returncode == 0, done.stderr
        assert "frozen live version" in done.stdout
        assert live_version(env.config, env.name) == 2
        wait_served(env, fold(before + during, buggy=False), "v2 after the swap")
        publish(config, ledger_topic, after)
        env.wait_folded(2, end_offsets(config, ledger_topic))
        everything = before + during + after
        assert env.states(2)[0] == fold(everything, buggy=False)
        assert listed(env)[env.name]["state"] == "running"

        done = env.refold("2", "rollback", env.name)
        assert done.returncode == 0 and "v1 is live again" in done.stdout, done.stderr
        assert "frozen" in done.stdout
        wait_served(env, v1, "v1's frozen state after the rollback")
        entry = listed(env)[env.name]
        assert entry["version"] == 1 and entry["state"] == "frozen"
    finally:
        env.stop_worker()
    assert env.states(1) == (v1, frozen_at)  # nothing ever folded into it
