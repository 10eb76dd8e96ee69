"""Replay and repair on the real broker: a fold with a bug, the fix as version 2, a shadow
rebuild while version 1 serves, a diff that names exactly the affected keys, swap, rollback."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

from refold.cli import broker
from refold.cli.broker import free_port
from refold.core.config import Config
from refold.core.errors import StoreError
from refold.engine.rebuild import PARALLEL_MIN_EVENTS, stored_offsets
from refold.kafka.publisher import Publisher
from refold.kafka.registry import codec_for
from refold.kafka.topics import Topics, event_topic, internal_topics
from refold.store.rocksdb import RocksStore
from refold.store.versions import live_version, parts_path, store_path

from tests.integration.test_broker import exited
from tests.integration.test_projections import end_offsets

ROOT = Path(__file__).resolve().parents[2]


def story(n: int, seed: int) -> list[tuple[str, str, dict]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        acc = f"{rng.choice(['biz', 'per'])}-{rng.randrange(40):03d}"
        kind = "bank.MoneyDeposited" if rng.random() < 0.6 else "bank.MoneyWithdrawn"
        out.append(
            (kind, acc, {"account_id": acc, "amount_cents": rng.randrange(1, 900), "memo": str(i)})
        )
    return out


def fold(events, buggy: bool) -> dict[str, dict]:
    """The oracle: what version 1 (buggy) or version 2 (fixed) must hold."""
    out: dict[str, dict] = defaultdict(lambda: {"balance_cents": 0, "events": 0})
    for kind, key, data in events:
        sign = -1 if kind == "bank.MoneyWithdrawn" and not (buggy and key.startswith("biz-")) else 1
        out[key]["balance_cents"] += sign * data["amount_cents"]
        out[key]["events"] += 1
    return dict(out)


class Env:
    def __init__(self, config: Config, name: str, topic: str, data_dir: Path) -> None:
        self.name, self.topic, self.data_dir = name, topic, data_dir
        self.config = Config(data_dir=data_dir, bootstrap_override=config.bootstrap_servers)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def env(self, versions: str) -> dict[str, str]:
        return {
            **os.environ,
            "REFOLD_BOOTSTRAP_SERVERS": self.config.bootstrap_servers,
            "REFOLD_DATA_DIR": str(self.data_dir),
            "REFOLD_APP": "tests.integration.apps.repair",
            "REPAIR_NAME": self.name,
            "REPAIR_TOPIC": self.topic,
            "REPAIR_CODE_VERSIONS": versions,
            "REFOLD_REBUILD_WRITE_EVERY": "2000",  # small rebuilds here: stored as they go
            "PYTHONPATH": str(ROOT),
        }

    def refold(
        self, versions: str, *args: str, timeout: float = 180
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "refold.cli.main", *args],
            env=self.env(versions),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start_worker(self, versions: str) -> None:
        log = (self.data_dir.parent / "worker.log").open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "refold.cli.main",
                "worker",
                "--only",
                f"{self.name},{self.name}-fx",
                "--http",
                f"127.0.0.1:{self.port}",
                "--http-procs",  # reader processes must follow the swap and rollback too
                "3",
            ],
            env=self.env(versions),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1)
                return
            except OSError:
                if self.proc.poll() is not None:
                    worker_log = (self.data_dir.parent / "worker.log").read_text(errors="replace")
                    raise AssertionError(f"worker exited: {worker_log[-2000:]}") from None
                time.sleep(0.2)
        raise AssertionError("worker HTTP did not come up")

    def stop_worker(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)

    def get(self, key: str, name: str | None = None) -> tuple[int, dict]:
        url = f"http://127.0.0.1:{self.port}/projections/{name or self.name}/{key}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def states(self, version: int, name: str | None = None) -> tuple[dict, dict]:
        view = RocksStore.open_secondary(
            store_path(self.config, name or self.name, version),
            self.data_dir.parent / f"sec-{version}-{time.time_ns()}",
        )
        try:
            return dict(view.scan(limit=100_000)), view.offsets()
        finally:
            view.close()

    def wait_folded(self, version: int, ends: dict, name: str | None = None) -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            path = store_path(self.config, name or self.name, version)
            if (path / "CURRENT").is_file():
                try:
                    _, offsets = self.states(version, name)
                except StoreError:  # the worker is still creating the store
                    offsets = {}
                if all(offsets.get(tp, 0) >= end for tp, end in ends.items()):
                    return
            time.sleep(0.3)
        raise AssertionError(f"v{version} did not fold up to {ends}")


def publish(config: Config, topic: str, events) -> None:
    with Publisher(config, codec_for(config)) as publisher:
        publisher.publish_many(topic, events)


def test_fix_a_bug_by_shadow_rebuild_diff_swap_and_rollback(config, ledger_topic, unique, tmp_path):
    env = Env(config, unique("repair"), ledger_topic, tmp_path / "data")
    first, during = story(1500, seed=11), story(400, seed=12)
    publish(config, ledger_topic, first)
    env.start_worker("1")
    env.wait_folded(1, end_offsets(config, ledger_topic))
    # The side-effect projection too: the replay flags below count from its v1 offsets.
    env.wait_folded(1, end_offsets(config, ledger_topic), name=f"{env.name}-fx")
    env.stop_worker()
    assert env.states(1)[0] == fold(first, buggy=True)

    # Deploy the fix: the worker serves v1 and builds v2 beside it.
    env.start_worker("1,2")
    failures: list = []
    served = 0
    stop = threading.Event()

    def query_loop() -> None:
        nonlocal served
        keys = sorted(fold(first, buggy=False))
        while not stop.is_set():
            status, body = env.get(random.choice(keys))
            if status != 200 or not isinstance(body.get("state", {}).get("balance_cents"), int):
                failures.append((status, body))
            served += 1

    loop = threading.Thread(target=query_loop)
    loop.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{env.port}/projections", timeout=5) as r:
            listed = {p["name"]: p for p in json.loads(r.read())}
        assert listed[env.name]["version"] == 1 and listed[env.name]["rebuild"]["version"] == 2
        publish(config, ledger_topic, during)
        ends = end_offsets(config, ledger_topic)
        env.wait_folded(1, ends)
        done = env.refold("1,2", "replay", env.name, "--diff", "--swap", "--quiet")
        assert done.returncode == 0, done.stderr
        everything = first + during
        affected = {
            k
            for k, s in fold(everything, buggy=True).items()
            if s != fold(everything, buggy=False)[k]
        }
        assert affected and all(k.startswith("biz-") for k in affected)
        assert f"{len(affected)} changed, 0 added, 0 removed" in done.stdout
        diff_file = Path(done.stdout.split("full diff: ")[1].split()[0])
        rows = [json.loads(line) for line in diff_file.read_text().splitlines()]
        assert {r["key"] for r in rows} == affected
        assert all(r["after"] == fold(everything, buggy=False)[r["key"]] for r in rows)

        assert live_version(env.config, env.name) == 2
        deadline = time.monotonic() + 30
        key = sorted(affected)[0]
        while env.get(key)[1]["state"] != fold(everything, buggy=False)[key]:
            if time.monotonic() > deadline:  # a deadline for the wait, not a speed check
                raise AssertionError("HTTP did not switch to v2")
            time.sleep(0.2)
        more = story(100, seed=13)
        publish(config, ledger_topic, more)
        env.wait_folded(2, end_offsets(config, ledger_topic))
        assert env.states(2)[0] == fold(everything + more, buggy=False)

        # The side-effect processor's v2, built beside its live v1 and never swapped in, acts
        # on nothing: v1 acted on every event, the history before the build and those since.
        env.wait_folded(2, end_offsets(config, ledger_topic), name=f"{env.name}-fx")
        fx, _ = env.states(2, f"{env.name}-fx")
        assert sum(s["replayed"] for s in fx.values()) == len(everything) + len(more)
        assert sum(s["live_effects"] for s in fx.values()) == 0

        done = env.refold("1,2", "rollback", env.name)
        assert done.returncode == 0 and "v1 is live again" in done.stdout, done.stderr
        deadline = time.monotonic() + 30
        while env.get(key)[1]["state"] != fold(everything + more, buggy=True)[key]:
            if time.monotonic() > deadline:
                raise AssertionError("HTTP did not roll back to v1")
            time.sleep(0.2)
    finally:
        stop.set()
        loop.join()
        env.stop_worker()
    assert served > 50 and failures == []


def test_cli_rebuild_resumes_after_kill_9_and_dry_run_writes_nothing(
    config, ledger_topic, unique, tmp_path
):
    env = Env(config, unique("repair"), ledger_topic, tmp_path / "data")
    events = story(30_000, seed=21)
    publish(config, ledger_topic, events)
    env.start_worker("1")
    ends = end_offsets(config, ledger_topic)
    env.wait_folded(1, ends)
    env.stop_worker()

    def written() -> list[str]:  # secondary views' scratch dirs come and go: not written data
        scratch = tmp_path / "data" / "scratch"
        return sorted(p.name for p in (tmp_path / "data").rglob("*") if scratch not in p.parents)

    before = written()
    done = env.refold("1,2", "replay", env.name, "--dry-run")
    assert done.returncode == 0, done.stderr
    assert f"events to fold: ~{len(events)}" in done.stdout and "live v1 by v2" in done.stdout
    assert written() == before

    proc = subprocess.Popen(
        [sys.executable, "-m", "refold.cli.main", "replay", env.name, "--quiet"],
        env=env.env("1,2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    path = store_path(env.config, env.name, 2)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # kill once part of the rebuild is stored
        try:
            if (path / "CURRENT").is_file() and sum(env.states(2)[1].values()) > 2000:
                break
        except StoreError:  # the rebuild is still creating its store
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    partial = sum(env.states(2)[1].values())
    assert 0 < partial < len(events)

    scratch = tmp_path / "data" / "scratch"
    assert any(p.name.startswith(f"{proc.pid}-") for p in scratch.iterdir())  # its live view's
    done = env.refold("1,2", "replay", env.name, "--diff", "--quiet")
    assert done.returncode == 0, done.stderr
    assert env.states(2)[0] == fold(events, buggy=False)
    assert f"folded {len(events) - partial} events" in done.stdout
    assert live_version(env.config, env.name) == 1  # no --swap
    assert not any(p.name.startswith(f"{proc.pid}-") for p in scratch.iterdir())  # swept


def test_as_of_equals_an_independent_fold_up_to_that_time(config, ledger_topic, unique, tmp_path):
    env = Env(config, unique("repair"), ledger_topic, tmp_path / "data")
    early = [e for e in story(300, seed=31) if e[1] == "per-001"] or story(5, seed=1)
    key = early[0][1]
    publish(config, ledger_topic, early)
    time.sleep(1.2)
    moment = datetime.now(UTC)
    time.sleep(1.2)
    late = [("bank.MoneyDeposited", key, {"account_id": key, "amount_cents": 7, "memo": "late"})]
    publish(config, ledger_topic, late)
    done = env.refold("1", "query", env.name, key, "--as-of", moment.isoformat())
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["state"] == fold([e for e in early if e[1] == key], buggy=True)[key]
    done = env.refold("1", "query", env.name, key, "--as-of", datetime.now(UTC).isoformat())
    assert json.loads(done.stdout)["state"] == fold(early + late, buggy=True)[key]
    done = env.refold("1", "query", env.name, key, "--as-of", "yesterday-ish")
    assert done.returncode == 2 and "ISO-8601" in done.stderr

    env.start_worker("1")
    try:
        stamp = urllib.parse.quote(moment.isoformat())
        status, body = env.get(f"{key}?as_of={stamp}")
        assert status == 200 and body["state"] == answer["state"]
        assert body["position"] == answer["position"]
        status, body = env.get(f"{key}?as_of=not-a-time")
        assert status == 400 and "ISO-8601" in body["detail"]
    finally:
        env.stop_worker()


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def wait_gone(pids: list[int], timeout: float = 15.0) -> None:
    """Wait until every pid has exited (a zombie waiting for init to reap it counts)."""
    deadline = time.monotonic() + timeout
    while any(not exited(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise AssertionError(f"rebuild children outlived their parent: {pids}")
        time.sleep(0.1)


def test_rebuild_split_over_processes_survives_kill_9_and_equals_the_oracle(
    config, ledger_topic, unique, tmp_path
):
    """Two processes fold the partitions into parts; kill -9 of the replay takes its children
    down too; the rerun resumes every part from its own offsets, merges, and the result, the
    diff and the count of events folded all match the oracle."""
    env = Env(config, unique("repair"), ledger_topic, tmp_path / "data")
    events = story(150_000, seed=41)
    publish(config, ledger_topic, events)
    env.start_worker("1")  # serves v1 throughout; the code it runs knows no v2
    try:
        env.wait_folded(1, end_offsets(config, ledger_topic))

        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "refold.cli.main",
                "replay",
                env.name,
                "--procs",
                "2",
                "--quiet",
            ],
            env=env.env("1,2"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        parts = parts_path(env.config, env.name, 2)
        deadline = time.monotonic() + 90
        while sum(stored_offsets(env.config, env.name, 2).values()) < 3000:  # parts are folding
            if time.monotonic() > deadline or proc.poll() is not None:
                raise AssertionError(f"no part progress seen: {proc.communicate()}")
            time.sleep(0.02)
        children = _children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert len(children) >= 2  # the two parts (and multiprocessing's resource tracker)
        wait_gone(children)
        assert parts.is_dir() and not stored_offsets_of_store(env, 2)
        partial = sum(stored_offsets(env.config, env.name, 2).values())
        assert 0 < partial < len(events)
        with urllib.request.urlopen(f"http://127.0.0.1:{env.port}/projections", timeout=5) as r:
            rebuild = {p["name"]: p for p in json.loads(r.read())}[env.name]["rebuild"]
        assert rebuild["version"] == 2 and rebuild["state"] == "on disk, behind"
        assert sum(p["next_offset"] for p in rebuild["partitions"]) == partial

        diff_file = tmp_path / "diff.jsonl"
        done = env.refold(
            "1,2", "replay", env.name, "--procs", "2", "--diff", "--diff-file", str(diff_file)
        )
        assert done.returncode == 0, done.stderr
        fixed, buggy = fold(events, buggy=False), fold(events, buggy=True)
        assert env.states(2)[0] == fixed
        assert env.states(2)[1] == end_offsets(config, ledger_topic)
        assert (
            f"folded {len(events) - partial} events" in done.stdout and "2 processes" in done.stdout
        )
        changed = {json.loads(line)["key"] for line in diff_file.read_text().splitlines()}
        assert changed == {k for k in fixed if fixed[k] != buggy[k]} and changed
        assert not parts.exists()
    finally:
        env.stop_worker()


def stored_offsets_of_store(env: Env, version: int) -> dict:
    """The offsets in the version's own store (not its parts), if it exists yet."""
    if not (store_path(env.config, env.name, version) / "CURRENT").is_file():
        return {}
    return env.states(version)[1]


def test_a_rebuild_whose_broker_dies_gives_up_with_a_reason(tmp_path, unique):
    """The broker is killed while the parts fold: the replay must not hang; it exits non-zero,
    says nothing moved, and leaves no child behind."""
    own = Config(data_dir=tmp_path / "broker")
    info = broker.start(own, port=free_port(), heap_mb=384)
    try:
        config = Config(data_dir=tmp_path / "unused", bootstrap_override=info.bootstrap_servers)
        topic = unique("ledger")
        Topics(config).ensure([*internal_topics(config), event_topic(topic, partitions=4)])
        publish(config, topic, story(150_000, seed=51))
        env = Env(config, unique("repair"), topic, tmp_path / "data")
        proc = subprocess.Popen(
            [sys.executable, "-m", "refold.cli.main", "replay", env.name, "--procs", "2", "--quiet",
             "--stall-timeout", "5"],
            env=env.env("1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 90
            while sum(stored_offsets(env.config, env.name, 1).values()) < 3000:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError(f"no part progress seen: {proc.communicate()}")
                time.sleep(0.02)
            children = _children(proc.pid)
            broker.kill_node(own, 1)
            _out, err = proc.communicate(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
        # Either no part moves for the stall timeout, or a part (re)started while the broker
        # is gone fails reading metadata: both end the replay with a reason, never a hang.
        reasons = ("no part moved for 5 s", "failed: TopicError: cannot read metadata")
        assert proc.returncode != 0 and "refold: error:" in err, err
        assert any(reason in err for reason in reasons), err
        wait_gone(children)
    finally:
        broker.stop(own, timeout=20)


def test_a_worker_builds_a_new_version_in_parts_beside_the_live_one(
    config, ledger_topic, unique, tmp_path
):
    """A worker deployed with v2 while v1 holds 200k+ events folds v2 in parts (one process per
    core), merges, follows; `replay --diff --swap` attaches to it; all equal the oracle."""
    env = Env(config, unique("repair"), ledger_topic, tmp_path / "data")
    events = story(PARALLEL_MIN_EVENTS + 10_000, seed=61)
    publish(config, ledger_topic, events)
    env.start_worker("1")
    env.wait_folded(1, end_offsets(config, ledger_topic))
    env.wait_folded(1, end_offsets(config, ledger_topic), name=f"{env.name}-fx")
    env.stop_worker()

    parts, seen = parts_path(env.config, env.name, 2), threading.Event()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set() and not seen.is_set():
            if parts.is_dir():
                seen.set()
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        env.start_worker("1,2")
        done = env.refold("1,2", "replay", env.name, "--diff", "--swap", "--quiet")
        assert done.returncode == 0, done.stderr
        env.wait_folded(2, end_offsets(config, ledger_topic), name=f"{env.name}-fx")
    finally:
        stop.set()
        watcher.join()
        env.stop_worker()
    # Built in parts, merged, cleaned up (the worker's log says why not).
    worker_log = (env.data_dir.parent / "worker.log").read_text(errors="replace")
    assert seen.is_set() and not parts.exists(), worker_log[-4000:]
    fixed, buggy = fold(events, buggy=False), fold(events, buggy=True)
    assert env.states(2)[0] == fixed
    affected = {k for k in fixed if fixed[k] != buggy[k]}
    assert f"{len(affected)} changed, 0 added, 0 removed" in done.stdout
    assert live_version(env.config, env.name) == 2
    fx, _ = env.states(2, f"{env.name}-fx")  # every event was below the live offsets: replayed
    assert sum(s["replayed"] for s in fx.values()) == len(events)
    assert sum(s["live_effects"] for s in fx.values()) == 0
