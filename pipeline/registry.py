"""The model registry, `recs_model_versions`: which versions exist and what became of them.

    training -> trained -> published -> rolled_back
          \\          \\-> abandoned (the sync stopped before publishing)
           \\-> rejected (scored below the popularity baseline) | abandoned

A version is published once its row says so (the commit point of a sync); CURRENT in the
store is set right after. `uro-recs rollback` moves CURRENT back in the store and marks the
version it left `rolled_back` here (`record_rollback`), so no later sync or tool takes it for
the newest published one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Final, Literal, TypeAlias

import asyncpg

from uro_recs.core.db import Database

if TYPE_CHECKING:
    from uro_recs.core.db import Connection

Status: TypeAlias = Literal[
    "training", "trained", "rejected", "published", "rolled_back", "abandoned"
]
UNFINISHED: Final[tuple[Status, ...]] = ("training", "trained")
_COLUMNS: Final = (
    "model, version, kind, status, metrics, n_interactions, data_start, data_end, holder,"
    " created_at, updated_at, published_at"
)


@dataclass(frozen=True)
class ModelVersion:
    model: str
    version: str
    kind: str
    status: Status
    metrics: dict[str, float]
    n_interactions: int
    data_start: datetime | None
    data_end: datetime | None
    holder: str
    created_at: datetime
    updated_at: datetime
    published_at: datetime | None

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> ModelVersion:
        metrics = row["metrics"]
        values = {name.strip(): row[name.strip()] for name in _COLUMNS.split(",")}
        values["metrics"] = json.loads(metrics) if isinstance(metrics, str) else dict(metrics)
        return cls(**values)


async def record_training(
    conn: Connection,
    *,
    model: str,
    version: str,
    kind: str,
    holder: str,
    n_interactions: int,
    data_start: datetime | None,
    data_end: datetime | None,
) -> None:
    await conn.execute(
        """
        INSERT INTO recs_model_versions
            (model, version, kind, status, n_interactions, data_start, data_end, holder)
        VALUES ($1, $2, $3, 'training', $4, $5, $6, $7)
        ON CONFLICT (model, version) DO NOTHING
        """,
        model,
        version,
        kind,
        n_interactions,
        data_start,
        data_end,
        holder,
    )


async def set_status(
    conn: Connection,
    model: str,
    version: str,
    status: Status,
    *,
    expected: tuple[Status, ...],
    metrics: Mapping[str, float] | None = None,
) -> bool:
    """Move one version from any of the `expected` statuses to `status`.

    Returns False when the version was not in one of them. Running it again after it
    succeeded (a retried transaction) finds the version already there and returns True.
    """
    found = await conn.fetchval(
        "SELECT status FROM recs_model_versions WHERE model = $1 AND version = $2",
        model,
        version,
    )
    if found == status:
        return True
    if found not in expected:
        return False
    await conn.execute(
        """
        UPDATE recs_model_versions
        SET status = $3, updated_at = now(),
            metrics = COALESCE($4::JSONB, metrics),
            published_at = CASE WHEN $3 = 'published' THEN now() ELSE published_at END
        WHERE model = $1 AND version = $2
        """,
        model,
        version,
        status,
        None if metrics is None else json.dumps(dict(metrics), sort_keys=True),
    )
    return True


async def versions(db: Database, model: str) -> list[ModelVersion]:
    """Every registered version of `model`, oldest first."""
    rows = await db.fetch(
        f"SELECT {_COLUMNS} FROM recs_model_versions WHERE model = $1 ORDER BY version", model
    )
    return [ModelVersion.from_row(row) for row in rows]


async def newest_published(db: Database, model: str) -> str | None:
    """The newest version a sync published (and nobody rolled back)."""
    value = await db.fetchval(
        "SELECT version FROM recs_model_versions WHERE model = $1 AND status = 'published'"
        " ORDER BY version DESC LIMIT 1",
        model,
    )
    return None if value is None else str(value)


async def record_rollback(db: Database, model: str, version: str) -> bool:
    """Mark `version`, which a rollback left, `rolled_back`. False when the registry has no
    published row for it (a version published by hand, or by `train --publish`)."""

    async def mark(conn: Connection) -> bool:
        return await set_status(conn, model, version, "rolled_back", expected=("published",))

    return await db.transaction(mark, "record_rollback")
