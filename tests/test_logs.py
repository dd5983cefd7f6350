"""One log stream: our events and the libraries' logging and warnings, one JSON object a line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.cluster import Cluster

SCRIPT = """
import logging, sys, warnings
import structlog
from uro_recs.core.logs import configure_logging
configure_logging("json", sys.argv[1])
log = structlog.get_logger("uro_recs.test")
log.debug("ours_debug")
log.info("ours_info", worker="als-12")
log.warning("ours_warning")
logging.getLogger("tensorflow").warning("a library's warning")
logging.getLogger("asyncpg").info("a library's info")
warnings.warn("a deprecation", DeprecationWarning, stacklevel=1)
"""


def log_lines(level: str) -> list[dict[str, object]]:
    done = subprocess.run(
        [sys.executable, "-W", "always", "-c", SCRIPT, level],
        capture_output=True,
        text=True,
        check=True,
    )
    return [json.loads(line) for line in done.stderr.splitlines()]  # each line JSON, or fails


def test_libraries_and_warnings_share_the_json_stream() -> None:
    lines = log_lines("info")
    events = [line["event"] for line in lines]
    assert events[:3] == ["ours_info", "ours_warning", "a library's warning"]
    assert any("a deprecation" in str(event) for event in events)
    assert "a library's info" not in events  # libraries: warnings and worse
    assert all("level" in line and "timestamp" in line for line in lines)
    assert lines[0]["worker"] == "als-12"


def test_the_level_filters_our_own_lines() -> None:
    events = [line["event"] for line in log_lines("warning")]
    assert "ours_info" not in events and "ours_warning" in events
    assert "ours_debug" in [line["event"] for line in log_lines("debug")]


def test_a_workers_lines_name_it_as_the_broker_does(trained_store: Path) -> None:
    with Cluster(trained_store, {"als": 1}).start() as cluster:
        pid = cluster.workers[0].pid
        worker_log = next(p for p in cluster.root.glob("worker-*.log"))
        lines = [json.loads(line) for line in worker_log.read_text().splitlines()]
    ready = next(line for line in lines if line["event"] == "worker_ready")
    assert ready["worker"] == f"als-{pid}"
