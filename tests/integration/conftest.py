"""Fixtures shared by the runtime tests."""

from __future__ import annotations

import pytest
from refold.core.config import Config
from refold.kafka.topics import Topics, event_topic, internal_topics


@pytest.fixture
def ledger_topic(config: Config, unique) -> str:
    """A fresh 4-partition event topic for the ledger test projection."""
    topic = unique("ledger")
    Topics(config).ensure([*internal_topics(config), event_topic(topic, partitions=4)])
    return topic
