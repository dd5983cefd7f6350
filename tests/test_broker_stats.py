"""The broker's request statistics (broker/stats.py): outcomes, latency buckets, the minute."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from uro_recs.broker.stats import LATENCY_BUCKETS_S, Latency, RequestStats


def test_outcomes_and_latency_are_kept_per_model_and_op() -> None:
    stats = RequestStats()
    for i in range(10):
        stats.record("als", "recommend", "ok", now=100.0 + i, seconds=0.003)
    stats.record("als", "predict", "bad_request", now=105.0, seconds=0.0004)
    stats.record("(unknown)", "recommend", "unknown_model", now=105.0)  # refused on arrival
    assert stats.outcomes[("als", "recommend", "ok")] == 10
    assert stats.outcomes[("(unknown)", "recommend", "unknown_model")] == 1
    assert stats.latency[("als", "recommend")].count == 10
    assert stats.latency[("als", "predict")].count == 1
    assert ("(unknown)", "recommend") not in stats.latency  # a refusal has no serving time


def test_the_last_minute_counts_requests_errors_and_quantiles() -> None:
    stats = RequestStats()
    for i in range(99):
        stats.record("als", "recommend", "ok", now=1000.0 + i * 0.5, seconds=0.0015)
    stats.record("als", "recommend", "worker_lost", now=1049.0, seconds=0.7)
    minute = stats.last_minute(now=1050.0)["als"]
    assert (minute["requests"], minute["errors"]) == (100, 1)
    assert minute["p50_ms"] == 2.0  # the 1-2 ms bucket's upper bound
    assert minute["p99_ms"] == 2.0
    assert 1.5 < minute["per_s"] <= 2.0
    # A minute later, all of it has left the window.
    assert stats.last_minute(now=1120.0) == {}


@given(st.lists(st.floats(min_value=0, max_value=120, allow_nan=False), min_size=1))
def test_a_quantile_is_the_bound_of_the_bucket_that_holds_it(samples: list[float]) -> None:
    latency = Latency()
    for sample in samples:
        latency.observe(sample)
    assert latency.count == len(samples)
    ordered = sorted(samples)
    for q in (0.5, 0.99):
        reported = latency.quantile(q)
        assert reported is not None
        true = ordered[max(0, math.ceil(q * len(ordered)) - 1)]
        assert reported >= true  # never optimistic
        bounds = [b for b in LATENCY_BUCKETS_S if b >= true]
        if bounds:
            assert reported == bounds[0]  # and no coarser than one bucket
