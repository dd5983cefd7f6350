"""The periodic jobs' textfiles for Prometheus (app/job_metrics.py)."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from uro_recs.app.job_metrics import record_job


def samples(path: Path) -> dict[str, float]:
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(path.read_text())
        for sample in family.samples
    }


def test_a_failed_run_keeps_the_last_success(tmp_path: Path) -> None:
    path = record_job(tmp_path, "batch-recommend", "als", succeeded=True, seconds=12.5)
    assert path.name == "uro_recs_batch_recommend.prom"
    first = samples(path)
    assert first["uro_recs_job_success"] == 1.0
    assert first["uro_recs_job_duration_seconds"] == 12.5
    success = first["uro_recs_job_last_success_timestamp_seconds"]

    record_job(tmp_path, "batch-recommend", "als", succeeded=False, seconds=3.0)
    second = samples(path)
    assert second["uro_recs_job_success"] == 0.0
    assert second["uro_recs_job_last_success_timestamp_seconds"] == success
    assert second["uro_recs_job_last_run_timestamp_seconds"] >= success
    assert not list(tmp_path.glob("*.tmp*"))  # replaced atomically, nothing left behind
