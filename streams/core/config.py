"""Configuration: one explicit object, built once from the environment and flags, passed down."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from refold.core.errors import ConfigError

#: Where `refold broker start` records the address of the broker it started.
BROKER_RECORD = "broker/broker.json"

_LIBRDKAFKA_LOG = logging.getLogger("librdkafka")
#: The schemas shipped in the package (refold.schemas: the bank example's), found through the
#: package wherever it is installed. The default of a Config made in code (tests, scripts).
BUNDLED_SCHEMAS = Path(str(resources.files("refold.schemas")))


@dataclass(frozen=True, slots=True)
class Config:
    """Settings every refold component reads; see DESIGN.md for the environment variables."""

    data_dir: Path = Path(".refold")
    schemas_dirs: tuple[Path, ...] = (BUNDLED_SCHEMAS,)
    app_modules: tuple[str, ...] = ()
    bootstrap_override: str | None = None
    client_overrides: Mapping[str, str] = field(default_factory=dict)
    #: A rebuild writes its store once per this many events (REFOLD_REBUILD_WRITE_EVERY): fewer
    #: writes per key, and at most this much folding redone after a crash.
    rebuild_write_every: int = 250_000

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
        return cls(
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

    def kafka(self, **extra: object) -> dict[str, object]:
        """librdkafka settings shared by every client, plus `extra`."""
        conf: dict[str, object] = {
            "bootstrap.servers": self.bootstrap_servers,
            # librdkafka's own messages go through Python logging ("librdkafka"), not raw stderr.
            "logger": _LIBRDKAFKA_LOG,
        }
        conf.update(self.client_overrides)
        conf.update(extra)
        return conf
