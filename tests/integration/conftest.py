"""Fixtures shared by the runtime tests."""

from __future__ import annotations

import pytest
from refold.core.commands import Decider
from refold.core.config import Config
from refold.examples.bank.accounts import Accounts
from refold.kafka.command_client import CommandClient
from refold.kafka.command_topics import ensure_command_topics
from refold.kafka.topics import Topics, event_topic, internal_topics


@pytest.fixture
def ledger_topic(config: Config, unique) -> str:
    """A fresh 4-partition event topic for the ledger test projection."""
    topic = unique("ledger")
    Topics(config).ensure([*internal_topics(config), event_topic(topic, partitions=4)])
    return topic


PARTITIONS = 4  # of the command tests' topics


@pytest.fixture
def vault(config: Config, unique) -> Decider:
    """A fresh `accounts`-like decider on its own 4-partition topics."""
    name = unique("vault")
    cls = type("Vault", (Accounts,), {"name": name, "events_topic": name})
    decider = cls()
    topics = Topics(config)
    topics.ensure([*internal_topics(config), event_topic(name, PARTITIONS)])
    ensure_command_topics(topics, decider)
    return decider


@pytest.fixture
def client(config: Config, vault: Decider):
    """A command client over the test's `vault` decider."""
    with CommandClient(config, {vault.name: vault}) as c:
        yield c
