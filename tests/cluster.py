"""Real broker and worker processes for integration tests."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import msgpack
import zmq

from uro_recs.core import protocol


class Cluster:
    """A broker process plus worker processes, configured through one TOML file."""

    def __init__(
        self,
        store: Path,
        models: dict[str, int],
        *,
        broker: dict[str, Any] | None = None,
        worker: dict[str, Any] | None = None,
        database: dict[str, Any] | None = None,
        ingest_workers: int = 0,
        model_options: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """`ingest_workers` > 0 enables [ingest]; they write to `database` (its url, retries).
        `model_options` adds settings to a model's [[models]] table, by model name."""
        # IPC paths are limited to ~107 bytes: keep the sockets in a short temporary path.
        self.root = Path(tempfile.mkdtemp(prefix="ur-"))
        self.run_dir = self.root / "run"
        self.config_path = self.root / "uro-recs.toml"
        lines = [f'run_dir = "{self.run_dir}"', f'store = "{store}"', 'log_format = "json"']
        ingest = {"enabled": True, "workers": ingest_workers} if ingest_workers else {}
        sections = {"broker": broker, "worker": worker, "database": database, "ingest": ingest}
        for section, values in ((name, v or {}) for name, v in sections.items()):
            lines.append(f"[{section}]")
            lines += [f"{key} = {_toml(value)}" for key, value in values.items()]
        for name, count in models.items():
            lines += ["[[models]]", f'name = "{name}"', f"workers = {count}"]
            options = (model_options or {}).get(name, {})
            lines += [f"{key} = {_toml(value)}" for key, value in options.items()]
        self.config_path.write_text("\n".join(lines) + "\n")
        self.models = models
        self.ingest_workers = ingest_workers
        self.broker: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.client_endpoint = f"ipc://{self.run_dir / 'client.sock'}"
        self.control_endpoint = f"ipc://{self.run_dir / 'control.sock'}"
        self.context = zmq.Context()

    def spawn(self, *args: str) -> subprocess.Popen[bytes]:
        command = [
            sys.executable,
            "-m",
            "uro_recs.app.cli",
            "--config",
            str(self.config_path),
            *args,
        ]
        with (self.root / f"{args[0]}-{time.monotonic_ns()}.log").open("wb") as log:
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def start(self, wait: bool = True) -> Cluster:
        self.broker = self.spawn("broker")
        for name, count in self.models.items():
            for _ in range(count):
                self.workers.append(self.spawn("worker", "--model", name))
        for _ in range(self.ingest_workers):
            self.start_ingest_worker()
        if wait:
            expected = dict(self.models)
            if self.ingest_workers:
                expected[protocol.INGEST_WORKERS] = self.ingest_workers
            self.wait_for_workers(expected)
        return self

    def start_ingest_worker(self) -> subprocess.Popen[bytes]:
        process = self.spawn("ingest-worker")
        self.workers.append(process)
        return process

    @contextmanager
    def serve(self) -> Iterator[subprocess.Popen[bytes]]:
        """`uro-recs serve` (broker and workers under one supervisor) instead of `start`."""
        command = [sys.executable, "-m", "uro_recs.app.cli", "--config", str(self.config_path)]
        process = subprocess.Popen(
            [*command, "serve"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.broker = process  # wait_for_workers checks this process stays alive
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()
            self.broker = None

    def start_worker(self, model: str) -> subprocess.Popen[bytes]:
        process = self.spawn("worker", "--model", model)
        self.workers.append(process)
        return process

    def fake_worker(self, identity: bytes, hello: protocol.WorkerHello) -> zmq.Socket[bytes]:
        """A DEALER on the workers socket that has sent READY: a worker the test drives."""
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"ipc://{self.run_dir / 'workers.sock'}")
        sock.send_multipart(protocol.encode_ready(hello))
        return sock

    def call(self, op: str, timeout_s: float = 5.0, **fields: Any) -> dict[str, Any]:
        """One request on a fresh DEALER socket; returns the decoded reply map."""
        with self.context.socket(zmq.DEALER) as sock:
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(fields.pop("endpoint", self.client_endpoint))
            sock.send_multipart([b"", protocol.encode_request(1, op, **fields)])
            if not sock.poll(int(timeout_s * 1000)):
                raise TimeoutError(f"no reply to {op} within {timeout_s} s")
            _, body = sock.recv_multipart()
            reply: dict[str, Any] = msgpack.unpackb(body)
            return reply

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("stats", endpoint=self.control_endpoint)["result"]
        return result

    def wait_for_workers(self, expected: dict[str, int], timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_broker_alive()
            try:
                models = self.stats()["models"]
            except TimeoutError:
                models = {}
            if all(models.get(m, {}).get("workers", 0) >= n for m, n in expected.items()):
                return
            time.sleep(0.2)
        raise TimeoutError(f"workers {expected} not ready in {timeout_s} s; logs in {self.root}")

    def _check_broker_alive(self) -> None:
        assert self.broker is not None
        if self.broker.poll() is not None:
            raise RuntimeError(f"broker exited with {self.broker.returncode}; logs in {self.root}")

    def stop(self) -> None:
        for process in [*([self.broker] if self.broker else []), *self.workers]:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in [*([self.broker] if self.broker else []), *self.workers]:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.context.destroy(linger=0)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.root.glob("*.log")))

    def __enter__(self) -> Cluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if exc_type is None:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            print(self.logs()[-20_000:])


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)
