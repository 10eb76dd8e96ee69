"""How a worker follows a projection's LIVE pointer: queries move to the version it names only
once that version has caught up, one projection's wait holds no other's switch back, each event
is acted on once across a build and a swap, and a store another process holds is waited for
quietly. Real broker, the real worker as a subprocess, results against oracle folds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from refold.core.config import Config
from refold.store.rocks_open import lock_holder
from refold.store.versions import live_version, pin_live, store_path

from tests.integration.test_projections import end_offsets
from tests.integration.test_replay import Env, fold, publish, story
from tests.integration.test_replay_races import served_version


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
