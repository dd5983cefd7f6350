"""Model workers' view of recent events: keyset reads of recs_events since the model's export."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.db_fixtures import empty_database, make_config, wait_until, with_database  # noqa: F401
from uro_recs.core.db import Database, migrate
from uro_recs.worker import recent_events
from uro_recs.worker.recent_events import RecentEvents

if TYPE_CHECKING:
    from uro_recs.core.db import Connection

NOW = datetime.now(UTC)
USERS = [str(uuid.UUID(int=100 + i)) for i in range(5)]


def event_rows(n: int, seed: int, weight: float = 1.0) -> list[tuple[object, ...]]:
    return [
        (USERS[i % 5], "map", str(uuid.UUID(int=seed * 1_000 + i)), "play", NOW, weight)
        for i in range(n)
    ]


def insert(url: str, rows: list[tuple[object, ...]], inserted_at: datetime | None = None) -> None:
    """One transaction, so every row shares one inserted_at (now() unless given)."""

    async def write(db: Database) -> None:
        async def in_one(conn: Connection) -> None:
            for row in rows:
                await conn.execute(
                    "INSERT INTO recs_events (user_id, item_kind, item_id, event, occurred_at,"
                    " weight, inserted_at) VALUES ($1::UUID, $2, $3::UUID, $4, $5, $6,"
                    " COALESCE($7::TIMESTAMPTZ, now()))",
                    *row,
                    inserted_at,
                )

        await db.transaction(in_one, "insert_events")

    with_database(url, write)


def expected(rows: list[tuple[object, ...]]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for row in rows:
        found.setdefault(str(row[0]), set()).add(str(row[2]))
    return found


@pytest.fixture
def small_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recent_events, "PAGE_ROWS", 7)  # far fewer than one transaction's rows


@pytest.fixture
def database(empty_database: str) -> Iterator[str]:  # noqa: F811
    with_database(empty_database, migrate)
    yield empty_database


def reader(url: str, since: datetime) -> RecentEvents:
    config = make_config(url, Path(".")).database
    events = RecentEvents(config, since, refresh_ms=50)
    events.start()
    return events


def snapshot(events: RecentEvents) -> dict[str, set[str]]:
    return {u: set(items) for u in USERS if (items := events.items_of(u))}


def test_events_since_the_export_are_read_in_pages_and_then_followed(
    database: str, small_pages: None
) -> None:
    old = event_rows(20, seed=1)
    insert(database, old, inserted_at=NOW - timedelta(hours=1))  # before the export: not wanted
    first = event_rows(50, seed=2)
    insert(database, first)  # 50 rows with one inserted_at, read 7 at a time
    insert(database, event_rows(5, seed=3, weight=-1.0))  # negative events consume nothing
    events = reader(database, since=NOW - timedelta(minutes=1))
    try:
        assert snapshot(events) == expected(first)
        later = event_rows(30, seed=4)
        insert(database, later)
        wait_until(lambda: snapshot(events) == expected(first + later), timeout_s=10)
        assert events.items_of(12345) is None  # ids that are not UUID strings have none
    finally:
        events.stop()


def test_after_a_rollout_it_reads_again_from_the_new_models_export(
    database: str, small_pages: None
) -> None:
    rows = event_rows(25, seed=5)
    insert(database, rows)
    events = reader(database, since=NOW - timedelta(minutes=1))
    try:
        assert snapshot(events) == expected(rows)
        events.reset(datetime.now(UTC) + timedelta(minutes=1))  # a model trained on all of it
        wait_until(lambda: snapshot(events) == {}, timeout_s=10)
        newer = event_rows(10, seed=6)
        insert(database, newer, inserted_at=datetime.now(UTC) + timedelta(minutes=2))
        wait_until(lambda: snapshot(events) == expected(newer), timeout_s=10)
    finally:
        events.stop()


def test_a_worker_that_cannot_read_recent_events_says_so_and_exits(trained_store: Path) -> None:
    env = {
        **os.environ,
        "URO_RECS_STORE": str(trained_store),
        "URO_RECS_WORKER_RECENT_EVENTS": "true",
        "URO_RECS_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nowhere",  # nothing listens
        "URO_RECS_DATABASE_RETRY_ATTEMPTS": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "uro_recs.app.cli", "worker", "--model", "als"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
    assert "cannot read recs_events" in done.stderr
