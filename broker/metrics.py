"""Prometheus metrics of the broker, on `[broker] metrics_address` (loopback by default).

The broker's loop owns its state and never waits for a scrape: once a second it copies what
the metrics need into a snapshot (`MetricsExporter.update`), and the HTTP server's thread
(prometheus_client) renders only snapshots. A scrape therefore costs the loop nothing, and a
slow or hostile scraper can delay nobody's answer.

Series (all prefixed `uro_recs_`):
- `requests_total{model,op,outcome}`: replies by outcome (`ok` or an error code); refusals on
  arrival included; a model name nobody configured counts as `(unknown)`;
- `request_duration_seconds{model,op}`: from the broker's receipt of a request to its reply,
  for accepted requests;
- `queued{model}`, `in_flight{model}`, `workers{model}` (live), `worker_slots{model}`;
- `model_version_info{model,version}`: 1 per version workers serve;
- `broker_events_total{event}`: the broker's counters (workers_lost, requests_redelivered,
  workers_joined, rejected_<code>, ...);
- `pending_bytes`, `clients`, `broker_uptime_seconds`, `broker_draining`;
- the workers' own figures, from the files they leave in `<run_dir>/worker-metrics`
  (worker/metrics.py): users and seconds per model call, ingested events, database errors.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from uro_recs.broker.core import BrokerCore
from uro_recs.broker.stats import LATENCY_BUCKETS_S

SNAPSHOT_EVERY_S = 1.0


@dataclass(frozen=True)
class Snapshot:
    outcomes: dict[tuple[str, str, str], int] = field(default_factory=dict)
    latency: dict[tuple[str, str], tuple[list[int], float]] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    pending_bytes: int = 0
    clients: int = 0
    uptime_s: float = 0.0
    draining: bool = False


def take_snapshot(core: BrokerCore, now: float) -> Snapshot:
    stats = core.stats(now)
    return Snapshot(
        outcomes=dict(core.requests.outcomes),
        latency={k: (list(v.counts), v.total_s) for k, v in core.requests.latency.items()},
        models=stats["models"],
        counters=dict(core.counters),
        pending_bytes=stats["pending_bytes"],
        clients=stats["clients"],
        uptime_s=stats["uptime_s"],
        draining=stats["draining"],
    )


class _SnapshotCollector(Collector):
    def __init__(self) -> None:
        self.snapshot = Snapshot()  # replaced whole by the broker's thread; read here

    def collect(self) -> Iterator[Any]:
        s = self.snapshot
        requests = CounterMetricFamily(
            "uro_recs_requests",
            "Replies by model, op and outcome",
            labels=["model", "op", "outcome"],
        )
        for (model, op, outcome), count in sorted(s.outcomes.items()):
            requests.add_metric([model, op, outcome], count)
        yield requests

        duration = HistogramMetricFamily(
            "uro_recs_request_duration_seconds",
            "From the broker's receipt of a request to its reply",
            labels=["model", "op"],
        )
        for (model, op), (counts, total_s) in sorted(s.latency.items()):
            buckets, seen = [], 0
            for bound, count in zip((*LATENCY_BUCKETS_S, float("inf")), counts, strict=True):
                seen += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), seen))
            duration.add_metric([model, op], buckets, total_s)
        yield duration

        gauges = {
            "queued": "Requests waiting for a worker",
            "in_flight": "Requests held by workers",
            "workers": "Live workers",
            "slots": "Requests the live workers may hold at once",
        }
        for key, help_text in gauges.items():
            name = "uro_recs_worker_slots" if key == "slots" else f"uro_recs_{key}"
            family = GaugeMetricFamily(name, help_text, labels=["model"])
            for model, state in sorted(s.models.items()):
                family.add_metric([model], state[key])
            yield family

        versions = InfoMetricFamily(
            "uro_recs_model_version", "Versions the workers serve", labels=["model"]
        )
        for model, state in sorted(s.models.items()):
            for version in state["versions"]:
                versions.add_metric([model], {"version": version})
        yield versions

        events = CounterMetricFamily(
            "uro_recs_broker_events", "The broker's event counters", labels=["event"]
        )
        for event, count in sorted(s.counters.items()):
            events.add_metric([event], count)
        yield events

        for name, help_text, value in (
            ("uro_recs_pending_bytes", "Request bodies the broker holds", s.pending_bytes),
            ("uro_recs_clients", "Connections holding requests or replies", s.clients),
            ("uro_recs_broker_uptime_seconds", "Seconds since the broker started", s.uptime_s),
            ("uro_recs_broker_draining", "1 while the broker drains", int(s.draining)),
        ):
            yield GaugeMetricFamily(name, help_text, value=value)


class MetricsExporter:
    """Serves the metrics over HTTP from its own thread; `update` is the loop's side."""

    def __init__(self, address: str, worker_metrics_dir: Path | None = None) -> None:
        host, _, port = address.rpartition(":")
        self._collector = _SnapshotCollector()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self._collector)
        if worker_metrics_dir is not None:  # the workers' own figures (worker/metrics.py)
            worker_metrics_dir.mkdir(parents=True, exist_ok=True)
            MultiProcessCollector(registry, path=str(worker_metrics_dir))  # type: ignore[no-untyped-call]
        self._server, self._thread = start_http_server(int(port), host or "127.0.0.1", registry)
        self._next = 0.0

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def update(self, core: BrokerCore, now: float, force: bool = False) -> None:
        if force or now >= self._next:
            self._collector.snapshot = take_snapshot(core, now)
            self._next = now + SNAPSHOT_EVERY_S

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if isinstance(self._thread, threading.Thread):
            self._thread.join(timeout=2)
