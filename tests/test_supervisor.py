"""`uro-recs serve`: the broker and workers as children, crashed workers restarted."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.cluster import Cluster


def _children(pid: int) -> dict[int, list[str]]:
    found = {}
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        argv = Path(f"/proc/{child}/cmdline").read_bytes().decode().split("\0")
        found[int(child)] = argv
    return found


def _worker_pids(pid: int) -> set[int]:
    return {child for child, argv in _children(pid).items() if "worker" in argv}


def test_serve_restarts_a_killed_worker_and_stops_cleanly(
    trained_store: Path, demo_users: list[str]
) -> None:
    cluster = Cluster(trained_store, {"als": 2})
    with cluster, cluster.serve() as serve:
        cluster.wait_for_workers({"als": 2})
        before = _worker_pids(serve.pid)
        assert len(before) == 2
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            after = _worker_pids(serve.pid)
            if len(after) == 2 and victim not in after:
                break
            assert time.monotonic() < deadline, "the killed worker was not restarted"
            time.sleep(0.1)
        cluster.wait_for_workers({"als": 2}, timeout_s=60)
        assert cluster.call("recommend", model="als", args={"user": demo_users[0]})["ok"]
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=30) == 0
