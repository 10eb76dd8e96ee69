"""Projection versions on disk: one store per version, and the LIVE pointer queries follow.

`$REFOLD_DATA_DIR/projections/<name>/LIVE` holds `{"version": N, "previous": [...]}`; it is
replaced atomically (write a temp file of this writer's own, fsync, rename), so a reader sees the
old pointer or the new one, never a torn one. `previous` is the stack `rollback` pops.

Writers — `replay --swap`, `rollback`, `drop`, a worker's own swap — may run at the same moment in
different processes: each reads, changes and replaces the pointer holding an exclusive lock on
`LIVE.lock` beside it, so no change is lost and no writer replaces another's temp file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from refold.core.config import Config
from refold.core.errors import ProjectionError
from refold.store.rocks_open import describe_process, lock_holder


def projection_dir(config: Config, name: str) -> Path:
    return config.data_dir / "projections" / name


def store_path(config: Config, name: str, version: int) -> Path:
    return projection_dir(config, name) / f"v{version}"


def parts_path(config: Config, name: str, version: int) -> Path:
    """Where a parallel rebuild keeps its part stores until they are merged
    (refold.engine.rebuild)."""
    return projection_dir(config, name) / f"v{version}.parts"


def versions_on_disk(config: Config, name: str) -> list[int]:
    root = projection_dir(config, name)
    return sorted(int(p.name[1:]) for p in root.glob("v*") if p.name[1:].isdigit() and p.is_dir())


def _pointer(config: Config, name: str) -> dict[str, object] | None:
    try:
        pointer: dict[str, object] = json.loads((projection_dir(config, name) / "LIVE").read_text())
        return pointer
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise ProjectionError(f"broken LIVE pointer for {name!r}: {exc}") from exc


def live_version(config: Config, name: str) -> int | None:
    """The version queries read: the LIVE pointer, else the only/newest version on disk (a
    pointer that names none says no version is live yet)."""
    pointer = _pointer(config, name)
    if pointer is not None:
        version = pointer["version"]
        return None if version is None else int(version)  # type: ignore[call-overload]
    on_disk = versions_on_disk(config, name)
    return on_disk[-1] if on_disk else None


def pin_live(config: Config, name: str, *, create: bool = False) -> int | None:
    """Write down the version `live_version` names when no pointer exists yet (the newest on
    disk), before another version's store is created: else that new store, however little it
    holds, would be the newest on disk and taken for live without a swap. With `create` (a
    replay about to build the first version), a projection with no version at all gets a
    pointer naming none: the store it builds is not live until the replay has completed it.
    Returns the live version (None: none)."""
    with _pointer_lock(config, name, create=create):
        live = live_version(config, name)
        if _pointer(config, name) is None and (live is not None or create):
            _write_pointer(config, name, live, [])
        return live


@contextlib.contextmanager
def _pointer_lock(config: Config, name: str, *, create: bool = False) -> Iterator[None]:
    """Hold the projection's pointer lock: one read-modify-write of LIVE at a time, across
    processes (the kernel releases it when its holder dies, even by kill -9). Without `create`,
    a projection with no directory has no pointer to change: nothing is made for it."""
    root = projection_dir(config, name)
    if not create and not root.is_dir():
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    with (root / "LIVE.lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _write_pointer(config: Config, name: str, version: int | None, previous: list[int]) -> None:
    """Replace LIVE atomically (call it holding `_pointer_lock`)."""
    root = projection_dir(config, name)
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="LIVE.", suffix=".tmp", dir=root)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump({"version": version, "previous": previous}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, root / "LIVE")
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def set_live(config: Config, name: str, version: int) -> int | None:
    """Make `version` live; the old live version is remembered for rollback. Returns it."""
    with _pointer_lock(config, name, create=True):
        pointer = _pointer(config, name) or {}
        old = pointer.get("version")
        previous = [int(v) for v in pointer.get("previous", [])]  # type: ignore[attr-defined]
        if old is not None and int(old) != version:  # type: ignore[call-overload]
            previous.append(int(old))  # type: ignore[call-overload]
        _write_pointer(config, name, version, previous)
    return int(old) if old is not None else None  # type: ignore[call-overload]


def rollback(config: Config, name: str) -> tuple[int, int]:
    """Make the previous live version live again; returns (from, to)."""
    with _pointer_lock(config, name):
        return _rollback(config, name)


def _rollback(config: Config, name: str) -> tuple[int, int]:
    pointer = _pointer(config, name)
    previous = [int(v) for v in (pointer or {}).get("previous", [])]  # type: ignore[attr-defined]
    previous = [v for v in previous if store_path(config, name, v).is_dir()]
    if pointer is None or not previous:
        raise ProjectionError(
            f"projection {name!r} has no previous version to roll back to",
            hint="versions on disk: "
            + (", ".join(map(str, versions_on_disk(config, name))) or "none"),
        )
    current = int(pointer["version"])  # type: ignore[call-overload]
    target = previous.pop()
    _write_pointer(config, name, target, previous)
    return current, target


def drop(config: Config, name: str, version: int) -> None:
    """Delete a version's store; the live one cannot be dropped."""
    with _pointer_lock(config, name):
        _drop(config, name, version)


def _drop(config: Config, name: str, version: int) -> None:
    if live_version(config, name) == version:
        raise ProjectionError(
            f"version {version} of {name!r} is live",
            hint="swap to another version or roll back first",
        )
    path = store_path(config, name, version)
    if not path.is_dir():
        raise ProjectionError(f"projection {name!r} has no version {version} on disk")
    holder = lock_holder(path)
    if holder is not None:  # its files would go from under a replay (or a worker) writing them
        raise ProjectionError(
            f"version {version} of {name!r} is open in process {holder} "
            f"({describe_process(holder)})",
            hint="wait for that replay to end, or stop it (or the worker), then drop",
        )
    shutil.rmtree(path)
    shutil.rmtree(parts_path(config, name, version), ignore_errors=True)
    pointer = _pointer(config, name)
    if pointer is not None:
        previous = [int(v) for v in pointer.get("previous", []) if int(v) != version]  # type: ignore[attr-defined]
        _write_pointer(config, name, live_version(config, name), previous)


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0
