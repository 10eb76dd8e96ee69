"""`refold task submit|status|list|cancel` and `refold task-worker`.

`task submit`, `task status` and `task cancel` need only Kafka: a task's status is folded
straight from its queue's status topic (the key's partition, as `query --as-of` does). `task
list` reads the status projection's store that a `refold worker` keeps in REFOLD_DATA_DIR (a
RocksDB secondary).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import threading
from datetime import UTC, datetime
from typing import Any

from refold.cli.output import out as _out
from refold.cli.output import seconds, wait_ended
from refold.core.config import Config
from refold.core.errors import InputError, TaskError
from refold.core.tasks import STATUSES, TERMINAL, TaskQueue, submission_from_json

log = logging.getLogger(__name__)


def _config(args: argparse.Namespace, config: Config) -> Config:
    if getattr(args, "app", None):
        config = config.with_(app_modules=tuple(m for m in args.app.split(",") if m))
    return config


def _queues(config: Config) -> dict[str, TaskQueue]:
    from refold.core.app import load_task_queues

    queues = load_task_queues(config.app_modules)
    if not queues:
        raise InputError(
            "no task queues in the app", hint="name the module with --app or REFOLD_APP"
        )
    return queues


def _queue(queues: dict[str, TaskQueue], name: str) -> TaskQueue:
    if name not in queues:
        raise InputError(f"unknown task queue {name!r}; known: {', '.join(sorted(queues))}")
    return queues[name]


def fold_status(config: Config, queue: TaskQueue, task_id: str) -> dict[str, Any] | None:
    """A task's status now, folded from the status topic (no worker needed)."""
    from refold.core.task_status import public_status

    state = _folded(config, queue, task_id)
    return None if state is None else public_status(state)


def _folded(config: Config, queue: TaskQueue, task_id: str) -> dict[str, Any] | None:
    """A task's whole folded state (its key and data included), from the status topic."""
    from refold.core.task_status import status_projection
    from refold.engine.timetravel import fold_as_of
    from refold.kafka.registry import codec_for

    found = fold_as_of(
        config, codec_for(config), status_projection(queue), task_id, datetime.now(UTC)
    )
    state: dict[str, Any] | None = found.state
    return state


def cmd_task(args: argparse.Namespace, config: Config) -> int:
    config = _config(args, config)
    queues = _queues(config)
    queue = _queue(queues, args.queue)
    if args.action == "submit":
        return _submit(args, config, queues, queue)
    if args.action == "cancel":
        return _cancel(args, config, queues, queue)
    if args.action == "status":
        state = fold_status(config, queue, _task_id(args))
        if state is None:
            raise InputError(f"no task {args.task_id!r} in queue {queue.name!r}")
        _out(state)
        return 0
    return _list(args, config, queue)


def _task_id(args: argparse.Namespace) -> str:
    """The TASK_ID argument of `status` and `cancel`: a record key, so UTF-8 text (a lone
    surrogate from argv raised UnicodeEncodeError in the fold: a traceback)."""
    task_id: str | None = args.task_id
    if not task_id:
        raise InputError(f"task {args.action} needs a TASK_ID")
    try:
        task_id.encode()
    except UnicodeEncodeError as exc:
        raise InputError(f"task id {task_id!r} is not UTF-8 text: {exc.reason}") from exc
    return task_id


def _submit(
    args: argparse.Namespace, config: Config, queues: dict[str, TaskQueue], queue: TaskQueue
) -> int:
    from refold.engine.membership import worker_id
    from refold.engine.task_queues import claim_task_id, claims_index
    from refold.kafka.task_log import TaskClient
    from refold.store.scratch import make_scratch, scratch_dir

    try:
        data = json.loads(args.data)
    except json.JSONDecodeError as exc:
        raise InputError(f"--data is not valid JSON: {exc.msg} at column {exc.colno}") from exc
    obj: dict[str, Any] = {"data": data}
    # Given, even empty: checked like the HTTP intake's fields (an empty id is refused there,
    # not replaced with a random one).
    if args.id is not None:
        obj["task_id"] = args.id
    if args.key is not None:
        obj["key"] = args.key
    submission = submission_from_json(obj)  # checked before anything is read or claimed

    def known(name: str, task_id: str) -> dict[str, Any] | None:
        return _folded(config, queues[name], task_id)

    # The id is claimed like a worker's intake claims it (one task per id across every node);
    # the index lives in a scratch folder (a worker may hold the data dir's own), removed after.
    scratch = make_scratch(scratch_dir(config.data_dir), "task-ids")
    try:
        index = claims_index(config, queue, scratch / "ids").start()
        claimer = worker_id(config)
        client = TaskClient(
            config,
            queues,
            known=known,
            claim=lambda name, submission: claim_task_id(index, claimer, name, submission),
        )
        try:
            accepted = client.submit(queue.name, submission)
        finally:
            client.close()
            index.stop()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not args.wait:
        _out(accepted.to_json())
        return 0
    state, ended = wait_ended(
        lambda: fold_status(config, queue, accepted.task_id), TERMINAL, args.timeout
    )
    if not ended:
        raise TaskError(
            f"task {accepted.task_id!r} is {state and state['status']} after {args.timeout}s",
            hint="is a `refold worker` dispatching and a `refold task-worker` running?",
        )
    _out(state)
    return 0 if state is not None and state["status"] == "succeeded" else 1


def _cancel(
    args: argparse.Namespace, config: Config, queues: dict[str, TaskQueue], queue: TaskQueue
) -> int:
    """Cancel a task that has not ended, as `POST /tasks/{queue}/{id}/cancel` does (with its
    parts, if split): its state is folded from the status topic, so no worker is needed. Exit
    0 with the answer the HTTP route gives; 2 (bad input) for a task the queue never had, as
    `task status`; 1 for one that ended already (the route's 409), nothing recorded then."""
    from refold.kafka.task_log import TaskClient

    task_id = _task_id(args)
    state = _folded(config, queue, task_id)
    if state is None or state["status"] is None:
        raise InputError(f"no task {task_id!r} in queue {queue.name!r}")
    if state["status"] in TERMINAL:
        raise TaskError(
            f"task {task_id!r} already ended {state['status']}: nothing to cancel",
            hint=f"`refold task status {queue.name} {task_id}` shows how it ended",
        )
    client = TaskClient(config, queues)
    try:
        client.cancel(queue.name, [task_id, *state.get("parts", ())])
    finally:
        client.close()
    _out({"task_id": task_id, "status": "cancelled"})
    return 0


def _list(args: argparse.Namespace, config: Config, queue: TaskQueue) -> int:
    from refold.core.task_status import public_status, status_projection_name
    from refold.store.rocksdb import RocksStore
    from refold.store.scratch import scratch_dir
    from refold.store.versions import live_version, store_path

    if args.status is not None and args.status not in STATUSES:
        raise InputError(f"--status must be one of {', '.join(STATUSES)}")
    name = status_projection_name(queue.name)
    path = store_path(config, name, live_version(config, name) or 1)
    if not path.is_dir():
        raise InputError(
            f"no status store for queue {queue.name!r} under {config.data_dir}",
            hint="run `refold worker` with this app first, or check REFOLD_DATA_DIR",
        )
    store = RocksStore.open_secondary(path, scratch_root=scratch_dir(config.data_dir))
    try:
        shown, after = 0, None
        while shown < args.limit:
            page = store.scan("", after, 1000)
            for task_id, state in page:
                after = task_id
                if args.status is None or state.get("status") == args.status:
                    _out(public_status(state))
                    shown += 1
                    if shown >= args.limit:
                        break
            if len(page) < 1000:
                break
    finally:
        store.close()
    return 0


def cmd_task_worker(args: argparse.Namespace, config: Config) -> int:
    from refold.engine.task_worker import TaskWorker
    from refold.kafka.registry import codec_for

    config = _config(args, config)
    queue = _queue(_queues(config), args.queue)
    worker = TaskWorker(
        config, codec_for(config), queue, concurrency=args.concurrency, consumers=args.consumers
    )
    worker.start()
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    print(
        f"task worker on {queue.work_topic} (share group {worker.group}, "
        f"{args.concurrency} thread(s), {args.consumers} consumer(s))",
        flush=True,
    )
    done.wait()
    worker.stop()
    return 0


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "task", help="submit a task, read its status, list a queue's tasks, cancel a task"
    )
    p.add_argument("action", choices=["submit", "status", "list", "cancel"])
    p.add_argument("queue", help="the task queue's name")
    p.add_argument("task_id", nargs="?", help="for status and cancel: the task id")
    p.add_argument("--data", default="{}", help="submit: the task's data as a JSON object")
    p.add_argument("--id", help="submit: the task id (idempotency key; default: a new one)")
    p.add_argument("--key", help="submit: the task's key (default: its id)")
    p.add_argument("--wait", action="store_true", help="submit: wait until the task ended")
    p.add_argument("--timeout", type=seconds, default=60.0, help="seconds --wait waits")
    p.add_argument("--status", help="list: only tasks with this status, e.g. dead")
    p.add_argument("--limit", type=int, default=100, help="list: at most this many")
    p.add_argument("--app", help="comma-separated modules with task queues (env REFOLD_APP)")

    p = sub.add_parser("task-worker", help="run a task queue's handler on its work items")
    p.add_argument("--app", help="comma-separated modules with task queues (env REFOLD_APP)")
    p.add_argument("--queue", required=True, help="the task queue's name")
    p.add_argument("--concurrency", type=int, default=1, help="work items handled at once")
    p.add_argument(
        "--consumers",
        type=int,
        default=2,
        help="share consumers in this process (one polls while the other's items are acknowledged)",
    )
