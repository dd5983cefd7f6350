"""Append interaction events to `recs_events` as they happen, in batches, idempotently.

`ingest_events` writes a finite collection; `EventWriter` buffers a stream (the broker's
`ingest` op feeds one) and flushes it by size or after `flush_interval_s`. Each batch is one
multi-row `INSERT ... ON CONFLICT DO NOTHING` in its own SERIALIZABLE transaction, retried on
SQLSTATE 40001: an event already stored (a replay, or a retry after an unknown commit) is
skipped, so at-least-once delivery upstream becomes exactly-once in the table. There is no
COPY path here: COPY cannot skip conflicts.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import structlog

from uro_recs.core.db import Database
from uro_recs.sdk.events import Event as Event
from uro_recs.sdk.events import InvalidEvent as InvalidEvent

if TYPE_CHECKING:
    from uro_recs.core.db import Connection

log = structlog.get_logger(__name__)

COLUMNS: Final = ("user_id", "item_kind", "item_id", "event", "occurred_at", "weight")


@dataclass
class IngestStats:
    received: int = 0
    inserted: int = 0  # new rows; received - inserted were already there
    batches: int = 0
    seconds: float = 0.0

    @property
    def duplicates(self) -> int:
        return self.received - self.inserted

    @property
    def events_per_s(self) -> float:
        return self.received / self.seconds if self.seconds > 0 else 0.0


async def ingest_events(
    db: Database,
    events: Iterable[Event],
    *,
    batch_rows: int | None = None,
    concurrency: int | None = None,
) -> IngestStats:
    """Validate every event first (nothing is written if one is invalid), then write them."""
    rows = [event.row() for event in events]
    writer = EventWriter(db, batch_rows=batch_rows, concurrency=concurrency)
    started = time.perf_counter()
    await writer._add_rows(rows)
    await writer.close()
    writer.stats.seconds = time.perf_counter() - started
    return writer.stats


@dataclass(slots=True)
class _Unit:
    """Rows buffered together. With `done` set they are one caller's and go in one
    transaction, whose outcome `done` reports; without, they may be split across batches."""

    rows: list[tuple[Any, ...]]
    done: asyncio.Future[None] | None = None


class EventWriter:
    """A buffer in front of `recs_events` for a long-lived producer.

    Two ways in. `add` / `add_many` return once the events are buffered; they wait only when
    `concurrency` batches are already being written (back-pressure). Full batches go at once,
    a partial one after `flush_interval_s`; a batch that fails (after its retries) makes the
    next `add`, `flush` or `close` raise. `submit` returns only when its events are committed
    (or raises why not), all of them in one transaction: group commit, so with a free write
    slot they go at once, and callers that arrive while the slots are busy share the next
    transaction. `flush` writes what is buffered and waits for every batch in flight; `close`
    flushes and stops the timer.
    """

    def __init__(
        self,
        db: Database,
        *,
        batch_rows: int | None = None,
        concurrency: int | None = None,
        flush_interval_s: float = 0.2,
    ) -> None:
        self.db = db
        self.batch_rows = batch_rows or db.config.batch_rows
        self.stats = IngestStats()
        self._slots = asyncio.Semaphore(concurrency or db.config.write_concurrency)
        self._lock = asyncio.Lock()  # one drainer at a time: a producer or the timer
        self._buffer: deque[_Unit] = deque()
        self._buffered = 0  # rows in _buffer
        self._in_flight: set[asyncio.Task[None]] = set()
        self._failure: BaseException | None = None
        self._interval = flush_interval_s
        self._stop = asyncio.Event()
        self._timer: asyncio.Task[None] | None = None

    async def add(self, event: Event) -> None:
        await self._add_rows([event.row()])

    async def add_many(self, events: Iterable[Event]) -> None:
        """Validate all of `events` (raising InvalidEvent before buffering any), then add."""
        await self._add_rows([event.row() for event in events])

    async def submit(self, rows: list[tuple[Any, ...]]) -> None:
        """Write validated rows (as `Event.row` gives them) in one transaction; return once
        it committed. Raises what the transaction raised after its retries."""
        done = asyncio.get_running_loop().create_future()
        self._append(_Unit(rows, done))
        await self._drain(everything=True)
        await done

    async def _add_rows(self, rows: list[tuple[Any, ...]]) -> None:
        self._raise_failure()
        if self._timer is None and self._interval > 0:
            self._timer = asyncio.create_task(self._flush_periodically())
        self._append(_Unit(rows))
        if self._buffered >= self.batch_rows:
            await self._drain(everything=False)

    def _append(self, unit: _Unit) -> None:
        self._buffer.append(unit)
        self._buffered += len(unit.rows)
        self.stats.received += len(unit.rows)

    async def flush(self) -> None:
        await self._drain(everything=True)
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)
        self._raise_failure()

    async def close(self) -> None:
        if self._timer is not None:
            self._stop.set()
            await self._timer  # it stops between drains, never holding rows
            self._timer = None
        await self.flush()

    async def _drain(self, everything: bool) -> None:
        async with self._lock:
            while self._buffered >= self.batch_rows or (everything and self._buffer):
                await self._slots.acquire()  # before taking rows: cancelling here loses none
                task = asyncio.create_task(self._write(self._take_batch()))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)

    def _take_batch(self) -> list[_Unit]:
        """Up to batch_rows rows from the front; a submitted unit whole, even if larger."""
        batch: list[_Unit] = []
        room = self.batch_rows
        while self._buffer and room > 0:
            unit = self._buffer[0]
            if unit.done is None and len(unit.rows) > room:
                batch.append(_Unit(unit.rows[:room]))
                del unit.rows[:room]
                taken = room
            elif unit.done is not None and batch and len(unit.rows) > room:
                break
            else:
                batch.append(self._buffer.popleft())
                taken = len(unit.rows)
            self._buffered -= taken
            room -= taken
        return batch

    async def _write(self, batch: list[_Unit]) -> None:
        try:
            # Duplicates inside one statement are dropped here: the table would skip them
            # anyway, and one statement must not touch a row twice.
            unique = list(dict.fromkeys(row for unit in batch for row in unit.rows))

            async def insert(conn: Connection) -> int:
                status = await conn.execute(_insert_sql(len(unique)), *_flatten(unique))
                return int(status.rsplit(" ", 1)[-1])

            inserted = await self.db.transaction(insert, "ingest_events")
        except Exception as exc:
            log.error("event_batch_failed", events=sum(len(u.rows) for u in batch), error=str(exc))
            for unit in batch:
                if unit.done is None:
                    self._failure = self._failure or exc  # nobody else will hear of it
                elif not unit.done.done():
                    unit.done.set_exception(exc)
        except BaseException:
            for unit in batch:
                if unit.done is not None:
                    unit.done.cancel()
            raise
        else:
            self.stats.inserted += inserted
            self.stats.batches += 1
            for unit in batch:
                if unit.done is not None and not unit.done.done():
                    unit.done.set_result(None)
        finally:
            self._slots.release()

    async def _flush_periodically(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self._interval)
            if self._failure is None:
                await self._drain(everything=True)

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise RuntimeError("an earlier batch of events could not be written") from (
                self._failure
            )


_SQL_CACHE: dict[int, str] = {}


def _insert_sql(n_rows: int) -> str:
    sql = _SQL_CACHE.get(n_rows)
    if sql is None:
        width = len(COLUMNS)
        values = ", ".join(
            f"(${width * i + 1}::UUID, ${width * i + 2}::TEXT, ${width * i + 3}::UUID,"
            f" ${width * i + 4}::TEXT, ${width * i + 5}::TIMESTAMPTZ, ${width * i + 6}::FLOAT8)"
            for i in range(n_rows)
        )
        sql = _SQL_CACHE[n_rows] = (
            f"INSERT INTO recs_events ({', '.join(COLUMNS)}) VALUES {values} ON CONFLICT DO NOTHING"
        )
    return sql


def _flatten(rows: list[tuple[Any, ...]]) -> list[Any]:
    return [value for row in rows for value in row]
