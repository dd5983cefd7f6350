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
import math
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

import structlog

from uro_recs.sdk.db import ITEM_KINDS, Database

if TYPE_CHECKING:
    from uro_recs.sdk.db import Connection

log = structlog.get_logger(__name__)

COLUMNS: Final = ("user_id", "item_kind", "item_id", "event", "occurred_at", "weight")
MAX_EVENT_NAME: Final = 64  # recs_events checks the same bound


class InvalidEvent(ValueError):
    pass


@dataclass(frozen=True)
class Event:
    """One interaction: `user_id` did `event` ("play", "view", "save", ...) to an item."""

    user_id: uuid.UUID | str
    item_kind: str  # "avatar", "map" or "prop"
    item_id: uuid.UUID | str
    event: str
    occurred_at: datetime  # timezone-aware; with the other fields, the event's identity
    weight: float = 1.0  # its label weight in training; negative weights cancel others

    def row(self) -> tuple[uuid.UUID, str, uuid.UUID, str, datetime, float]:
        """The validated row, or InvalidEvent saying what is wrong."""
        try:
            user = self.user_id if isinstance(self.user_id, uuid.UUID) else uuid.UUID(self.user_id)
            item = self.item_id if isinstance(self.item_id, uuid.UUID) else uuid.UUID(self.item_id)
        except (ValueError, TypeError, AttributeError) as exc:
            raise InvalidEvent(f"user_id and item_id must be UUIDs: {self}") from exc
        if self.item_kind not in ITEM_KINDS:
            raise InvalidEvent(f"item_kind must be one of {ITEM_KINDS}, got {self.item_kind!r}")
        if not 1 <= len(self.event) <= MAX_EVENT_NAME:
            raise InvalidEvent(f"event must be 1 to {MAX_EVENT_NAME} characters")
        if self.occurred_at.tzinfo is None:
            raise InvalidEvent("occurred_at must be timezone-aware")
        if not math.isfinite(self.weight):
            raise InvalidEvent("weight must be a finite number")
        return user, self.item_kind, item, self.event, self.occurred_at, float(self.weight)


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


class EventWriter:
    """A buffer in front of `recs_events` for a long-lived producer.

    `add` returns once the event is buffered; it waits only when `concurrency` batches are
    already being written (back-pressure). Full batches go at once, a partial one after
    `flush_interval_s`. `flush` writes what is buffered and waits for every batch in flight;
    `close` flushes and stops the timer. A batch that fails (after its retries) makes the
    next `add`, `flush` or `close` raise.
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
        self._lock = asyncio.Lock()  # one drainer at a time: the producer or the timer
        self._buffer: list[tuple[Any, ...]] = []
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

    async def _add_rows(self, rows: list[tuple[Any, ...]]) -> None:
        self._raise_failure()
        if self._timer is None and self._interval > 0:
            self._timer = asyncio.create_task(self._flush_periodically())
        self._buffer.extend(rows)
        self.stats.received += len(rows)
        if len(self._buffer) >= self.batch_rows:
            await self._drain(everything=False)

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
            while len(self._buffer) >= self.batch_rows or (everything and self._buffer):
                await self._slots.acquire()  # before taking rows: cancelling here loses none
                batch = self._buffer[: self.batch_rows]
                del self._buffer[: self.batch_rows]
                task = asyncio.create_task(self._write(batch))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)

    async def _write(self, batch: list[tuple[Any, ...]]) -> None:
        try:
            # Duplicates inside one statement are dropped here: the table would skip them
            # anyway, and one statement must not touch a row twice.
            unique = list(dict.fromkeys(batch))

            async def insert(conn: Connection) -> int:
                status = await conn.execute(_insert_sql(len(unique)), *_flatten(unique))
                return int(status.rsplit(" ", 1)[-1])

            inserted = await self.db.transaction(insert, "ingest_events")
            self.stats.inserted += inserted
            self.stats.batches += 1
        except BaseException as exc:
            self._failure = self._failure or exc
            log.error("event_batch_failed", events=len(batch), error=str(exc))
            raise
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


async def recent_items(
    db: Database, users: Iterable[uuid.UUID | str], since: datetime
) -> dict[str, set[str]]:
    """Items each user had events with since `since` (for example the model's data window
    end): what serving can treat as consumed until the next retrain picks them up."""
    ids = [u if isinstance(u, uuid.UUID) else uuid.UUID(u) for u in users]
    rows = await db.fetch(
        "SELECT user_id::TEXT AS user_id, item_id::TEXT AS item_id FROM recs_events"
        " WHERE user_id = ANY($1::UUID[]) AND occurred_at >= $2 AND weight > 0",
        ids,
        since,
    )
    found: dict[str, set[str]] = {str(u): set() for u in ids}
    for row in rows:
        found[row["user_id"]].add(row["item_id"])
    return found
