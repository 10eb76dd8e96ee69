"""The query server's connection limits as the environment sets them (refold.http.limits)."""

from __future__ import annotations

import resource

import pytest
from refold.core.errors import ConfigError
from refold.http.limits import ConnectionStats, Limits


def test_defaults_and_the_cap_below_the_descriptor_limit() -> None:
    limits = Limits.from_env({})
    assert (limits.keepalive_s, limits.header_s, limits.body_s) == (75.0, 10.0, 30.0)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        assert 0 < limits.max_connections < soft
        assert soft - limits.max_connections >= min(256, soft // 2)  # the worker's reserve
    assert limits.tick_s == 1.0  # a quarter of the shortest timeout, at most a second


def test_the_environment_sets_each_limit() -> None:
    limits = Limits.from_env(
        {
            "REFOLD_HTTP_KEEPALIVE_S": "5",
            "REFOLD_HTTP_HEADER_TIMEOUT_S": "0.4",
            "REFOLD_HTTP_BODY_TIMEOUT_S": "2.5",
            "REFOLD_HTTP_MAX_CONNECTIONS": "12",
        }
    )
    assert limits == Limits(5.0, 0.4, 2.5, 12)
    assert limits.tick_s == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("REFOLD_HTTP_KEEPALIVE_S", "0"),
        ("REFOLD_HTTP_HEADER_TIMEOUT_S", "-1"),
        ("REFOLD_HTTP_BODY_TIMEOUT_S", "soon"),
        ("REFOLD_HTTP_KEEPALIVE_S", "nan"),
        ("REFOLD_HTTP_MAX_CONNECTIONS", "0"),
        ("REFOLD_HTTP_MAX_CONNECTIONS", "1.5"),
    ],
)
def test_a_bad_setting_is_a_config_error_naming_it(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Limits.from_env({name: value})


def test_the_metrics_text_names_every_counter() -> None:
    stats = ConnectionStats()
    stats.open, stats.refused = 3, 2
    stats.timeouts["header"] = 4
    text = stats.metrics()
    assert "refold_http_connections_open 3\n" in text
    assert "refold_http_connections_refused_total 2\n" in text
    assert 'refold_http_timeouts_total{kind="header"} 4\n' in text
    assert 'refold_http_timeouts_total{kind="idle"} 0\n' in text
