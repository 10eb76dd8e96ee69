"""Configuration: one explicit object, built once from the environment and flags, passed down."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from refold.core.errors import ConfigError

#: Where `refold broker start` records the address of the broker it started.
BROKER_RECORD = "broker/broker.json"

log = logging.getLogger(__name__)
_LIBRDKAFKA_LOG = logging.getLogger("librdkafka")
#: The schemas shipped in the package (refold.schemas: the bank example's), found through the
#: package wherever it is installed. The default of a Config made in code (tests, scripts).
BUNDLED_SCHEMAS = Path(str(resources.files("refold.schemas")))
#: `REFOLD_KAFKA_<NAME>` becomes the librdkafka property `<name>` (lower case, `_` -> `.`).
KAFKA_PREFIX = "REFOLD_KAFKA_"
DEFAULT_APP_ID = "refold"
_APP_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
_overridden_once: set[tuple[str, str]] = set()  # (property, user value) already warned about
#: REFOLD_KAFKA_* settings that only the clients asking for them get (`Config.kafka(scoped=)`):
#: `max.poll.interval.ms` is the command processor's batch budget (refold.engine.
#: command_limits). Passed to every client, a value below librdkafka's session timeout (45 s)
#: failed every consumer that keeps that default (claims, results and read-to-end readers) at
#: creation ("`max.poll.interval.ms` must be >= `session.timeout.ms`"), a worker not starting
#: at all; a low one put projection runners and dispatchers out of their groups whenever a
#: batch took longer; and every producer and admin client logged it as ignored.
SCOPED = frozenset({"max.poll.interval.ms"})


def kafka_overrides(env: Mapping[str, str]) -> dict[str, str]:
    """The librdkafka settings the environment passes through (`REFOLD_KAFKA_*`)."""
    return {
        name[len(KAFKA_PREFIX) :].lower().replace("_", "."): value
        for name, value in env.items()
        if name.startswith(KAFKA_PREFIX) and len(name) > len(KAFKA_PREFIX)
    }


def check_app_id(app_id: str) -> str:
    if not app_id or not set(app_id) <= _APP_ID_CHARS or len(app_id) > 64:
        raise ConfigError(
            f"REFOLD_APP_ID must be 1-64 letters, digits, '-' or '_', not {app_id!r}",
            hint="it prefixes consumer groups, transactional ids and internal topics",
        )
    return app_id


def _seconds(env: Mapping[str, str], name: str, default: str) -> float:
    """The environment variable `name` as seconds between 0 and a day (exclusive)."""
    raw = env.get(name) or default
    try:
        seconds = float(raw)
        if not 0 < seconds < 86_400:
            raise ValueError
    except ValueError:
        raise ConfigError(f"{name} must be seconds between 0 and 86400, not {raw!r}") from None
    return seconds


@dataclass(frozen=True, slots=True)
class Config:
    """Settings every refold component reads; see DESIGN.md for the environment variables."""

    data_dir: Path = Path(".refold")
    schemas_dirs: tuple[Path, ...] = (BUNDLED_SCHEMAS,)
    app_modules: tuple[str, ...] = ()
    bootstrap_override: str | None = None
    #: librdkafka settings for every client (REFOLD_KAFKA_*), above refold's tuning defaults and
    #: below what refold requires for correctness (see `kafka`).
    client_overrides: Mapping[str, str] = field(default_factory=dict)
    #: Prefix of every consumer group, transactional id and internal topic (REFOLD_APP_ID), so
    #: two deployments share a cluster without joining each other's groups.
    app_id: str = DEFAULT_APP_ID
    #: A rebuild writes its store once per this many events (REFOLD_REBUILD_WRITE_EVERY): fewer
    #: writes per key, and at most this much folding redone after a crash.
    rebuild_write_every: int = 250_000
    #: Seconds a command waits for a broker that does not answer before it gives up with an
    #: error (REFOLD_BROKER_TIMEOUT): `status`, `tail`, `query --as-of`, `publish`, `command`.
    broker_timeout_s: float = 30.0
    #: Seconds one command's decision may run before the command processor gives it up and
    #: rejects the command (REFOLD_DECIDE_TIMEOUT_S; refold.engine.command_watchdog).
    decide_timeout_s: float = 30.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        env = os.environ if env is None else env
        data_dir = Path(env.get("REFOLD_DATA_DIR") or ".refold")
        raw_schemas = env.get("REFOLD_SCHEMAS_DIR")
        if raw_schemas:
            schemas = tuple(Path(p) for p in raw_schemas.split(":") if p)
        elif Path("schemas").is_dir():
            schemas = (Path("schemas"),)
        else:  # the app modules may still declare theirs (SCHEMAS_DIRS)
            schemas = ()
        apps = tuple(m.strip() for m in env.get("REFOLD_APP", "").split(",") if m.strip())
        raw_every = env.get("REFOLD_REBUILD_WRITE_EVERY") or "250000"
        try:
            every = int(raw_every)
            if every < 1:
                raise ValueError
        except ValueError:
            raise ConfigError(
                f"REFOLD_REBUILD_WRITE_EVERY must be a positive number of events, not {raw_every!r}"
            ) from None
        broker_timeout = _seconds(env, "REFOLD_BROKER_TIMEOUT", "30")
        return cls(
            broker_timeout_s=broker_timeout,
            decide_timeout_s=_seconds(env, "REFOLD_DECIDE_TIMEOUT_S", "30"),
            app_id=check_app_id(env.get("REFOLD_APP_ID") or DEFAULT_APP_ID),
            client_overrides=kafka_overrides(env),
            data_dir=data_dir,
            schemas_dirs=schemas,
            app_modules=apps,
            bootstrap_override=env.get("REFOLD_BOOTSTRAP_SERVERS") or None,
            rebuild_write_every=every,
        )

    def with_(self, **changes: object) -> Config:
        return replace(self, **changes)  # type: ignore[arg-type]

    @property
    def broker_record(self) -> Path:
        return self.data_dir / BROKER_RECORD

    @property
    def bootstrap_servers(self) -> str:
        """The Kafka address: the env/flag override, else what `refold broker start` recorded."""
        if self.bootstrap_override:
            return self.bootstrap_override
        try:
            record = json.loads(self.broker_record.read_text())
            return str(record["bootstrap_servers"])
        except FileNotFoundError:
            raise ConfigError(
                "no Kafka broker configured",
                hint="run `refold broker start` or set REFOLD_BOOTSTRAP_SERVERS=host:port",
            ) from None
        except (ValueError, KeyError) as exc:
            raise ConfigError(
                f"broken broker record {self.broker_record}: {exc}",
                hint="run `refold broker start --fresh` or set REFOLD_BOOTSTRAP_SERVERS",
            ) from exc

    def kafka(
        self,
        *,
        defaults: Mapping[str, object] | None = None,
        scoped: Collection[str] = (),
        **required: object,
    ) -> dict[str, object]:
        """librdkafka settings for one client, layered (later wins): the connection; refold's
        tuning `defaults` for the client's role; the user's REFOLD_KAFKA_* settings, but for
        the SCOPED ones unless the client names them in `scoped`; and what refold `required`s
        for correctness (group ids, isolation, transactions, acks). A user setting that a
        required one overrides is logged once as a warning, naming both."""
        conf: dict[str, object] = {
            "bootstrap.servers": self.bootstrap_servers,
            # librdkafka's own messages go through Python logging ("librdkafka"), not raw stderr.
            "logger": _LIBRDKAFKA_LOG,
        }
        conf.update(defaults or {})
        conf.update(
            (name, value)
            for name, value in self.client_overrides.items()
            if name not in SCOPED or name in scoped
        )
        for name, value in required.items():
            user = self.client_overrides.get(name)
            differs = user is not None and str(user).lower() != str(value).lower()
            if differs and (name, str(user)) not in _overridden_once:
                _overridden_once.add((name, str(user)))
                log.warning(
                    "REFOLD_KAFKA_%s=%s is not used: refold needs %s=%s for this client",
                    name.upper().replace(".", "_"), user, name, value,
                )  # fmt: skip
            conf[name] = value
        return conf

    # -- names refold gives the things it creates on the cluster --------------------------

    def group(self, *parts: str) -> str:
        """A consumer group or transactional id of this deployment: `<app id>.<parts...>`."""
        return ".".join((self.app_id, *parts))

    @property
    def schemas_topic(self) -> str:
        """The compacted topic of writer schemas."""
        return f"_{self.app_id}.schemas"

    def dead_letter_topic(self, projection: str) -> str:
        """Where a projection's poison events go, with the reason and position."""
        return f"{self.app_id}.dlq.{projection}"
