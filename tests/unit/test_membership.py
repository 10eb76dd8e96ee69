"""A worker's identity and its fold consumers' group settings (no Kafka)."""

from __future__ import annotations

from pathlib import Path

import pytest
from refold.core.config import Config
from refold.engine.membership import (
    SESSION_TIMEOUT_MS,
    fold_group_settings,
    rejoin_after_s,
    worker_id,
)


def test_the_worker_id_is_created_once_and_kept_in_the_data_dir(tmp_path: Path) -> None:
    config = Config(data_dir=tmp_path / "data")
    first = worker_id(config)
    assert (
        first
        and first == worker_id(config) == (tmp_path / "data" / "worker.id").read_text().strip()
    )
    assert worker_id(Config(data_dir=tmp_path / "other")) != first


def test_static_membership_on_the_classic_protocol_by_default() -> None:
    defaults, required = fold_group_settings(Config(), "w1.balances.v1")
    assert required == {
        "group.instance.id": "w1.balances.v1",
        "partition.assignment.strategy": "cooperative-sticky",
    }
    assert defaults["session.timeout.ms"] == SESSION_TIMEOUT_MS


def test_kip_848_leaves_assignment_and_session_to_the_broker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = Config(client_overrides={"group.protocol": "consumer"})
    defaults, required = fold_group_settings(config, "w1.balances.v1")
    assert (defaults, required) == ({}, {"group.instance.id": "w1.balances.v1"})
    monkeypatch.setenv("REFOLD_STATIC_MEMBERSHIP", "0")
    assert fold_group_settings(config, "w1.balances.v1") == ({}, {})


def test_a_consumer_is_replaced_after_two_session_timeouts_out_of_its_group() -> None:
    assert rejoin_after_s(Config()) == 2 * SESSION_TIMEOUT_MS / 1000
    assert rejoin_after_s(Config(client_overrides={"session.timeout.ms": "30000"})) == 60.0
    # KIP-848: the broker's session timeout (45 s), which clients cannot set, plus 10 s
    assert rejoin_after_s(Config(client_overrides={"group.protocol": "consumer"})) == 55.0
