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
