"""The dashboard: `GET /` serves one self-contained page (no CDN, no build step: the worker's
machine may have no internet), and `GET /dashboard.json` what it shows, which the page polls.

What the page shows: every projection (version, state, events folded, dead letters, lag per
partition, and the events/s the page derives between polls), a version being rebuilt with its
progress and ETA, which worker owns which partition (this one, or the member the broker names),
the command processors' counts, and tasks and sagas by status.

Tasks and sagas are counted from their status projections' stores by a scan capped at
`COUNT_CAP` keys per queue (`"capped": true` when there are more), cached for `COUNT_EVERY_S`:
a page left open costs a bounded read per second, whatever the backlog.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from importlib import resources
from typing import Any

from aiohttp import web
from refold.engine.worker import Worker
from refold.http.answers import dumps

COUNT_CAP = 50_000
COUNT_EVERY_S = 2.0
_PAGE = resources.files("refold.http").joinpath("dashboard.html")


class Dashboard:
    """The page and its data for one worker's query server."""

    def __init__(self, worker: Worker, projections: Callable[[], list[dict[str, Any]]]) -> None:
        self.worker = worker
        self._projections = projections
        self._page = _PAGE.read_bytes()
        self._started = time.time()
        self._counts: dict[str, tuple[float, dict[str, Any]]] = {}  # cache by "kind/name"

    async def page(self, request: web.Request) -> web.StreamResponse:
        """`GET /`: the page (it fetches `/dashboard.json` every second)."""
        return web.Response(
            body=self._page,
            content_type="text/html",
            charset="utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    async def data(self, request: web.Request) -> web.StreamResponse:
        """`GET /dashboard.json`: a snapshot of everything the page shows."""
        loop = asyncio.get_running_loop()
        body = await loop.run_in_executor(None, self.snapshot)
        return web.Response(body=dumps(body), content_type="application/json")

    def snapshot(self) -> dict[str, Any]:
        worker = self.worker
        health = worker.health.health
        failed = [n for n, r in worker.runners.items() if r.stats.state == "failed"]
        return {
            "worker": {
                "id": worker.worker_id,
                "pid": os.getpid(),
                "app": list(worker.config.app_modules),
                "started": self._started,
                "now": time.time(),
                "status": "failed" if failed else health.status(),
                "broker": health.summary().get("broker"),
            },
            "projections": self._projections(),
            "commands": [
                {
                    "name": name,
                    "state": p.stats.state,
                    "error": p.stats.error,
                    "accepted": p.stats.accepted,
                    "rejected": p.stats.rejected,
                    "duplicates": p.stats.duplicates,
                    "conflicts": p.stats.conflicts,
                    "partitions": list(p.stats.assigned),
                }
                for name, p in sorted(worker.processors.items())
            ],
            "tasks": [
                self._count("tasks", name, partial(worker.tasks.runner, name))
                for name in sorted(worker.tasks.queues)
            ],
            "sagas": [
                self._count("sagas", name, partial(worker.sagas.runner, name))
                for name in sorted(worker.sagas.sagas)
            ],
        }

    def _count(self, kind: str, name: str, runner: Callable[[], Any]) -> dict[str, Any]:
        """`{"name", "counts": {status: n}, "total", "capped"}` from the status store."""
        cached = self._counts.get(f"{kind}/{name}")
        now = time.monotonic()
        if cached is not None and now - cached[0] < COUNT_EVERY_S:
            return cached[1]
        counts: Counter[str] = Counter()
        total, capped, after = 0, False, None
        try:
            store = runner().store
            while True:
                page = store.scan("", after, 1000)
                for key, state in page:
                    after = key
                    counts[str(state.get("status", "unknown"))] += 1
                total += len(page)
                if len(page) < 1000:
                    break
                if total >= COUNT_CAP:
                    capped = True
                    break
            error = None
        except Exception as exc:  # not started yet, a store closed by a swap: say so, retry later
            error = f"{type(exc).__name__}: {exc}"
        found = {
            "name": name,
            "counts": dict(sorted(counts.items())),
            "total": total,
            "capped": capped,
            "error": error,
        }
        self._counts[f"{kind}/{name}"] = (now, found)
        return found
