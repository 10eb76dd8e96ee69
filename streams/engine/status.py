"""What the query server reports about runners: lag, descriptions and Prometheus metrics."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from confluent_kafka import IsolationLevel, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec
from refold.core.config import Config
from refold.engine.rebuild import build_on_disk
from refold.engine.runtime import ProjectionRunner
from refold.kafka import clients

log = logging.getLogger(__name__)

TP = tuple[str, int]
WARN_EVERY_S = 60.0


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


def describe(runner: ProjectionRunner, watermarks: Watermarks) -> dict[str, Any]:
    stats = runner.stats
    return {
        "name": runner.name,
        "version": runner.version,
        "state": stats.state,
        "error": stats.error,
        "topics": list(runner.projection.topics),
        "partitions": _partitions(runner.stats.positions, runner.stats.assigned, watermarks),
        "events_folded": stats.folded,
        "dead_letters": stats.dead_letters,
        "skipped": stats.skipped,
    }


def describe_on_disk(
    config: Config, runner: ProjectionRunner, watermarks: Watermarks
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
    runners: list[ProjectionRunner],
    watermarks: Watermarks,
    requests: Mapping[tuple[str, int], int],
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
        "1 while the projection's runner is not stopped or failed.",
        [({"projection": r.name}, int(r.stats.state in ("starting", "running"))) for r in runners],
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
