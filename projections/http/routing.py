"""Any worker answers any key: a lookup of a key whose partition another worker folds is
forwarded to that worker (or answered 307 with its URL), so a client may ask whichever worker
it likes, and a load balancer in front of several needs no idea of partitions.

The owner of a key's partition comes from the worker's health snapshot (the group's
assignment, as the broker describes it: `answers.Freshness.owner`); its HTTP address from the
members topic (`refold.kafka.members`), where each query server advertises its own. The
forwarded request carries `X-Refold-Forwarded-By`, and a request that carries it is answered
where it lands, so two workers that disagree about ownership for a moment never bounce it.

- `?route=local` answers from this worker's store (stale says how far to trust it);
  `?route=redirect` answers 307 with the owner's URL instead of forwarding.
- The owner's answer is passed through as is (status, body, its position and lag), with
  `X-Refold-Served-By: <worker id>`.
- When ownership moves while a lookup is in flight — the owner answers stale because it no
  longer folds the partition, or cannot be reached — the lookup is retried on whoever owns it
  by the next health snapshot, for up to `RETRY_S`; then it is answered here, marked stale.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import web
from refold.engine.frozen import Serving
from refold.engine.worker import Worker
from refold.http.answers import Freshness, dumps, error_body, loads
from refold.kafka.members import Members

log = logging.getLogger(__name__)

FORWARDED = "X-Refold-Forwarded-By"
SERVED_BY = "X-Refold-Served-By"
RETRY_S = 5.0
TIMEOUT_S = 35.0  # a forwarded lookup may wait up to MAX_WAIT_MS for its min_offset


class Router:
    """Forwards lookups of keys other workers fold, for one query server."""

    def __init__(self, worker: Worker, freshness: Callable[[Serving], Freshness]) -> None:
        self.worker = worker
        self.members = Members(worker.config)
        self._freshness = freshness
        self._session: aiohttp.ClientSession | None = None
        self.url: str | None = None
        self.forwarded = 0
        self.failed = 0

    def start(self, url: str) -> None:
        """Tail the members topic and advertise this server at `url`."""
        self.url = url
        self.members.start()
        self.members.advertise(self.worker.worker_id, url)

    def stop(self) -> None:
        try:
            self.members.withdraw(self.worker.worker_id)
        except Exception as exc:  # the broker gone: the entry stays, which is harmless
            log.info("could not withdraw %s from the members topic: %s", self.url, exc)
        self.members.stop()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def owner_url(self, runner: Serving, key: str) -> tuple[str, str] | None:
        """(worker id, URL) of the worker that folds `key`, when it is another known one."""
        member = self._freshness(runner).owner(key)
        if member is None:
            return None
        worker_id = member.split(".", 1)[0]  # instance ids are `<worker id>.<name>.v<version>`
        url = self.members.url(worker_id)
        if url is None or worker_id == self.worker.worker_id:
            return None
        return worker_id, url

    def others(self, runner: Serving) -> dict[str, str] | None:
        """{worker id: URL} of every other worker that folds some of `runner`'s partitions,
        or None when this worker folds them all (or cannot tell who does)."""
        owners = self._freshness(runner).owners
        if owners is None:
            return None
        found: dict[str, str] = {}
        for member in owners:
            if member is None:
                continue
            worker_id = member.split(".", 1)[0]
            url = self.members.url(worker_id)
            if url is None:
                return None  # an owner we cannot reach: the caller answers from here, stale
            found[worker_id] = url
        return found or None

    def routes(self, runner: Serving, key: str) -> bool:
        """Whether a plain lookup of `key` is for another worker (the fast path hands it over)."""
        return self.owner_url(runner, key) is not None

    async def forward(
        self, runner: Serving, key: str, request: web.Request, body: bytes | None = None
    ) -> web.Response | None:
        """The owner's answer to this lookup, a 307 to it, or None: answer here. A POST about
        the key is forwarded as a POST, with `body` (a saga's start) or without (a task's
        cancel)."""
        route = request.query.get("route", "")
        if route == "local" or FORWARDED in request.headers:
            return None
        deadline = asyncio.get_running_loop().time() + RETRY_S
        while True:
            found = self.owner_url(runner, key)
            if found is None:
                return None
            worker_id, url = found
            target = url + request.path_qs
            if route == "redirect":
                return web.Response(status=307, headers={"Location": target, SERVED_BY: worker_id})
            authorization = request.headers.get("Authorization")
            answer = await self._get(target, authorization, request.method, body)
            if answer is not None:
                status, body = answer
                if b'"stale":true' not in body or asyncio.get_running_loop().time() > deadline:
                    self.forwarded += 1
                    return web.Response(
                        status=status,
                        body=body,
                        content_type="application/json",
                        headers={SERVED_BY: worker_id},
                    )
            if asyncio.get_running_loop().time() > deadline:
                self.failed += 1
                return None
            await asyncio.sleep(0.25)  # the next health snapshot may name a new owner

    async def scan(
        self,
        runner: Serving,
        request: web.Request,
        local: Callable[[int], list[Any]],
        limit: int,
        position: dict[str, int],
    ) -> web.Response | None:
        """A page of keys across every worker that folds some of the projection's partitions:
        each answers the keys of the partitions it folds (`local(n)`: this worker's first n),
        merged in key order. None: answer from here (every partition is here, or an owner is
        unknown, or the request was forwarded or asked `route=local`)."""
        if request.query.get("route") == "local" or FORWARDED in request.headers:
            return None
        others = self.others(runner)
        if others is None:
            return None
        query = {**request.query, "limit": str(limit + 1)}
        path = request.path + "?" + urlencode(query)
        authorization = request.headers.get("Authorization")
        answers = await asyncio.gather(
            *(self._get(url + path, authorization) for url in others.values())
        )
        rows = list(local(limit + 1))
        position = dict(position)  # ours, then each owner's for the partitions it folds
        for worker_id, answer in zip(others, answers, strict=True):
            if answer is None or answer[0] != 200:
                self.failed += 1
                detail = f"worker {worker_id} did not answer its part of the scan"
                return web.Response(
                    status=503,
                    body=error_body("scan incomplete", detail, retry=True),
                    content_type="application/json",
                )
            part = loads(answer[1])
            rows += [(item["key"], item["state"]) for item in part["items"]]
            position.update(part.get("position", {}))
        rows.sort(key=lambda row: row[0].encode())
        page = rows[:limit]
        self.forwarded += 1
        return web.Response(
            status=200,
            body=dumps(
                {
                    "items": [{"key": k, "state": s} for k, s in page],
                    "next": page[-1][0] if len(rows) > limit else None,
                    "position": position,
                    "served_by": sorted([self.worker.worker_id, *others]),
                }
            ),
            content_type="application/json",
        )

    def here(self, runner: Serving) -> Callable[[str], bool] | None:
        """Whether a key's partition is folded here, or None when every partition is (or who
        folds them is unknown)."""
        fresh = self._freshness(runner)
        return None if fresh.owners is None else fresh.here

    async def ask(
        self, others: dict[str, str], request: web.Request, query: dict[str, str]
    ) -> list[Any] | None:
        """Each of `others`' JSON answer to this request's path with `query` (forwarded: each
        answers for the partitions it folds), or None when one did not answer 200."""
        path = request.path + "?" + urlencode(query)
        authorization = request.headers.get("Authorization")
        answers = await asyncio.gather(
            *(self._get(url + path, authorization) for url in others.values())
        )
        if any(answer is None or answer[0] != 200 for answer in answers):
            self.failed += 1
            return None
        self.forwarded += 1
        return [loads(answer[1]) for answer in answers if answer is not None]

    async def _get(
        self,
        target: str,
        authorization: str | None,
        method: str = "GET",
        body: bytes | None = None,
    ) -> tuple[int, bytes] | None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=TIMEOUT_S, connect=2.0)
            )
        headers = {FORWARDED: self.worker.worker_id}
        if authorization is not None:  # the owner checks the caller's token too
            headers["Authorization"] = authorization
        try:
            async with self._session.request(
                method, target, headers=headers, data=body, allow_redirects=False
            ) as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.info("forwarding to %s failed: %s", target, exc)
            return None
