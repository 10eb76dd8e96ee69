"""refold write side and runtime: config, Kafka clients, Avro serde, publisher, processors, CLI."""

from streams.errors import RefoldError

__all__ = ["RefoldError"]
