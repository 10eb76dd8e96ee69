"""How a worker follows a projection's LIVE pointer: queries move to the version it names only
once that version has caught up, one projection's wait holds no other's switch back, each event
is acted on once across a build and a swap, and a store another process holds is waited for
quietly. Real broker, the real worker as a subprocess, results against oracle folds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition
from refold.core.config import Config
from refold.engine.rebuild import stored_offsets
from refold.kafka.topics import Topics, event_topic
from refold.store.rocks_open import lock_holder
from refold.store.versions import live_version, pin_live, set_live, store_path

from tests.integration.test_projections import end_offsets
from tests.integration.test_replay import Env, fold, publish, story
from tests.integration.test_replay_races import (
    interrupt_after_a_write,
    served_version,
    slow_replay,
    until_every_key_reads,
)


class SwitchEnv(Env):
    """An `Env` whose processes get `extra` environment variables (see apps/repair.py)."""

    def __init__(self, config: Config, name: str, topic: str, data_dir: Path, **extra: str):
        super().__init__(config, name, topic, data_dir)
        self.extra = extra

    def env(self, versions: str) -> dict[str, str]:
        return {**super().env(versions), **self.extra}

    def listed(self) -> dict[str, dict]:
        url = f"http://127.0.0.1:{self.port}/projections"
        with urllib.request.urlopen(url, timeout=5) as response:
            return {p["name"]: p for p in json.loads(response.read())}

    def log(self) -> str:
        return (self.data_dir.parent / "worker.log").read_text(errors="replace")


def test_queries_stay_on_the_old_version_until_the_new_one_caught_up_and_others_move_on(
    config, ledger_topic, unique, tmp_path
):
    """LIVE is moved to a v2 that cannot catch up (its fold waits on a file). For well over
    the minute after which the worker used to give up waiting, every answer is v1's (never a
    state behind what was served), and `GET /projections` says what the switch waits for and
    how far behind v2 is; meanwhile a swap of another projection is followed at once. Once v2
    can fold, queries move to it and every answer is v2's."""
    hold = tmp_path / "hold"
    hold.touch()
    env = SwitchEnv(
        config, unique("repair"), ledger_topic, tmp_path / "data", REPAIR_HOLD_FILE=str(hold)
    )
    fx = f"{env.name}-fx"
    events = story(400, seed=101)
    publish(config, ledger_topic, events)
    for name in (env.name, fx):
        done = env.refold("1", "replay", name, "--quiet")
        assert done.returncode == 0, done.stderr
    buggy, fixed = fold(events, buggy=True), fold(events, buggy=False)
    keys = sorted(k for k in fixed if fixed[k] != buggy[k])[:5]
    env.start_worker("1,2")
    try:
        env.wait_folded(2, end_offsets(config, ledger_topic), name=fx)  # built beside v1
        set_live(env.config, env.name, 2)  # what `replay --swap` does in another process
        swapped_at = time.monotonic()
        time.sleep(1.0)  # the watcher is in that switch now
        set_live(env.config, fx, 2)
        deadline = time.monotonic() + 10
        while served_version(env, fx) != 2:
            assert time.monotonic() < deadline, "the other projection's swap was not followed"
            time.sleep(0.1)

        switch = env.listed()[env.name]["switch"]
        assert switch["version"] == 2 and switch["behind"] > 0, switch
        assert "queries read v1 until v2 has folded what v1 has" in switch["waiting"], switch
        while time.monotonic() - swapped_at < 70:  # the old code gave up after 60 s
            assert served_version(env) == 1
            for key in keys:
                status, body = env.get(key)
                assert status == 200 and body["state"] == buggy[key], body
            time.sleep(0.5)
        assert "queries read v1 until v2 has folded what v1 has" in env.log()

        hold.unlink()
        deadline = time.monotonic() + 60
        while served_version(env) != 2:
            assert time.monotonic() < deadline, "queries did not move to v2 once it caught up"
            time.sleep(0.2)
        until_every_key_reads(env, fixed)
        assert env.listed()[env.name]["switch"] is None
    finally:
        hold.unlink(missing_ok=True)  # (a fold held in it would hold the worker's exit)
        env.stop_worker()


def notifications(config: Config, topic: str, start: int = 0) -> Counter[str]:
    """How many times each event position was acted on, from offset `start` of the (one-
    partition) notifications topic on (see apps/repair.py, REPAIR_FX_TOPIC)."""
    consumer = Consumer(
        {
            "bootstrap.servers": config.bootstrap_servers,
            "group.id": "unused",
            "enable.partition.eof": True,
        }
    )
    consumer.assign([TopicPartition(topic, 0, start)])
    seen: Counter[str] = Counter()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            if msg.error() is not None:
                break  # the end of the only partition
            seen[msg.key().decode()] += 1
    finally:
        consumer.close()
    return seen


def test_each_event_is_acted_on_once_across_a_build_a_swap_and_its_grace(
    config, ledger_topic, unique, tmp_path
):
    """Events keep arriving while the worker builds v2 of a projection that acts on events
    (a notification per event it does not see as `replay`), while a swap moves queries to v2
    and during the two seconds v1 answers after it. Every event must be acted on exactly once,
    by the version that was live when it came: counted in the records sent."""
    notify = unique("notify")
    Topics(config).ensure([event_topic(notify, partitions=1)])
    env = SwitchEnv(
        config, unique("repair"), ledger_topic, tmp_path / "data", REPAIR_FX_TOPIC=notify
    )
    fx = f"{env.name}-fx"
    publish(config, ledger_topic, story(300, seed=103))
    env.start_worker("1")
    try:
        env.wait_folded(1, end_offsets(config, ledger_topic), name=fx)
    finally:
        env.stop_worker()

    stop = threading.Event()

    def keep_publishing() -> None:
        seed = 200
        while not stop.wait(0.05):
            publish(config, ledger_topic, story(5, seed=seed))
            seed += 1

    publisher = threading.Thread(target=keep_publishing)
    env.start_worker("1,2")
    publisher.start()
    try:
        env.wait_folded(2, end_offsets(config, ledger_topic), name=fx)  # built, following
        time.sleep(2)  # v2 follows v1 at the end of the log for a while
        set_live(env.config, fx, 2)
        deadline = time.monotonic() + 30
        while served_version(env, fx) != 2:
            assert time.monotonic() < deadline, "queries did not move to v2"
            time.sleep(0.1)
        time.sleep(4)  # past v1's grace, events still arriving
        stop.set()
        publisher.join()
        ends = end_offsets(config, ledger_topic)
        env.wait_folded(2, ends, name=fx)
    finally:
        stop.set()
        env.stop_worker()
    sent = notifications(config, notify)
    everything = {f"{t}:{p}:{o}" for (t, p), end in ends.items() for o in range(end)}
    twice = {where: n for where, n in sent.items() if n > 1}
    assert not twice, f"{len(twice)} events acted on more than once, e.g. {sorted(twice)[:5]}"
    assert set(sent) == everything, f"{len(everything - set(sent))} events never acted on"


def test_a_worker_waits_quietly_for_a_store_another_process_holds(
    config, ledger_topic, unique, tmp_path
):
    """While another process (a replay) holds the store of the version the worker's code
    builds, the worker serves v1 and tries again every 0.3 s: it must say so once, not spin,
    not touch the holder's RocksDB files (each failed open used to move the holder's info LOG
    aside, keeping only three), and build v2 itself as soon as the lock is free."""
    env = SwitchEnv(config, unique("repair"), ledger_topic, tmp_path / "data")
    events = story(300, seed=105)
    publish(config, ledger_topic, events)
    done = env.refold("1", "replay", env.name, "--quiet")
    assert done.returncode == 0, done.stderr
    v2 = store_path(env.config, env.name, 2)
    pin_live(env.config, env.name)  # as a replay does before it creates v2's store
    holder = subprocess.Popen(  # holds v2's store (RocksDB's LOCK) until told to let go
        [
            sys.executable,
            "-c",
            "import sys; from refold.store.rocksdb import RocksStore; "
            f"s = RocksStore.open({str(v2)!r}); print('held', flush=True); sys.stdin.readline(); "
            "s.close()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        holder_log = os.stat(v2 / "LOG").st_ino
        env.start_worker("1,2")
        assert served_version(env) == 1
        ticks = os.sysconf("SC_CLK_TCK")

        def cpu_s() -> float:
            fields = Path(f"/proc/{env.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime

        time.sleep(1)
        before, started = cpu_s(), time.monotonic()
        time.sleep(5)  # ~16 tries
        used = (cpu_s() - before) / (time.monotonic() - started)
        assert used < 0.5, f"the waiting worker used {used:.0%} of a core"
        assert sorted(p.name for p in v2.glob("LOG.old.*")) == []
        assert os.stat(v2 / "LOG").st_ino == holder_log
        said = env.log().count("is not built here while another process writes it")
        assert said == 1, env.log()[-3000:]

        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(30) == 0
        freed = time.monotonic()
        while lock_holder(v2) != env.proc.pid:
            assert time.monotonic() - freed < 10, "the worker did not take v2's build up"
            time.sleep(0.02)
        env.wait_folded(2, end_offsets(config, ledger_topic))
        assert live_version(env.config, env.name) == 1
        status, body = env.get("biz-001")
        assert status == 200 and body["state"] == fold(events, buggy=True)["biz-001"], body
    finally:
        if holder.poll() is None:
            holder.kill()
        env.stop_worker()
    assert env.states(2)[0] == fold(events, buggy=False)


def test_an_interrupted_first_replay_leaves_no_version_live(config, ledger_topic, unique, tmp_path):
    """The very first `refold replay` of a projection is stopped half-way (Ctrl-C). Its
    half-built v1 must not count as live (it used to, as the only version on disk): the
    replay says so, and a worker deployed with the next version's code alone serves that
    version, folded by itself, rather than v1 frozen half-built for ever."""
    env = SwitchEnv(config, unique("repair"), ledger_topic, tmp_path / "data")
    events = story(20_000, seed=107)
    publish(config, ledger_topic, events)
    replay = slow_replay(env, "1", "--procs", "1", "--quiet", fold_s=0.0005)
    err = interrupt_after_a_write(env, replay, 1)
    assert f"interrupted: {env.name} v1 is not live;" in err
    assert 0 < sum(stored_offsets(env.config, env.name, 1).values()) < len(events)
    assert live_version(env.config, env.name) is None

    env.start_worker("2")
    try:
        assert served_version(env) == 2
        env.wait_folded(2, end_offsets(config, ledger_topic))
        fixed = fold(events, buggy=False)
        assert {k: env.get(k)[1]["state"] for k in fixed} == fixed
        assert env.listed()[env.name]["state"] == "running"
    finally:
        env.stop_worker()
    assert live_version(env.config, env.name) == 2
