"""`refold saga start|status|rebuild|dead-letters`.

`start`, `status` and `dead-letters` need only Kafka: a saga's state is folded straight from its
saga topic (the key's partition, as `query --as-of` does); a `refold worker` with the app drives
the saga. `rebuild` folds the saga's state again from offset zero beside the live store of this
data directory (a worker may be running on it) and compares the two, saga by saga: the replay
check of a saga, which sends nothing (no saga runner takes part in it).
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import closing
from datetime import UTC, datetime
from typing import Any

from refold.cli.output import out as _out
from refold.cli.output import seconds, wait_ended
from refold.core.config import Config
from refold.core.errors import InputError, SagaError
from refold.core.sagas import TERMINAL, Saga, check_saga_id, start_from_json


def _sagas(config: Config) -> dict[str, Saga]:
    from refold.core.app import load_sagas

    sagas = load_sagas(config.app_modules)
    if not sagas:
        raise InputError("no sagas in the app", hint="name the module with --app or REFOLD_APP")
    return sagas


def fold_state(config: Config, saga: Saga, saga_id: str) -> dict[str, Any] | None:
    """A saga's state now, folded from its saga topic (no worker needed)."""
    from refold.core.sagas import public_state, saga_projection
    from refold.engine.timetravel import fold_as_of
    from refold.kafka.registry import codec_for

    found = fold_as_of(config, codec_for(config), saga_projection(saga), saga_id, datetime.now(UTC))
    if found.state is None or found.state.get("status") is None:
        return None
    return public_state(found.state, saga.name)


def cmd_saga(args: argparse.Namespace, config: Config) -> int:
    if args.app:
        config = config.with_(app_modules=tuple(m for m in args.app.split(",") if m))
    sagas = _sagas(config)
    if args.name not in sagas:
        raise InputError(f"unknown saga {args.name!r}; known: {', '.join(sorted(sagas))}")
    saga = sagas[args.name]
    if args.action == "rebuild":
        return _rebuild(args, config, saga)
    if args.action == "dead-letters":
        return _dead_letters(args, config, saga)
    if args.action == "status":
        if not args.saga_id:
            raise InputError("saga status needs a SAGA_ID")
        check_saga_id(args.saga_id)
        state = fold_state(config, saga, args.saga_id)
        if state is None:
            raise InputError(f"no saga {args.saga_id!r} of {saga.name!r}")
        _out(state)
        return 0
    return _start(args, config, sagas, saga)


def _start(args: argparse.Namespace, config: Config, sagas: dict[str, Saga], saga: Saga) -> int:
    from refold.core.app import load_deciders
    from refold.kafka.saga_log import SagaClient

    try:
        data = json.loads(args.data)
    except json.JSONDecodeError as exc:
        raise InputError(f"--data is not valid JSON: {exc.msg} at column {exc.colno}") from exc
    obj: dict[str, Any] = {"data": data}
    if args.saga_id is not None:  # "" is refused as over HTTP, not replaced by a new id
        obj["saga_id"] = args.saga_id

    def known(name: str, saga_id: str) -> dict[str, Any] | None:
        return fold_state(config, sagas[name], saga_id)

    deciders = load_deciders(config.app_modules)
    start = start_from_json(saga, obj, deciders)  # bad input is one line, before any connection
    client = SagaClient(config, sagas, known=known, deciders=deciders)
    try:
        started = client.start(saga.name, start)
    finally:
        client.close()
    if not args.wait:
        _out(started.to_json())
        return 0
    state, ended = wait_ended(
        lambda: fold_state(config, saga, started.saga_id), TERMINAL, args.timeout
    )
    if not ended:
        raise SagaError(
            f"saga {started.saga_id!r} is {state and state['status']} after {args.timeout}s",
            hint="is a `refold worker` with the app running?",
        )
    _out(state)
    return 0 if state is not None and state["status"] == "completed" else 1


def _rebuild(args: argparse.Namespace, config: Config, saga: Saga) -> int:
    """Build the saga's state at the next version number from offset zero, up to the live
    version's offsets, diff the two, drop the build. 0: every saga alike; 1: some differ."""
    from refold.core.sagas import saga_projection, saga_projection_name
    from refold.engine.replay import replay
    from refold.kafka.registry import codec_for
    from refold.store.versions import drop, live_version

    name = saga_projection_name(saga.name)
    live = live_version(config, name)
    if live is None:
        raise InputError(
            f"no state of saga {saga.name!r} in {config.data_dir}",
            hint="point REFOLD_DATA_DIR at the data directory of a worker that runs the saga",
        )
    version = live + 1
    projection = saga_projection(saga, version)
    try:
        result = replay(
            config,
            codec_for(config),
            projection,
            version,
            diff=True,
            progress=None if args.quiet else sys.stderr,
        )
    finally:
        if store_exists(config, name, version):
            drop(config, name, version)
    diff = result.diff
    if diff is None:  # replay diffs whenever a live version exists, as it does here
        raise SagaError(f"rebuild of saga {saga.name!r} made no comparison")
    report = {
        "saga": saga.name,
        "folded": result.folded,
        "unchanged": diff.unchanged,
        "changed": diff.changed,
        "added": diff.added,
        "removed": diff.removed,
        "samples": diff.samples,
    }
    _out(report)
    return 0 if diff.changed == diff.added == diff.removed == 0 else 1


def store_exists(config: Config, name: str, version: int) -> bool:
    from refold.store.versions import store_path

    return store_path(config, name, version).is_dir()


def _dead_letters(args: argparse.Namespace, config: Config, saga: Saga) -> int:
    """The records of `<name>.saga.dead`: each saga that ended `failed` for a person to look at,
    with the reason and its state when it failed."""
    from confluent_kafka import OFFSET_BEGINNING
    from refold.core.errors import TopicError
    from refold.kafka import clients
    from refold.kafka.log import read_to_end, topic_partitions
    from refold.kafka.registry import codec_for

    codec = codec_for(config)
    consumer = clients.consumer(config, config.group("saga-dead-reader"))
    shown = 0
    try:
        try:
            numbers = topic_partitions(consumer, saga.dead_topic)
        except TopicError:
            return 0  # no saga of this name ever failed for a person
        starts = {(saga.dead_topic, p): OFFSET_BEGINNING for p in numbers}
        batches = read_to_end(consumer, starts)
        with closing(batches):  # the reader unassigns before the consumer closes
            for msg in (m for batch in batches for m in batch):
                if args.limit is not None and shown >= args.limit:
                    break
                _type, data = codec.decode(msg.value())
                state = json.loads(data.get("data") or "null")
                _out(
                    {
                        "saga_id": data["saga_id"],
                        "reason": data.get("reason"),
                        "state": state,
                        "partition": msg.partition(),
                        "offset": msg.offset(),
                    }
                )
                shown += 1
    finally:
        consumer.close()
    return 0


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "saga", help="start a saga, read its status, rebuild its state, list its dead letters"
    )
    p.add_argument("action", choices=["start", "status", "rebuild", "dead-letters"])
    p.add_argument("name", help="the saga's name, e.g. transfers")
    p.add_argument("saga_id", nargs="?", help="the saga id (start: default a new one)")
    p.add_argument("--data", default="{}", help="start: the saga's data as a JSON object")
    p.add_argument("--wait", action="store_true", help="start: wait until the saga ended")
    p.add_argument("--timeout", type=seconds, default=60.0, help="seconds --wait waits")
    p.add_argument("--app", help="comma-separated modules with sagas (env REFOLD_APP)")
    p.add_argument("--limit", type=int, help="dead-letters: show at most this many")
    p.add_argument("--quiet", action="store_true", help="rebuild: no progress line")
