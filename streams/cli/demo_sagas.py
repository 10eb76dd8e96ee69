"""The demo's saga part: two transfers through the bank's `transfers` saga, one that completes
and one to an account that does not exist, which is compensated (the money comes back)."""

from __future__ import annotations

import time
from typing import Any

from refold.core.errors import RefoldError
from refold.core.sagas import TERMINAL


def show_transfers(worker: Any, run: str, timeout: float = 60.0) -> None:
    """Start both transfers through the worker's sagas (as POST /sagas does) and print how they
    ended, step by step."""
    alice, bob = f"alice-{run}", f"bob-{run}"
    transfers = {
        f"rent-share-{run}": {"from": alice, "to": bob, "amount_cents": 30_000},
        f"typo-{run}": {"from": alice, "to": f"bobb-{run}", "amount_cents": 5_000},
    }
    print("\ntwo transfers through the `transfers` saga (POST /sagas/transfers)")
    for saga_id, data in transfers.items():
        worker.sagas.start_saga("transfers", {"saga_id": saga_id, "data": data})
    deadline = time.monotonic() + timeout
    for saga_id, data in transfers.items():
        while True:
            state = worker.sagas.status("transfers", saga_id)
            if state is not None and state["status"] in TERMINAL:
                break
            if time.monotonic() > deadline:
                raise RefoldError(f"saga {saga_id} did not end within {timeout:g} s")
            time.sleep(0.1)
        print(f"  {saga_id:<16} {data['from']} -> {data['to']}: {state['status']}")
        for step in state["steps"]:
            why = f" ({step['reason']})" if step.get("reason") else ""
            print(f"    {step['name']:<10} {step['status']}{why}  [{step['command_id']}]")
