"""Projection reads over HTTP, a mixin of the query server (refold.http.server): key lookups
(also what the fast path and reader processes answer), scans, `as_of`, `min_offset` waits,
`GET /projections`, and how current each answer is (`freshness_of`, `health_of`).

Point lookups and scans read the store on the loop thread (a RocksDB get is microseconds and
rocksdict allows reads while the fold thread commits); waiting for an offset runs in an
executor. Every answer that reads a store carries the runner's positions, read before the state,
so the state is at least as new as the position it reports. A key another worker folds is
forwarded to it (refold.http.routing).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web
from confluent_kafka import KafkaException
from refold.core.errors import BrokerError, InputError, LogReadError, StoreError, TopicError
from refold.engine.frozen import FrozenVersion, Serving
from refold.engine.health import Health
from refold.engine.status import Watermarks, describe, describe_on_disk
from refold.engine.timetravel import fold_as_of, parse_time
from refold.engine.worker import Worker
from refold.http import answers
from refold.http.answers import DOWN as _DOWN
from refold.http.answers import Freshness
from refold.http.answers import dumps as _dumps
from refold.http.answers import position as _position
from refold.http.fastpath import Answer
from refold.http.routing import FORWARDED, Router

log = logging.getLogger(__name__)

TP = tuple[str, int]

MAX_WAIT_MS = 30_000
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
_MAX_OFFSET = 2**63 - 1
_JSON = "application/json"


def respond(status: int, body: Any) -> web.Response:
    return web.Response(status=status, body=_dumps(body), content_type=_JSON)


def error(status: int, error: str, detail: Any, **extra: Any) -> web.Response:
    """The one error shape: `{"error": short phrase, "detail": what exactly, ...extra}`."""
    return web.Response(
        status=status, body=answers.error_body(error, detail, **extra), content_type=_JSON
    )


def _count(raw: str, what: str, low: int, high: int) -> int:
    """A decimal integer in [low, high]; InputError naming `what` otherwise."""
    text = raw.strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 19):
        raise InputError(f"{what} must be a non-negative integer, not {raw!r}")
    value = int(text)
    if not low <= value <= high:
        raise InputError(f"{what} must be between {low} and {high}, not {value}")
    return value


def _min_offset(runner: Serving, raw: str) -> dict[TP, int]:
    """The query's min_offset: positions in the topics the runner folds, or, for a re-keyed
    projection that folds its repartition topic, in its source topics (what a publisher
    answered; `partition:offset` means the source) or in the repartition topic (what its
    answers carry)."""
    routed = getattr(runner, "routed", None)
    if routed is None:
        return parse_min_offset(raw, runner.topics)
    try:
        return parse_min_offset(raw, routed.sources)
    except InputError:
        return parse_min_offset(raw, (*routed.sources, *runner.topics))


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


class ProjectionReads:
    """The projection routes of `QueryServer` (which sets these attributes)."""

    worker: Worker
    router: Router
    _watermarks: Watermarks
    _waits: ThreadPoolExecutor
    _position_cache: dict[str, tuple[Mapping[TP, int], bytes]]
    _freshness: tuple[Health | None, dict[str, Freshness]]

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
            runner, refused = await self._reach(runner, request)
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
        worker = self.worker
        sagas = {name: r.stats.state for name, r in worker.sagas.runners.items()}
        sagas.update(dict.fromkeys(worker.sagas.undriven, "failed"))
        commands = {name: p.stats.state for name, p in worker.processors.items()}
        reconcilers = worker.tasks.reconcilers
        tasks = {
            name: {"dispatch": d.stats.state, "reconcile": reconcilers[name].stats.state}
            for name, d in worker.tasks.dispatchers.items()
            if name in reconcilers
        }
        summary = health.summary()
        stuck = {n: p.stats.stuck_decisions for n, p in worker.processors.items()}
        if any(stuck.values()):  # the partitions go on; a restart frees the threads
            summary = {**summary, "stuck_decisions": stuck}
        return answers.health(states, health.status(), summary, sagas, commands, tasks)

    async def _as_of(self, runner: Serving, key: str, when: str) -> web.Response:
        """`?as_of=ISO-TIME`: the key's events up to that time, folded from the log."""
        try:
            moment = parse_time(when)
        except InputError as exc:
            return error(400, "bad as_of", str(exc))
        if isinstance(runner, FrozenVersion):  # its fold is not in the code: nothing to fold
            return error(
                409,
                "as_of not supported",
                f"v{runner.version} of {runner.name!r} is frozen: {runner.reason}",
            )
        if runner.projection.rekeys:
            return error(
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
            return error(503, "broker unavailable", f"cannot read the log for as_of: {exc}")
        if found.state is None:
            return error(
                404,
                "no state for key",
                f"no events for key {key!r} before {when}",
                position=found.position,
            )
        return respond(
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
            return error(400, "bad query", str(exc))
        runner, refused = await self._reach(runner, request)
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
        return respond(
            200,
            {
                "items": [{"key": k, "state": s} for k, s in page],
                "next": page[-1][0] if len(rows) > limit else None,
                "position": _position(positions),
            },
        )

    async def _reach(
        self, runner: Serving, request: web.Request
    ) -> tuple[Serving, web.Response | None]:
        """The runner to read once it folded the query's `min_offset` (and None), else the
        400/409/503 answer. When queries move to another version while the request waits (a
        swap or a rollback: the old version stops folding, and SWITCH_GRACE_S later its store
        closes), the wait goes on for what is left of `wait_ms` on the version queries read
        now, and the answer comes from it."""
        query = request.query
        raw = query.get("min_offset")
        try:
            wait_ms = _count(query.get("wait_ms", "0"), "wait_ms", 0, MAX_WAIT_MS)
        except InputError as exc:
            return runner, error(400, "bad query", str(exc))
        if raw is None:
            return runner, None
        deadline = time.monotonic() + wait_ms / 1000
        while True:
            key = request.match_info.get("key")
            refused = await self._reach_on(runner, raw, key, wait_ms, deadline)
            current = self.worker.runners.get(runner.name)
            if (
                current is runner
                and refused is not None
                and runner.stats.state == "retired"  # folds no more: queries move on at once
                and time.monotonic() < deadline
            ):
                await asyncio.sleep(0.02)
                continue
            if current is None or current is runner:
                return runner, refused
            runner = current  # queries moved on while this request waited

    async def _reach_on(
        self, runner: Serving, raw: str, key: str | None, wait_ms: int, deadline: float
    ) -> web.Response | None:
        """None once `runner` folded `raw` (min_offset; for `key`, if one was asked), waiting
        until `deadline` at most, else the 400/409/503 answer (`wait_ms` as asked)."""
        try:
            wanted = _min_offset(runner, raw)
        except InputError as exc:
            return error(400, "bad query", str(exc))
        try:
            routed = getattr(runner, "routed", None)  # a re-keyed projection's source positions
            if routed is not None and any(t in routed.sources for t, _p in wanted):
                found = await asyncio.get_running_loop().run_in_executor(
                    self._waits,
                    routed.needed,
                    wanted,
                    key,
                    max(0.0, deadline - time.monotonic()),
                )
                if found is None:
                    return error(
                        409,
                        "position not reached",
                        f"projection {runner.name!r} has not routed min_offset={raw} to its "
                        f"repartition topic after waiting {wait_ms} ms",
                        position=_position(runner.stats.positions),
                    )
                wanted = found
            if runner.reached(wanted):
                return None
            left = deadline - time.monotonic()
            if left > 0 and await asyncio.get_running_loop().run_in_executor(
                self._waits, runner.wait_for, wanted, left
            ):
                return None
        except StoreError as exc:
            return self._unavailable(runner, exc)
        return error(
            409,
            "position not reached",
            f"projection {runner.name!r} ({runner.stats.state}) has not folded "
            f"min_offset={raw} after waiting {wait_ms} ms",
            position=_position(runner.stats.positions),
        )

    def _unknown(self, name: str) -> web.Response:
        known = ", ".join(sorted(self.worker.runners)) or "none"
        return error(404, "unknown projection", f"no projection {name!r}; known: {known}")

    def _unavailable(self, runner: Serving, exc: StoreError | None = None) -> web.Response:
        stats = runner.stats
        if exc is not None:
            log.warning("projection %s unreadable (%s): %s", runner.name, stats.state, exc)
        reason = exc or stats.error or "its runner ended"
        return error(
            503, "projection unavailable", f"projection {runner.name!r} is {stats.state}: {reason}"
        )

    async def projections(self, request: web.Request) -> web.StreamResponse:
        """`GET /projections`: every runner with its counters, positions and lag."""
        loop = asyncio.get_running_loop()
        described = await loop.run_in_executor(None, self.describe_projections)
        return respond(200, described)

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
            # The version LIVE names, which queries read once it has caught up with this one.
            entry["switch"] = self.worker.switch_status(r.name)
            out.append(entry)
        return out


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
