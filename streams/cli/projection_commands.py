"""`refold query|replay|rollback|drop|status|dead-letters`: reading a projection's stores and
managing its versions from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from refold.cli.output import out as _out
from refold.cli.output import positive_seconds
from refold.core.config import Config
from refold.core.errors import InputError

if TYPE_CHECKING:
    from refold.core.projection import Projection
    from refold.store.rocksdb import RocksStore


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("query", help="read a projection's state (JSON)")
    p.add_argument("name")
    p.add_argument("key", nargs="?")
    p.add_argument("--prefix", help="list keys starting with this")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument(
        "--as-of", metavar="TIME", help="the key's state at an ISO-8601 time (from the log)"
    )

    p = sub.add_parser(
        "replay", help="rebuild a projection version from offset 0 beside the live one"
    )
    p.add_argument("name")
    p.add_argument("--version", type=int, help="version number to build (default: the code's)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.add_argument(
        "--diff", action="store_true", help="compare with the live version once caught up"
    )
    p.add_argument("--diff-file", help="where to write the full diff (JSON lines)")
    p.add_argument("--swap", action="store_true", help="make it live once caught up")
    p.add_argument("--app", help="comma-separated modules with projections (env REFOLD_APP)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument(
        "--procs",
        type=int,
        help="processes that fold a build from scratch, partitions split between them "
        "(default: one per core when there are at least 200,000 events; 1 = no split)",
    )
    p.add_argument(
        "--stall-timeout",
        type=positive_seconds,
        default=120.0,
        metavar="SECONDS",
        help="give up when nothing is folded for this long, say the broker is gone (default 120)",
    )

    p = sub.add_parser("rollback", help="make the previous version of a projection live again")
    p.add_argument("name")

    p = sub.add_parser("drop", help="delete a (not live) version of a projection")
    p.add_argument("name")
    p.add_argument("--version", type=int, required=True)

    p = sub.add_parser("status", help="every projection with version, offsets, lag, dead letters")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")

    p = sub.add_parser("dead-letters", help="list a projection's dead-lettered records")
    p.add_argument("name")
    p.add_argument("--limit", type=int)


def _open_reader(config: Config, name: str) -> tuple[RocksStore, int]:
    """A read-only (secondary) view of the projection's live store, and its version."""
    from refold.store.rocksdb import RocksStore
    from refold.store.scratch import scratch_dir
    from refold.store.versions import live_version, store_path

    version = live_version(config, name) or 1
    path = store_path(config, name, version)
    if not path.is_dir():
        raise InputError(
            f"projection {name!r} has no store under {config.data_dir}",
            hint="run `refold worker` first, or check REFOLD_DATA_DIR",
        )
    return RocksStore.open_secondary(path, scratch_root=scratch_dir(config.data_dir)), version


def cmd_query(args: argparse.Namespace, config: Config) -> int:
    if args.as_of:
        from refold.engine.timetravel import fold_as_of, parse_time
        from refold.kafka.registry import codec_for

        if args.key is None:
            raise InputError("--as-of needs a KEY")
        moment = parse_time(args.as_of)
        found = fold_as_of(
            config, codec_for(config), _projection(config, args.name), args.key, moment
        )
        if found.state is None:
            raise InputError(f"no state for key {args.key!r} in {args.name} as of {args.as_of}")
        _out(
            {
                "key": found.key,
                "state": found.state,
                "position": found.position,
                "as_of": moment.isoformat(),
            }
        )
        return 0
    store, _version = _open_reader(config, args.name)
    try:
        if args.key is not None:
            state = store.get(args.key)
            if state is None:
                raise InputError(f"no state for key {args.key!r} in {args.name}")
            _out({"key": args.key, "state": state})
        else:
            for key, state in store.scan(prefix=args.prefix or "", limit=args.limit):
                _out({"key": key, "state": state})
    finally:
        store.close()
    return 0


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    from refold.core.app import load_versions
    from refold.engine.status import Watermarks, status_table, store_status

    watermarks = Watermarks(config, timeout=10.0)
    rows = [store_status(config, v, watermarks) for v in load_versions(config.app_modules).values()]
    if args.json:
        for row in rows:
            _out(row.to_json())
    else:
        print(status_table(rows))
    return 0


def _projection(config: Config, name: str, version: int | None = None) -> Projection:
    """The class of that version of the projection (default: the newest). A store is folded
    only by its own version's code, so a version the code has no class for is an error."""
    from refold.core.app import load_versions
    from refold.engine.frozen import frozen_reason

    versions = load_versions(config.app_modules)
    if name not in versions:
        raise InputError(
            f"unknown projection {name!r}", hint="known: " + ", ".join(sorted(versions))
        )
    classes = versions[name]
    if version is None:
        return classes[max(classes)]
    reason = frozen_reason(name, classes, version)
    if reason is not None:
        raise InputError(
            f"cannot fold v{version}: {reason}",
            hint=f"deploy v{version}'s class beside the others, or replay v{max(classes)}",
        )
    return classes[version]


def cmd_replay(args: argparse.Namespace, config: Config) -> int:
    from refold.engine.replay import plan, replay
    from refold.kafka.registry import codec_for

    if args.app:
        config = config.with_(app_modules=tuple(m for m in args.app.split(",") if m))
    projection = _projection(config, args.name, args.version)
    version = args.version or projection.version
    if args.dry_run:
        print(plan(config, projection, version).describe())
        return 0
    try:
        result = replay(
            config,
            codec_for(config),
            projection,
            version,
            diff=args.diff,
            swap=args.swap,
            diff_path=Path(args.diff_file) if args.diff_file else None,
            progress=None if args.quiet else sys.stderr,
            procs=args.procs,
            catch_up_timeout=args.stall_timeout,
            live_frozen=_live_frozen(config, args.name),
        )
    except KeyboardInterrupt:
        _interrupted(config, args.name, version)
        raise
    rate = result.folded / result.seconds if result.seconds else 0.0
    split = f", {result.parts} processes" if result.parts > 1 else ""
    if result.builder is not None:  # another process folded it; this one waited
        print(
            f"{args.name} v{version}: built by process {result.builder} ({result.folded} events "
            f"folded), caught up with the live version after {result.seconds:.1f} s"
        )
    else:
        print(
            f"{args.name} v{version}: folded {result.folded} events in {result.seconds:.1f} s "
            f"({rate:,.0f} events/s{split}), caught up with the live version"
        )
    if result.diff is not None:
        print(result.diff.describe())
        for row in result.diff.samples:
            print(
                f"  {row['change']:<8} {row['key']}: {json.dumps(row['before'])} -> "
                f"{json.dumps(row['after'])}"
            )
        print(f"full diff: {result.diff.path}")
    if result.swapped:
        print(f"v{version} is live (the previous version stays for `refold rollback {args.name}`)")
    return 0


def _interrupted(config: Config, name: str, version: int) -> None:
    """Say what an interrupted replay left: which version is live, and that what it folded
    is kept for the next `refold replay` to resume from (only whole batches are stored)."""
    from refold.store.versions import live_version

    live = live_version(config, name)
    if live == version:
        state = "is live"
    else:
        state = "is not live" + ("" if live is None else f" (v{live} is)")
    print(
        f"interrupted: {name} v{version} {state}; what this replay folded is kept, and "
        f"`refold replay {name}` resumes from it",
        file=sys.stderr,
    )


def _live_frozen(config: Config, name: str) -> bool:
    """Whether the code lacks the live version's class: workers serve it frozen."""
    from refold.core.app import load_versions
    from refold.engine.frozen import frozen_reason
    from refold.store.versions import live_version

    live = live_version(config, name)
    return (
        live is not None
        and frozen_reason(name, load_versions(config.app_modules)[name], live) is not None
    )


def cmd_rollback(args: argparse.Namespace, config: Config) -> int:
    from refold.store.versions import rollback

    current, target = rollback(config, args.name)
    frozen = " (frozen: the code has no class for it)" if _live_frozen(config, args.name) else ""
    print(f"{args.name}: v{target} is live again (was v{current}){frozen}")
    return 0


def cmd_drop(args: argparse.Namespace, config: Config) -> int:
    from refold.store.versions import drop

    drop(config, args.name, args.version)
    print(f"{args.name}: dropped v{args.version}")
    return 0


def cmd_dead_letters(args: argparse.Namespace, config: Config) -> int:
    from refold.core.app import load_versions
    from refold.engine.runtime import dead_letter_topic_name
    from refold.engine.tail import dead_letters
    from refold.kafka.topics import Topics

    versions = load_versions(config.app_modules)
    if args.name not in versions and not Topics(config).exists(
        dead_letter_topic_name(config, args.name)
    ):  # a projection gone from the code may still have dead letters: those are shown
        raise InputError(
            f"unknown projection {args.name!r}", hint="known: " + ", ".join(sorted(versions))
        )
    for record in dead_letters(config, args.name, limit=args.limit):
        _out(record)
    return 0
