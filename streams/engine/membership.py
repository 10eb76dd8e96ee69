"""How a worker's fold consumers belong to their groups: a stable identity, static membership.

A worker's identity is a random id kept in its data directory (`worker.id`), so a restarted
worker is the same member to Kafka. Each fold consumer joins its projection version's group with
the static `group.instance.id` `<worker id>.<name>.v<version>` (classic protocol, KIP-345): a
worker restarted after `kill -9` takes its partitions back at once, with no rebalance and no
wait for the dead member to expire. A worker that never comes back is expired after
`SESSION_TIMEOUT_MS` and its partitions move to the others. A static member does not leave its
group on a clean stop either: a worker stopped on purpose also hands its partitions over only
after the session timeout (a restart within it changes nothing).

Measured against the KIP-848 consumer protocol (`group.protocol=consumer`) in bench/RESULTS.md
("Recovery"): without static membership the dead member keeps its partitions until the broker's
session timeout (`group.consumer.session.timeout.ms`, 45 s, not settable by a client) expires
it; with static membership the broker refuses the restarted member's instance id until then
(UNRELEASED_INSTANCE_ID), which librdkafka 2.16 treats as fatal (the runner then replaces its
consumer every few seconds until the dead member has expired: `ProjectionRunner.rejoin`).
`REFOLD_KAFKA_GROUP_PROTOCOL=consumer` still selects it: the assignment then happens on the broker
and the client-side assignment and session settings are left out, as librdkafka requires.
"""

from __future__ import annotations

import logging
import os
import uuid

from refold.core.config import Config
from refold.core.errors import ConfigError

log = logging.getLogger(__name__)

#: A member not heard of this long is expired and its partitions move to the others (classic
#: protocol; the broker accepts 6-1800 s by default). Kept short: it is how long the partitions
#: of a worker that died for good go unfolded. `REFOLD_KAFKA_SESSION_TIMEOUT_MS` changes it.
SESSION_TIMEOUT_MS = 10_000
#: Three heartbeats per session timeout, as Kafka recommends.
HEARTBEAT_INTERVAL_MS = 3_000
#: `REFOLD_STATIC_MEMBERSHIP=0` joins without `group.instance.id` (the recovery benchmark's
#: baseline; nothing else needs it).
STATIC_ENV = "REFOLD_STATIC_MEMBERSHIP"
ID_FILE = "worker.id"


def worker_id(config: Config) -> str:
    """This data directory's worker id, created on first use (atomically, so two processes
    racing on a new directory agree on one)."""
    path = config.data_dir / ID_FILE
    try:
        found = path.read_text().strip()
    except FileNotFoundError:
        found = ""
    except OSError as exc:
        raise ConfigError(f"cannot read the worker id in {path}: {exc.strerror}") from exc
    if found:
        return found
    try:
        config.data_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{ID_FILE}.{os.getpid()}.tmp")
        tmp.write_text(uuid.uuid4().hex[:12] + "\n")
        try:
            os.link(tmp, path)  # fails if another process created it first: theirs wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        return path.read_text().strip()
    except OSError as exc:
        raise ConfigError(
            f"cannot create the worker id in {path}: {exc.strerror}",
            hint="REFOLD_DATA_DIR must be a writable directory",
        ) from exc


def uses_consumer_protocol(config: Config) -> bool:
    """True when the user chose KIP-848 groups (`REFOLD_KAFKA_GROUP_PROTOCOL=consumer`)."""
    return str(config.client_overrides.get("group.protocol", "classic")).lower() == "consumer"


def rejoin_after_s(config: Config) -> float:
    """How long a fold consumer may stay out of its group (while the group goes on without it)
    before it is replaced (refold.engine.health): two session timeouts, so the group's own
    rebalances and expiries have run first; with KIP-848 the broker's 45 s plus 10 s."""
    if uses_consumer_protocol(config):
        return 55.0
    session_ms = config.client_overrides.get("session.timeout.ms", SESSION_TIMEOUT_MS)
    try:
        return 2 * int(session_ms) / 1000
    except ValueError:
        return 2 * SESSION_TIMEOUT_MS / 1000


def fold_group_settings(
    config: Config, instance_id: str | None
) -> tuple[dict[str, object], dict[str, object]]:
    """(tuning defaults, required settings) of a fold consumer's group membership.

    `instance_id` None: a dynamic member (a consumer that only assigns, or the baseline)."""
    static = instance_id is not None and os.environ.get(STATIC_ENV, "1") != "0"
    required: dict[str, object] = {}
    defaults: dict[str, object] = {}
    if static:
        required["group.instance.id"] = instance_id
    if uses_consumer_protocol(config):
        return defaults, required  # assignor and session timeout are the broker's
    required["partition.assignment.strategy"] = "cooperative-sticky"
    defaults["session.timeout.ms"] = SESSION_TIMEOUT_MS
    defaults["heartbeat.interval.ms"] = HEARTBEAT_INTERVAL_MS
    return defaults, required
