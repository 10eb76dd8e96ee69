"""Writer schemas in a compacted topic, keyed by fingerprint, so any consumer can decode any
record ever written even when its local `.avsc` files lack that writer version.
"""

from __future__ import annotations

import json
import logging
import threading

from confluent_kafka import OFFSET_BEGINNING, KafkaException, Producer
from refold.core.app import schema_dirs
from refold.core.catalog import Catalog, SchemaVersion
from refold.core.config import Config
from refold.core.errors import LogReadError, PublishError
from refold.core.sagas import SAGA_SCHEMAS
from refold.core.serde import Codec
from refold.core.tasks import TASK_SCHEMAS
from refold.kafka import clients
from refold.kafka.log import read_to_end

log = logging.getLogger(__name__)


class SchemaRegistry:
    """Registers writer schemas before first use and looks up unknown fingerprints."""

    def __init__(self, config: Config, catalog: Catalog, topic: str | None = None) -> None:
        self._config = config
        self._catalog = catalog
        self._topic = topic or config.schemas_topic
        self._registered: set[bytes] = set()
        self._lock = threading.Lock()

    def ensure_registered(self, sv: SchemaVersion, producer: Producer) -> None:
        """Write `sv` to the registry topic (once per process) and wait for the ack, so the
        schema is durable before any event that references it."""
        if sv.fingerprint in self._registered:
            return
        with self._lock:
            if sv.fingerprint in self._registered:
                return
            value = json.dumps(
                {
                    "type": sv.type,
                    "version": sv.version,
                    "schema": json.loads(sv.source.read_text()) if sv.source.is_file() else None,
                    "canonical": sv.canonical,
                }
            ).encode()
            errors: list[str] = []

            def on_delivery(err: object, _msg: object) -> None:
                if err is not None:
                    errors.append(str(err))

            producer.produce(self._topic, value, key=sv.fingerprint_hex, on_delivery=on_delivery)
            remaining = producer.flush(30)
            if errors or remaining:
                raise PublishError(
                    f"cannot register schema {sv.type} v{sv.version} in {self._topic}: "
                    f"{errors or 'timed out'}",
                    hint="run `refold topics ensure` to create the internal topics",
                )
            self._registered.add(sv.fingerprint)

    def lookup(self, fingerprint: bytes) -> SchemaVersion | None:
        """Read the registry topic to its end, learn every schema in it, return the one asked."""
        consumer = clients.consumer(self._config, self._config.group("registry-reader"))
        try:
            for batch in read_to_end(consumer, {(self._topic, 0): OFFSET_BEGINNING}, timeout=10):
                for msg in batch:
                    self._learn(msg.value())
        except (KafkaException, LogReadError) as exc:
            log.warning("schema registry topic %s unreadable: %s", self._topic, exc)
        finally:
            consumer.close()
        return self._catalog.by_fingerprint.get(fingerprint)

    def _learn(self, value: bytes | None) -> None:
        if not value:
            return
        try:
            record = json.loads(value)
            schema = record.get("schema") or json.loads(record["canonical"])
            self._catalog.learn(record["type"], int(record["version"]), json.dumps(schema))
        except Exception as exc:  # a bad registry record must not stop decoding of the rest
            log.warning("skipping malformed schema registry record: %s", exc)


def codec_for(config: Config) -> Codec:
    """The catalog from the schema directories (REFOLD_SCHEMAS_DIR and those the app modules
    declare), the task and saga events' own schemas, and a registry fallback for unknown writers."""
    found = [*config.schemas_dirs, *schema_dirs(config.app_modules), TASK_SCHEMAS, SAGA_SCHEMAS]
    dirs = {d.resolve(): d for d in found}
    catalog = Catalog.load(dirs.values())
    registry = SchemaRegistry(config, catalog)
    return Codec(catalog, on_unknown_fingerprint=registry.lookup)
