"""A process killed with SIGKILL while it holds a secondary view leaves its scratch dir under
the data dir (never in /tmp); the next worker on that data dir removes it, and keeps the scratch
dir of a process that still runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from refold.store.rocksdb import RocksStore
from refold.store.scratch import scratch_dir

from tests.integration.test_replay import ROOT, Env

HOLD_A_VIEW = """
import sys, time
from pathlib import Path
from refold.store.rocksdb import RocksStore
view = RocksStore.open_secondary(sys.argv[1], scratch_root=Path(sys.argv[2]))
print(view._scratch, flush=True)
time.sleep(600)
"""


def hold_a_view(store: Path, root: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_A_VIEW, str(store), str(root)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def test_a_worker_sweeps_scratch_dirs_of_killed_processes_only(
    config, ledger_topic, unique, tmp_path
):
    env = Env(config, unique("scratch"), ledger_topic, tmp_path / "data")
    store = env.data_dir / "projections" / "other" / "v1"
    with RocksStore.open(store) as writer:
        writer.commit({"a": 1}, {("t", 0): 1})
    root = scratch_dir(env.data_dir)
    killed, stale = hold_a_view(store, root)
    alive, kept = hold_a_view(store, root)
    try:
        assert stale.parent == root and kept.parent == root and stale.is_dir() and kept.is_dir()
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        time.sleep(0.2)
        assert stale.is_dir()  # nothing removed it: the process had no chance to
        env.start_worker("1")
        env.stop_worker()
        assert not stale.exists()
        assert kept.is_dir()
    finally:
        for proc in (killed, alive):
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
