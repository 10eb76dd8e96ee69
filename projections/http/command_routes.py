"""HTTP for commands: `POST /commands/{aggregate}` and `GET /commands/{id}` (mounted by the
query server).

A POST answers 202 only once the command is durably in the command topic; a malformed command is
refused at once (400/404/422) and never appended, and so is one that would wait too long behind
this worker's backlog (429 with Retry-After: `refold.http.admission`).
`?wait_ms=N` (on both routes) waits up to N ms for the result, answered from the worker's
results index (read_committed), without a thread per waiting request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import quote

import orjson
from aiohttp import web
from refold.core.commands import Command, is_conflict, pending
from refold.core.errors import CommandError, InputError
from refold.engine.worker import Worker
from refold.http.admission import Backlog, LoopLag
from refold.http.answers import Reply, error_reply, reply, web_response

log = logging.getLogger(__name__)

MAX_WAIT_MS = 30_000
MAX_REMEMBERED = 100_000  # pending command ids remembered for GET /commands/{id}


def _wait_ms(raw: str) -> int:
    raw = raw.strip()
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 9):
        raise InputError(f"wait_ms must be a non-negative integer, not {raw!r}")
    return min(int(raw), MAX_WAIT_MS)


def _conflict(command: Command, first: dict[str, Any]) -> Reply:
    """409: the id already names another command (another key, type, data or version)."""
    return reply(
        409,
        {
            "error": "command id conflict",
            "detail": f"command id {command.command_id!r} was first used for "
            f"{first.get('type')} on {first.get('key')!r}; a command id means one command",
            "command_id": command.command_id,
            "first": {k: first.get(k) for k in ("aggregate", "key", "type", "status")},
        },
    )


class CommandRoutes:
    """The command handlers over one worker's command client and results index."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._backlogs: dict[str, Backlog] = {}  # per aggregate: admission under overload
        #: how late the server's event loop runs (started with it): admission refuses while late
        self.lag = LoopLag()
        # Ids appended through this server and not decided yet, so that `GET /commands/{id}`
        # tells a pending command (200 pending) from an unknown id (404): the results index
        # only knows decided ones. Bounded; oldest forgotten first.
        self._submitted: OrderedDict[str, None] = OrderedDict()

    async def post(self, request: web.Request) -> web.StreamResponse:
        """`POST /commands/{aggregate}` with `{"command_id"?, "key", "type", "data",
        "expected_version"?}` -> 202 `{"command_id", "status_url"}` (or the result with wait_ms)."""
        started = time.time()
        wait = request.query.get("wait_ms", "0")
        body = await request.read()
        return web_response(await self.intake(request.match_info["name"], wait, body, started))

    async def intake(
        self, aggregate: str, wait: str, body: bytes, started: float | None = None
    ) -> Reply:
        """The answer to `POST /commands/{aggregate}?wait_ms={wait}` with `body`, for aiohttp's
        route and for refold.http.fastpath alike (which sends it without aiohttp's request and
        response objects: under overload a 429 costs a fraction of a full request)."""
        started = time.time() if started is None else started
        if aggregate not in self.worker.processors:
            known = ", ".join(sorted(self.worker.processors)) or "none"
            return error_reply(
                404,
                "unknown aggregate",
                f"no command processor for {aggregate!r} here; known: {known}",
            )
        try:
            wait_ms = _wait_ms(wait)
        except InputError as exc:
            return error_reply(400, "bad query", str(exc))
        try:
            obj = orjson.loads(body)
        except ValueError as exc:
            return error_reply(400, "invalid JSON", f"the body is not JSON: {exc}")
        client = self.worker.command_client
        try:
            command = client.prepare(aggregate, obj)
        except InputError as exc:
            return error_reply(422, "invalid command", str(exc))
        timing = self.worker.processors[aggregate].timing
        results = self.worker.results
        first = results.get(command.command_id) if results else None
        if first is not None and is_conflict(first, command):
            return _conflict(command, first)  # known already: nothing is appended
        status_url = f"/commands/{quote(command.command_id, safe='')}"
        if first is not None:  # decided already: its first result at once, nothing appended
            return reply(200, {**first, "status_url": status_url})
        backlog = self._backlogs.get(aggregate)
        if backlog is None:
            backlog = self._backlogs[aggregate] = Backlog(lag=self.lag)
        late = backlog.refused_late
        retry = backlog.refuse()
        if retry is not None:  # overloaded: say so now rather than answer seconds late
            if backlog.refused_late > late:
                detail = (
                    f"this worker takes in requests {self.lag.lag_s * 1000:.0f} ms late "
                    f"with {len(backlog)} commands for {aggregate!r} in flight; nothing appended"
                )
            else:
                detail = (
                    f"{len(backlog)} commands for {aggregate!r} wait for a decision here, more "
                    f"than {backlog.max_queue_s:g} s of work at the rate this worker decides; "
                    "nothing appended"
                )
            return reply(
                429,
                {"error": "too many commands", "detail": detail},
                (("Retry-After", f"{retry:.0f}"),),
            )
        self._remember(command.command_id)  # before the append: a GET may race its answer
        if results is not None:  # in flight from now: the append counts too
            backlog.watch(command.command_id, results.watch)
        appending = time.time()
        timing.add("http_intake", (appending - started) * 1000)
        try:
            await asyncio.wrap_future(client.append(command))
        except InputError as exc:  # too large for a record (a JSON body has no lone surrogate)
            backlog.dropped(command.command_id)
            self._submitted.pop(command.command_id, None)
            return error_reply(413, "command too large", str(exc))
        except CommandError as exc:
            log.warning("POST /commands/%s: %s", aggregate, exc)
            backlog.dropped(command.command_id)
            return error_reply(503, "not acknowledged", str(exc))
        timing.add("http_append", (time.time() - appending) * 1000)
        if wait_ms:
            learned: list[float] = []
            result = await self._result(command.command_id, wait_ms, learned)
            if result is not None and is_conflict(result, command):
                return _conflict(command, result)
            if result is not None:
                response = reply(200, {**result, "status_url": status_url})
                answered = time.time()
                if learned:
                    timing.add("http_answer", (answered - learned[0]) * 1000)
                    decided_ms = result.get("decided_at_ms")
                    if isinstance(decided_ms, int) and decided_ms:
                        timing.add("decided_to_index", learned[0] * 1000 - decided_ms)
                timing.add("post_total", (answered - started) * 1000)
                return response
        return reply(
            202, {"command_id": command.command_id, "status": "pending", "status_url": status_url}
        )

    async def get(self, request: web.Request) -> web.StreamResponse:
        """`GET /commands/{id}`: the result, or `pending` while the command has none."""
        command_id = request.match_info["name"]
        if self.worker.results is None:
            return web_response(
                error_reply(404, "no commands", "this worker runs no command processor")
            )
        try:
            wait_ms = _wait_ms(request.query.get("wait_ms", "0"))
        except InputError as exc:
            return web_response(error_reply(400, "bad query", str(exc)))
        result = await self._result(command_id, wait_ms)
        if result is not None:
            self._submitted.pop(command_id, None)
            return web_response(reply(200, result))
        if command_id in self._submitted:
            return web_response(reply(200, pending(command_id)))
        return web_response(
            error_reply(
                404,
                "unknown command",
                f"no result for command {command_id!r} and it was not submitted through this "
                "server; a command submitted elsewhere is found here once it is decided",
            )
        )

    def _remember(self, command_id: str) -> None:
        submitted = self._submitted
        submitted[command_id] = None
        submitted.move_to_end(command_id)
        if len(submitted) > MAX_REMEMBERED:
            submitted.popitem(last=False)

    async def _result(
        self, command_id: str, wait_ms: int, learned: list[float] | None = None
    ) -> dict[str, Any] | None:
        """The result, known or within `wait_ms`; `learned` gets the time the index had it
        (for the step timings of refold.engine.command_timing)."""
        index = self.worker.results
        if index is None:
            return None
        found = index.get(command_id)
        if found is not None or not wait_ms:
            return found
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()

        def settle(result: dict[str, Any]) -> None:
            if not future.done():
                future.set_result(result)

        def from_index_thread(result: dict[str, Any]) -> None:
            if learned is not None:
                learned.append(time.time())
            loop.call_soon_threadsafe(settle, result)

        cancel = index.watch(command_id, from_index_thread)
        try:
            return await asyncio.wait_for(future, wait_ms / 1000)
        except TimeoutError:
            return None
        finally:
            cancel()
