"""What refold reports about projections: lag, descriptions and Prometheus metrics for the query
server's runners, and the rows of `refold status` read from the stores on disk."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import IsolationLevel, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec
from refold.core.config import Config
from refold.core.errors import TopicError
from refold.core.projection import Projection
from refold.engine import command_timing
from refold.engine.frozen import Serving, frozen_reason
from refold.engine.rebuild import build_on_disk, stored_offsets
from refold.engine.repartition import repartition_topic
from refold.kafka import clients
from refold.store.rocksdb import RocksStore
from refold.store.scratch import scratch_dir
from refold.store.versions import live_version, store_path

log = logging.getLogger(__name__)

TP = tuple[str, int]
WARN_EVERY_S = 60.0
_DOWN = ("stopped", "failed")


class Watermarks:
    """Read-committed end offsets of source partitions, asked of the broker, cached for `ttl` s.

    Not from the runners' consumers: confluent-kafka serializes calls on one Consumer across
    threads, so a call from here would queue behind the fold thread's consume loop.
    """

    def __init__(self, config: Config, ttl: float = 1.0, timeout: float = 2.0) -> None:
        self._config = config
        self._ttl = ttl
        self._timeout = timeout
        self._admin: AdminClient | None = None
        self._lock = threading.Lock()
        self._ends: dict[TP, int] = {}
        self._at = 0.0
        self._warned_at = -WARN_EVERY_S

    def ends(self, partitions: Iterable[TP]) -> dict[TP, int]:
        """End offsets of the partitions the broker answered for (blocks: call off the loop)."""
        wanted = set(partitions)
        with self._lock:
            stale = time.monotonic() - self._at > self._ttl
            if wanted and (stale or not wanted <= self._ends.keys()):
                self._refresh(wanted | (self._ends.keys() if not stale else set()))
            return {tp: self._ends[tp] for tp in wanted if tp in self._ends}

    def _refresh(self, partitions: set[TP]) -> None:
        if self._admin is None:
            self._admin = clients.admin(self._config)
        futures = self._admin.list_offsets(
            {TopicPartition(t, p): OffsetSpec.latest() for t, p in partitions},
            isolation_level=IsolationLevel.READ_COMMITTED,
            request_timeout=self._timeout,
        )
        ends: dict[TP, int] = {}
        missing: list[str] = []
        for tp, future in futures.items():
            try:
                ends[(tp.topic, tp.partition)] = future.result().offset
            except KafkaException as exc:  # lag is best-effort: unknown rather than wrong
                missing.append(f"{tp.topic}[{tp.partition}]: {exc}")
        now = time.monotonic()
        if missing and now - self._warned_at >= WARN_EVERY_S:
            # One line per WARN_EVERY_S, not one per partition per request: with the broker
            # gone, every /projections and /metrics request would add a screenful.
            self._warned_at = now
            log.warning(
                "no end offset for %d partition(s), e.g. %s (lag unknown; said once per %.0f s)",
                len(missing),
                missing[0],
                WARN_EVERY_S,
            )
        self._ends = ends
        self._at = time.monotonic()

    def partitions(self, topics: Iterable[str]) -> list[TP]:
        """Every partition of the topics that exist (blocks: call off the loop)."""
        with self._lock:
            if self._admin is None:
                self._admin = clients.admin(self._config)
            admin = self._admin
        out: list[TP] = []
        for topic in topics:
            try:
                md = admin.list_topics(topic=topic, timeout=self._timeout * 5).topics.get(topic)
            except KafkaException as exc:
                raise TopicError(
                    f"cannot read metadata for topic {topic!r}: {exc}",
                    hint="is the broker running? `refold broker status`",
                ) from exc
            if md is not None and md.error is None:
                out.extend((topic, p) for p in sorted(md.partitions))
        return out


def _partitions(
    positions: Mapping[tuple[str, int], int],
    owned: Iterable[tuple[str, int]],
    watermarks: Watermarks,
) -> list[dict[str, Any]]:
    """Partitions with next offset and lag (None when unknown)."""
    tps = sorted(set(positions) | set(owned))
    ends = watermarks.ends(tps)
    out: list[dict[str, Any]] = []
    for t, p in tps:
        nxt, end = positions.get((t, p)), ends.get((t, p))
        lag = None if nxt is None or end is None else max(0, end - nxt)
        out.append({"topic": t, "partition": p, "next_offset": nxt, "lag": lag})
    return out


def describe(runner: Serving, watermarks: Watermarks) -> dict[str, Any]:
    stats = runner.stats
    out = {
        "name": runner.name,
        "version": runner.version,
        "state": stats.state,
        "error": stats.error,
        "topics": list(runner.topics),
        "partitions": _partitions(runner.stats.positions, runner.stats.assigned, watermarks),
        "events_folded": stats.folded,
        "dead_letters": stats.dead_letters,
        "skipped": stats.skipped,
    }
    feeder = getattr(runner, "feeder", None)
    if feeder is not None:  # a re-keyed projection: its routing stage (refold.engine.repartition)
        routed = feeder.routed_offsets()
        ends = watermarks.ends(list(routed))
        f = feeder.stats
        out["routing"] = {
            "state": f.state,
            "error": f.error,
            "routed": f.routed,
            "skipped": f.skipped,
            "dead_letters": f.dead_letters,
            "partitions": [
                {"topic": t, "partition": p, "next_offset": o, "lag": _gap(ends.get((t, p)), o)}
                for (t, p), o in sorted(routed.items())
            ],
        }
    return out


def _gap(end: int | None, nxt: int) -> int | None:
    return None if end is None else max(0, end - nxt)


def describe_on_disk(
    config: Config, runner: Serving, watermarks: Watermarks
) -> dict[str, Any] | None:
    """A newer version of `runner`'s projection that another process builds, read from disk."""
    found = build_on_disk(config, runner.name, runner.version)
    if found is None:
        return None
    version, offsets = found
    # The live version's partitions that the build has not reached yet are at offset 0.
    folded = {tp: offsets.get(tp, 0) for tp in {*offsets, *runner.stats.positions}}
    partitions = _partitions(folded, (), watermarks)
    behind = any(part["lag"] for part in partitions)
    return {
        "name": runner.name,
        "version": version,
        # Not this worker's: `refold replay` building it, or a version kept after a rollback.
        "state": "on disk, behind" if behind else "on disk, caught up",
        "partitions": partitions,
    }


def _label(value: object) -> str:
    return str(value).replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def metrics_text(
    runners: list[Serving],
    watermarks: Watermarks,
    requests: Mapping[tuple[str, int], int],
    processors: Mapping[str, Any] = {},
) -> str:
    lines: list[str] = []

    def family(name: str, kind: str, doc: str, samples: list[tuple[dict[str, Any], int]]) -> None:
        lines.append(f"# HELP {name} {doc}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{text}}} {value}")

    partitions = {
        r.name: _partitions(r.stats.positions, r.stats.assigned, watermarks) for r in runners
    }
    family(
        "refold_projection_up",
        "gauge",
        "1 while the projection answers queries (its runner is not stopped or failed).",
        [
            ({"projection": r.name}, int(r.stats.state not in ("stopped", "failed")))
            for r in runners
        ],
    )
    family(
        "refold_events_folded_total",
        "counter",
        "Events folded into the projection's store.",
        [({"projection": r.name}, r.stats.folded) for r in runners],
    )
    family(
        "refold_dead_letters_total",
        "counter",
        "Poison events sent to the dead-letter topic.",
        [({"projection": r.name}, r.stats.dead_letters) for r in runners],
    )
    family(
        "refold_events_skipped_total",
        "counter",
        "Events with no key to fold under.",
        [({"projection": r.name}, r.stats.skipped) for r in runners],
    )
    family(
        "refold_projection_next_offset",
        "gauge",
        "Next offset to fold per source partition.",
        [
            (
                {"projection": name, "topic": p["topic"], "partition": p["partition"]},
                p["next_offset"],
            )
            for name, ps in partitions.items()
            for p in ps
            if p["next_offset"] is not None
        ],
    )
    family(
        "refold_projection_lag",
        "gauge",
        "Records in the partition not folded yet.",
        [
            ({"projection": name, "topic": p["topic"], "partition": p["partition"]}, p["lag"])
            for name, ps in partitions.items()
            for p in ps
            if p["lag"] is not None
        ],
    )
    for name, doc, attr in (
        ("refold_commands_accepted_total", "Commands accepted.", "accepted"),
        ("refold_commands_rejected_total", "Commands rejected, with a reason.", "rejected"),
        (
            "refold_command_retries_total",
            "Failed command-processor steps tried again (backing off 0.5 s to 5 s).",
            "retries",
        ),
        (
            "refold_command_events_skipped_total",
            "Events read back that the decider could not fold or whose state could not be stored.",
            "skipped_events",
        ),
        (
            "refold_command_decide_timeouts_total",
            "Decisions given up past REFOLD_DECIDE_TIMEOUT_S, their commands rejected.",
            "decide_timeouts",
        ),
        (
            "refold_command_stuck_decisions",
            "Threads still stuck in a decision that was given up (a restart frees them).",
            "stuck_decisions",
        ),
    ):
        family(
            name,
            "gauge" if name == "refold_command_stuck_decisions" else "counter",
            doc,
            [({"aggregate": n}, getattr(p.stats, attr)) for n, p in sorted(processors.items())],
        )
    timings = {n: p.timing for n, p in processors.items() if hasattr(p, "timing")}
    lines += command_timing.metrics_lines(timings)
    family(
        "refold_http_requests_total",
        "counter",
        "HTTP requests answered, by route and status.",
        [
            ({"route": route, "status": status}, n)
            for (route, status), n in sorted(requests.items())
        ],
    )
    return "\n".join(lines) + "\n"


# -- `refold status`: the stores on disk ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoreStatus:
    """One projection as `refold status` shows it: its live version's store and lag, and the
    progress of a newer version being built beside it."""

    projection: str
    version: int
    code_version: int
    events_folded: int
    lag: int
    dead_letters: int
    offsets: Mapping[TP, int]
    building: Mapping[str, int] | None = None  # version, position, of
    #: why no code may fold the live version (refold.engine.frozen), or None
    frozen: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "projection": self.projection,
            "version": self.version,
            "code_version": self.code_version,
            "state": "frozen" if self.frozen else "folding",
            "frozen": self.frozen,
            "building": dict(self.building) if self.building else None,
            "events_folded": self.events_folded,
            "lag": self.lag,
            "dead_letters": self.dead_letters,
            "offsets": {f"{t}:{p}": o for (t, p), o in sorted(self.offsets.items())},
        }


def store_status(
    config: Config, versions: Mapping[int, Projection], watermarks: Watermarks
) -> StoreStatus:
    """Read the live (or only) version's store of a projection (its classes by version) and
    the source topics' ends."""
    projection = versions[max(versions)]
    name = projection.name
    version = live_version(config, name) or projection.version
    offsets: dict[TP, int] = {}
    counters = {"events_folded": 0, "dead_letters": 0}
    path = store_path(config, name, version)
    if path.is_dir():
        store = RocksStore.open_secondary(path, scratch_root=scratch_dir(config.data_dir))
        try:
            offsets = store.offsets()
            counters = {k: int(store.meta(k) or 0) for k in counters}
        finally:
            store.close()
    # A re-keyed projection folded in a worker stores its repartition topic's offsets.
    folded = {t for t, _p in offsets}
    rekeyed = repartition_topic(config, name, version)
    tps = watermarks.partitions((rekeyed,) if rekeyed in folded else projection.topics)
    ends = watermarks.ends(tps)
    lag = sum(max(0, ends.get(tp, 0) - offsets.get(tp, 0)) for tp in tps)
    building = None
    if projection.version != version and store_path(config, name, projection.version).is_dir():
        done = sum(stored_offsets(config, name, projection.version).values())
        total = sum(offsets.values()) + lag
        building = {"version": projection.version, "position": done, "of": total}
    return StoreStatus(
        name,
        version,
        projection.version,
        counters["events_folded"],
        lag,
        counters["dead_letters"],
        offsets,
        building,
        frozen_reason(name, versions, version),
    )


def status_table(rows: Iterable[StoreStatus]) -> str:
    """`refold status` as a table, one line per projection."""
    lines = [f"{'PROJECTION':<16} {'VERSION':>7} {'FOLDED':>10} {'LAG':>8} {'DEAD':>6}  OFFSETS"]
    for row in rows:
        offs = " ".join(f"{t}:{p}={o}" for (t, p), o in sorted(row.offsets.items())) or "-"
        if row.building:
            b = row.building
            offs += f"  (building v{b['version']}: {b['position']}/{b['of']})"
        if row.frozen:
            offs += f"  (frozen: {row.frozen})"
        lines.append(
            f"{row.projection:<16} {row.version:>7} {row.events_folded:>10} "
            f"{row.lag:>8} {row.dead_letters:>6}  {offs}"
        )
    return "\n".join(lines)
