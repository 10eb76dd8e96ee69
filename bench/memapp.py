"""The bundled `Balances` fold over the topic and under the name the memory scenario chooses
(BENCH_TOPIC, BENCH_NAME), for a `refold worker` subprocess."""

from __future__ import annotations

import os

from refold.examples.bank.projections import Balances


class MemoryBalances(Balances):
    name = os.environ.get("BENCH_NAME", "bench-memory")
    topics = (os.environ.get("BENCH_TOPIC", "bench.memory"),)
