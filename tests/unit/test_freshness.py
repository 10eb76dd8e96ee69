"""What a lookup says about its key's partition (`answers.Freshness`), and when a partition
counts as behind (`runner_stats.Behind`): pure logic, no Kafka."""

from __future__ import annotations

import json

from refold.engine.runner_stats import Behind
from refold.engine.timetravel import murmur2_partition
from refold.http.answers import Freshness, key_found, key_missing


def said(fresh: Freshness, key: str) -> dict[str, object]:
    return json.loads(b"{" + fresh.fragment(key)[1:] + b"}")


def test_one_answer_fits_every_key_when_every_partition_is_here_and_current() -> None:
    fresh = Freshness([(4, [(0, None)] * 4)])
    assert fresh.uniform is not None
    assert said(fresh, "acc-1") == {"lag": 0, "stale": False}


def test_a_key_gets_its_own_partitions_lag_or_staleness_by_murmur2() -> None:
    keys = [f"acc-{i}" for i in range(40)]
    by_partition = {murmur2_partition(k.encode(), 4): k for k in keys}
    assert len(by_partition) == 4
    entries = [(7, None), (None, "partition t:1 is folded by another worker (w2)"), (0, None)]
    entries.append((None, "partition t:3 is folded by nobody now"))
    fresh = Freshness([(4, entries)])
    assert fresh.uniform is None
    assert said(fresh, by_partition[0]) == {"lag": 7, "stale": False}
    assert said(fresh, by_partition[1])["stale"] is True
    assert "another worker" in str(said(fresh, by_partition[1])["stale_reason"])
    assert said(fresh, by_partition[2]) == {"lag": 0, "stale": False}
    assert said(fresh, by_partition[3])["lag"] is None


def test_a_rekeying_projection_is_stale_unless_every_partition_is_here() -> None:
    here = Freshness([(2, [(3, None), (4, None)])], rekeys=True)
    assert said(here, "anyone") == {"lag": 7, "stale": False}
    partly = Freshness([(2, [(3, None), (None, "not here")])], rekeys=True)
    assert said(partly, "anyone")["stale"] is True


def test_an_unreachable_broker_makes_every_answer_stale_and_survives_the_reader_pipe() -> None:
    fresh = Freshness([(4, [(0, None)] * 4)], stale="the broker is unreachable: gone")
    copy = Freshness.from_json(json.loads(json.dumps(fresh.to_json())))
    for f in (fresh, copy):
        assert said(f, "k") == {
            "lag": None,
            "stale": True,
            "stale_reason": "the broker is unreachable: gone",
        }
    mixed = Freshness([(2, [(1, None), (None, "elsewhere")])])
    again = Freshness.from_json(json.loads(json.dumps(mixed.to_json())))
    assert all(mixed.fragment(k) == again.fragment(k) for k in ("a", "b", "c", "d"))


def test_lookup_bodies_carry_the_fragment_as_json() -> None:
    fresh = Freshness([(1, [(2, None)])])
    found = json.loads(key_found("k", {"n": 1}, b'{"t:0":5}', fresh.fragment("k")))
    assert found == {
        "key": "k",
        "state": {"n": 1},
        "position": {"t:0": 5},
        "lag": 2,
        "stale": False,
    }
    missing = json.loads(key_missing("p", "k", {("t", 0): 5}, fresh.fragment("k")))
    assert missing["error"] == "no state for key" and missing["lag"] == 2


def test_behind_means_records_older_than_the_window_not_folded() -> None:
    behind = Behind(after=5.0)
    tp = ("t", 0)
    # A new owner is behind until it has folded what the partition held when it took it.
    assert behind.update(0.0, {tp: 100}, {tp: 40}) == (tp,)
    assert behind.update(1.0, {tp: 150}, {tp: 100}) == ()
    # Under steady load the position trails the end, but by less than the window: current.
    assert behind.update(6.0, {tp: 400}, {tp: 380}) == ()
    # Stuck at 380 while the ends seen 5 s ago were past it: behind.
    assert behind.update(12.0, {tp: 700}, {tp: 380}) == (tp,)
