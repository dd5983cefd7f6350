"""The periodic jobs' (sync, batch-recommend) figures for Prometheus, as textfiles for
node_exporter's textfile collector: one file per job, `<dir>/uro_recs_<job>.prom`, replaced
atomically after each run.

    uro_recs_job_duration_seconds{job,model}               the last run
    uro_recs_job_last_run_timestamp_seconds{job,model}
    uro_recs_job_success{job,model}                        1 if the last run succeeded
    uro_recs_job_last_success_timestamp_seconds{job,model} kept across failed runs

An alert on `time() - uro_recs_job_last_success_timestamp_seconds > 2 * 86400` catches a
retrain that has not succeeded for two nights, whatever the reason.
"""

from __future__ import annotations

import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile
from prometheus_client.parser import text_string_to_metric_families

_LAST_SUCCESS = "uro_recs_job_last_success_timestamp_seconds"


def record_job(directory: Path, job: str, model: str, succeeded: bool, seconds: float) -> Path:
    """Write the job's textfile; returns its path."""
    path = directory / f"uro_recs_{job.replace('-', '_')}.prom"
    now = time.time()
    last_success = now if succeeded else _previous_success(path, job, model)
    registry = CollectorRegistry()
    labels = ["job", "model"]
    values = {
        "uro_recs_job_duration_seconds": ("Seconds the last run took", seconds),
        "uro_recs_job_last_run_timestamp_seconds": ("When the last run ended", now),
        "uro_recs_job_success": ("1 if the last run succeeded", 1.0 if succeeded else 0.0),
    }
    if last_success is not None:
        values[_LAST_SUCCESS] = ("When a run last succeeded", last_success)
    for name, (help_text, value) in values.items():
        Gauge(name, help_text, labels, registry=registry).labels(job, model).set(value)
    write_to_textfile(str(path), registry)
    return path


def _previous_success(path: Path, job: str, model: str) -> float | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == _LAST_SUCCESS and sample.labels == {"job": job, "model": model}:
                return float(sample.value)
    return None
