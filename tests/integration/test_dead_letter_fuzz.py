"""Hypothesis on what a worker reads: records with arbitrary values, keys and headers, between
good events, on a topic a projection folds. Every record is folded or dead-lettered with its
position; the worker neither stops nor fails, and the good events' states are exact."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Producer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from refold.core.config import Config
from refold.core.errors import DecodeError
from refold.engine.tail import dead_letters

from tests.integration.test_http import DEPOSITED, Served
from tests.integration.test_http import serve as serve
from tests.unit.test_fuzz_decode import HEADERS, values

GOOD = st.tuples(st.sampled_from(["acc-1", "acc-2", "acc-3"]), st.integers(0, 10**6), st.just("ok"))


@pytest.mark.timeout(300)
def test_arbitrary_records_are_folded_or_dead_lettered(
    config: Config, request: pytest.FixtureRequest
) -> None:
    factory: Callable[..., Served] = request.getfixturevalue("serve")
    runs, dead_seen, exact = [0], [0], [0]

    @settings(
        max_examples=4,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        records=st.lists(
            st.tuples(st.just("good"), GOOD, st.none())
            | st.tuples(
                st.just("raw"), st.tuples(values(), st.none() | st.binary(max_size=6)), HEADERS
            ),
            min_size=20,
            max_size=20,
        )
    )
    def check(records: list[tuple[str, Any, Any]]) -> None:
        runs[0] += 1
        s = factory()
        codec = s.worker.codec
        producer = Producer(config.kafka())
        placed: list[tuple[int, int] | None] = [None] * len(records)

        def delivered(index: int) -> Callable[[Any, Any], None]:
            def on_delivery(err: Any, msg: Any) -> None:
                assert err is None, err
                placed[index] = (msg.partition(), msg.offset())

            return on_delivery

        folded: dict[str, dict[str, Any]] = {}
        undecodable: set[int] = set()  # the records that must be dead letters
        for index, (kind, record, headers) in enumerate(records):
            if kind == "good":
                key, amount, memo = record
                data = {"account_id": key, "amount_cents": amount, "memo": memo}
                value, raw_key, raw_headers = codec.encode(DEPOSITED, data), key.encode(), []
                state = folded.setdefault(key, {"balance_cents": 0, "deposits": 0, "memos": []})
                state["balance_cents"] += amount
                state["deposits"] += 1
                state["memos"].append(memo)
            else:
                (value, raw_key), raw_headers = record, list(headers or [])
                try:
                    codec.decode(value)
                except DecodeError:
                    undecodable.add(index)
            producer.produce(
                s.topic, value, raw_key, headers=raw_headers, on_delivery=delivered(index)
            )
        assert producer.flush(60) == 0 and None not in placed
        runner = s.worker.runners[s.name]
        last: dict[tuple[str, int], int] = {}
        for where in placed:
            assert where is not None
            last[(s.topic, where[0])] = max(where[1], last.get((s.topic, where[0]), -1))
        assert runner.wait_for(last, 90), runner.stats.state
        assert runner.stats.state not in ("stopped", "failed")

        dead = {(d["partition"], d["offset"]): d for d in dead_letters(config, s.name)}
        assert all(d["reason"] and d["topic"] == s.topic for d in dead.values()), dead
        assert {placed[i] for i in undecodable} <= set(dead)  # each with its position
        dead_seen[0] += len(dead)
        good = {placed[i] for i, (kind, _, _) in enumerate(records) if kind == "good"}
        assert not good & set(dead)  # a good event is never dead-lettered
        raw = len(records) - len(good)
        if len(undecodable) == raw:  # every raw record refused: the states are exact
            exact[0] += 1
            for key, state in folded.items():
                assert s.get_key(key).body["state"] == state

    check()
    assert runs[0] >= 3 and dead_seen[0] > 0 and exact[0] > 0, (runs, dead_seen, exact)
