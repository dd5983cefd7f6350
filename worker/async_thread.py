"""An asyncio event loop on a thread of its own, for the database work of a worker whose main
loop is synchronous (ZeroMQ): the ingest worker's writes and the recent-events reader."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class AsyncThread:
    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name=name)

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run `coroutine` on the loop; raises RuntimeError (and closes it) if the thread is
        not running, so that a caller never waits for a result that cannot come."""
        if not self._thread.is_alive():
            coroutine.close()
            raise RuntimeError(f"the {self._thread.name} thread is not running")
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the loop and wait for its result."""
        return self.submit(coroutine).result()

    def call_soon(self, callback: Callable[[], object]) -> None:
        self.loop.call_soon_threadsafe(callback)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the loop (what runs on it is abandoned) and close it once the thread ended."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=timeout_s)
        if not self._thread.is_alive() and not self.loop.is_closed():
            self.loop.close()
