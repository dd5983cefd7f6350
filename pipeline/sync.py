"""`uro-recs sync`: export -> train -> evaluate -> publish, one sync per model at a time.

Publishing means three things, in this order: the version is written into the model store
(atomically: temporary directory, fsync, rename), the registry row turns `published` (the
commit point, checked against the sync's lease in the same transaction), and CURRENT points
at it. A sync that dies anywhere leaves no published version behind that is not complete in
the store, and CURRENT only ever points at a complete, published version; the next sync marks
what it left `abandoned` and deletes its unpublished files. Rolling the workers onto the new
version is the broker's job (`uro-recs rollout`).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import asyncpg
import structlog

from uro_recs.core.config import Config
from uro_recs.core.db import Database, Lease, load_migrations
from uro_recs.core.families import KINDS
from uro_recs.pipeline import registry
from uro_recs.pipeline.export import Export, export_interactions

if TYPE_CHECKING:
    from uro_recs.core.db import Connection
    from uro_recs.pipeline.training import TrainedModel

log = structlog.get_logger(__name__)

# The publish gate: the model must find at least as many held-out items as the popularity
# baseline. ndcg@10 is reported beside it but does not gate: libreco normalises it by the
# hits a list found, so it ranks the order of those hits, not how many there are.
GATED_METRICS: Final = ("recall@10",)
REPORTED_METRICS: Final = ("recall@10", "ndcg@10")  # each shown with popularity_<name>


class SyncError(Exception):
    """The sync cannot go on; nothing was published."""


@dataclass
class SyncReport:
    model: str
    kind: str
    version: str = ""
    status: str = ""  # "published" or "rejected"
    went_live: bool = False  # published and made CURRENT ([sync] go_live)
    metrics: dict[str, float] = field(default_factory=dict)
    export: Export | None = None
    recovered: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    retries: int = 0
    flavor: str = ""

    def summary(self) -> str:
        lines = [f"sync {self.model} ({self.kind}) on {self.flavor}: {self.status.upper()}"]
        lines += [f"  recovered: {note}" for note in self.recovered]
        if self.export is not None:
            frame = self.export.interactions
            lines.append(
                f"  export:   {self.export.n_saves:,} saves + {self.export.n_events:,} events"
                f" -> {len(frame):,} interactions, {frame['user'].nunique():,} users,"
                f" {frame['item'].nunique():,} items ({self.export.n_skipped:,} rows about"
                f" private or missing items skipped); {len(self.export.catalog):,} public items"
            )
            start, end = self.export.data_start, self.export.data_end
            if start is not None and end is not None:
                lines.append(f"  window:   {start:%Y-%m-%d %H:%M} .. {end:%Y-%m-%d %H:%M} UTC")
        if self.metrics:
            model = ", ".join(
                f"{m} {self.metrics.get(m, float('nan')):.4f}" for m in REPORTED_METRICS
            )
            base = ", ".join(
                f"{m} {self.metrics.get('popularity_' + m, float('nan')):.4f}"
                for m in REPORTED_METRICS
            )
            lines.append(f"  model:    {model}")
            gate = " and ".join(GATED_METRICS)
            lines.append(f"  baseline: {base} (most popular items; {gate} must reach it)")
        lines.append(
            "  time:     "
            + ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in self.timings.items())
        )
        if self.retries:
            lines.append(f"  retried:  {self.retries} transactions (conflicts, lost connections)")
        if self.status == "published" and self.went_live:
            lines.append(f"  version:  {self.version} is published and CURRENT in the store")
            lines.append(f"  next:     uro-recs rollout {self.model} (the retrain unit does)")
        elif self.status == "published":
            lines.append(
                f"  version:  {self.version} is published; CURRENT is unchanged ([sync] go_live"
                " = false)"
            )
            lines.append(f"  to serve: uro-recs rollout {self.model} {self.version}")
        elif self.status == "rejected":
            lines.append(
                f"  version:  {self.version} scored below the popularity baseline and was not"
                " published (--force publishes it anyway)"
            )
        return "\n".join(lines)


def beats_baseline(metrics: dict[str, float]) -> bool:
    """True when the model is at least as good as the popularity baseline (GATED_METRICS)."""
    return all(
        name in metrics and metrics[name] >= metrics.get(f"popularity_{name}", float("inf"))
        for name in GATED_METRICS
    )


async def run_sync(
    config: Config,
    *,
    model: str | None = None,
    kind: str | None = None,
    force: bool = False,
    progress: bool = False,
    say: Callable[[str], None] = lambda _line: None,
    epochs: int | None = None,
) -> SyncReport:
    """One sync; see the module docstring. `say` receives one progress line per phase."""
    name = model or config.sync.model
    chosen_kind = kind or config.sync.kind
    if chosen_kind not in KINDS:
        raise SyncError(f"unknown model kind {chosen_kind!r}; choose one of {', '.join(KINDS)}")
    report = SyncReport(model=name, kind=chosen_kind)
    started = time.perf_counter()
    db = await Database.connect(config.database)
    report.flavor = db.flavor
    try:
        await require_migrations(db)
        async with Lease(db, f"sync:{name}", config.database.lease_ttl_s) as lease:
            report.recovered = await recover(db, config.store, name)
            for note in report.recovered:
                say(f"recovered: {note}")
            await _sync_locked(db, lease, config, report, force, progress, say, epochs)
    finally:
        report.retries = db.retries.conflicts + db.retries.connection_losses
        await db.close()
    report.timings["total"] = time.perf_counter() - started
    return report


async def _sync_locked(
    db: Database,
    lease: Lease,
    config: Config,
    report: SyncReport,
    force: bool,
    progress: bool,
    say: Callable[[str], None],
    epochs: int | None,
) -> None:
    from uro_recs.core.model_store import save_version, set_current

    phase = time.perf_counter()
    say("exporting interactions ...")
    export = await export_interactions(
        db,
        page_rows=config.database.page_rows,
        save_weight=config.sync.save_weight,
        progress=progress,
    )
    report.export = export
    report.timings["export"] = time.perf_counter() - phase
    frame = export.interactions
    say(f"exported {len(frame):,} interactions in {report.timings['export']:.1f} s")
    if frame.empty:
        raise SyncError("no interactions with public items to train on")

    version = _unique_version(config.store, report.model, await registry.versions(db, report.model))
    report.version = version

    async def record(conn: Connection) -> None:
        await registry.record_training(
            conn,
            model=report.model,
            version=version,
            kind=report.kind,
            holder=lease.holder,
            n_interactions=len(frame),
            data_start=export.data_start,
            data_end=export.data_end,
        )

    await db.transaction(record, "record_training")

    phase = time.perf_counter()
    say(f"training {report.kind} on {len(frame):,} interactions ...")
    trained = await asyncio.to_thread(_train, frame, report.kind, config, epochs)
    # Workers with [worker] recent_events read the events inserted after this moment.
    trained.data["exported_at_unix"] = int(export.snapshot.timestamp())
    report.metrics = dict(trained.metrics)
    report.timings["train"] = time.perf_counter() - phase
    say(f"trained and evaluated in {report.timings['train']:.1f} s")
    lease.check()

    good = beats_baseline(report.metrics)
    if not good and not force:
        await _move(db, report, "rejected", ("training",), report.metrics)
        report.status = "rejected"
        log.warning("model_rejected", model=report.model, version=version, **_log_metrics(report))
        return
    await _move(db, report, "trained", ("training",), report.metrics)

    phase = time.perf_counter()
    say(f"saving {report.model}/{version} into {config.store} ...")
    await asyncio.to_thread(
        save_version,
        config.store,
        report.model,
        version,
        trained.save,
        trained.manifest_fields(),
    )

    async def publish(conn: Connection) -> None:
        await lease.verify(conn)  # a sync that lost its lease must not publish
        if not await registry.set_status(
            conn, report.model, version, "published", expected=("trained",)
        ):
            raise SyncError(f"{report.model}/{version} left the 'trained' state")

    await db.transaction(publish, "publish")
    if config.sync.go_live:
        set_current(config.store, report.model, version)
    report.timings["publish"] = time.perf_counter() - phase
    report.status = "published"
    report.went_live = config.sync.go_live
    log.info(
        "model_published",
        model=report.model,
        version=version,
        forced=not good,
        **_log_metrics(report),
    )


def _train(frame: Any, kind: str, config: Config, epochs: int | None) -> TrainedModel:
    from uro_recs.pipeline.training import train_model

    return train_model(
        frame,
        kind,
        epochs=epochs,
        params=config.sync.params,
        test_fraction=config.sync.test_fraction,
        threads=config.sync.threads,
        refit=config.sync.refit,
    )


async def _move(
    db: Database,
    report: SyncReport,
    status: registry.Status,
    expected: tuple[registry.Status, ...],
    metrics: dict[str, float] | None = None,
) -> None:
    async def move(conn: Connection) -> None:
        if not await registry.set_status(
            conn, report.model, report.version, status, expected=expected, metrics=metrics
        ):
            raise SyncError(f"{report.model}/{report.version} is no longer {expected}")

    await db.transaction(move, f"mark_{status}")


async def require_migrations(db: Database) -> None:
    shipped = {m.version for m in load_migrations()}
    try:
        rows = await db.fetch("SELECT version FROM recs_schema_migrations")
    except asyncpg.UndefinedTableError as exc:
        raise SyncError("the database is not migrated: run `uro-recs db migrate`") from exc
    missing = shipped - {int(row["version"]) for row in rows}
    if missing:
        raise SyncError(f"migrations {sorted(missing)} are not applied: run `uro-recs db migrate`")


async def recover(db: Database, store: Path, model: str) -> list[str]:
    """Clean up after syncs that stopped early; call it holding the model's sync lease.

    Unfinished registry rows become `abandoned` and their store directories (never published)
    are deleted, as are leftover temporary directories. CURRENT is left alone: it may have
    been rolled back on purpose. A newer published version that is not CURRENT (a sync that
    stopped right after its commit) is reported, for `uro-recs rollout` to pick up.
    """
    from uro_recs.core.model_store import StoreError, current_version, version_dir

    notes: list[str] = []

    async def abandon(conn: Connection) -> list[str]:
        rows = await conn.fetch(
            "UPDATE recs_model_versions SET status = 'abandoned', updated_at = now()"
            " WHERE model = $1 AND status IN ('training', 'trained') RETURNING version",
            model,
        )
        return [str(row["version"]) for row in rows]

    for version in await db.transaction(abandon, "abandon_unfinished"):
        directory = version_dir(store, model, version)
        if directory.exists():
            shutil.rmtree(directory)
            notes.append(f"{model}/{version} abandoned, its unpublished files deleted")
        else:
            notes.append(f"{model}/{version} abandoned")
    model_dir = store / model
    if model_dir.is_dir():
        for leftover in model_dir.glob(".*.tmp-*"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
                notes.append(f"temporary directory {leftover.name} deleted")

    newest = await registry.newest_published(db, model)
    try:
        current: str | None = current_version(store, model)
    except StoreError:
        current = None
    if newest is not None and (current is None or newest > current):
        notes.append(f"{model}/{newest} is published but CURRENT is {current}; left as it is")
    for note in notes:
        log.info("sync_recovered", model=model, note=note)
    return notes


def _unique_version(store: Path, model: str, known: list[registry.ModelVersion]) -> str:
    """A new time-based version name, suffixed when that second is already taken."""
    from uro_recs.core.model_store import new_version_name

    taken = {v.version for v in known} | {p.name for p in (store / model).glob("*")}
    base = new_version_name(datetime.now(UTC))
    name, suffix = base, 1
    while name in taken:
        suffix += 1
        name = f"{base}-{suffix}"
    return name


def _log_metrics(report: SyncReport) -> dict[str, float]:
    return {name.replace("@", "_at_"): value for name, value in report.metrics.items()}
