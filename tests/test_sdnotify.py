"""sd_notify: the module on its own, then a real broker and a real worker talking to a test socket
standing in for systemd's $NOTIFY_SOCKET."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster
from uro_recs.core.sdnotify import Notifier, notify_address, watchdog_interval_s

WATCHDOG_S = 0.5
# The loops wake at least once per heartbeat, so the heartbeat must be well under half the
# watchdog interval for the pings to keep their pace.
FAST_HEARTBEAT = {"heartbeat_ms": 100, "liveness": 10}


class NotifySocket:
    """What systemd listens on: a datagram socket; each datagram is one notification."""

    def __init__(self, address: str) -> None:
        self.address = address  # as $NOTIFY_SOCKET spells it
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        bound = notify_address(address)
        assert bound is not None
        self.sock.bind(bound)

    def receive(self, timeout_s: float) -> tuple[float, str] | None:
        self.sock.settimeout(max(timeout_s, 0.001))
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        return time.monotonic(), data.decode()

    def wait_for(self, field: str, timeout_s: float) -> list[tuple[float, str]]:
        """Every message up to and including the first that has line `field`."""
        messages = []
        deadline = time.monotonic() + timeout_s
        while (message := self.receive(deadline - time.monotonic())) is not None:
            messages.append(message)
            if field in message[1].splitlines():
                return messages
        raise AssertionError(f"no {field} within {timeout_s} s; got {messages}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    directory = Path(tempfile.mkdtemp(prefix="sd-"))  # socket paths must stay short
    listener = NotifySocket(str(directory / "notify"))
    yield listener
    listener.close()
    (directory / "notify").unlink()
    directory.rmdir()


# --- the module -----------------------------------------------------------------------------


def test_ready_is_one_datagram_with_its_status(notify_socket: NotifySocket) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": notify_socket.address})
    notifier.ready("serving")
    assert notify_socket.receive(1.0) is not None
    assert notify_socket.receive(0.05) is None
    notifier.close()


def test_notify_reaches_an_abstract_socket() -> None:
    listener = NotifySocket(f"@uro-recs-test-{uuid.uuid4().hex}")
    try:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": listener.address})
        notifier.ready()
        received = listener.receive(1.0)
        assert received is not None and received[1] == "READY=1"
        notifier.close()
    finally:
        listener.close()


def test_without_notify_socket_nothing_is_sent_and_nothing_fails() -> None:
    notifier = Notifier.from_environ({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled and notifier.watchdog_s is None
    notifier.ready()
    notifier.tick()
    notifier.stopping()
    assert notifier.send("READY=1") is False


def test_a_vanished_notify_socket_is_logged_not_raised(tmp_path: Path) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.send("READY=1") is False


def test_watchdog_setting_for_another_process_is_ignored() -> None:
    env = {"WATCHDOG_USEC": "2000000"}
    assert watchdog_interval_s(env, os.getpid()) == 2.0
    assert watchdog_interval_s({**env, "WATCHDOG_PID": str(os.getpid())}, os.getpid()) == 2.0
    assert watchdog_interval_s({**env, "WATCHDOG_PID": "1"}, os.getpid()) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}, os.getpid()) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "soon"}, os.getpid()) is None


def test_tick_pings_the_watchdog_at_half_its_interval(notify_socket: NotifySocket) -> None:
    env = {"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "200000"}
    notifier = Notifier.from_environ(env)
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        notifier.tick()
        time.sleep(0.005)
    pings = []
    while (message := notify_socket.receive(0.05)) is not None:
        assert message[1] == "WATCHDOG=1"
        pings.append(message)
    assert 9 <= len(pings) <= 11  # at 0, 0.1, ..., 0.9 s
    notifier.close()


def test_stopping_is_sent_once(notify_socket: NotifySocket) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": notify_socket.address})
    notifier.stopping("draining")
    notifier.stopping("draining")
    first = notify_socket.receive(1.0)
    assert first is not None and first[1] == "STOPPING=1\nSTATUS=draining"
    assert notify_socket.receive(0.1) is None
    notifier.close()


# --- the broker and a worker ------------------------------------------------------------------


def spawn(
    cluster: Cluster, notify: NotifySocket, *args: str, watchdog: bool = True
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "NOTIFY_SOCKET": notify.address}
    if watchdog:
        env["WATCHDOG_USEC"] = str(int(WATCHDOG_S * 1_000_000))
    command = [
        sys.executable,
        "-m",
        "uro_recs.app.cli",
        "--config",
        str(cluster.config_path),
        *args,
    ]
    with (cluster.root / f"{args[0]}-notified.log").open("wb") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def assert_watchdog_pace(notify: NotifySocket, seconds: float) -> None:
    """WATCHDOG=1 alone, never faster than half the interval, never a gap near the interval."""
    while (queued := notify.receive(0)) is not None:  # read late, so their times are not theirs
        assert queued[1] == "WATCHDOG=1"
    pings = []
    end = time.monotonic() + seconds
    while (message := notify.receive(end - time.monotonic())) is not None:
        assert message[1] == "WATCHDOG=1"
        pings.append(message[0])
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert len(pings) >= seconds / WATCHDOG_S, pings
    assert min(gaps) >= WATCHDOG_S / 2 - 0.05, gaps
    assert max(gaps) < WATCHDOG_S * 0.8, gaps


def stop_and_expect_stopping(process: subprocess.Popen[bytes], notify: NotifySocket) -> None:
    process.send_signal(signal.SIGTERM)
    messages = notify.wait_for("STOPPING=1", timeout_s=5)
    assert all(m[1] == "WATCHDOG=1" for m in messages[:-1])
    assert process.wait(timeout=20) == 0


def test_broker_sends_ready_only_after_binding_then_pings_and_stopping_on_sigterm(
    trained_store: Path, notify_socket: NotifySocket
) -> None:
    with Cluster(trained_store, {"als": 1}, broker=FAST_HEARTBEAT) as cluster:
        broker = spawn(cluster, notify_socket, "broker")
        cluster.broker = broker
        _, ready = notify_socket.wait_for("READY=1", timeout_s=30)[-1]
        assert ready == "READY=1\nSTATUS=serving"
        # READY=1 comes after the bind: the sockets are there and answer.
        assert {p.name for p in cluster.run_dir.iterdir()} >= {
            "client.sock",
            "control.sock",
            "workers.sock",
        }
        assert cluster.stats()["draining"] is False
        assert_watchdog_pace(notify_socket, seconds=2.0)
        stop_and_expect_stopping(broker, notify_socket)


def test_worker_sends_ready_once_warm_and_registered_then_pings_and_stopping_on_sigterm(
    trained_store: Path, notify_socket: NotifySocket
) -> None:
    with Cluster(trained_store, {"als": 1}, broker=FAST_HEARTBEAT) as cluster:
        cluster.broker = cluster.spawn("broker")
        cluster.wait_for_workers({})
        worker = spawn(cluster, notify_socket, "worker", "--instance", "als-1")
        cluster.workers.append(worker)
        messages = notify_socket.wait_for("READY=1", timeout_s=120)
        assert len(messages) == 1  # nothing before READY=1: the watchdog starts after it
        assert messages[0][1].startswith("READY=1\nSTATUS=serving als ")
        # The worker announced itself to the broker before telling systemd it is ready.
        cluster.wait_for_workers({"als": 1}, timeout_s=1.0)
        assert_watchdog_pace(notify_socket, seconds=2.0)
        stop_and_expect_stopping(worker, notify_socket)
