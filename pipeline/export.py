"""Export uro's interactions for training: backpack saves plus `recs_events`, public items only.

Every table is read in keyset pages on its primary key (never OFFSET), one short statement per
page, so nothing holds a transaction or a cursor open. On CockroachDB every page reads at one
`follower_read_timestamp()` taken at the start: a consistent snapshot served by the nearest
replica. Memory stays bounded by the distinct ids plus about 24 bytes per interaction; the
rows of a page are dropped once encoded.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import asyncpg
import numpy as np
import pandas as pd
import structlog
from tqdm import tqdm

from uro_recs.core.db import Database
from uro_recs.core.protocol import ITEM_KINDS

log = structlog.get_logger(__name__)

ITEM_TABLES: Final = {"avatar": "avatars", "map": "maps", "prop": "props"}
_NIL: Final = uuid.UUID(int=0)  # below every other UUID: the keyset start
_EVENT_KEY: Final = "user_id, item_kind, item_id, event, occurred_at"


@dataclass(frozen=True)
class Export:
    """The training data: one row per (user, item) with the summed weight as label."""

    # user, item (UUID strings), label, time (unix s), item_kind, item_uploader (the
    # uploader's user id, "" when there is none): the last two are the models' item features
    interactions: pd.DataFrame
    catalog: dict[str, str]  # every public item id -> its kind
    n_saves: int  # backpack rows read
    n_events: int  # recs_events rows read
    n_skipped: int  # rows about items that are not public (or not there)
    snapshot: datetime  # what the export read as of
    seconds: float

    @property
    def data_start(self) -> datetime | None:
        return _moment(self.interactions["time"].min()) if len(self.interactions) else None

    @property
    def data_end(self) -> datetime | None:
        return _moment(self.interactions["time"].max()) if len(self.interactions) else None


class Snapshot:
    """Where every page reads from: one AS OF SYSTEM TIME on CockroachDB, "now" elsewhere."""

    def __init__(self, moment: datetime, as_of: bool) -> None:
        self.moment = moment
        # A datetime formatted here, never text from outside: safe to inline.
        stamp = moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00:00")
        self.clause = f"AS OF SYSTEM TIME '{stamp}'" if as_of else ""

    @classmethod
    async def take(cls, db: Database) -> Snapshot:
        if db.flavor == "cockroachdb":
            return cls(await db.fetchval("SELECT follower_read_timestamp()"), as_of=True)
        return cls(await db.fetchval("SELECT now()"), as_of=False)


class _Codes:
    """Strings to dense int codes, so rows are kept as small integer arrays."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}

    def code(self, value: str) -> int:
        found = self.index.get(value)
        if found is None:
            found = self.index[value] = len(self.index)
        return found

    def values(self) -> np.ndarray:  # type: ignore[type-arg]
        return np.array(list(self.index), dtype=object)


class _Collector:
    def __init__(self, catalog: dict[str, str], uploaders: dict[str, str]) -> None:
        self.catalog = catalog
        self.uploaders = uploaders
        self.users = _Codes()
        self.items = _Codes()
        self.kind_of_code: list[int] = []
        self.chunks: list[np.ndarray] = []  # type: ignore[type-arg]
        self.skipped = 0

    def add(self, rows: Sequence[tuple[str, str, str, float, float]]) -> None:
        """(user, item, kind, weight, unix time) rows; unknown or private items skipped."""
        page = np.empty((len(rows), 4), dtype=np.float64)
        kept = 0
        for user, item, kind, weight, moment in rows:
            if self.catalog.get(item) != kind:
                self.skipped += 1
                continue
            item_code = self.items.code(item)
            if item_code == len(self.kind_of_code):
                self.kind_of_code.append(ITEM_KINDS.index(kind))
            page[kept] = (self.users.code(user), item_code, weight, moment)
            kept += 1
        self.chunks.append(page[:kept])

    def frame(self) -> pd.DataFrame:
        rows = np.concatenate(self.chunks) if self.chunks else np.empty((0, 4))
        raw = pd.DataFrame(
            {
                "user": rows[:, 0].astype(np.int64),
                "item": rows[:, 1].astype(np.int64),
                "label": rows[:, 2],
                "time": rows[:, 3],
            }
        )
        # One row per (user, item): weights add up, the first interaction dates the pair.
        pairs = raw.groupby(["user", "item"], sort=False).agg(
            label=("label", "sum"), time=("time", "min")
        )
        pairs = pairs[pairs["label"] > 0].reset_index()
        kinds = np.array(ITEM_KINDS, dtype=object)[np.asarray(self.kind_of_code, dtype=np.int64)]
        items = self.items.values()
        uploader_of_code = np.array([self.uploaders.get(i, "") for i in items], dtype=object)
        frame = pd.DataFrame(
            {
                "user": self.users.values()[pairs["user"].to_numpy()],
                "item": items[pairs["item"].to_numpy()],
                "label": pairs["label"].to_numpy(dtype=np.float32),
                "time": pairs["time"].to_numpy(dtype=np.int64),
                "item_kind": kinds[pairs["item"].to_numpy()] if len(pairs) else [],
                "item_uploader": uploader_of_code[pairs["item"].to_numpy()] if len(pairs) else [],
            }
        )
        return frame.sort_values(["time", "user"], kind="stable", ignore_index=True)


async def read_catalog(
    db: Database,
    page_rows: int,
    snapshot: Snapshot | None = None,
    uploaders: dict[str, str] | None = None,
) -> dict[str, str]:
    """Every public avatar, map and prop: item id (UUID string) -> kind; and into `uploaders`,
    when given, item id -> its uploader's user id (absent when the item has none)."""
    snapshot = snapshot or await Snapshot.take(db)
    catalog: dict[str, str] = {}
    for kind, table in ITEM_TABLES.items():
        after = _NIL
        while True:
            rows = await db.fetch(
                f"SELECT id, uploader_id FROM {table} {snapshot.clause}"
                " WHERE is_public AND id > $1 ORDER BY id LIMIT $2",
                after,
                page_rows,
            )
            for row in rows:
                catalog[str(row["id"])] = kind
                if uploaders is not None and row["uploader_id"] is not None:
                    uploaders[str(row["id"])] = str(row["uploader_id"])
            if len(rows) < page_rows:
                break
            after = rows[-1]["id"]
    return catalog


async def export_interactions(
    db: Database,
    *,
    page_rows: int,
    save_weight: float,
    progress: bool = False,
) -> Export:
    """Read the catalog, every backpack save and every event; see the module docstring."""
    started = time.perf_counter()
    snapshot = await Snapshot.take(db)
    uploaders: dict[str, str] = {}
    catalog = await read_catalog(db, page_rows, snapshot, uploaders)
    collector = _Collector(catalog, uploaders)
    n_saves = await _export_saves(db, snapshot, collector, page_rows, save_weight, progress)
    n_events = await _export_events(db, snapshot, collector, page_rows, progress)
    frame = collector.frame()
    export = Export(
        interactions=frame,
        catalog=catalog,
        n_saves=n_saves,
        n_events=n_events,
        n_skipped=collector.skipped,
        snapshot=snapshot.moment,
        seconds=time.perf_counter() - started,
    )
    log.info(
        "interactions_exported",
        public_items=len(catalog),
        saves=n_saves,
        events=n_events,
        skipped=collector.skipped,
        pairs=len(frame),
        users=int(frame["user"].nunique()),
        items=int(frame["item"].nunique()),
        seconds=round(export.seconds, 3),
    )
    return export


async def _export_saves(
    db: Database,
    snapshot: Snapshot,
    collector: _Collector,
    page_rows: int,
    weight: float,
    progress: bool,
) -> int:
    total = await db.fetchval(f"SELECT count(*) FROM backpack_join {snapshot.clause}")
    query = f"""
        SELECT bj.id, b.owner_id::TEXT AS user_id, bj.avatar_id::TEXT AS avatar_id,
               bj.map_id::TEXT AS map_id, bj.prop_id::TEXT AS prop_id,
               extract(epoch FROM bj.inserted_at)::FLOAT8 AS moment
        FROM backpack_join AS bj JOIN backpacks AS b ON b.id = bj.backpack_id {snapshot.clause}
        WHERE bj.id > $1
        ORDER BY bj.id
        LIMIT $2"""

    def rows_of(page: list[asyncpg.Record]) -> list[tuple[str, str, str, float, float]]:
        out = []
        for row in page:
            user, moment = row["user_id"], row["moment"] or 0.0
            if user is None:
                continue
            for kind in ITEM_KINDS:
                item = row[f"{kind}_id"]
                if item is not None:
                    out.append((user, item, kind, weight, moment))
        return out

    return await _paged(
        db, query, (_NIL,), ("id",), rows_of, collector, page_rows, total, "saves", progress
    )


async def _export_events(
    db: Database, snapshot: Snapshot, collector: _Collector, page_rows: int, progress: bool
) -> int:
    total = await db.fetchval(f"SELECT count(*) FROM recs_events {snapshot.clause}")
    query = f"""
        SELECT {_EVENT_KEY}, weight
        FROM recs_events {snapshot.clause}
        WHERE ({_EVENT_KEY}) > ($1, $2, $3, $4, $5)
        ORDER BY {_EVENT_KEY}
        LIMIT $6"""
    start = (_NIL, "", _NIL, "", datetime(1, 1, 1, tzinfo=UTC))

    def rows_of(page: list[asyncpg.Record]) -> list[tuple[str, str, str, float, float]]:
        return [
            (
                str(row["user_id"]),
                str(row["item_id"]),
                row["item_kind"],
                row["weight"],
                row["occurred_at"].timestamp(),
            )
            for row in page
        ]

    key = tuple(name.strip() for name in _EVENT_KEY.split(","))
    return await _paged(
        db, query, start, key, rows_of, collector, page_rows, total, "events", progress
    )


async def _paged(
    db: Database,
    query: str,
    start: tuple[object, ...],
    key: tuple[str, ...],
    rows_of: Callable[[list[asyncpg.Record]], list[tuple[str, str, str, float, float]]],
    collector: _Collector,
    page_rows: int,
    total: int,
    what: str,
    progress: bool,
) -> int:
    """Fetch `query` page by page, the keyset moving to the last row's `key` columns."""
    after, read = start, 0
    with tqdm(total=total, desc=f"export {what}", unit=" rows", disable=not progress) as bar:
        while True:
            page = await db.fetch(query, *after, page_rows)
            collector.add(rows_of(page))
            read += len(page)
            bar.update(len(page))
            if len(page) < page_rows:
                return read
            after = tuple(page[-1][column] for column in key)


def _moment(seconds: float) -> datetime:
    return datetime.fromtimestamp(float(seconds), UTC)
