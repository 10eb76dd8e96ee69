"""The query server: HTTP reads of a worker's projection stores, event intake and metrics.

aiohttp runs on its own event loop in a daemon thread, beside the worker's fold threads. Point
lookups and scans read the store on the loop thread (a RocksDB get is microseconds and rocksdict
allows reads while the fold thread commits); whatever blocks — waiting for an offset, publishing,
watermark queries — runs in an executor. Every answer that reads a store carries the runner's
positions, read before the state, so the state is at least as new as the position it reports.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from aiohttp import web
from confluent_kafka import KafkaException
from refold.core.errors import (
    BrokerError,
    ConfigError,
    InputError,
    LogReadError,
    StoreError,
    TopicError,
)
from refold.engine.frozen import FrozenVersion, Serving
from refold.engine.health import Health
from refold.engine.status import Watermarks, describe, describe_on_disk, metrics_text
from refold.engine.timetravel import fold_as_of, parse_time
from refold.engine.worker import Worker
from refold.http import answers
from refold.http.answers import DOWN as _DOWN
from refold.http.answers import Freshness
from refold.http.answers import dumps as _dumps
from refold.http.answers import position as _position
from refold.http.auth import Tokens, route_scope
from refold.http.command_routes import CommandRoutes
from refold.http.dashboard import Dashboard
from refold.http.event_routes import EventRoutes
from refold.http.fastpath import Answer, Front, new_loop
from refold.http.malformed import MalformedRequests
from refold.http.replicas import ReaderProcesses
from refold.http.routing import FORWARDED, Router
from refold.http.saga_routes import SagaRoutes
from refold.http.task_routes import TaskRoutes

log = logging.getLogger(__name__)

TP = tuple[str, int]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_WAIT_MS = 30_000
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
WAIT_THREADS = 32  # concurrent read-your-writes waits; more queue for a thread
_MAX_OFFSET = 2**63 - 1
_JSON = "application/json"
_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


def _respond(status: int, body: Any) -> web.Response:
    return web.Response(status=status, body=_dumps(body), content_type=_JSON)


def _error(status: int, error: str, detail: Any, **extra: Any) -> web.Response:
    """The one error shape: `{"error": short phrase, "detail": what exactly, ...extra}`."""
    return web.Response(
        status=status, body=answers.error_body(error, detail, **extra), content_type=_JSON
    )


def _refuse(status: int, error: str, allow: str | None = None) -> Handler:
    async def refuse(request: web.Request) -> web.StreamResponse:
        response = _error(status, error, f"{request.method} {request.path}")
        if allow is not None:
            response.headers["Allow"] = allow
        return response

    return refuse


def _count(raw: str, what: str, low: int, high: int) -> int:
    """A decimal integer in [low, high]; InputError naming `what` otherwise."""
    text = raw.strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 19):
        raise InputError(f"{what} must be a non-negative integer, not {raw!r}")
    value = int(text)
    if not low <= value <= high:
        raise InputError(f"{what} must be between {low} and {high}, not {value}")
    return value


def parse_min_offset(raw: str, topics: tuple[str, ...]) -> dict[TP, int]:
    """`P:O,P:O` (single-topic projections) or `topic:P:O,...` -> {(topic, P): O}.

    Kafka topic names cannot contain ':', so the parts are unambiguous.
    """
    wanted: dict[TP, int] = {}
    for item in raw.split(","):
        parts = item.strip().split(":")
        if len(parts) == 2:
            if len(topics) != 1:
                raise InputError(
                    f"min_offset item {item!r} names no topic but the projection reads "
                    f"{len(topics)} topics; write topic:partition:offset"
                )
            topic = topics[0]
        elif len(parts) == 3:
            topic = parts[0]
            if topic not in topics:
                raise InputError(
                    f"min_offset names topic {topic!r}, which the projection "
                    f"does not read (it reads {', '.join(topics)})"
                )
        else:
            raise InputError(
                f"min_offset item {item!r} is not partition:offset or topic:partition:offset"
            )
        tp = (topic, _count(parts[-2], "min_offset partition", 0, 1_000_000))
        offset = _count(parts[-1], "min_offset offset", 0, _MAX_OFFSET)
        wanted[tp] = max(offset, wanted.get(tp, 0))
    return wanted


class QueryServer:
    """Serves one worker's projections over HTTP until `stop()`; single use (start once).

    With `procs` > 1, `procs - 1` reader processes (refold.http.replica) answer key lookups
    on the same port beside this one.
    """

    def __init__(
        self,
        worker: Worker,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        procs: int = 1,
        fast_path: bool = True,  # False: aiohttp answers everything (a benchmark baseline)
        advertise: str | None = None,  # the URL other workers forward to (default: `url`)
    ) -> None:
        if procs < 1:
            raise ConfigError(f"--http-procs must be at least 1, not {procs}")
        self.worker = worker
        self.host = host
        self.port = port  # the bound port once `start()` returned (port 0 picks a free one)
        self.procs = procs
        self._fast_path = fast_path
        self.readers: ReaderProcesses | None = None
        self._upstream = 0  # the loopback port the reader processes relay requests to
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._listeners: list[asyncio.AbstractServer] = []
        self._front: Front | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._waits = ThreadPoolExecutor(WAIT_THREADS, thread_name_prefix="refold-http-wait")
        # One publish at a time: the shared Publisher's flush() is not meant for concurrent callers.
        self._publishing = ThreadPoolExecutor(1, thread_name_prefix="refold-http-publish")
        self._requests: dict[tuple[str, int], int] = {}
        self._watermarks = Watermarks(worker.config)
        self._events = EventRoutes(worker, self._publishing)
        self._commands = CommandRoutes(worker)
        self._tasks = TaskRoutes(worker)
        self._dashboard = Dashboard(worker, self.describe_projections)
        self._advertise = advertise
        self.router = Router(worker, self.freshness)
        self.tokens = Tokens.from_env()  # None: the API is open (refold.http.auth)
        self._sagas = SagaRoutes(worker, self.router)
        # Encoded positions per projection, reused while the runner's positions dict is the same
        # object: the runtime publishes new positions by replacing the dict, never mutating it.
        self._position_cache: dict[str, tuple[Mapping[TP, int], bytes]] = {}
        self._freshness: tuple[Health | None, dict[str, Freshness]] = (None, {})

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Listen on host:port in a daemon thread; returns once listening (ConfigError if not)."""
        if self._thread is not None:
            raise ConfigError("this QueryServer was already started; create a new one")
        self._thread = threading.Thread(target=self._serve, name="refold-http", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise ConfigError(f"HTTP server on {self.host}:{self.port} did not start in {timeout}s")
        if self._failure is not None:
            raise ConfigError(
                f"cannot serve HTTP on {self.host}:{self.port}: {self._failure}",
                hint="choose another --http HOST:PORT (port 0 picks a free one)",
            ) from self._failure
        self.router.start(self._advertise or self.url)
        if self.procs > 1:
            readers = ReaderProcesses(
                self.worker, self.procs - 1, self.host, self.port, self._upstream, self
            )
            try:
                readers.start(timeout)
            except ConfigError:
                self.stop()
                raise
            self.readers = readers
        log.info("query server listening on %s (%d processes)", self.url, self.procs)

    def stop(self, timeout: float = 10.0) -> None:
        """Close the listener and connections, end the loop thread; idempotent."""
        if self.readers is not None:
            self.readers.stop()
        if self.router.url is not None:
            self.router.stop()
            self.router.url = None
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
        self._waits.shutdown(wait=False, cancel_futures=True)
        self._publishing.shutdown(wait=False, cancel_futures=True)

    def _serve(self) -> None:
        loop = new_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._listen())
        except BaseException as exc:  # reported to start(), which raises it in the caller
            self._failure = exc
        self._ready.set()
        try:
            if self._failure is None:
                loop.run_forever()
        finally:
            for listener in self._listeners:
                listener.close()
            if self._front is not None:
                self._front.close_all()
            if self._runner is not None:
                loop.run_until_complete(self._runner.cleanup())
            loop.run_until_complete(self.router.close())
            loop.close()
            log.info("query server on %s stopped", self.url)

    async def _listen(self) -> None:
        app = web.Application(client_max_size=1 << 20)
        routes: list[tuple[str, str, Handler]] = [  # the router tries them in this order
            ("GET", "/projections/{name}/{key:.+}", self.get_key),
            ("GET", "/projections/{name}", self.scan),
            ("GET", "/projections", self.projections),
            ("GET", "/healthz", self.healthz),
            ("GET", "/", self._dashboard.page),
            ("GET", "/dashboard.json", self._dashboard.data),
            ("GET", "/metrics", self.metrics),
            ("POST", "/events/{topic}", self._events.post),
            ("POST", "/commands/{name}", self._commands.post),
            ("GET", "/commands/{name}", self._commands.get),
            ("POST", "/tasks/{queue}", self._tasks.submit),
            ("GET", "/tasks/{queue}", self._tasks.list),
            ("POST", "/tasks/{queue}/{task_id}/cancel", self._tasks.cancel),
            ("GET", "/tasks/{queue}/{task_id}", self._tasks.get),
            ("POST", "/sagas/{name}", self._sagas.start),
            ("GET", "/sagas/{name}", self._sagas.describe),
            ("GET", "/sagas/{name}/{saga_id}", self._sagas.get),
        ]
        # Per-route wrappers instead of a middleware: aiohttp adds a second layer per request
        # once an app has any middleware, and the key lookup is the hot path.
        allowed: dict[web.Resource, list[str]] = {}  # one path may take several methods
        for method, path, handler in routes:
            resource = app.router.add_resource(path)  # reuses the previous one for the same path
            scope = route_scope(method, path)
            resource.add_route(method, self._guard(resource.canonical, handler, scope))
            allowed.setdefault(resource, []).append(method)
        for resource, methods in allowed.items():
            refuse = _refuse(405, "method not allowed", allow=", ".join(methods))
            resource.add_route("*", self._guard(resource.canonical, refuse))
        app.router.add_route("*", "/{path:.*}", self._guard("unmatched", _refuse(404, "no route")))
        self._runner = web.AppRunner(
            app,
            access_log=None,
            shutdown_timeout=2.0,
            logger=MalformedRequests(logging.getLogger("aiohttp.server"), self._requests),
        )
        await self._runner.setup()
        full_app = self._runner.server
        assert full_app is not None  # set by setup()
        # Connections start on the fast path, which hands them to aiohttp when it must.
        self._front = Front(self, full_app, self._requests, self.tokens)
        loop = asyncio.get_running_loop()
        shared = self.procs > 1
        if shared and self.port:
            _check_free(self.host, self.port)  # SO_REUSEPORT would share it with a stranger
        accept = self._front.protocol if self._fast_path else full_app
        listener = await loop.create_server(
            accept,
            self.host,
            self.port,
            reuse_address=True,
            reuse_port=shared or None,
            backlog=1024,
        )
        self._listeners.append(listener)
        self.port = listener.sockets[0].getsockname()[1]
        if shared:  # what the reader processes relay to: this server, on loopback only
            upstream = await loop.create_server(self._front.protocol, "127.0.0.1", 0, backlog=1024)
            self._listeners.append(upstream)
            self._upstream = upstream.sockets[0].getsockname()[1]

    def _guard(self, route: str, handler: Handler, scope: str | None = None) -> Handler:
        """`handler`, answering a JSON error for whatever it raises, counting every answer;
        with API tokens, only for a token with `scope` (401 / 403 otherwise)."""
        counts = self._requests
        tokens = self.tokens if scope is not None else None

        async def guarded(request: web.Request) -> web.StreamResponse:
            response: web.StreamResponse
            try:
                allowed = (
                    200
                    if tokens is None
                    else tokens.allows(request.headers.get("Authorization"), cast(str, scope))
                )
                if allowed == 401:
                    response = _error(
                        401, "unauthorized", "send Authorization: Bearer TOKEN (a known token)"
                    )
                    response.headers["WWW-Authenticate"] = 'Bearer realm="refold"'
                elif allowed == 403:
                    response = _error(403, "forbidden", f"this token lacks the {scope!r} scope")
                else:
                    response = await handler(request)
            except web.HTTPException as exc:  # aiohttp's own, e.g. 413 for a body too large
                where = f"{request.method} {request.path}"
                response = _error(exc.status, exc.reason.lower(), where)
            except Exception as exc:
                log.exception("%s %s failed", request.method, request.path_qs)
                response = _error(500, "internal error", f"{type(exc).__name__}: {exc}")
            counter = (route, response.status)
            counts[counter] = counts.get(counter, 0) + 1
            return response

        return guarded

    # -- projections ------------------------------------------------------------------------

    async def get_key(self, request: web.Request) -> web.StreamResponse:
        """`GET /projections/{name}/{key}`: one key's state and the runner's position."""
        info = request.match_info
        name = info["name"]
        runner = self.worker.runners.get(name)
        if runner is None:
            return self._unknown(name)
        if runner.stats.state in _DOWN:
            return self._unavailable(runner)
        if "as_of" in request.query:
            return await self._as_of(runner, info["key"], request.query["as_of"])
        forwarded = await self.router.forward(runner, info["key"], request)
        if forwarded is not None:  # another worker folds this key (refold.http.routing)
            return forwarded
        if request.query_string:
            refused = await self._reach(runner, request)
            if refused is not None:
                return refused
        try:
            status, body = self._read_key(runner, info["key"])
        except StoreError as exc:
            return self._unavailable(runner, exc)
        return web.Response(status=status, body=body, content_type=_JSON)

    def _read_key(self, runner: Serving, key: str) -> Answer:
        """The 200 or 404 answer for one key of a readable runner (StoreError if it is not)."""
        positions = runner.stats.positions  # before the state: the state is at least this new
        state = runner.store.get(key)
        fresh = self.freshness(runner).fragment(key)
        if state is None:
            return 404, answers.key_missing(runner.name, key, positions, fresh)
        cached = self._position_cache.get(runner.name)
        if cached is None or cached[0] is not positions:
            cached = (positions, _dumps(_position(positions)))
            self._position_cache[runner.name] = cached
        return 200, answers.key_found(key, state, cached[1], fresh)

    def freshness(self, runner: Serving) -> Freshness:
        """How current `runner`'s answers are, per key partition: rebuilt once per health
        snapshot (a few times a second), not per lookup."""
        health = self.worker.health.health
        built = self._freshness
        if built[0] is not health:
            built = self._freshness = (health, {})
        fresh = built[1].get(runner.name)
        if fresh is None:
            fresh = built[1][runner.name] = freshness_of(health, runner)
        return fresh

    # The fast path (refold.http.fastpath) reads through these two; None sends the request
    # to the full app, which answers unknown names, stopped runners and store errors.

    def lookup(self, name: str, key: str) -> Answer | None:
        runner = self.worker.runners.get(name)
        if runner is None or runner.stats.state in _DOWN or self.router.routes(runner, key):
            return None
        try:
            return self._read_key(runner, key)
        except StoreError:
            return None

    def healthz_answer(self) -> Answer:
        health = self.worker.health.health
        states = {name: r.stats.state for name, r in self.worker.runners.items()}
        sagas = {name: r.stats.state for name, r in self.worker.sagas.runners.items()}
        return answers.health(states, health.status(), health.summary(), sagas)

    async def _as_of(self, runner: Serving, key: str, when: str) -> web.Response:
        """`?as_of=ISO-TIME`: the key's events up to that time, folded from the log."""
        try:
            moment = parse_time(when)
        except InputError as exc:
            return _error(400, "bad as_of", str(exc))
        if isinstance(runner, FrozenVersion):  # its fold is not in the code: nothing to fold
            return _error(
                409,
                "as_of not supported",
                f"v{runner.version} of {runner.name!r} is frozen: {runner.reason}",
            )
        if runner.projection.rekeys:
            return _error(
                400,
                "as_of not supported",
                f"projection {runner.name!r} re-keys events; as_of needs aggregate keys",
            )
        worker = self.worker
        projection = runner.projection
        loop = asyncio.get_running_loop()
        try:
            found = await loop.run_in_executor(
                self._waits,
                lambda: fold_as_of(worker.config, worker.codec, projection, key, moment),
            )
        except (KafkaException, LogReadError, TopicError, BrokerError) as exc:
            log.warning("as_of %s/%s: %s", runner.name, key, exc)
            return _error(503, "broker unavailable", f"cannot read the log for as_of: {exc}")
        if found.state is None:
            return _error(
                404,
                "no state for key",
                f"no events for key {key!r} before {when}",
                position=found.position,
            )
        return _respond(
            200,
            {
                "key": key,
                "state": found.state,
                "position": found.position,
                "as_of": moment.isoformat(),
            },
        )

    async def scan(self, request: web.Request) -> web.StreamResponse:
        """`GET /projections/{name}?prefix=&after=&limit=`: a page of keys in byte order."""
        name = request.match_info["name"]
        runner = self.worker.runners.get(name)
        if runner is None:
            return self._unknown(name)
        if runner.stats.state in _DOWN:
            return self._unavailable(runner)
        query = request.query
        try:
            limit = _count(query.get("limit", str(DEFAULT_LIMIT)), "limit", 1, MAX_LIMIT)
        except InputError as exc:
            return _error(400, "bad query", str(exc))
        refused = await self._reach(runner, request)
        if refused is not None:
            return refused
        prefix, after = query.get("prefix", ""), query.get("after")
        fresh = self.freshness(runner)

        def local(n: int, only_here: bool) -> list[tuple[str, Any]]:
            """The first `n` keys of this store; `only_here`: of the partitions folded here
            (the store may still hold keys of partitions it folded before a rebalance)."""
            if not only_here or fresh.owners is None:
                return runner.store.scan(prefix, after, n)
            found: list[tuple[str, Any]] = []
            cursor, step = after, max(n, 1000)
            while len(found) < n:
                rows = runner.store.scan(prefix, cursor, step)
                found += [(k, s) for k, s in rows if fresh.here(k)]
                if len(rows) < step:
                    break
                cursor = rows[-1][0]
            return found[:n]

        positions = runner.stats.positions
        try:
            # Other workers fold some partitions: the page merges their keys with ours.
            merged = await self.router.scan(
                runner, request, lambda n: local(n, True), limit, _position(positions)
            )
            if merged is not None:
                return merged
            # One more than asked: `next` is null exactly when nothing follows this page.
            # Asked by another worker for its merge: only the keys of our partitions.
            rows = local(limit + 1, FORWARDED in request.headers)
        except StoreError as exc:
            return self._unavailable(runner, exc)
        page = rows[:limit]
        return _respond(
            200,
            {
                "items": [{"key": k, "state": s} for k, s in page],
                "next": page[-1][0] if len(rows) > limit else None,
                "position": _position(positions),
            },
        )

    async def _reach(self, runner: Serving, request: web.Request) -> web.Response | None:
        """None once the runner folded the query's `min_offset`, else the 400/409 answer."""
        query = request.query
        raw = query.get("min_offset")
        try:
            wait_ms = _count(query.get("wait_ms", "0"), "wait_ms", 0, MAX_WAIT_MS)
            if raw is None:
                return None
            wanted = parse_min_offset(raw, runner.topics)
        except InputError as exc:
            return _error(400, "bad query", str(exc))
        try:
            if runner.reached(wanted):
                return None
            if wait_ms and await asyncio.get_running_loop().run_in_executor(
                self._waits, runner.wait_for, wanted, wait_ms / 1000
            ):
                return None
        except StoreError as exc:
            return self._unavailable(runner, exc)
        return _error(
            409,
            "position not reached",
            f"projection {runner.name!r} ({runner.stats.state}) has not folded "
            f"min_offset={raw} after waiting {wait_ms} ms",
            position=_position(runner.stats.positions),
        )

    def _unknown(self, name: str) -> web.Response:
        known = ", ".join(sorted(self.worker.runners)) or "none"
        return _error(404, "unknown projection", f"no projection {name!r}; known: {known}")

    def _unavailable(self, runner: Serving, exc: StoreError | None = None) -> web.Response:
        stats = runner.stats
        if exc is not None:
            log.warning("projection %s unreadable (%s): %s", runner.name, stats.state, exc)
        reason = exc or stats.error or "its runner ended"
        return _error(
            503, "projection unavailable", f"projection {runner.name!r} is {stats.state}: {reason}"
        )

    # -- status -----------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        """`GET /healthz`: 200 while no projection failed, else 503; each runner's state."""
        status, body = self.healthz_answer()
        return web.Response(status=status, body=body, content_type=_JSON)

    async def projections(self, request: web.Request) -> web.StreamResponse:
        """`GET /projections`: every runner with its counters, positions and lag."""
        loop = asyncio.get_running_loop()
        described = await loop.run_in_executor(None, self.describe_projections)
        return _respond(200, described)

    def describe_projections(self) -> list[dict[str, Any]]:
        """Every live runner as `GET /projections` shows it, with the version being rebuilt."""
        builds = dict(self.worker.builds)
        marks = self._watermarks
        config = self.worker.config
        health = self.worker.health.health
        out = []
        for r in list(self.worker.runners.values()):
            entry = describe(r, marks)
            entry["health"] = health_of(health, r)
            build = builds.get(r.name)
            # A newer version being rebuilt beside the live one: its progress.
            if build is not None:
                entry["rebuild"] = describe(build, marks)
            else:  # maybe by `refold replay`, in its own processes
                entry["rebuild"] = describe_on_disk(config, r, marks)
            out.append(entry)
        return out

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        """`GET /metrics`: Prometheus text format 0.0.4."""
        requests = dict(self._requests)  # snapshot on the loop thread, the only writer
        if self.readers is not None:
            for counter, n in self.readers.counts().items():
                requests[counter] = requests.get(counter, 0) + n
        runners = list(self.worker.runners.values())
        processors = dict(self.worker.processors)
        loop = asyncio.get_running_loop()
        text = await loop.run_in_executor(
            None, metrics_text, runners, self._watermarks, requests, processors
        )
        return web.Response(body=text.encode(), headers={"Content-Type": _PROMETHEUS})


def freshness_of(health: Health, runner: Serving) -> Freshness:
    """What lookups of `runner` say about their key's partition, from a health snapshot."""
    if isinstance(runner, FrozenVersion):  # nothing folds it: every answer is as old as it is
        return Freshness([], stale=f"v{runner.version} is frozen: {runner.reason}")
    if not health.reachable:
        return Freshness([], stale=f"the broker is unreachable: {health.broker_error}")
    described = health.projections.get(runner.name)
    if described is None or described.version != runner.version:
        return answers.UNKNOWN
    parts: answers.Parts = []
    owners: list[str | None] = []  # of the first topic's partitions: where lookups are routed
    by_tp = {(p.topic, p.partition): p for p in described.partitions}
    for topic, count in described.counts:
        entries: list[answers.Entry] = []
        for partition in range(count):
            p = by_tp[(topic, partition)]
            if not parts:
                owners.append(p.member if p.owner == "elsewhere" else None)
            if p.owner == "here":
                entries.append((p.lag, None))
            elif p.owner == "elsewhere":
                why = f"partition {topic}:{partition} is folded by another worker ({p.member})"
                entries.append((None, why))
            else:
                entries.append((None, f"partition {topic}:{partition} is folded by nobody now"))
        parts.append((count, entries))
    return Freshness(parts, rekeys=described.rekeys, owners=owners)


def health_of(health: Health, runner: Serving) -> dict[str, Any]:
    """`GET /projections`' account of whether `runner`'s answers are current."""
    if isinstance(runner, FrozenVersion):
        return {"status": "frozen", "broker_reachable": health.reachable}
    described = health.projections.get(runner.name)
    if described is None or described.version != runner.version:
        return {"status": "starting", "broker_reachable": health.reachable}
    if not health.reachable:
        status = "broker unreachable"
    else:
        status = "unowned" if described.unowned else "behind" if described.behind else "ok"
    return {
        "status": status,
        "broker_reachable": health.reachable,
        "unowned": described.unowned,
        "behind": described.behind,
        "partitions": [p.to_json() for p in described.partitions],
    }


def _check_free(host: str, port: int) -> None:
    """OSError unless host:port is free: a socket without SO_REUSEPORT cannot bind beside one."""
    for family, kind, proto, _, address in socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    ):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
