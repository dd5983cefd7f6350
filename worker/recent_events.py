"""What users did since the served model's data was exported, for `recommend` to leave out.

A model knows the items a user consumed up to its training data; events ingested since then
(a map played a minute ago) reach the model only at the next retrain. A model worker with
`[worker] recent_events` on keeps, per user, the items of their positive-weight events in
`recs_events` since the model's export, and `recommend` treats them as consumed.

For sequence models (RNN4Rec, DIN, ...) it also keeps each user's newest events in the order
they happened: the worker appends them to the user's training sequence, so a map played a
second ago changes what the user is offered next.

A thread of its own reads them with asyncpg: first everything since the export, then every
`refresh_ms` what was inserted since the last read, in keyset pages on `inserted_at` plus the
primary key. Each read starts `OVERLAP` before the newest `inserted_at` seen, because a
transaction that started earlier (its `now()` is older) can commit after a later one; the
re-read rows are merged as sets, so reading one twice changes nothing. The serving thread
only ever reads `items_of`: each user's set is a frozenset replaced whole, never mutated.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import structlog

from uro_recs.core.config import DatabaseConfig
from uro_recs.core.db import Database
from uro_recs.core.model_store import Manifest
from uro_recs.worker.async_thread import AsyncThread

log = structlog.get_logger("uro_recs.worker.recent_events")

OVERLAP: Final = timedelta(seconds=2)
_NIL: Final = "00000000-0000-0000-0000-000000000000"
PAGE_ROWS: Final = 10_000
SEQUENCE_ITEMS: Final = 50  # per user, for sequence models (they read their last few)
_NO_KEY: Final = (_NIL, "", _NIL, "", datetime.min.replace(tzinfo=UTC))
# Keyset on (inserted_at, primary key): rows sharing one inserted_at (one ingest transaction)
# are never skipped or read forever, whatever the page size.
_PAGE_SQL: Final = """
SELECT user_id::TEXT AS user_id, item_kind, item_id::TEXT AS item_id, event, occurred_at,
       inserted_at
FROM recs_events
WHERE inserted_at >= $1 AND weight > 0
  AND (inserted_at, user_id, item_kind, item_id, event, occurred_at)
      > ($1::TIMESTAMPTZ, $2::UUID, $3::TEXT, $4::UUID, $5::TEXT, $6::TIMESTAMPTZ)
ORDER BY inserted_at, user_id, item_kind, item_id, event, occurred_at
LIMIT $7
"""


def exported_at(manifest: Manifest) -> datetime:
    """When the model's training data was read: `uro-recs sync` records it; for other models
    (trained from a file) the version's creation time, which is later, is the best there is."""
    exported = manifest.data.get("exported_at_unix")
    if exported is not None:
        return datetime.fromtimestamp(exported, UTC)
    return datetime.fromisoformat(manifest.created_at)


class RecentEvents:
    def __init__(self, database: DatabaseConfig, since: datetime, refresh_ms: int) -> None:
        self.database = database
        self.refresh_s = refresh_ms / 1000
        self._items: dict[str, frozenset[str]] = {}
        # Per user, the newest SEQUENCE_ITEMS (occurred_at, item) pairs, oldest first.
        self._sequences: dict[str, tuple[tuple[datetime, str], ...]] = {}
        self._since = since  # the next read starts here (minus OVERLAP)
        self._reset_to: datetime | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._async = AsyncThread("recent-events")
        self._reading: concurrent.futures.Future[None] | None = None
        self._stop = asyncio.Event()

    def start(self, timeout_s: float = 60.0) -> None:
        """Start reading; return once everything since the export is in (or raise why not)."""
        self._async.start()
        self._reading = self._async.submit(self._run())
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"recent events not read within {timeout_s} s")
        if self._failure is not None:
            raise self._failure

    def stop(self) -> None:
        """Stop reading; waits for the reader to close its connection (10 s at most)."""
        if self._async.is_alive():
            self._async.call_soon(self._stop.set)
            with contextlib.suppress(Exception):
                if self._reading is not None:
                    self._reading.result(timeout=10)
        self._async.stop()

    def items_of(self, user: object) -> frozenset[str] | None:
        """The items `user` had events with since the export, or None."""
        return self._items.get(user) if isinstance(user, str) else None

    def sequence_of(self, user: object) -> tuple[str, ...]:
        """The items of `user`'s events since the export in the order they happened (the
        newest SEQUENCE_ITEMS), for sequence models; empty if none."""
        pairs = self._sequences.get(user, ()) if isinstance(user, str) else ()
        return tuple(item for _, item in pairs)

    def reset(self, since: datetime) -> None:
        """After a rollout: forget what was read and read again from the new model's export."""
        self._reset_to = since

    @property
    def users(self) -> int:
        return len(self._items)

    # --- the reading thread -------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._read_forever()
        except BaseException as exc:
            self._failure = exc
            self._ready.set()
            log.exception("recent_events_failed")

    async def _read_forever(self) -> None:
        async with await Database.connect(self.database) as db:
            count = await self._read_new(db, self._items, self._sequences)
            log.info("recent_events_loaded", since=self._since.isoformat(), events=count)
            self._ready.set()
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.refresh_s)
                try:
                    if self._reset_to is not None:
                        # Read into a new map and swap: no moment with an empty filter.
                        self._since, self._reset_to = self._reset_to, None
                        fresh: dict[str, frozenset[str]] = {}
                        fresh_sequences: dict[str, tuple[tuple[datetime, str], ...]] = {}
                        await self._read_new(db, fresh, fresh_sequences)
                        self._items, self._sequences = fresh, fresh_sequences
                    else:
                        await self._read_new(db, self._items, self._sequences)
                except Exception:  # the database may come back: keep what we have, read again
                    log.exception("recent_events_read_failed")

    async def _read_new(
        self,
        db: Database,
        items: dict[str, frozenset[str]],
        sequences: dict[str, tuple[tuple[datetime, str], ...]],
    ) -> int:
        """Merge into `items` every positive event inserted since `_since` - OVERLAP, then
        move `_since` to the newest seen; returns the rows read."""
        start = self._since - OVERLAP
        key: tuple[Any, ...] = _NO_KEY
        newest, read = self._since, 0
        while True:
            rows = await db.fetch(_PAGE_SQL, start, *key, PAGE_ROWS)
            read += len(rows)
            added: dict[str, set[str]] = {}
            happened: dict[str, set[tuple[datetime, str]]] = {}
            for row in rows:
                added.setdefault(row["user_id"], set()).add(row["item_id"])
                happened.setdefault(row["user_id"], set()).add((row["occurred_at"], row["item_id"]))
            for user, new in added.items():
                known = items.get(user, frozenset())
                if not new <= known:
                    items[user] = known | new  # replaced whole: readers never see a set grow
                # Merged as a set (a re-read row changes nothing), kept in time order.
                merged = sorted(set(sequences.get(user, ())) | happened[user])
                sequences[user] = tuple(merged[-SEQUENCE_ITEMS:])
            if rows:
                newest = max(newest, rows[-1]["inserted_at"])
            if len(rows) < PAGE_ROWS:
                break
            last = rows[-1]
            start = last["inserted_at"]
            key = (
                last["user_id"],
                last["item_kind"],
                last["item_id"],
                last["event"],
                last["occurred_at"],
            )
        self._since = newest
        return read
