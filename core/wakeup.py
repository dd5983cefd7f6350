"""Waking a zmq poll loop from a signal handler or another thread: a socket pair it polls."""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable


class Wakeup:
    """Register `fileno()` with the loop's poller; `wake()` (or a signal) makes the poll return."""

    def __init__(self) -> None:
        self._read, self._write = socket.socketpair()
        self._read.setblocking(False)
        self._write.setblocking(False)

    def fileno(self) -> int:
        return self._read.fileno()

    def wake(self) -> None:
        self._write.send(b"\0")

    def on_stop_signals(self, handler: Callable[[], None]) -> None:
        """SIGTERM and SIGINT call `handler` and wake the loop at once (not at its next poll)."""
        signal.set_wakeup_fd(self._write.fileno())
        signal.signal(signal.SIGTERM, lambda *_: handler())
        signal.signal(signal.SIGINT, lambda *_: handler())

    def drain(self) -> None:
        try:
            while self._read.recv(512):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        self._read.close()
        self._write.close()
