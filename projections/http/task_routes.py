"""HTTP for task queues (mounted by the query server):

- `POST /tasks/{queue}` `{"task_id"?, "key"?, "data": {...}}` -> 202 `{"task_id", "status":
  "accepted", "status_url"}` once the task is durably in the intake topic; a repeated task id
  answers the same and appends nothing (on any worker: ids are claimed first), a repeat with
  another body 409; bad input 400/404/422, never appended;
- `GET /tasks/{queue}/{task_id}` -> the task's status (the status projection's state), from
  whichever worker folds its status partition (forwarded like a projection lookup, or 307 with
  `?route=redirect`); for a task this worker accepted, at least `accepted` (read-your-writes:
  it waits briefly for the projection to fold the accepted event, else answers that event),
  never 404;
- `GET /tasks/{queue}?status=&after=&limit=` -> a page of tasks;
- `POST /tasks/{queue}/{task_id}/cancel` -> 200, or 409 when the task already ended; from
  the worker that folds its status partition (forwarded like the GET).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
from aiohttp import web
from refold.core.errors import InputError, TaskConflict, TaskError
from refold.engine.frozen import Serving
from refold.engine.worker import Worker
from refold.http.answers import Reply, error_reply, reply, web_response
from refold.http.routing import FORWARDED, Router

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
ACK_TIMEOUT_S = 30.0


def _respond(status: int, body: Any) -> web.Response:
    return web_response(reply(status, body))


def _wake(loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> None:
    """From the producer's poll thread: resolve `future` on its loop."""
    loop.call_soon_threadsafe(_set, future)


def _set(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _error(status: int, error: str, detail: Any) -> web.Response:
    return web_response(error_reply(status, error, detail))


class TaskRoutes:
    """The task handlers over one worker's task queues."""

    def __init__(self, worker: Worker, router: Router | None = None) -> None:
        self.tasks = worker.tasks
        self._router = router
        # Cancels wait for Kafka's acknowledgement: off the event loop, one flush at a time.
        self._appends = ThreadPoolExecutor(1, thread_name_prefix="refold-http-tasks")
        self._waits = ThreadPoolExecutor(8, thread_name_prefix="refold-http-task-waits")

    def _unknown(self, queue: str) -> web.Response | None:
        unknown = self._unknown_reply(queue)
        return None if unknown is None else web_response(unknown)

    def _unknown_reply(self, queue: str) -> Reply | None:
        if queue in self.tasks.queues:
            return None
        known = ", ".join(sorted(self.tasks.queues)) or "none"
        return error_reply(
            404, "unknown task queue", f"no task queue {queue!r} here; known: {known}"
        )

    async def submit(self, request: web.Request) -> web.StreamResponse:
        return web_response(
            await self.intake(request.match_info["queue"], "", await request.read())
        )

    async def intake(self, queue: str, _query: str, body: bytes) -> Reply:
        """The answer to `POST /tasks/{queue}` with `body`, for aiohttp's route and for
        refold.http.fastpath alike (which sends it without aiohttp's objects)."""
        unknown = self._unknown_reply(queue)
        if unknown is not None:
            return unknown
        try:
            obj = orjson.loads(body)
        except ValueError as exc:
            return error_reply(400, "invalid JSON", f"the body is not JSON: {exc}")
        loop = asyncio.get_running_loop()
        try:
            # Checked and queued for its claim here, on the loop (nothing blocks: the client's
            # claims threads claim every id waiting in one round trip, then append); the
            # answer waits for this task's own acknowledgements. Measured: a claim round trip
            # per POST on 8 intake threads held HTTP intake to 0.31x Celery.
            pending = self.tasks.submit_nowait(queue, obj)
            acked: asyncio.Future[None] = loop.create_future()
            pending.on_done(lambda _: _wake(loop, acked))
            await asyncio.wait_for(acked, ACK_TIMEOUT_S)
            accepted = pending.result()
        except InputError as exc:
            return error_reply(422, "invalid task", str(exc))
        except TaskConflict as exc:
            return error_reply(409, "task id conflict", str(exc))
        except (TaskError, TimeoutError) as exc:
            log.warning("POST /tasks/%s: %s", queue, exc)
            return error_reply(503, "not acknowledged", str(exc) or "no acknowledgement in time")
        return reply(202, accepted.to_json())

    async def get(self, request: web.Request) -> web.StreamResponse:
        queue, task_id = request.match_info["queue"], request.match_info["task_id"]
        unknown = self._unknown(queue)
        if unknown is not None:
            return unknown
        forwarded = await self._forward(queue, task_id, request)
        if forwarded is not None:  # another worker folds this task's status partition
            return forwarded
        state = self.tasks.status(queue, task_id)
        if state is None and self.tasks.submitted(queue, task_id):
            # Accepted here, not folded yet: wait for it off the loop (read-your-writes).
            loop = asyncio.get_running_loop()
            state = await loop.run_in_executor(
                self._waits, self.tasks.status_after_submit, queue, task_id
            )
        if state is None:
            return _error(404, "unknown task", f"no task {task_id!r} in queue {queue!r} (yet)")
        return _respond(200, state)

    async def _forward(self, queue: str, task_id: str, request: web.Request) -> web.Response | None:
        """The owner's answer, when another worker folds the task's status partition; None to
        answer here (this worker's own, or its read-your-writes `accepted` for a task the owner
        has not folded yet)."""
        runner = self._status_runner(queue)
        if self._router is None or runner is None:
            return None
        forwarded = await self._router.forward(runner, task_id, request)
        if forwarded is None or forwarded.status != 404:
            return forwarded
        return None if self.tasks.submitted(queue, task_id) else forwarded

    async def list(self, request: web.Request) -> web.StreamResponse:
        queue = request.match_info["queue"]
        unknown = self._unknown(queue)
        if unknown is not None:
            return unknown
        query = request.query
        raw = query.get("limit", str(DEFAULT_LIMIT))
        if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= MAX_LIMIT):
            return _error(400, "bad query", f"limit must be 1..{MAX_LIMIT}, not {raw!r}")
        limit, status, after = int(raw), query.get("status"), query.get("after")
        # With other workers folding some of the status partitions, each lists the tasks of
        # its own partitions and the pages are merged in id order (like a projection's scan);
        # asked by another worker for its part, only those of ours.
        router, others, only = self._router, None, None
        runner = self._status_runner(queue)
        if router is not None and runner is not None and query.get("route") != "local":
            only = router.here(runner)
            if FORWARDED not in request.headers:
                others = router.others(runner)
        try:
            items, nxt = self.tasks.list(queue, status, after, limit, only)
        except InputError as exc:
            return _error(400, "bad query", str(exc))
        if not others or router is None:
            return _respond(200, {"items": items, "next": nxt})
        parts = await router.ask(others, request, {**query, "limit": str(limit)})
        if parts is None:
            detail = "a worker that folds some of the queue's status partitions did not answer"
            return web_response(error_reply(503, "list incomplete", detail))
        rows = items + [item for part in parts for item in part["items"]]
        rows.sort(key=lambda item: str(item["task_id"]).encode())
        page = rows[:limit]
        more = len(rows) > limit or nxt is not None or any(part["next"] for part in parts)
        following = page[-1]["task_id"] if more and page else None
        return _respond(200, {"items": page, "next": following})

    def _status_runner(self, queue: str) -> Serving | None:
        try:
            return self.tasks.runner(queue)
        except KeyError:  # this worker does not fold the queue's status (`--only`)
            return None

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        queue, task_id = request.match_info["queue"], request.match_info["task_id"]
        unknown = self._unknown(queue)
        if unknown is not None:
            return unknown
        # The worker that folds the task's status partition knows whether it ended (this
        # one's store may lack the task, or hold it as it was when the partition moved here).
        forwarded = await self._forward(queue, task_id, request)
        if forwarded is not None:
            return forwarded
        loop = asyncio.get_running_loop()
        try:
            answer = await loop.run_in_executor(self._appends, self.tasks.cancel, queue, task_id)
        except InputError as exc:
            return _error(404, "unknown task", str(exc))
        except TaskError as exc:
            return _error(409, "task ended", str(exc))
        return _respond(200, answer)
