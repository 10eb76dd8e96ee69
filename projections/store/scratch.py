"""Scratch directories of secondary store views: under the data dir, swept once their owner is gone.

A RocksDB secondary instance (`RocksStore.open_secondary`: replay, status and the HTTP reader
processes read live stores through them) needs a private directory for its own files. They live
under `<data_dir>/scratch/`, each named `<pid>-<start>-<label>-<random>`: the owning process's
id and start time (clock ticks after boot, from /proc), so a pid reused by another process is
not taken for the owner. A view's `close()` removes its directory; `sweep` (run when a worker
starts) removes those a killed process left behind, and keeps those whose owner still runs.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def scratch_dir(data_dir: Path) -> Path:
    """Where the secondary views of the stores under `data_dir` keep their scratch dirs."""
    return data_dir / "scratch"


def _start_ticks(pid: int) -> int | None:
    """When `pid` started (clock ticks after boot), 0 without /proc, None if it is not running."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:  # no /proc here: fall back to "a process with that id exists"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return 0
        return 0
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22: starttime


def make_scratch(root: Path, label: str) -> Path:
    """A fresh directory under `root` owned by this process."""
    root.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    start = _start_ticks(pid) or 0
    return Path(tempfile.mkdtemp(prefix=f"{pid}-{start}-{label}-", dir=root))


def _owner_alive(name: str) -> bool:
    pid_text, _, rest = name.partition("-")
    start_text = rest.partition("-")[0]
    if not (pid_text.isdigit() and start_text.isdigit()):
        return True  # not named by make_scratch: not ours to judge
    start = _start_ticks(int(pid_text))
    return start is not None and (start == int(start_text) or start == 0 or int(start_text) == 0)


def sweep(root: Path) -> list[Path]:
    """Remove the scratch directories under `root` whose owning process is gone."""
    if not root.is_dir():
        return []
    removed = []
    for path in sorted(root.iterdir()):
        if path.is_dir() and not _owner_alive(path.name):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log.info("removed %d scratch dir(s) of processes gone: %s", len(removed), removed)
    return removed
