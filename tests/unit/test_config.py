"""Settings read from the environment: defaults, and a clear error for a bad value."""

from __future__ import annotations

from pathlib import Path

import pytest
from refold.core.config import Config
from refold.core.errors import ConfigError


def test_defaults_and_overrides_from_the_environment() -> None:
    plain = Config.from_env({})
    assert plain.data_dir == Path(".refold") and plain.rebuild_write_every == 250_000
    tuned = Config.from_env(
        {"REFOLD_DATA_DIR": "/tmp/x", "REFOLD_APP": "a, b", "REFOLD_REBUILD_WRITE_EVERY": "5000"}
    )
    assert tuned.data_dir == Path("/tmp/x") and tuned.app_modules == ("a", "b")
    assert tuned.rebuild_write_every == 5000


@pytest.mark.parametrize("bad", ["0", "-3", "lots", "1e5"])
def test_a_bad_rebuild_write_interval_names_the_variable(bad: str) -> None:
    with pytest.raises(ConfigError, match="REFOLD_REBUILD_WRITE_EVERY"):
        Config.from_env({"REFOLD_REBUILD_WRITE_EVERY": bad})


def test_the_broker_timeout_defaults_to_30_s_and_names_the_variable_when_bad() -> None:
    assert Config.from_env({}).broker_timeout_s == 30.0
    assert Config.from_env({"REFOLD_BROKER_TIMEOUT": "2.5"}).broker_timeout_s == 2.5
    for bad in ("0", "-1", "soon"):
        with pytest.raises(ConfigError, match="REFOLD_BROKER_TIMEOUT"):
            Config.from_env({"REFOLD_BROKER_TIMEOUT": bad})


def test_the_decide_timeout_defaults_to_30_s_and_names_the_variable_when_bad() -> None:
    assert Config.from_env({}).decide_timeout_s == 30.0
    assert Config.from_env({"REFOLD_DECIDE_TIMEOUT_S": "2"}).decide_timeout_s == 2.0
    for bad in ("0", "-1", "never"):
        with pytest.raises(ConfigError, match="REFOLD_DECIDE_TIMEOUT_S"):
            Config.from_env({"REFOLD_DECIDE_TIMEOUT_S": bad})


def test_the_max_poll_interval_goes_only_to_the_clients_that_ask_for_it() -> None:
    """It is the command processor's batch budget; passed to every client it made consumers
    with librdkafka's 45 s session timeout refuse to be created, and producers warn."""
    config = Config.from_env(
        {
            "REFOLD_BOOTSTRAP_SERVERS": "127.0.0.1:1",
            "REFOLD_KAFKA_MAX_POLL_INTERVAL_MS": "7000",
            "REFOLD_KAFKA_CLIENT_ID": "shop",
        }
    )
    assert "max.poll.interval.ms" not in config.kafka()
    assert config.kafka()["client.id"] == "shop"
    assert config.kafka(scoped=("max.poll.interval.ms",))["max.poll.interval.ms"] == "7000"


def test_refold_kafka_variables_pass_through_to_every_client() -> None:
    config = Config.from_env(
        {
            "REFOLD_BOOTSTRAP_SERVERS": "127.0.0.1:1",
            "REFOLD_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "REFOLD_KAFKA_CLIENT_ID": "shop",
            "REFOLD_KAFKA_LINGER_MS": "50",
            "REFOLD_KAFKA_ENABLE_AUTO_COMMIT": "true",
            "REFOLD_KAFKA_": "ignored",
        }
    )
    assert config.client_overrides == {
        "security.protocol": "SASL_SSL",
        "client.id": "shop",
        "linger.ms": "50",
        "enable.auto.commit": "true",
    }
    conf = config.kafka(defaults={"linger.ms": 5, "compression.type": "lz4"})
    assert conf["security.protocol"] == "SASL_SSL" and conf["linger.ms"] == "50"
    assert conf["compression.type"] == "lz4" and conf["bootstrap.servers"] == "127.0.0.1:1"


def test_refolds_required_settings_win_and_say_so(caplog: pytest.LogCaptureFixture) -> None:
    config = Config.from_env(
        {"REFOLD_BOOTSTRAP_SERVERS": "x:1", "REFOLD_KAFKA_ENABLE_AUTO_COMMIT": "true"}
    )
    with caplog.at_level("WARNING", logger="refold.core.config"):
        conf = config.kafka(**{"enable.auto.commit": False, "group.id": "g"})
    assert conf["enable.auto.commit"] is False and conf["group.id"] == "g"
    assert "REFOLD_KAFKA_ENABLE_AUTO_COMMIT=true is not used" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="refold.core.config"):
        config.kafka(**{"enable.auto.commit": False})
    assert caplog.text == ""  # once per setting, not per client


def test_the_app_id_prefixes_groups_and_internal_topics() -> None:
    default = Config.from_env({})
    assert default.app_id == "refold"
    assert default.group("balances", "v1") == "refold.balances.v1"
    assert default.schemas_topic == "_refold.schemas"
    assert default.dead_letter_topic("balances") == "refold.dlq.balances"
    staging = Config.from_env({"REFOLD_APP_ID": "staging"})
    assert staging.group("commands", "accounts") == "staging.commands.accounts"
    assert staging.schemas_topic == "_staging.schemas"
    assert staging.dead_letter_topic("balances") == "staging.dlq.balances"


@pytest.mark.parametrize("bad", ["a.b", "a b", "x" * 65, "é"])
def test_a_bad_app_id_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="REFOLD_APP_ID"):
        Config.from_env({"REFOLD_APP_ID": bad})
