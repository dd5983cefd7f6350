"""One broker per run_dir: a second `broker` or `serve` on a live broker's run_dir exits at once,
naming the live one, and leaves it serving."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster import Cluster
from uro_recs.core.run_lock import EXIT_IN_USE, LOCK_NAME, RunDirInUse, lock_run_dir, recorded_pid

# Tries the lock in a fresh process: prints "locked" (then holds it until stdin closes) or
# "in use by <pid>".
TRY_LOCK = r"""
import sys
from pathlib import Path
from uro_recs.core.run_lock import RunDirInUse, lock_run_dir
try:
    lock = lock_run_dir(Path(sys.argv[1]))
except RunDirInUse as error:
    print(f"in use by {error.pid}", flush=True)
else:
    print("locked", flush=True)
    sys.stdin.read()
"""


def try_lock(run_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", TRY_LOCK, str(run_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def first_line(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    return process.stdout.readline().strip()


def test_a_held_run_dir_is_refused_to_another_process_naming_the_holder(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    lock = lock_run_dir(run_dir)
    try:
        assert (run_dir / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        assert recorded_pid(run_dir) == os.getpid()
        other = try_lock(run_dir)
        assert first_line(other) == f"in use by {os.getpid()}"
        assert other.wait(timeout=30) == 0
        with pytest.raises(RunDirInUse, match=f"is in use by PID {os.getpid()}; stop that broker"):
            lock_run_dir(run_dir)  # another open of the file, in this process: refused too
    finally:
        lock.release()
    assert not lock.held
    after = try_lock(run_dir)
    assert first_line(after) == "locked"
    after.communicate("", timeout=30)


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    holder = try_lock(tmp_path)
    assert first_line(holder) == "locked"
    assert recorded_pid(tmp_path) == holder.pid
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    lock = lock_run_dir(tmp_path)  # the kernel dropped the dead process's lock
    assert recorded_pid(tmp_path) == os.getpid()
    lock.release()


def wait_until_serving(cluster: Cluster, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert cluster.broker is not None and cluster.broker.poll() is None, cluster.logs()
        try:
            cluster.stats()
            return
        except TimeoutError:
            assert time.monotonic() < deadline, cluster.logs()


def assert_still_serving(cluster: Cluster, pid: int) -> None:
    assert cluster.broker is not None and cluster.broker.poll() is None
    assert cluster.broker.pid == pid
    assert recorded_pid(cluster.run_dir) == pid
    assert cluster.stats()["models"] == {}
    assert "ok" in cluster.call("stats")  # the client socket answers (whatever it answers)


def in_use_line(cluster: Cluster, pid: int) -> str:
    return (
        f"uro-recs: run_dir {cluster.run_dir} is in use by PID {pid}; "
        "stop that broker first or use another run_dir"
    )


def test_a_second_broker_on_a_live_run_dir_exits_and_the_first_keeps_serving(
    tmp_path: Path,
) -> None:
    with Cluster(tmp_path, {}) as cluster:
        cluster.start()
        wait_until_serving(cluster)
        assert cluster.broker is not None
        first = cluster.broker.pid
        command = [sys.executable, "-m", "uro_recs.app.cli", "--config", str(cluster.config_path)]
        started = time.monotonic()
        second = subprocess.run([*command, "broker"], capture_output=True, text=True, timeout=60)
        took_s = time.monotonic() - started
        assert second.returncode == EXIT_IN_USE, second.stderr
        assert second.stderr.splitlines() == [in_use_line(cluster, first)]
        assert took_s < 10, f"the second broker took {took_s:.1f} s to give up"
        assert_still_serving(cluster, first)


def test_serve_on_a_live_run_dir_exits_with_the_brokers_reason_and_starts_no_worker(
    tmp_path: Path,
) -> None:
    with Cluster(tmp_path, {}) as cluster:
        cluster.start()
        wait_until_serving(cluster)
        assert cluster.broker is not None
        first = cluster.broker.pid
        # serve needs a model to serve; its worker would fail to load (the store is empty),
        # but it must not even start.
        config = cluster.root / "serve.toml"
        text = cluster.config_path.read_text()
        config.write_text(text + '[[models]]\nname = "als"\nworkers = 1\n')
        command = [sys.executable, "-m", "uro_recs.app.cli", "--config", str(config), "serve"]
        started = time.monotonic()
        serve = subprocess.run(command, capture_output=True, text=True, timeout=60)
        took_s = time.monotonic() - started
        assert serve.returncode == EXIT_IN_USE, serve.stderr
        assert in_use_line(cluster, first) in serve.stderr.splitlines()
        assert "Traceback" not in serve.stderr
        assert '"worker-als-1"' not in serve.stderr  # child_started names every child it starts
        assert took_s < 15, f"serve took {took_s:.1f} s to give up"
        assert_still_serving(cluster, first)
