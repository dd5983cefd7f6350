"""The benchmark's rate sweep, against a fake server with a known capacity; its two-stage
recall, against the trained demo DeepFM."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from perf.bench import Plan, best_rate, sweep, two_stage_recall
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


def test_the_summary_gives_medians_and_ranges_of_the_rounds_and_ratios_to_the_best_fastapi() -> (
    None
):
    from perf.bench import summarize

    def run(rates: dict[float, float], saturated: float, pss_kib: int) -> dict[str, object]:
        steps = [
            {"offered_rate": r, "p99_ms": p99, "errors": {}, "unanswered": 0}
            for r, p99 in rates.items()
        ]
        best = max((r for r, p99 in rates.items() if p99 <= 10), default=0.0)
        return {
            "steps": steps,
            "saturated": {"achieved_rate": saturated},
            "memory_kib": [{"pss_kib": pss_kib}],
            "max_rate": best,
        }

    result = {
        "catalogue": "demo",
        "model": "als",
        "in_process": [{"achieved_rate": a, "p50_ms": 0.1} for a in (4000.0, 5000.0, 6000.0)],
        "runs": {
            "fastapi": [run({500.0: 5, 800.0: 20}, 900, 1024) for _ in range(3)],
            "fastapi 2 workers": [
                run({1000.0: 5}, 1500, 2048),
                run({900.0: 5}, 1400, 2048),
                run({1200.0: 5}, 1600, 2048),
            ],
            "uro-recs 1 worker": [
                run({3000.0: 5}, 9000, 512),
                run({4500.0: 5}, 8000, 512),
                run({6000.0: 5, 9000.0: 30}, 10_000, 512),
            ],
        },
    }
    rows = {row["system"]: row for row in summarize([result])}
    uro = rows["uro-recs 1 worker"]
    assert uro["max_rate"] == {"median": 4500.0, "min": 3000.0, "max": 6000.0}
    assert uro["max_rate_vs_fastapi"] == 4.5  # against 2 workers' median 1,000, the better
    assert uro["max_rate_vs_in_process"] == 0.9
    assert uro["saturated_rate_vs_fastapi"] == 6.0
    assert rows["fastapi"]["max_rate"] == {"median": 500.0, "min": 500.0, "max": 500.0}
    assert rows["fastapi 2 workers"]["pss_mib"] == {"median": 2.0, "min": 2.0, "max": 2.0}


def test_two_stage_recall_is_whole_with_every_item_a_candidate_and_less_with_few(
    trained_store: Path, demo_users: list[str]
) -> None:
    every_item = 1_000_000  # more than the demo catalogue holds
    whole = two_stage_recall(trained_store, demo_users, 10, candidates=every_item, sample=50)
    few = two_stage_recall(trained_store, demo_users, 10, candidates=12, sample=50)
    assert whole["users"] == few["users"] == 50
    # Full ranking again, up to libreco's float32 near-ties at the 10th place.
    assert whole["mean"] >= 0.99
    assert few["mean"] < whole["mean"]
    assert few["worst"] <= few["mean"] <= 1.0
