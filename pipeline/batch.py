"""`uro-recs batch-recommend`: top-N per item kind for every user in uro's `users` table,
written into `recs_user_recommendations` as a new generation, then made live by one pointer flip.

Readers go through the `recs_live_user_recommendations` view, which joins the one-row
`recs_recommendation_pointer`: each statement sees exactly one generation, so uro never shows
a user half of yesterday's list and half of today's. Rows of a generation are written in
batches (one statement and one transaction each, retried on SQLSTATE 40001) while readers
still see the previous one; the flip is one small transaction; generations older than the
last `keep_generations` are then deleted in batches.

The users are uro's: `users.id`, read in keyset pages of `page_rows`, so every user uro has
gets rows and uro needs no fallback of its own. A user the model knows (an interaction in the
data it was trained on) gets the model's ranking; a user it does not know (no interaction in
the export, or joined after it) gets the cold-start list, flagged `cold_start`: per kind, the
model's popular items (the manifest's `popular_items`, which the online `recommend` serves to
unknown users; topped up by the items' interaction counts when the list holds fewer than N of
a kind), scored with the share of the model's users who interacted with each. Items are the
model's items that are public now, per kind; a known user's consumed items are left out.

Memory: per user of the model, what libreco loads (its user -> inner id map, consumed items,
embeddings) and nothing more; of uro's users, one page of ids (`page_rows`), the rows of the
chunk being scored, and the batches waiting to be written (at most `write_concurrency` in
flight, of `batch_rows` each).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt
import structlog
from tqdm import tqdm

from uro_recs.core.config import Config
from uro_recs.core.db import Database, Lease
from uro_recs.core.protocol import ITEM_KINDS
from uro_recs.pipeline.export import Snapshot, read_catalog

if TYPE_CHECKING:
    from uro_recs.core.db import Connection

log = structlog.get_logger(__name__)

TABLE: Final = "recs_user_recommendations"
COLUMNS: Final = (
    "generation",
    "user_id",
    "item_kind",
    "rank",
    "item_id",
    "score",
    "model_version",
    "generated_at",
    "cold_start",
)
USERS_TABLE: Final = "users"  # uro's users: every `id` gets rows
_NIL: Final = uuid.UUID(int=0)  # below every other UUID: the keyset start
LEASE_NAME: Final = "batch-recommend"
# user x item scores computed at once: bounds the memory of one chunk (16 MB of float32)
SCORES_PER_CHUNK: Final = 4_000_000

Row = tuple[str, str, int, str, float, bool]  # user_id, item_kind, rank, item_id, score, cold


@dataclass
class BatchReport:
    model: str
    version: str = ""
    generation: int = 0
    n_users: int = 0  # uro users given rows
    n_cold_start: int = 0  # of them, users the model does not know: the popular items
    n_without_rows: int = 0  # uro users left without a row (no public item to offer)
    rows_by_kind: dict[str, int] = field(default_factory=dict)
    purged: list[int] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    retries: int = 0
    method: str = "multi-row INSERT"

    @property
    def n_rows(self) -> int:
        return sum(self.rows_by_kind.values())

    @property
    def rows_per_s(self) -> float:
        seconds = self.timings.get("write", 0.0)
        return self.n_rows / seconds if seconds > 0 else 0.0

    def summary(self) -> str:
        kinds = ", ".join(f"{kind} {rows:,}" for kind, rows in self.rows_by_kind.items())
        lines = [
            f"batch-recommend {self.model}/{self.version}: generation {self.generation} is LIVE",
            f"  rows:     {self.n_rows:,} for {self.n_users:,} users ({kinds})",
            f"  cold:     {self.n_cold_start:,} users the model does not know got the popular"
            " items per kind (cold_start)",
            f"  written:  {self.rows_per_s:,.0f} rows/s by {self.method}"
            f" ({self.timings.get('write', 0.0):.1f} s scoring and writing)",
            "  time:     "
            + ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in self.timings.items()),
        ]
        if self.n_without_rows:
            lines.append(f"  empty:    {self.n_without_rows:,} users got no row (no public item)")
        if self.purged:
            lines.append(f"  purged:   generations {', '.join(map(str, self.purged))}")
        if self.retries:
            lines.append(f"  retried:  {self.retries} transactions (conflicts, lost connections)")
        lines.append(
            "  readers:  SELECT ... FROM recs_live_user_recommendations WHERE user_id = $1"
        )
        return "\n".join(lines)


async def batch_recommend(
    config: Config,
    *,
    model: str | None = None,
    version: str | None = None,
    n: int | None = None,
    progress: bool = False,
    say: Callable[[str], None] = lambda _line: None,
) -> BatchReport:
    name = model or config.sync.model
    per_kind = n or config.sync.batch_n
    method = "binary COPY" if config.database.use_copy else "multi-row INSERT"
    report = BatchReport(model=name, method=method)
    started = time.perf_counter()
    db = await Database.connect(config.database)
    try:
        async with Lease(db, LEASE_NAME, config.database.lease_ttl_s) as lease:
            phase = time.perf_counter()
            loaded = await asyncio.to_thread(load_model, config.store, name, version)
            report.version = loaded.version
            catalog = await read_catalog(db, config.database.page_rows)
            scorer = Scorer(loaded, catalog, per_kind)
            n_uro_users = await count_uro_users(db)
            report.timings["load"] = time.perf_counter() - phase
            say(
                f"scoring {n_uro_users:,} uro users ({scorer.n_users:,} known to the model) x"
                f" {scorer.n_candidates:,} public items of {name}/{loaded.version},"
                f" top {per_kind} per kind"
            )
            report.generation = await _start_generation(db, name, loaded.version)
            phase = time.perf_counter()
            await _write_generation(db, config, report, scorer, n_uro_users, progress)
            report.timings["write"] = time.perf_counter() - phase
            await _flip(db, lease, report)
            say(f"generation {report.generation} is live ({report.n_rows:,} rows)")
            phase = time.perf_counter()
            report.purged = await purge_generations(
                db, config.sync.keep_generations, config.database.batch_rows
            )
            report.timings["purge"] = time.perf_counter() - phase
    finally:
        report.retries = db.retries.conflicts + db.retries.connection_losses
        await db.close()
    report.timings["total"] = time.perf_counter() - started
    log.info(
        "batch_recommendations_written",
        model=name,
        version=report.version,
        generation=report.generation,
        users=report.n_users,
        cold_start_users=report.n_cold_start,
        users_without_rows=report.n_without_rows,
        rows=report.n_rows,
        rows_per_s=round(report.rows_per_s),
        retries=report.retries,
    )
    return report


@dataclass(frozen=True)
class LoadedModel:
    version: str
    model: Any  # the libreco model
    data_info: Any
    graph: Any  # the tf.Graph of a TensorFlow model, else None
    popular_items: tuple[str, ...] = ()  # the manifest's: what unknown users are served


def load_model(store: Path, name: str, version: str | None = None) -> LoadedModel:
    """Verify a stored version (CURRENT by default), then load it with libreco."""
    from uro_recs.core.model_store import MODEL_FILE_STEM, current_version, verify, version_dir
    from uro_recs.worker.libreco_env import in_graph, quiet, tf

    # isort: split
    from libreco.algorithms import ALS, DeepFM
    from libreco.data import DataInfo

    chosen = version or current_version(store, name)
    directory = version_dir(store, name, chosen)
    manifest = verify(directory)  # before libreco unpickles anything
    classes: dict[str, Any] = {"ALS": ALS, "DeepFM": DeepFM}
    model_class = classes.get(manifest.libreco_class)
    if model_class is None:
        raise ValueError(f"cannot batch-recommend with {manifest.libreco_class}")
    graph = tf.Graph() if model_class is DeepFM else None
    with quiet(stderr=True), in_graph(graph):
        data_info = DataInfo.load(str(directory), MODEL_FILE_STEM)
        model = model_class.load(str(directory), MODEL_FILE_STEM, data_info)
    popular = tuple(str(item) for item in manifest.popular_items)
    return LoadedModel(chosen, model, data_info, graph, popular)


class Scorer:
    """Top-N per kind for chunks of users; the popular items for users the model does not know.

    Models with embeddings (ALS) score a chunk with one matrix product, as libreco's
    `recommend_user` does; others with one libreco `predict` call over every (user, item)
    pair of the chunk. Scores are libreco's: the sigmoid of the model's output.
    """

    def __init__(self, loaded: LoadedModel, catalog: dict[str, str], n: int) -> None:
        self.loaded = loaded
        self.n = n
        info = loaded.data_info
        self.n_users = int(info.n_users)
        self.n_items = int(info.n_items)
        self.user2id: dict[str, int] = info.user2id  # libreco's own map, built once
        self.item_ids = np.array([str(info.id2item[i]) for i in range(self.n_items)], dtype=object)
        self.consumed: dict[int, list[int]] = info.user_consumed
        self.candidates: dict[str, npt.NDArray[np.int64]] = {
            kind: np.array(
                [i for i, item in enumerate(self.item_ids) if catalog.get(item) == kind],
                dtype=np.int64,
            )
            for kind in ITEM_KINDS
        }
        self.n_candidates = sum(len(c) for c in self.candidates.values())
        self.popular = self._popular(info, loaded.popular_items)
        user_embeds = getattr(loaded.model, "user_embeds_np", None)
        item_embeds = getattr(loaded.model, "item_embeds_np", None)
        self._embeds = (
            None
            if user_embeds is None or item_embeds is None
            else (user_embeds[: self.n_users], item_embeds[: self.n_items])
        )
        self.chunk_users = max(1, SCORES_PER_CHUNK // max(1, self.n_items))

    def _popular(
        self, info: Any, popular_items: Sequence[str]
    ) -> dict[str, list[tuple[str, float]]]:
        """The cold-start list: per kind, up to n public items with their scores.

        The order is the manifest's `popular_items` (what the online `recommend` serves to
        users it does not know), then, for a kind with fewer than n there, that kind's other
        items by how many of the model's users interacted with them (then by id), which is
        how the manifest's list is ordered. The score is that share of the model's users.
        """
        item_consumed: dict[int, Any] = getattr(info, "item_consumed", None) or {}
        counts = np.array(
            [len(item_consumed.get(i, ())) for i in range(self.n_items)], dtype=np.float64
        )
        shares = counts / max(1, self.n_users)
        index = {item: i for i, item in enumerate(self.item_ids.tolist())}
        listed = [index[item] for item in dict.fromkeys(popular_items) if item in index]
        out: dict[str, list[tuple[str, float]]] = {}
        for kind, candidates in self.candidates.items():
            allowed = set(candidates.tolist())
            chosen = [i for i in listed if i in allowed][: self.n]
            if len(chosen) < self.n:
                taken = set(chosen)
                rest = sorted(
                    (i for i in allowed if i not in taken),
                    key=lambda i: (-counts[i], self.item_ids[i]),
                )
                chosen += rest[: self.n - len(chosen)]
            out[kind] = [(str(self.item_ids[i]), float(shares[i])) for i in chosen]
        return out

    def cold_start_rows(self, user_id: str) -> list[Row]:
        """The popular items of every kind for a user the model does not know."""
        return [
            (user_id, kind, rank + 1, item, score, True)
            for kind, items in self.popular.items()
            for rank, (item, score) in enumerate(items)
        ]

    def rows_for(self, user_ids: Sequence[str]) -> Iterator[tuple[list[Row], bool]]:
        """Each user's rows and whether they are cold-start, in the order of `user_ids`;
        the users the model knows are scored `chunk_users` at a time."""
        for start in range(0, len(user_ids), self.chunk_users):
            chunk = user_ids[start : start + self.chunk_users]
            inner = [self.user2id.get(user) for user in chunk]
            known = [(i, user) for i, user in zip(inner, chunk, strict=True) if i is not None]
            scored = iter(
                self.rows(np.array([i for i, _ in known], dtype=np.int64), [u for _, u in known])
                if known
                else []
            )
            for user, index in zip(chunk, inner, strict=True):
                if index is None:
                    yield self.cold_start_rows(user), True
                else:
                    yield next(scored), False

    def rows(
        self, users: npt.NDArray[np.int64], user_ids: Sequence[str] | None = None
    ) -> list[list[Row]]:
        """Each user's rows (every kind, best first), in the order of `users` (libreco's
        inner ids; `user_ids` are their ids, looked up in libreco's id2user if not given)."""
        if user_ids is None:
            id2user = self.loaded.data_info.id2user
            user_ids = [str(id2user[u]) for u in users.tolist()]
        logits = self._scores(users)
        # Consumed items can never come back: minus infinity sorts them last, then drops them.
        lengths = [len(self.consumed.get(int(u), ())) for u in users]
        if sum(lengths):
            consumed = np.concatenate([self.consumed.get(int(u), []) for u in users])
            logits[np.repeat(np.arange(len(users)), lengths), consumed.astype(np.int64)] = -np.inf
        out: list[list[Row]] = [[] for _ in range(len(users))]
        for kind, candidates in self.candidates.items():
            if candidates.size == 0:
                continue
            k = min(self.n, candidates.size)
            scores = logits[:, candidates]
            top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            top_scores = np.take_along_axis(scores, top, axis=1)
            order = np.argsort(-top_scores, axis=1, kind="stable")
            top = np.take_along_axis(top, order, axis=1)
            top_scores = np.take_along_axis(top_scores, order, axis=1)
            kept = np.isfinite(top_scores)
            probabilities = (1.0 / (1.0 + np.exp(-top_scores))).tolist()
            items = self.item_ids[candidates[top]].tolist()
            for row, user_id in enumerate(user_ids):
                out[row].extend(
                    (user_id, kind, rank + 1, items[row][rank], probabilities[row][rank], False)
                    for rank in range(int(kept[row].sum()))
                )
        return out

    def _scores(self, users: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        """Logits of every (user, item) pair: users x all model items."""
        if self._embeds is not None:
            user_embeds, item_embeds = self._embeds
            return np.asarray(user_embeds[users] @ item_embeds.T, dtype=np.float64)
        wanted = np.concatenate(list(self.candidates.values()))
        scores = np.full((len(users), self.n_items), -np.inf)
        if wanted.size:
            from uro_recs.worker.libreco_env import in_graph  # loaded with the model

            with in_graph(self.loaded.graph):
                probabilities = self.loaded.model.predict(
                    user=np.repeat(users, wanted.size),
                    item=np.tile(wanted, len(users)),
                    inner_id=True,
                )
            p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1 - 1e-12)
            # back to logits, so both paths rank and report scores the same way
            scores[:, wanted] = np.log(p / (1 - p)).reshape(len(users), wanted.size)
        return scores


async def _start_generation(db: Database, model: str, version: str) -> int:
    async def start(conn: Connection) -> int:
        # A build left behind by a stopped run is failed; purge_generations deletes its rows.
        await conn.execute(
            "UPDATE recs_recommendation_generations SET status = 'failed', finished_at = now()"
            " WHERE status = 'building'"
        )
        generation = int(
            await conn.fetchval(
                "SELECT COALESCE(max(generation), 0) + 1 FROM recs_recommendation_generations"
            )
        )
        await conn.execute(
            "INSERT INTO recs_recommendation_generations (generation, model, model_version,"
            " status) VALUES ($1, $2, $3, 'building')",
            generation,
            model,
            version,
        )
        return generation

    return await db.transaction(start, "start_generation")


async def count_uro_users(db: Database) -> int:
    snapshot = await Snapshot.take(db)
    return int(await db.fetchval(f"SELECT count(*) FROM {USERS_TABLE} {snapshot.clause}"))


async def uro_user_pages(db: Database, page_rows: int) -> AsyncIterator[list[str]]:
    """Every id in uro's users table, in keyset pages on the primary key. Each page reads
    at its own snapshot (a follower read on CockroachDB), so a long run never outlives one."""
    after = _NIL
    while True:
        snapshot = await Snapshot.take(db)
        rows = await db.fetch(
            f"SELECT id FROM {USERS_TABLE} {snapshot.clause} WHERE id > $1 ORDER BY id LIMIT $2",
            after,
            page_rows,
        )
        if rows:
            yield [str(row["id"]) for row in rows]
        if len(rows) < page_rows:
            return
        after = rows[-1]["id"]


async def _write_generation(
    db: Database,
    config: Config,
    report: BatchReport,
    scorer: Scorer,
    n_uro_users: int,
    progress: bool,
) -> None:
    generated_at = datetime.now(UTC)
    batch_rows = config.database.batch_rows
    limit = config.database.write_concurrency
    in_flight: set[asyncio.Task[None]] = set()
    write = _copy_batch if config.database.use_copy else _insert_batch

    async def one(rows: list[Row]) -> None:
        async def attempt(conn: Connection) -> None:
            await write(conn, report.generation, report.version, generated_at, rows)

        await db.transaction(attempt, "write_recommendations")

    async def submit(rows: list[Row]) -> None:
        while len(in_flight) >= limit:
            done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                in_flight.discard(task)
                task.result()
        in_flight.add(asyncio.create_task(one(rows)))

    try:
        bar = tqdm(total=n_uro_users, desc="batch", unit=" users", disable=not progress)
        with bar:
            async for user_ids in uro_user_pages(db, config.database.page_rows):
                pending: list[Row] = []
                for user_rows, cold_start in scorer.rows_for(user_ids):
                    if not user_rows:
                        report.n_without_rows += 1
                        continue
                    report.n_users += 1
                    report.n_cold_start += cold_start
                    # A user's rows stay in one batch, which is what a COPY retry deletes.
                    if pending and len(pending) + len(user_rows) > batch_rows:
                        await submit(pending)
                        pending = []
                    pending.extend(user_rows)
                    for row in user_rows:
                        report.rows_by_kind[row[1]] = report.rows_by_kind.get(row[1], 0) + 1
                if pending:
                    await submit(pending)
                bar.update(len(user_ids))
        while in_flight:
            done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                in_flight.discard(task)
                task.result()
    finally:
        for task in in_flight:
            task.cancel()
        await asyncio.gather(*in_flight, return_exceptions=True)


async def _insert_batch(
    conn: Connection, generation: int, version: str, generated_at: datetime, rows: list[Row]
) -> None:
    """One multi-row INSERT; a retry after an unknown commit finds its rows and skips them."""
    values = ", ".join(
        f"($1, ${4 + 6 * i}::UUID, ${5 + 6 * i}::TEXT, ${6 + 6 * i}::INT4,"
        f" ${7 + 6 * i}::UUID, ${8 + 6 * i}::FLOAT8, $2, $3, ${9 + 6 * i}::BOOL)"
        for i in range(len(rows))
    )
    args: list[Any] = [generation, version, generated_at]
    for row in rows:
        args.extend(row)
    await conn.execute(
        f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES {values} ON CONFLICT DO NOTHING",
        *args,
    )


async def _copy_batch(
    conn: Connection, generation: int, version: str, generated_at: datetime, rows: list[Row]
) -> None:
    """Binary COPY (CockroachDB >= 23.1). COPY cannot skip conflicts, so the batch first
    deletes whatever an earlier attempt of itself may have committed (its users' rows)."""
    await conn.execute(
        f"DELETE FROM {TABLE} WHERE generation = $1 AND user_id = ANY($2::UUID[])",
        generation,
        sorted({uuid.UUID(row[0]) for row in rows}),
    )
    await conn.copy_records_to_table(
        TABLE,
        columns=list(COLUMNS),
        records=[
            (
                generation,
                uuid.UUID(user),
                kind,
                rank,
                uuid.UUID(item),
                score,
                version,
                generated_at,
                cold_start,
            )
            for user, kind, rank, item, score, cold_start in rows
        ],
    )


async def _flip(db: Database, lease: Lease, report: BatchReport) -> None:
    async def flip(conn: Connection) -> None:
        await lease.verify(conn)
        status = await conn.fetchval(
            "SELECT status FROM recs_recommendation_generations WHERE generation = $1",
            report.generation,
        )
        if status == "live":  # this transaction committed before, and is being retried
            return
        if status != "building":
            raise RuntimeError(f"generation {report.generation} is {status}, not building")
        await conn.execute(
            "UPDATE recs_recommendation_generations SET status = 'retired' WHERE status = 'live'"
        )
        await conn.execute(
            "UPDATE recs_recommendation_generations SET status = 'live', finished_at = now(),"
            " n_users = $2, n_rows = $3 WHERE generation = $1",
            report.generation,
            report.n_users,
            report.n_rows,
        )
        await conn.execute(
            "INSERT INTO recs_recommendation_pointer (singleton, generation, flipped_at)"
            " VALUES (true, $1, now()) ON CONFLICT (singleton) DO UPDATE"
            " SET generation = excluded.generation, flipped_at = excluded.flipped_at",
            report.generation,
        )

    await db.transaction(flip, "flip_generation")


async def purge_generations(db: Database, keep: int, batch_rows: int) -> list[int]:
    """Delete the rows of failed generations and of retired ones beyond the newest `keep`
    (the live one included), a batch per transaction; returns the purged generations."""
    rows = await db.fetch(
        "SELECT generation, status FROM recs_recommendation_generations"
        " WHERE status IN ('live', 'retired', 'failed') ORDER BY generation DESC"
    )
    served = [int(r["generation"]) for r in rows if r["status"] in ("live", "retired")]
    doomed = [int(r["generation"]) for r in rows if r["status"] == "failed"] + served[
        max(1, keep) :
    ]
    for generation in sorted(doomed):
        while True:
            deleted = await db.execute(
                f"DELETE FROM {TABLE} WHERE generation = $1 AND user_id IN"
                f" (SELECT user_id FROM {TABLE} WHERE generation = $1 ORDER BY user_id LIMIT $2)",
                generation,
                batch_rows,
            )
            if deleted == "DELETE 0":
                break

        async def mark(conn: Connection, generation: int = generation) -> None:
            await conn.execute(
                "UPDATE recs_recommendation_generations SET status = 'purged'"
                " WHERE generation = $1 AND status IN ('retired', 'failed')",
                generation,
            )

        await db.transaction(mark, "mark_purged")
        log.info("generation_purged", generation=generation)
    return sorted(doomed)
