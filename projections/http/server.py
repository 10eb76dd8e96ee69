"""The query server: HTTP reads of a worker's projection stores, event intake and metrics.

aiohttp runs on its own event loop in a daemon thread, beside the worker's fold threads; a lean
fast path (refold.http.fastpath) answers plain key lookups before aiohttp sees them. Whatever
blocks — waiting for an offset, publishing, watermark queries — runs in an executor. Here: the
lifecycle, the routes and their guard (errors, counts, API tokens: refold.http.auth), health and
metrics; the projection reads are `refold.http.projection_routes`, mixed in.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import cast

from aiohttp import web
from refold.core.errors import (
    ConfigError,
)
from refold.engine.health import Health
from refold.engine.status import Watermarks, metrics_text
from refold.engine.worker import Worker
from refold.http.answers import Freshness
from refold.http.auth import Tokens, route_scope
from refold.http.command_routes import CommandRoutes
from refold.http.dashboard import Dashboard
from refold.http.event_routes import EventRoutes
from refold.http.fastpath import COMMANDS_ROUTE, TASKS_ROUTE, Front, new_loop
from refold.http.limits import ConnectionStats, Limits
from refold.http.malformed import MalformedRequests
from refold.http.projection_routes import ProjectionReads
from refold.http.projection_routes import error as _error
from refold.http.replicas import ReaderProcesses
from refold.http.routing import Router
from refold.http.saga_routes import SagaRoutes
from refold.http.task_routes import TaskRoutes

log = logging.getLogger(__name__)

TP = tuple[str, int]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

WAIT_THREADS = 32  # concurrent read-your-writes waits; more queue for a thread
_JSON = "application/json"
_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


def _refuse(status: int, error: str, allow: str | None = None) -> Handler:
    async def refuse(request: web.Request) -> web.StreamResponse:
        response = _error(status, error, f"{request.method} {request.path}")
        if allow is not None:
            response.headers["Allow"] = allow
        return response

    return refuse


class QueryServer(ProjectionReads):
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
        fast_path: bool = True,  # False: aiohttp answers everything (a baseline; same limits)
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
        self._dashboard = Dashboard(worker, self.describe_projections)
        self._advertise = advertise
        self.router = Router(worker, self.freshness)
        self._tasks = TaskRoutes(worker, self.router)
        self.tokens = Tokens.from_env()  # None: the API is open (refold.http.auth)
        self.limits = Limits.from_env()  # timeouts and the connection cap (refold.http.limits)
        self._sagas = SagaRoutes(worker, self.router)
        # Encoded positions per projection, reused while the runner's positions dict is the same
        # object: the runtime publishes new positions by replacing the dict, never mutating it.
        self._position_cache: dict[str, tuple[Mapping[TP, int], bytes]] = {}
        self._freshness: tuple[Health | None, dict[str, Freshness]] = (None, {})

    @property
    def connections(self) -> ConnectionStats | None:
        """Open, refused and timed-out connections (None until started)."""
        return None if self._front is None else self._front.stats

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
        self._commands.lag.start(asyncio.get_running_loop())
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
            ("GET", r"/sagas/{name}/{saga_id:[\s\S]+}", self._sagas.get),  # any text, even "/", LF
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
        limits = self.limits
        self._runner = web.AppRunner(
            app,
            access_log=None,
            # A backstop only: the sweep (refold.http.limits) closes idle connections first.
            keepalive_timeout=limits.keepalive_s + 2 * limits.tick_s + 1,
            shutdown_timeout=2.0,
            logger=MalformedRequests(logging.getLogger("aiohttp.server"), self._requests),
        )
        await self._runner.setup()
        full_app = self._runner.server
        assert full_app is not None  # set by setup()
        # Connections start on the fast path, which hands them to aiohttp when it must.
        self._front = Front(
            self,
            full_app,
            self._requests,
            self.tokens,
            limits,
            fast=self._fast_path,
            posts={
                b"commands": (COMMANDS_ROUTE, self._commands.intake),
                b"tasks": (TASKS_ROUTE, self._tasks.intake),
            },
        )
        loop = asyncio.get_running_loop()
        shared = self.procs > 1
        if shared and self.port:
            _check_free(self.host, self.port)  # SO_REUSEPORT would share it with a stranger
        listener = await loop.create_server(
            self._front.protocol,
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
            except ConnectionResetError:  # the client went (or a body timeout closed it)
                log.info("%s %s: the connection closed mid-request", request.method, request.path)
                response = _error(408, "request timeout", "the connection closed mid-request")
            except Exception as exc:
                log.exception("%s %s failed", request.method, request.path_qs)
                response = _error(500, "internal error", f"{type(exc).__name__}: {exc}")
            counter = (route, response.status)
            counts[counter] = counts.get(counter, 0) + 1
            return response

        return guarded

    # -- status -----------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        """`GET /healthz`: 200 while no projection failed, else 503; each runner's state."""
        status, body = self.healthz_answer()
        return web.Response(status=status, body=body, content_type=_JSON)

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
        lag = "refold_http_loop_lag_seconds"
        text += (
            f"# HELP {lag} How late the HTTP event loop runs what is ready, smoothed; POST "
            "/commands is refused (429) while it is above REFOLD_COMMAND_MAX_LAG_S.\n"
            f"# TYPE {lag} gauge\n{lag} {self._commands.lag.lag_s:.6f}\n"
        )
        if self._front is not None:
            connections = ConnectionStats()
            connections.add(self._front.stats.as_list())
            if self.readers is not None:
                connections.add(self.readers.connection_stats().as_list())
            text += connections.metrics()
        return web.Response(body=text.encode(), headers={"Content-Type": _PROMETHEUS})


def _check_free(host: str, port: int) -> None:
    """OSError unless host:port is free: a socket without SO_REUSEPORT cannot bind beside one."""
    for family, kind, proto, _, address in socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    ):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
