"""`refold saga start|status`.

Both need only Kafka: a saga's state is folded straight from its saga topic (the key's
partition, as `query --as-of` does); a `refold worker` with the app drives the saga.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

from refold.core.config import Config
from refold.core.errors import InputError, SagaError
from refold.core.sagas import TERMINAL, Saga


def _out(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, separators=(", ", ": ")) + "\n")


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
    if args.action == "status":
        if not args.saga_id:
            raise InputError("saga status needs a SAGA_ID")
        state = fold_state(config, saga, args.saga_id)
        if state is None:
            raise InputError(f"no saga {args.saga_id!r} of {saga.name!r}")
        _out(state)
        return 0
    return _start(args, config, sagas, saga)


def _start(args: argparse.Namespace, config: Config, sagas: dict[str, Saga], saga: Saga) -> int:
    from refold.kafka.saga_log import SagaClient

    try:
        data = json.loads(args.data)
    except json.JSONDecodeError as exc:
        raise InputError(f"--data is not valid JSON: {exc.msg} at column {exc.colno}") from exc
    obj: dict[str, Any] = {"data": data}
    if args.saga_id:
        obj["saga_id"] = args.saga_id

    def known(name: str, saga_id: str) -> dict[str, Any] | None:
        return fold_state(config, sagas[name], saga_id)

    client = SagaClient(config, sagas, known=known)
    try:
        started = client.start(saga.name, client.prepare(saga.name, obj))
    finally:
        client.close()
    if not args.wait:
        _out(started.to_json())
        return 0
    deadline = time.monotonic() + args.timeout
    while True:
        state = fold_state(config, saga, started.saga_id)
        if state is not None and state["status"] in TERMINAL:
            _out(state)
            return 0 if state["status"] == "completed" else 1
        if time.monotonic() > deadline:
            raise SagaError(
                f"saga {started.saga_id!r} is {state and state['status']} after {args.timeout}s",
                hint="is a `refold worker` with the app running?",
            )
        time.sleep(0.3)


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("saga", help="start a saga, read its status")
    p.add_argument("action", choices=["start", "status"])
    p.add_argument("name", help="the saga's name, e.g. transfers")
    p.add_argument("saga_id", nargs="?", help="the saga id (start: default a new one)")
    p.add_argument("--data", default="{}", help="start: the saga's data as a JSON object")
    p.add_argument("--wait", action="store_true", help="start: wait until the saga ended")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds --wait waits")
    p.add_argument("--app", help="comma-separated modules with sagas (env REFOLD_APP)")
