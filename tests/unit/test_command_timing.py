"""The command step histograms: what /metrics shows, and the bench's quantiles read back from it."""

from __future__ import annotations

import random

from refold.engine.command_timing import BUCKETS_MS, StepTimes, metrics_lines

from bench.commands import parse_steps, step_quantiles


def bucket_of(ms: float) -> tuple[float, float]:
    """The (lower, upper] bucket bounds holding `ms`."""
    low = 0.0
    for high in BUCKETS_MS:
        if ms <= high:
            return low, high
        low = high
    return low, float("inf")


def test_histograms_count_every_sample_and_quantiles_land_in_the_right_bucket() -> None:
    times = StepTimes()
    rng = random.Random(4)
    early = [rng.uniform(0, 2000) for _ in range(500)]  # traffic before the measured run
    for ms in early:
        times.add("queued", ms)
    before = parse_steps("\n".join(metrics_lines({"vault": times})))
    measured = sorted(rng.expovariate(1 / 12) for _ in range(3000))
    for ms in measured:
        times.add("queued", ms)
    times.add("txn_commit", 4.0, times=7)  # once per transaction, counted per command
    text = "\n".join(metrics_lines({"vault": times}))
    assert 'refold_command_step_ms_count{aggregate="vault",step="queued"} 3500' in text
    assert 'refold_command_step_ms_count{aggregate="vault",step="txn_commit"} 7' in text
    assert text.index('step="queued"') < text.index('step="txn_commit"')  # a command's order
    steps = step_quantiles(before, parse_steps(text))
    assert steps["queued"]["count"] == 3000
    for name, q in (("p50_ms", 0.5), ("p99_ms", 0.99)):
        exact = measured[int(q * len(measured))]
        low, high = bucket_of(exact)
        assert low <= steps["queued"][name] <= high, (name, exact, steps["queued"][name])
    assert steps["txn_commit"]["count"] == 7
    assert 3.0 <= steps["txn_commit"]["p50_ms"] <= 5.0
