"""The benchmark's rate sweep, against a fake server with a known capacity."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from perf.bench import Plan, best_rate, sweep
from perf.loadgen import RunResult

PLAN = Plan(
    catalogues=[],
    models=[],
    step_s=1.0,
    growth=1.5,
    max_steps=12,
    bisect_steps=3,
    min_samples=1,
    smoke=False,
    default_threads=False,
)


def fake_server(capacity: float) -> tuple[list[float], Callable[[float, float], RunResult]]:
    """Answers in 1 ms up to `capacity` requests/s and in 50 ms above it."""
    offered: list[float] = []

    def run_at(rate: float, seconds: float) -> RunResult:
        offered.append(rate)
        result = RunResult(system="fake", mode="open", offered_rate=rate, duration_s=seconds)
        latency_us = 1_000 if rate <= capacity else 50_000
        for _ in range(100):
            result.sent += 1
            result.ok += 1
            result.record(latency_us)
        return result

    return offered, run_at


@pytest.mark.parametrize(
    ("capacity", "first_rate"),
    [(1_000.0, 100.0), (300.0, 400.0), (45.0, 10.0)],
    ids=["grows-to-the-edge", "first-rate-over-budget-steps-down", "slow-server"],
)
def test_sweep_finds_the_highest_rate_within_budget_and_never_one_over_it(
    capacity: float, first_rate: float
) -> None:
    _, run_at = fake_server(capacity)
    steps = sweep(run_at, PLAN, first_rate)
    best = best_rate(steps)
    assert best <= capacity
    # The edge lies between a rate x within budget and 1.5x over it, an interval of at most
    # capacity / 2; three bisections leave an eighth of it (and rates are rounded to 1/s).
    assert best >= capacity * (1 - (PLAN.growth - 1) / 8) - 1
    half = [s for s in steps if s.get("half_of_best")]
    assert [s["offered_rate"] for s in half] == [pytest.approx(best / 2, abs=0.1)]


def test_a_server_over_budget_at_every_rate_tried_scores_zero() -> None:
    offered, run_at = fake_server(capacity=1.0)
    steps = sweep(run_at, PLAN, 100.0)
    assert best_rate(steps) == 0.0
    assert min(offered) >= 50.0  # it stops at half the first rate
