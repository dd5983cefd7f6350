"""`uro-recs serve`: run the broker plus N workers per model (and the ingest workers, if
enabled), restarting crashed workers.

In production systemd takes this role (systemd/); this is for development, the demo and the
tests. The workers start once the broker holds its run_dir; if another broker holds it, serve
exits with the broker's EXIT_IN_USE and starts no worker. Stop order matters: the broker drains
first (its workers finish what it holds), then the workers are told to stop.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from uro_recs.core.config import Config
from uro_recs.core.run_lock import EXIT_IN_USE, recorded_pid

log = structlog.get_logger("uro_recs.app.supervisor")

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0
HEALTHY_AFTER_S = 60.0  # a child that ran this long restarts from the shortest backoff again
BROKER_LOCK_WAIT_S = 30.0  # workers start once the broker holds its run_dir, or after this


@dataclass(slots=True)
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float = 0.0

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL)
        self.started_at = time.monotonic()
        log.info("child_started", child=self.name, pid=self.process.pid)


class Supervisor:
    def __init__(self, config: Config, config_path: Path | None) -> None:
        self.config = config
        base = [sys.executable, "-m", "uro_recs.app.cli"]
        if config_path is not None:
            base += ["--config", str(config_path)]
        self.broker = Child("broker", [*base, "broker"])
        self.workers = [
            Child(f"worker-{model.name}-{i}", [*base, "worker", "--model", model.name])
            for model in config.models
            for i in range(1, model.workers + 1)
        ]
        if config.ingest.enabled:
            self.workers += [
                Child(f"ingest-{i}", [*base, "ingest-worker"])
                for i in range(1, config.ingest.workers + 1)
            ]
        self.stopping = False
        self.exit_code: int | None = None  # set when serve must stop with a code of its own

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self._request_stop())
        signal.signal(signal.SIGINT, lambda *_: self._request_stop())
        if self._start_broker() == EXIT_IN_USE:
            return EXIT_IN_USE  # the broker printed whose run_dir it is; no worker started
        if not self.stopping:
            for child in self.workers:
                child.start()
        while not self.stopping:
            self._watch(self.broker)
            for child in self.workers:
                self._watch(child)
            time.sleep(0.1)
        return self._stop()

    def _start_broker(self) -> int | None:
        """Start the broker and wait until it holds the run_dir's lock (its PID is in the lock
        file) or exits: its exit code then, else None. Workers started before that could join
        another broker that holds the run_dir."""
        self.broker.start()
        assert self.broker.process is not None
        deadline = time.monotonic() + BROKER_LOCK_WAIT_S
        while not self.stopping and time.monotonic() < deadline:
            code = self.broker.process.poll()
            if code is not None:
                return code  # _watch logs it and restarts the broker, unless it is EXIT_IN_USE
            if recorded_pid(self.config.run_dir) == self.broker.process.pid:
                return None
            time.sleep(0.02)
        if not self.stopping:
            log.warning("broker_lock_not_seen", run_dir=str(self.config.run_dir))
        return None

    def _request_stop(self) -> None:
        self.stopping = True

    def _watch(self, child: Child) -> None:
        now = time.monotonic()
        if child.process is None:
            if now >= child.restart_at:
                child.start()
            return
        code = child.process.poll()
        if code is None:
            return
        ran_s = now - child.started_at
        if child is self.broker and code == EXIT_IN_USE:
            # Another broker holds the run_dir: restarting cannot help while it lives.
            log.error("broker_run_dir_in_use", run_dir=str(self.config.run_dir))
            self.exit_code = EXIT_IN_USE
            self.stopping = True
            return
        child.failures = 1 if ran_s >= HEALTHY_AFTER_S else child.failures + 1
        delay = min(BACKOFF_MAX_S, BACKOFF_START_S * 2 ** (child.failures - 1))
        log.warning(
            "child_exited", child=child.name, code=code, ran_s=round(ran_s, 2), restart_in_s=delay
        )
        child.process = None
        child.restart_at = now + delay

    def _stop(self) -> int:
        log.info("supervisor_stopping")
        self._terminate([self.broker], self.config.broker.drain_timeout_s + 5)
        self._terminate(self.workers, self.config.worker.drain_timeout_s + 5)
        broker_code = self.broker.process.returncode if self.broker.process else 0
        log.info("supervisor_stopped", broker_exit=broker_code)
        if self.exit_code is not None:
            return self.exit_code
        return 0 if broker_code in (0, None) else 1

    @staticmethod
    def _terminate(children: list[Child], timeout_s: float) -> None:
        running = [
            c.process for c in children if c.process is not None and c.process.poll() is None
        ]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for process in running:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("child_killed", pid=process.pid)
                process.kill()
                process.wait()
