"""HTTP for sagas (mounted by the query server):

- `POST /sagas/{name}` `{"saga_id"?, "data": {...}}` -> 202 `{"saga_id", "status": "running",
  "status_url"}` once the `started` event is durably on the saga topic; a repeated saga id
  answers the same and appends nothing, with other data 409 `{"error": "saga id conflict",
  "detail", "saga_id", "status_url"}` (as a command or task id reused for another body); bad
  input 400/404/422, never appended. A start that names its saga id is answered by the worker
  that folds the saga's partition (forwarded like a lookup): that worker's state and its own
  starts know every earlier start of the id, so a repeat sent to any worker is told so;
- `GET /sagas/{name}/{saga_id}` -> the saga's state (its state projection, made public), from
  the worker that folds the saga's partition: a worker that does not forwards the lookup to it
  (`refold.http.routing`; `?route=local` answers here, `?route=redirect` with a 307);
- `GET /sagas/{name}` -> this worker's runner of the saga: its counters and the partitions it
  drives (`runner.ready`), or `runner: null` where no runner drives it.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
from aiohttp import web
from refold.core.errors import InputError, SagaConflict, SagaError
from refold.core.sagas import saga_projection_name
from refold.engine.worker import Worker
from refold.http.routing import Router

log = logging.getLogger(__name__)

_JSON = "application/json"


def _respond(status: int, body: Any) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type=_JSON)


def _error(status: int, error: str, detail: Any) -> web.Response:
    return _respond(status, {"error": error, "detail": detail})


class SagaRoutes:
    """The saga handlers over one worker's sagas."""

    def __init__(self, worker: Worker, router: Router | None = None) -> None:
        self.sagas = worker.sagas
        self._runners = worker.runners
        self._router = router
        # Starts wait for Kafka's acknowledgement: off the event loop, one flush at a time.
        self._appends = ThreadPoolExecutor(1, thread_name_prefix="refold-http-sagas")

    def _unknown(self, name: str) -> web.Response | None:
        if name in self.sagas.sagas:
            return None
        known = ", ".join(sorted(self.sagas.sagas)) or "none"
        return _error(404, "unknown saga", f"no saga {name!r} here; known: {known}")

    async def start(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        unknown = self._unknown(name)
        if unknown is not None:
            return unknown
        raw = await request.read()
        try:
            obj = orjson.loads(raw)
        except ValueError as exc:
            return _error(400, "invalid JSON", f"the body is not JSON: {exc}")
        loop = asyncio.get_running_loop()
        try:
            start = await loop.run_in_executor(self._appends, self.sagas.prepare, name, obj)
            if isinstance(obj, dict) and "saga_id" in obj:  # a new random id has no owner yet
                forwarded = await self._to_owner(name, start.saga_id, request, raw)
                if forwarded is not None:
                    return forwarded
            append = self.sagas.append_start
            started = await loop.run_in_executor(self._appends, append, name, start)
        except InputError as exc:
            return _error(422, "invalid saga start", str(exc))
        except SagaConflict as exc:  # known already: nothing is appended
            body = {"error": "saga id conflict", "detail": str(exc)}
            return _respond(409, {**body, "saga_id": exc.saga_id, "status_url": exc.status_url})
        except SagaError as exc:
            log.warning("POST /sagas/%s: %s", name, exc)
            return _error(503, "not acknowledged", str(exc))
        return _respond(202, started.to_json())

    async def _to_owner(
        self, name: str, saga_id: str, request: web.Request, body: bytes
    ) -> web.Response | None:
        """The answer of the worker that folds the saga's partition, when another one does."""
        runner = self._runners.get(saga_projection_name(name))
        if self._router is None or runner is None:
            return None
        return await self._router.forward(runner, saga_id, request, body)

    async def get(self, request: web.Request) -> web.StreamResponse:
        name, saga_id = request.match_info["name"], request.match_info["saga_id"]
        unknown = self._unknown(name)
        if unknown is not None:
            return unknown
        runner = self._runners.get(saga_projection_name(name))
        if self._router is not None and runner is not None:
            forwarded = await self._router.forward(runner, saga_id, request)
            if forwarded is not None:  # another worker folds this saga's partition
                return forwarded
        state = self.sagas.status(name, saga_id)
        if state is None:
            return _error(404, "unknown saga run", f"no saga {saga_id!r} of {name!r} (yet)")
        return _respond(200, state)

    async def describe(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        unknown = self._unknown(name)
        if unknown is not None:
            return unknown
        return _respond(200, self.sagas.describe(name))
