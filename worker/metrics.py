"""The workers' own figures for the broker's Prometheus endpoint ([broker] metrics_address).

prometheus_client's multiprocess mode: each worker process writes its numbers into files in
`<run_dir>/worker-metrics`, and the broker's exporter adds them up at each scrape. Nothing is
sent over the worker protocol and nothing waits: an observation is a write into a memory map.
Off (every method a no-op, prometheus_client not imported) unless metrics are configured.

    uro_recs_worker_call_users{model}        histogram: users scored in one model call
    uro_recs_worker_call_seconds{model}      histogram: the model call's duration
    uro_recs_ingest_events_total             events an ingest worker stored (new or not)
    uro_recs_ingest_database_errors_total    ingest writes that failed on the database
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

_USERS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
_SECONDS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class WorkerMetrics:
    def __init__(self, directory: Path | None, model: str) -> None:
        """`directory` None: off. Must come before anything imports prometheus_client, which
        reads PROMETHEUS_MULTIPROC_DIR once, at import."""
        self._users: Any = None
        self._seconds: Any = None
        self._events: Any = None
        self._errors: Any = None
        if directory is None:
            return
        directory.mkdir(parents=True, exist_ok=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
        from prometheus_client import Counter, Histogram

        # Registered nowhere in this process: the files are what the broker reads.
        self._users = Histogram(
            "uro_recs_worker_call_users",
            "Users scored in one model call",
            ["model"],
            buckets=_USERS_BUCKETS,
            registry=None,
        ).labels(model)
        self._seconds = Histogram(
            "uro_recs_worker_call_seconds",
            "Duration of one model call",
            ["model"],
            buckets=_SECONDS_BUCKETS,
            registry=None,
        ).labels(model)
        self._events = Counter(
            "uro_recs_ingest_events", "Events an ingest worker stored", registry=None
        )
        self._errors = Counter(
            "uro_recs_ingest_database_errors",
            "Ingest writes that failed on the database",
            registry=None,
        )

    def model_call(self, users: int, seconds: float) -> None:
        if self._users is not None:
            self._users.observe(users)
            self._seconds.observe(seconds)

    def ingested(self, events: int) -> None:
        if self._events is not None:
            self._events.inc(events)

    def database_error(self) -> None:
        if self._errors is not None:
            self._errors.inc()
