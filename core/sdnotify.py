"""sd_notify without libsystemd: the protocol is one datagram to `$NOTIFY_SOCKET`.

`Notifier.from_environ()` is a no-op outside systemd, so the broker and the workers use it
unconditionally. The watchdog is pinged from the caller's main loop (`tick()` once per
iteration), never from a thread: a stuck loop stops the pings and systemd restarts the service.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger("uro_recs.core.sdnotify")


def notify_address(value: str) -> bytes | None:
    """The socket address in `$NOTIFY_SOCKET`: a path, or `@name` for an abstract socket."""
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    return None  # an address family this implementation does not speak (e.g. vsock:)


def watchdog_interval_s(environ: Mapping[str, str], pid: int) -> float | None:
    """The watchdog timeout systemd asks of process `pid`, or None when there is none."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    watchdog_pid = environ.get("WATCHDOG_PID", "")
    if usec <= 0 or (watchdog_pid and watchdog_pid != str(pid)):
        return None  # WATCHDOG_PID names another process: the setting is not ours
    return usec / 1_000_000


class Notifier:
    def __init__(self, address: bytes | None, watchdog_s: float | None = None) -> None:
        self.address = address
        self.watchdog_s = watchdog_s if address is not None else None
        self._sock: socket.socket | None = None
        self._next_ping = 0.0
        self._stopping_sent = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        notifier = cls(
            notify_address(env.get("NOTIFY_SOCKET", "")),
            watchdog_interval_s(env, os.getpid()),
        )
        if notifier.watchdog_s is not None:
            log.info("watchdog_enabled", interval_s=notifier.watchdog_s)
        return notifier

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send `KEY=value` lines in one datagram; False (and a log line) when it fails."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(assignments).encode(), self.address)
        except OSError as error:
            log.warning("sd_notify_failed", message=assignments[0], error=str(error))
            return False
        return True

    def ready(self, status: str = "") -> None:
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def stopping(self, status: str = "") -> None:
        if not self._stopping_sent:
            self._stopping_sent = True
            self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def tick(self) -> None:
        """Ping the watchdog if half its interval has passed since the last ping."""
        if self.watchdog_s is None:
            return
        now = time.monotonic()
        if now >= self._next_ping:
            self._next_ping = now + self.watchdog_s / 2
            self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
