"""The bundled bank folds and the projection loader, without Kafka."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from refold import Event, Projection
from refold.core.app import load_projections
from refold.core.errors import ProjectionError
from refold.examples.bank.projections import Balances, Owners, Passbook


def ev(offset: int, type_: str, key: str, **data) -> Event:
    return Event(
        f"bank.{type_}",
        key,
        {"account_id": key, **data},
        "bank.accounts",
        0,
        offset,
        1_700_000_000_000 + offset,
    )


STORY = [
    ev(0, "AccountOpened", "a1", owner="ada"),
    ev(1, "MoneyDeposited", "a1", amount_cents=10_000, memo="salary"),
    ev(2, "MoneyWithdrawn", "a1", amount_cents=2_500, memo="rent"),
    ev(3, "AccountOpened", "a2", owner="ada"),
    ev(4, "MoneyDeposited", "a2", amount_cents=700, memo="gift"),
    ev(5, "MoneyWithdrawn", "a1", amount_cents=500, memo="coffee"),
]


def fold(projection: Projection, events: list[Event]) -> dict[str, object]:
    """What the runtime does, minus I/O: route by key (following links), fold in order."""
    states: dict[str, object] = {}
    links: dict[str, str] = {}
    for event in events:
        key = projection.key(event)
        if key is None:
            key = links.get(event.key)
            if key is None:
                continue
        else:
            links[event.key] = key
        state = states.get(key, projection.initial(key))
        states[key] = projection.apply(state, event)
    return states


def test_balances() -> None:
    states = fold(Balances(), STORY)
    assert states["a1"] == {
        "balance_cents": 7_000,
        "deposits": 1,
        "withdrawals": 2,
        "events": 4,
        "owner": "ada",
    }
    assert states["a2"]["balance_cents"] == 700


def test_passbook_lines_carry_the_balance_after_them() -> None:
    book = fold(Passbook(), STORY)["a1"]
    assert [(e["memo"], e["amount_cents"], e["balance_cents"]) for e in book["entries"]] == [
        ("salary", 10_000, 10_000),
        ("rent", -2_500, 7_500),
        ("coffee", -500, 7_000),
    ]
    assert book["owner"] == "ada" and book["entries"][0]["time"].startswith("2023-11-14T")


def test_owners_follow_the_account_to_its_owner() -> None:
    states = fold(Owners(), STORY)
    assert set(states) == {"ada"}
    assert states["ada"] == {"accounts": {"a1": 7_000, "a2": 700}, "total_cents": 7_700}


def test_unhandled_types_leave_state_unchanged() -> None:
    class Counter(Projection):
        name, topics = "counter", ("t",)

        def initial(self, key):
            return {"n": 0}

        def on_MoneyDeposited(self, state, event):
            state["n"] += 1
            return state

    assert fold(Counter(), STORY) == {"a1": {"n": 1}, "a2": {"n": 1}}


def write_module(tmp_path: Path, name: str, body: str, monkeypatch) -> str:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)
    return name


@pytest.mark.parametrize(
    "body, reason",
    [
        (
            "from refold import Projection\nclass P(Projection):\n    topics = ('t',)\n",
            "has no name",
        ),
        ("from refold import Projection\nclass P(Projection):\n    name = 'p'\n", "topics"),
        (
            "from refold import Projection\nclass P(Projection):\n    name = 'p'\n"
            "    topics = 't'\n",
            "topics",
        ),
        (
            "from refold import Projection\nclass P(Projection):\n    name = 'balances'\n"
            "    topics = ('t',)\n",
            "duplicate projection name 'balances'",
        ),
        ("raise RuntimeError('kaboom')\n", "cannot import app module"),
        (
            "from refold import Projection\nclass P(Projection):\n    name = 'p'\n"
            "    topics = ('t',)\n    version = 0\n",
            "version",
        ),
    ],
)
def test_malformed_projections_are_startup_errors(tmp_path, monkeypatch, body, reason) -> None:
    module = write_module(tmp_path, f"userapp_{abs(hash(body))}", body, monkeypatch)
    with pytest.raises(ProjectionError, match=reason):
        load_projections(["refold.examples.bank", module])


def test_missing_module_is_a_startup_error() -> None:
    with pytest.raises(ProjectionError, match="no_such_module"):
        load_projections(["no_such_module"])


def test_a_user_app_loads_alone_or_beside_the_bank_example(tmp_path, monkeypatch) -> None:
    module = write_module(
        tmp_path,
        "userapp_ok",
        "from refold import Projection\nclass Mine(Projection):\n    name = 'mine'\n"
        "    topics = ('x',)\n",
        monkeypatch,
    )
    assert [p.name for p in load_projections([module])] == ["mine"]
    names = sorted(p.name for p in load_projections([module, "refold.examples.bank"]))
    assert names == ["balances", "mine", "owners", "passbook"]
    assert load_projections() == []
