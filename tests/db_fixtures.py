"""Database fixtures: a throwaway PostgreSQL database per test module, uro's tables (a subset
of their columns, typed as Ecto makes them) filled with a synthetic community, and a TCP proxy
that can drop every connection and refuse new ones, like a database restart.

Tests reach the server at URO_RECS_TEST_POSTGRES (default: local, trust auth) and never touch
any database but the ones they create. Import the fixtures a test module uses from here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import numpy as np
import pandas as pd
import pytest

from uro_recs.core.config import Config, DatabaseConfig, SyncConfig
from uro_recs.core.db import Database, migrate

T = TypeVar("T")

ADMIN_URL = os.environ.get(
    "URO_RECS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
# Small enough to sync in a few seconds on two cores, large enough that ALS beats popularity.
COMMUNITY_SIZES = {"n_users": 800, "n_items": 1200, "n_interactions": 30_000, "seed": 7}
PRIVATE_SHARE = 0.1  # items uploaded but not public: never exported, never recommended
EVENT_SHARE = 0.25  # interactions stored as recs_events instead of backpack saves

URO_TABLES = """
CREATE TABLE users (
    id UUID PRIMARY KEY, username TEXT NOT NULL, display_name TEXT,
    created_at TIMESTAMP NOT NULL, updated_at TIMESTAMP NOT NULL
);
CREATE TABLE avatars (
    id UUID PRIMARY KEY, name TEXT, description TEXT, uploader_id UUID REFERENCES users (id),
    is_public BOOL NOT NULL DEFAULT false,
    inserted_at TIMESTAMP NOT NULL, updated_at TIMESTAMP NOT NULL
);
CREATE TABLE maps (LIKE avatars INCLUDING ALL);
CREATE TABLE props (LIKE avatars INCLUDING ALL);
CREATE TABLE shared_files (
    id UUID PRIMARY KEY, name TEXT, uploader_id UUID REFERENCES users (id), tags VARCHAR[],
    is_public BOOL NOT NULL DEFAULT false, created_at TIMESTAMP NOT NULL
);
CREATE TABLE backpacks (id UUID PRIMARY KEY, owner_id UUID REFERENCES users (id));
CREATE TABLE backpack_join (
    id UUID PRIMARY KEY, backpack_id UUID NOT NULL REFERENCES backpacks (id),
    map_id UUID REFERENCES maps (id), avatar_id UUID REFERENCES avatars (id),
    prop_id UUID REFERENCES props (id),
    inserted_at TIMESTAMP NOT NULL, updated_at TIMESTAMP NOT NULL
);
CREATE TABLE friendships (
    user_id UUID NOT NULL REFERENCES users (id), friend_id UUID NOT NULL REFERENCES users (id),
    accepted_at TIMESTAMP, PRIMARY KEY (user_id, friend_id)
);
"""


def database_url(name: str) -> str:
    parts = urlsplit(ADMIN_URL)
    return urlunsplit(parts._replace(path=f"/{name}"))


@dataclass(frozen=True)
class Community:
    """What the fixture wrote into uro's tables, and what the export should make of it."""

    interactions: pd.DataFrame  # every generated interaction: user, item, label, time, kind
    public: dict[str, str]  # public item -> kind
    private: set[str]
    saves: pd.DataFrame  # the rows stored as backpack saves
    events: pd.DataFrame  # the rows stored as recs_events ("play")
    extra_views: pd.DataFrame  # "view" events on pairs that were also saved

    def expected_pairs(self) -> pd.DataFrame:
        """(user, item) -> summed label over saves and events, public items only."""
        rows = pd.concat([self.saves, self.events, self.extra_views])
        rows = rows[rows["item"].isin(self.public.keys())]
        return rows.groupby(["user", "item"])["label"].sum().reset_index()


def make_community(**sizes: int) -> Community:
    """A synthetic community: COMMUNITY_SIZES unless `sizes` says otherwise."""
    from uro_recs.pipeline.demo_data import make_interactions

    data = make_interactions(**{**COMMUNITY_SIZES, **sizes})
    data = data.rename(columns={"item_kind": "kind"})
    rng = np.random.default_rng(5)
    items = data.drop_duplicates("item")[["item", "kind"]]
    private_mask = rng.random(len(items)) < PRIVATE_SHARE
    public = dict(zip(items["item"][~private_mask], items["kind"][~private_mask], strict=True))
    as_event = rng.random(len(data)) < EVENT_SHARE
    saves = data[~as_event]
    viewed = saves.sample(frac=0.05, random_state=3)
    extra_views = viewed.assign(label=0.5, time=viewed["time"] + 60)
    return Community(
        interactions=data,
        public=public,
        private=set(items["item"][private_mask]),
        saves=saves,
        events=data[as_event],
        extra_views=extra_views,
    )


def _naive(seconds: float) -> datetime:
    return datetime.fromtimestamp(float(seconds), UTC).replace(tzinfo=None)


async def load_community(url: str, community: Community) -> None:
    """Create uro's tables and fill them: users, items (some private), backpacks, saves, events."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(URO_TABLES)
        data = community.interactions
        now = datetime(2026, 11, 27)
        users = sorted(set(data["user"]))
        await conn.copy_records_to_table(
            "users",
            columns=["id", "username", "display_name", "created_at", "updated_at"],
            records=[
                (uuid.UUID(u), f"user{i}", f"User {i}", now, now) for i, u in enumerate(users)
            ],
        )
        items = data.drop_duplicates("item")
        for kind, table in (("avatar", "avatars"), ("map", "maps"), ("prop", "props")):
            of_kind = items[items["kind"] == kind]["item"]
            await conn.copy_records_to_table(
                table,
                columns=["id", "name", "uploader_id", "is_public", "inserted_at", "updated_at"],
                records=[
                    (
                        uuid.UUID(i),
                        f"{kind} {n}",
                        uuid.UUID(users[n % len(users)]),
                        i in community.public,
                        now,
                        now,
                    )
                    for n, i in enumerate(of_kind)
                ],
            )
        backpacks = {u: uuid.uuid4() for u in users}
        await conn.copy_records_to_table(
            "backpacks",
            columns=["id", "owner_id"],
            records=[(b, uuid.UUID(u)) for u, b in backpacks.items()],
        )
        records = []
        for user, item, kind, moment in community.saves[
            ["user", "item", "kind", "time"]
        ].itertuples(index=False):
            ids: dict[str, uuid.UUID | None] = {"avatar": None, "map": None, "prop": None}
            ids[kind] = uuid.UUID(item)
            stamp = _naive(moment)
            records.append(
                (
                    uuid.uuid4(),
                    backpacks[user],
                    ids["map"],
                    ids["avatar"],
                    ids["prop"],
                    stamp,
                    stamp,
                )
            )
        await conn.copy_records_to_table(
            "backpack_join",
            columns=[
                "id",
                "backpack_id",
                "map_id",
                "avatar_id",
                "prop_id",
                "inserted_at",
                "updated_at",
            ],
            records=records,
        )
    finally:
        await conn.close()


def event_records(frame: pd.DataFrame, event: str) -> list[tuple[Any, ...]]:
    return [
        (uuid.UUID(u), kind, uuid.UUID(i), event, datetime.fromtimestamp(float(t), UTC), float(w))
        for u, i, kind, t, w in frame[["user", "item", "kind", "time", "label"]].itertuples(
            index=False
        )
    ]


async def load_events(url: str, community: Community) -> None:
    """The community's events, written straight into recs_events (needs the migrations)."""
    conn = await asyncpg.connect(url)
    try:
        for frame, event in ((community.events, "play"), (community.extra_views, "view")):
            await conn.copy_records_to_table(
                "recs_events",
                columns=["user_id", "item_kind", "item_id", "event", "occurred_at", "weight"],
                records=event_records(frame, event),
            )
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def community() -> Community:
    return make_community()


def _admin(sql: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(ADMIN_URL)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


def fresh_database() -> Iterator[str]:
    """Create a database named for this run, yield its URL, drop it."""
    name = f"uro_recs_test_{secrets.token_hex(6)}"
    _admin(f"CREATE DATABASE {name}")
    try:
        yield database_url(name)
    finally:
        _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def empty_database() -> Iterator[str]:
    """A new, empty database for one test."""
    yield from fresh_database()


@pytest.fixture(scope="module")
def community_database(community: Community) -> Iterator[str]:
    """A database for one test module: uro's tables with the community, migrated, events in."""
    for url in fresh_database():
        asyncio.run(load_community(url, community))

        async def prepare(url: str = url) -> None:
            async with await Database.connect(make_config(url, Path(".")).database) as db:
                await migrate(db)
            await load_events(url, community)

        asyncio.run(prepare())
        yield url


def with_database(url: str, fn: Callable[[Database], Awaitable[T]], **database: Any) -> T:
    """Run `fn` with a connected Database (test settings) in a new event loop."""

    async def main() -> T:
        async with await Database.connect(make_config(url, Path("."), **database).database) as db:
            return await fn(db)

    return asyncio.run(main())


def make_config(url: str, store: Path, **database: Any) -> Config:
    """Settings for tests: quick retries, small pages and batches, training as in CI."""
    db = DatabaseConfig(
        url=url,
        retry_base_delay_s=0.01,
        retry_max_delay_s=0.5,
        retry_attempts=12,
        page_rows=1_000,
        batch_rows=500,
        lease_ttl_s=30.0,
    )
    return Config(
        store=store,
        database=dataclasses.replace(db, **database),
        sync=SyncConfig(model="als", kind="als", threads=2, batch_n=5),
    )


class TcpProxy:
    """127.0.0.1:<port> -> the test server. `outage(s)` drops every connection and refuses
    new ones for s seconds: what clients see while the database restarts."""

    def __init__(self, target_url: str = ADMIN_URL) -> None:
        parts = urlsplit(target_url)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: asyncio.Server | None = None
        self.port = 0
        self.outages = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._call(self._listen())

    def url(self, database: str) -> str:
        name = urlsplit(database).path
        parts = urlsplit(ADMIN_URL)
        return urlunsplit(
            parts._replace(
                netloc=f"{parts.username or 'postgres'}@127.0.0.1:{self.port}", path=name
            )
        )

    def outage(self, seconds: float) -> None:
        """Drop every connection and stop listening now; listen again `seconds` later."""
        self.outages += 1
        self._call(self._stop())
        asyncio.run_coroutine_threadsafe(self._listen_after(seconds), self.loop)

    def close(self) -> None:
        self._call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)

    def _call(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout=10)

    async def _listen(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _listen_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        await self._listen()

    async def _stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for writer in list(self._writers):
            writer.transport.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    running = TcpProxy()
    try:
        yield running
    finally:
        running.close()


def wait_until(condition: Any, timeout_s: float = 60.0, every_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(every_s)
    raise TimeoutError(f"condition not met within {timeout_s} s")
