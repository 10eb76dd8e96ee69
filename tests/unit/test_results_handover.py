"""A processor's committed results handed to the worker's results index in the same process
(refold.kafka.command_client.ResultsIndex.learn_committed): waiters are answered at once, a
repeat changes nothing, and what is handed over stays bounded. No broker: the index's consumer
is never started."""

from __future__ import annotations

from pathlib import Path

import pytest
from refold.core.config import Config
from refold.kafka import command_client
from refold.kafka.command_client import ResultsIndex


def _index(tmp_path: Path) -> ResultsIndex:
    config = Config(data_dir=tmp_path, bootstrap_override="127.0.0.1:1")
    return ResultsIndex(config, ["bank.results"], store_path=tmp_path / "results")


def _result(cid: str, status: str = "accepted") -> dict[str, object]:
    return {"command_id": cid, "status": status, "aggregate": "accounts", "key": "k"}


def test_a_waiter_is_answered_by_the_handover_once_and_the_first_result_stands(
    tmp_path: Path,
) -> None:
    index = _index(tmp_path)
    seen: list[dict[str, object]] = []
    cancel = index.watch("c-1", seen.append)
    assert seen == [] and index.get("c-1") is None
    index.learn_committed([_result("c-1"), _result("c-2")])
    assert seen == [_result("c-1")]
    assert index.get("c-2") == _result("c-2")  # no waiter: known for a later GET
    index.learn_committed([_result("c-1", "rejected")])  # a repeat: the first one stands
    assert seen == [_result("c-1")] and index.get("c-1") == _result("c-1")
    cancel()
    late: list[dict[str, object]] = []
    index.watch("c-2", late.append)  # a watch after the handover is answered at once
    assert late == [_result("c-2")]


def test_what_is_handed_over_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(command_client, "MAX_HANDED_OVER", 3)
    index = _index(tmp_path)
    index.learn_committed(_result(f"c-{i}") for i in range(5))
    assert [index.get(f"c-{i}") is not None for i in range(5)] == [False, False, True, True, True]
