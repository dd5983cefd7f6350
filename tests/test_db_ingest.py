"""Event ingest: batched, idempotent on replay, retried on conflicts, fast enough."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from tests.db_fixtures import empty_database, with_database  # noqa: F401
from uro_recs.core.db import Database, migrate
from uro_recs.pipeline.ingest import Event, EventWriter, InvalidEvent, ingest_events

START = datetime(2026, 11, 1, tzinfo=UTC)


def make_events(n: int, seed: int = 1) -> list[Event]:
    users = [uuid.UUID(int=seed * 1_000_003 + i) for i in range(50)]
    items = [uuid.UUID(int=seed * 7_000_001 + i) for i in range(200)]
    kinds = ("avatar", "map", "prop")
    return [
        Event(
            user_id=users[i % len(users)],
            item_kind=kinds[i % 3],
            item_id=items[(i * 7) % len(items)],
            event="play" if i % 5 else "view",
            occurred_at=START + timedelta(seconds=i),
            weight=1.0,
        )
        for i in range(n)
    ]


async def count_events(db: Database) -> int:
    return int(await db.fetchval("SELECT count(*) FROM recs_events"))


def test_a_replayed_event_is_a_no_op(empty_database: str) -> None:  # noqa: F811
    events = make_events(2_000)

    async def replay(db: Database) -> tuple[int, int, int, int]:
        await migrate(db)
        first = await ingest_events(db, events, batch_rows=500)
        again = await ingest_events(db, events[:700] + events[:10], batch_rows=500)
        return first.inserted, again.inserted, again.duplicates, await count_events(db)

    first, again, duplicates, stored = with_database(empty_database, replay)
    assert (first, again, duplicates, stored) == (2_000, 0, 710, 2_000)


def test_an_invalid_event_is_refused_before_anything_is_written(
    empty_database: str,  # noqa: F811
) -> None:
    good = make_events(3)
    bad = Event(good[0].user_id, "hat", good[0].item_id, "play", START)

    async def mixed(db: Database) -> int:
        await migrate(db)
        with pytest.raises(InvalidEvent, match="item_kind"):
            await ingest_events(db, [*good, bad])
        with pytest.raises(InvalidEvent, match="UUID"):
            await ingest_events(db, [Event("not-a-uuid", "map", uuid.uuid4(), "play", START)])
        with pytest.raises(InvalidEvent, match="timezone"):
            await ingest_events(
                db, [Event(uuid.uuid4(), "map", uuid.uuid4(), "play", datetime(2026, 1, 1))]
            )
        return await count_events(db)

    assert with_database(empty_database, mixed) == 0


def test_the_writer_flushes_full_batches_on_its_own_and_the_rest_on_a_timer(
    empty_database: str,  # noqa: F811
) -> None:
    events = make_events(250)

    async def stream(db: Database) -> tuple[int, int, int]:
        await migrate(db)
        writer = EventWriter(db, batch_rows=100, flush_interval_s=0.05)
        for event in events:
            await writer.add(event)
        await asyncio.sleep(0.5)  # two full batches went at once, the last 50 on the timer
        seen = await count_events(db)
        await writer.close()
        return seen, writer.stats.batches, await count_events(db)

    seen, batches, stored = with_database(empty_database, stream)
    assert seen == 250
    assert batches == 3
    assert stored == 250


def test_concurrent_writers_of_overlapping_events_conflict_retry_and_store_each_once(
    empty_database: str,  # noqa: F811
) -> None:
    shared = make_events(2_000, seed=1)
    own = [make_events(1_000, seed=2), make_events(1_000, seed=3)]

    async def race(db: Database) -> tuple[int, int, int]:
        await migrate(db)
        writers = [EventWriter(db, batch_rows=100, concurrency=2, flush_interval_s=0) for _ in own]
        # Both writers send each batch of the shared events at the same moment.
        for start in range(0, len(shared), 100):
            chunk = shared[start : start + 100]
            await asyncio.gather(*(writer.add_many(chunk) for writer in writers))
        for writer, events in zip(writers, own, strict=True):
            await writer.add_many(events)
        await asyncio.gather(*(writer.close() for writer in writers))
        inserted = sum(writer.stats.inserted for writer in writers)
        return inserted, await count_events(db), db.retries.conflicts

    inserted, stored, conflicts = with_database(empty_database, race, pool_size=4)
    assert stored == 4_000
    assert inserted == 4_000
    assert conflicts > 0  # SERIALIZABLE turned the overlap into 40001s, which were retried


def test_submitted_events_share_transactions_and_each_caller_hears_its_own_outcome(
    empty_database: str,  # noqa: F811
) -> None:
    events = make_events(500, seed=4)
    rows = [event.row() for event in events]
    bad_row = (*rows[0][:1], "hat", *rows[0][2:])  # the table's CHECK refuses it

    async def group_commit(db: Database) -> tuple[int, int, int]:
        await migrate(db)
        writer = EventWriter(db, concurrency=1, flush_interval_s=0)
        await asyncio.gather(*(writer.submit(rows[i : i + 5]) for i in range(0, 500, 5)))
        batches = writer.stats.batches
        with pytest.raises(asyncpg.CheckViolationError):
            await writer.submit([bad_row])
        await writer.submit(rows[:5])  # the writer goes on after one caller's failure
        await writer.close()
        return batches, writer.stats.inserted, await count_events(db)

    batches, inserted, stored = with_database(empty_database, group_commit)
    assert batches < 100 / 4  # 100 callers, one write slot: most waited and shared one
    assert (inserted, stored) == (500, 500)
