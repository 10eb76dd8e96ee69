"""How a worker moves a projection's queries from one version to another, a step per tick.

The LIVE pointer names a version queries do not read yet (a swap, a rollback, a build that
caught up): the worker's watcher (refold.engine.worker) calls `_switch` once per tick. The target
is started (or taken from the builds, or revived within its grace) and trails the serving
version (refold.engine.runner_trail, `trailing`); once it keeps pace, the serving version retires
(stops folding and acting, its store still answering); once the target has folded all it did,
queries read the target and the old version answers SWITCH_GRACE_S more. Until then queries read
the serving version, however long that takes (`switch_status` says why); a failed target leaves
it serving. No step waits, so one projection's switch holds no other's back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from refold.core.errors import ProjectionError
from refold.core.projection import Projection
from refold.engine.frozen import FrozenVersion, Serving
from refold.engine.runner_stats import TP
from refold.engine.runtime import ProjectionRunner

log = logging.getLogger("refold.engine.worker")

SWITCH_GRACE_S = 2.0  # an old version keeps answering (not folding) this long after queries left
SAY_EVERY_S = 10.0  # how often a switch that waits says again how far behind its target is


class VersionSwitch:
    """The switching half of `refold.engine.worker.Worker` (its state is the worker's)."""

    versions: dict[str, dict[int, Projection]]
    runners: dict[str, Serving]
    builds: dict[str, ProjectionRunner]
    switching: dict[str, Serving]
    _switch_said: dict[str, tuple[str, float, str]]
    _seen: dict[str, dict[TP, int]]
    _retired: list[Serving]
    _retired_lock: threading.Lock
    _serve: Callable[..., Serving]
    _start_runner: Callable[..., ProjectionRunner]

    def _switch(self, name: str, version: int) -> None:
        """One step of moving queries to `version` (the LIVE pointer's); never waits. The
        target is started (or taken from the builds, or revived) and trails the serving
        version; once it keeps pace, the serving version retires (stops folding and acting,
        its store still answering); once the target has folded all it did, queries read the
        target. Until then queries read the serving version, which a failed target leaves
        serving (folding again if it had retired)."""
        old = self.runners[name]
        target = self.switching.get(name)
        if target is not None and target.version != version:  # the pointer moved on
            self._abandon(name)
            old, target = self.runners[name], None
        if target is None:
            target = self.switching[name] = self._target(name, version, old)
        if target.stats.state in ("failed", "stopped"):
            if old.stats.state == "retired" and isinstance(old, ProjectionRunner):
                old = self._fold_again(old, target)
            self._say(
                name,
                "failed",
                f"v{version} {target.stats.state} ({target.stats.error}): queries stay on "
                f"v{old.version} until LIVE changes or the worker restarts",
            )
            return
        if isinstance(target, FrozenVersion):  # it serves what it holds: nothing to wait for
            if isinstance(old, ProjectionRunner):
                old.retire()
            self._complete(name, target)
            return
        folding = isinstance(old, ProjectionRunner) and old.stats.state in ("starting", "running")
        if folding and self._keeps_pace(name, target, old):
            for build in self.builds.values():  # a newer version being built trails the target
                if build.name == name and build.trailing is old:
                    build.trailing = target
            assert isinstance(old, ProjectionRunner)  # (folding says so)
            old.retire()
        elif not folding and _caught_up(target, old):
            self._complete(name, target)
            return
        behind = _behind(target, old)
        self._say(
            name,
            "behind",
            f"queries read v{old.version} until v{version} has folded what v{old.version} has"
            + ("" if behind is None else f": {behind} event(s) behind"),
        )

    def _target(self, name: str, version: int, old: Serving) -> Serving:
        """The runner of `version` to switch to: the build of it, the retired runner of it
        (its grace not over), or a new one (frozen without its class). Events below what `old`
        has folded reach it as replay: `old` acted on them."""
        build = self.builds.get(name)
        if build is not None and build.version == version:
            return self.builds.pop(name)
        acted = {} if isinstance(old, FrozenVersion) else dict(old.stats.positions)
        target = self._revive(name, version, acted) or self._serve(name, version, acted)
        self._switch_said.pop(name, None)
        return target

    def _keeps_pace(self, name: str, new: Serving, old: Serving) -> bool:
        """Whether `new` has folded all `old` has, or all `old` had folded at the previous
        tick (close enough: the rest is caught up once `old` stops)."""
        seen, self._seen[name] = self._seen.get(name), _folded(old)
        return _caught_up(new, old) or (
            seen is not None
            and isinstance(new, ProjectionRunner)
            and new.feeder is None
            and _reached_here(new, seen)
        )

    def _complete(self, name: str, new: Serving) -> None:
        """Queries read `new` from now on; the version they read answers SWITCH_GRACE_S more
        (requests already reading it), folding nothing."""
        del self.switching[name]
        self._switch_said.pop(name, None)
        self._seen.pop(name, None)
        old = self.runners[name]
        self.runners[name] = new
        log.info("%s: queries now read v%d (was v%d)", name, new.version, old.version)
        with self._retired_lock:
            self._retired.append(old)
        timer = threading.Timer(SWITCH_GRACE_S, self._stop_retired, args=(old,))
        timer.daemon = True
        timer.start()

    def _abandon(self, name: str) -> None:
        """The LIVE pointer left the version a switch waited for: a build of the code's
        version goes back to building, any other target stops; a serving version that had
        retired for the switch folds again."""
        target = self.switching.pop(name)
        self._switch_said.pop(name, None)
        serving = self.runners[name]
        log.info(
            "%s: LIVE no longer names v%d: queries stay on v%d",
            name,
            target.version,
            serving.version,
        )
        if serving.stats.state == "retired" and isinstance(serving, ProjectionRunner):
            serving = self._fold_again(serving, target)
        if (
            isinstance(target, ProjectionRunner)
            and target.version == max(self.versions[name])
            and target.version > serving.version
            and name not in self.builds
            and target.stats.state in ("starting", "running")
        ):
            target.trailing = serving if isinstance(serving, ProjectionRunner) else None
            self.builds[name] = target
        else:
            target.stop()

    def _say(self, name: str, kind: str, text: str) -> None:
        """Say why a switch waits when the reason (`kind`) changes, else every SAY_EVERY_S:
        at first as info (most switches end within a tick or two), then as a warning
        (queries read an older version than LIVE names); a failure at once as a warning.
        `switch_status` shows the latest `text` (how far behind the target is, now)."""
        said = self._switch_said.get(name)
        now = time.monotonic()
        if said is None or said[0] != kind or now - said[1] >= SAY_EVERY_S:
            first = said is None or said[0] != kind
            level = logging.INFO if first and kind != "failed" else logging.WARNING
            log.log(level, "%s: %s", name, text)
            said = (kind, now, text)
        self._switch_said[name] = (said[0], said[1], text)

    def switch_status(self, name: str) -> dict[str, object] | None:
        """The switch a projection waits for, for `GET /projections`: the target version, its
        state, how many events it is behind the version queries read, and why they wait."""
        target = self.switching.get(name)
        if target is None:
            return None
        serving = self.runners[name]
        said = self._switch_said.get(name)
        return {
            "version": target.version,
            "state": target.stats.state,
            "error": target.stats.error,
            "behind": _behind(target, serving),
            "waiting": said[2] if said else f"v{target.version} starting",
        }

    def _revive(self, name: str, version: int, acted: dict[TP, int]) -> Serving | None:
        """The version queries left less than SWITCH_GRACE_S ago, if that is `version` (a swap
        rolled back at once): still open in this process, so its store cannot be opened a
        second time; it folds again from its store (frozen: serves again as it is)."""
        with self._retired_lock:
            found = next(
                (r for r in self._retired if r.name == name and r.version == version), None
            )
            if found is None:
                return None
            self._retired.remove(found)
        log.info("%s: v%d serves again, its grace not over", name, version)
        if isinstance(found, FrozenVersion):
            return found
        return self._refold(found, acted)

    def _fold_again(self, retired: ProjectionRunner, target: Serving) -> ProjectionRunner:
        """The serving version, retired for a switch that did not happen, folds again (what
        `target` folded reaches it as replay); the builds trail it again."""
        runner = self.runners[retired.name] = self._refold(retired, dict(target.stats.positions))
        for build in self.builds.values():
            if build.name == retired.name:
                build.trailing = runner
        return runner

    def _refold(self, runner: ProjectionRunner, acted: dict[TP, int]) -> ProjectionRunner:
        """A new runner folding on from `runner`'s store once `runner` has retired (its fold
        thread ends within a batch); events below `acted` reach it as replay."""
        if not runner.ended(30.0):
            raise ProjectionError(f"{runner.name} v{runner.version}: its fold did not end")
        return self._start_runner(runner.name, runner.version, acted, runner.store)

    def _stop_retired(self, runner: Serving) -> None:
        """The grace is over: stop `runner`, unless queries came back to it meanwhile."""
        with self._retired_lock:
            if runner not in self._retired:
                return
            self._retired.remove(runner)
        runner.stop()


def _caught_up(new: Serving, old: Serving) -> bool:
    """Whether `new` has folded what `old` has. A re-keyed version folds a repartition topic of
    its own, whose offsets say nothing of the other's: it has caught up once its routing has
    passed the source offsets the old one routed (or folded, from its source) in the source
    partitions this worker routes, and it has nothing left to fold."""
    if not isinstance(new, ProjectionRunner) or new.feeder is None:
        return _reached_here(new, _folded(old))
    routed = new.feeder.routed_offsets()
    theirs = old.feeder.routed_offsets() if isinstance(old, ProjectionRunner) and old.feeder else {}
    sources = new.projection.topics
    theirs = theirs or {tp: o for tp, o in old.stats.positions.items() if tp[0] in sources}
    return (
        bool(routed)
        and all(routed.get(tp, o) >= o for tp, o in theirs.items())
        and bool(new.stats.lag)
        and not any(new.stats.lag.values())
    )


def _behind(new: Serving, old: Serving) -> int | None:
    """Events `old` has folded that `new` has not, in the partitions both fold from one
    topic (None for a re-keyed `new`: its own repartition topic says nothing of `old`)."""
    if isinstance(new, ProjectionRunner) and new.feeder is not None:
        return None
    mine, owned = new.stats.positions, set(new.stats.assigned)
    theirs = old.stats.positions.items()
    return sum(max(0, nxt - mine.get(tp, 0)) for tp, nxt in theirs if not owned or tp in owned)


def _reached_here(new: Serving, folded: dict[TP, int]) -> bool:
    """Whether `new` has folded `folded` in the partitions it folds here (other workers fold
    the others); not before its group has given it its share, which may be none (more workers
    than partitions): then it has nothing to catch up on here."""
    owned = set(new.stats.assigned)
    return new.stats.joined and new.reached({tp: o for tp, o in folded.items() if tp in owned})


def _folded(runner: Serving) -> dict[TP, int]:
    """The last offset `runner` folded per partition (for `reached`)."""
    return {tp: nxt - 1 for tp, nxt in runner.stats.positions.items() if nxt > 0}
