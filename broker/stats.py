"""What the broker counts about the requests it answers: outcomes and latency per model and op,
since it started (for Prometheus) and over the last minute (for `stats` and `uro-recs status`).

Pure data, no clock: the core passes `now`. Latency is measured from the broker's receipt of
a request to its reply, in fixed buckets, so recording one is a bisect and two increments;
quantiles are read off the buckets (the upper bound of the bucket that holds them).
"""

from __future__ import annotations

import bisect
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Final

from uro_recs.core.protocol import MAX_TIMEOUT_MS

# Seconds; the last bucket (+Inf) catches the rest.
LATENCY_BUCKETS_S: Final = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
)  # fmt: skip
# Nothing is answered later than the longest budget plus the grace: the +Inf bucket's bound.
_LATEST_S: Final = MAX_TIMEOUT_MS / 1000
WINDOW_S: Final = 60.0
_SLOT_S: Final = 5.0  # the minute window moves in steps of this


@dataclass(slots=True)
class Latency:
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    total_s: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self.total_s += seconds

    def add(self, other: Latency) -> None:
        for i, count in enumerate(other.counts):
            self.counts[i] += count
        self.total_s += other.total_s

    @property
    def count(self) -> int:
        return sum(self.counts)

    def quantile(self, q: float) -> float | None:
        """The upper bound of the bucket holding the q-quantile, in seconds (None: no data)."""
        total = self.count
        if total == 0:
            return None
        rank, seen = q * total, 0
        for bound, count in zip((*LATENCY_BUCKETS_S, _LATEST_S), self.counts, strict=True):
            seen += count
            if seen >= rank:
                return bound
        return _LATEST_S


@dataclass(slots=True)
class _Slot:
    start: float
    requests: Counter[str] = field(default_factory=Counter)  # by model
    errors: Counter[str] = field(default_factory=Counter)  # by model
    latency: dict[str, Latency] = field(default_factory=dict)  # by model


class RequestStats:
    def __init__(self) -> None:
        self.outcomes: Counter[tuple[str, str, str]] = Counter()  # (model, op, outcome)
        self.latency: dict[tuple[str, str], Latency] = {}  # (model, op), answered requests
        self._slots: deque[_Slot] = deque()

    def record(
        self, model: str, op: str, outcome: str, now: float, seconds: float | None = None
    ) -> None:
        """One reply. `seconds` since receipt for accepted requests; None for a refusal made
        on arrival (it says nothing about serving latency)."""
        self.outcomes[(model, op, outcome)] += 1
        slot = self._slot(now)
        slot.requests[model] += 1
        if outcome != "ok":
            slot.errors[model] += 1
        if seconds is not None:
            key = (model, op)
            latency = self.latency.get(key)
            if latency is None:
                latency = self.latency[key] = Latency()
            latency.observe(seconds)
            by_model = slot.latency.get(model)
            if by_model is None:
                by_model = slot.latency[model] = Latency()
            by_model.observe(seconds)

    def last_minute(self, now: float) -> dict[str, dict[str, Any]]:
        """Per model: requests, errors, requests/s, p50 and p99 in ms over the last minute."""
        self._expire(now)
        requests: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        latency: dict[str, Latency] = {}
        for slot in self._slots:
            requests.update(slot.requests)
            errors.update(slot.errors)
            for model, observed in slot.latency.items():
                latency.setdefault(model, Latency()).add(observed)
        span = max(_SLOT_S, min(WINDOW_S, now - self._slots[0].start)) if self._slots else 0.0
        summary = {}
        for model in requests:
            merged = latency.get(model, Latency())
            p50, p99 = merged.quantile(0.5), merged.quantile(0.99)
            summary[model] = {
                "requests": requests[model],
                "errors": errors[model],
                "per_s": round(requests[model] / span, 2) if span else 0.0,
                "p50_ms": None if p50 is None else p50 * 1000,
                "p99_ms": None if p99 is None else p99 * 1000,
            }
        return summary

    def _slot(self, now: float) -> _Slot:
        if not self._slots or now >= self._slots[-1].start + _SLOT_S:
            self._slots.append(_Slot(start=now - now % _SLOT_S))
            self._expire(now)
        return self._slots[-1]

    def _expire(self, now: float) -> None:
        while self._slots and self._slots[0].start + _SLOT_S <= now - WINDOW_S:
            self._slots.popleft()
