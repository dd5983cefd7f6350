"""One broker per run_dir: an exclusive `flock` on `<run_dir>/broker.lock`.

A second broker on the same run_dir would bind over the live one's IPC sockets and cut its
clients and workers off. The broker takes this lock before it binds anything and holds it for
the life of its process; the kernel drops it when the process ends, however it ends, so a
`kill -9`'d broker leaves no stale lock behind. The file holds the holder's PID, for the message
that names it.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

LOCK_NAME = "broker.lock"
# `uro-recs broker` exits with this when another broker holds its run_dir; `serve` stops with it
# instead of restarting the broker, since retrying cannot help while the other one lives.
EXIT_IN_USE = 3
_PID_WAIT_S = 0.5  # the holder writes its PID just after it locks: give it that moment


class RunDirInUse(RuntimeError):
    """Another live process holds the run_dir's lock; `pid` is its PID when it could be read."""

    def __init__(self, run_dir: Path, pid: int | None) -> None:
        holder = f"PID {pid}" if pid is not None else "another process"
        super().__init__(
            f"run_dir {run_dir} is in use by {holder}; "
            "stop that broker first or use another run_dir"
        )
        self.run_dir = run_dir
        self.pid = pid


class RunLock:
    """A held lock. Keep it for the life of the process; `release` is for tests and tidy exits."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def lock_run_dir(run_dir: Path) -> RunLock:
    """Take the run_dir's lock without waiting (creating the directory and the file if need be),
    write our PID into it, and return it held; raise `RunDirInUse` if a live process holds it."""
    run_dir = run_dir.absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    # O_CLOEXEC: a child must not inherit the descriptor (and with it the lock).
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirInUse(run_dir, _wait_for_pid(path)) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return RunLock(path, fd)


def recorded_pid(run_dir: Path) -> int | None:
    """The PID the lock file names: the holder's while one holds it, else the last holder's."""
    return _read_pid(run_dir.absolute() / LOCK_NAME)


def _wait_for_pid(path: Path) -> int | None:
    deadline = time.monotonic() + _PID_WAIT_S
    while (pid := _read_pid(path)) is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return pid


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None
