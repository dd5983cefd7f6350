"""Batch recommendations: right per kind, for every uro user (the popular items, flagged
cold_start, for users the model does not know), written in retried batches, and flipped so
that no reader ever sees two generations mixed."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections import defaultdict
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import pandas as pd
import pytest

from tests.db_fixtures import (  # noqa: F401
    Community,
    community,
    community_database,
    empty_database,
    make_config,
    with_database,
)
from uro_recs.core.db import Database, load_migrations, migrate
from uro_recs.core.model_store import current_version
from uro_recs.pipeline import batch as batch_module
from uro_recs.pipeline.batch import BatchReport, Scorer, batch_recommend, load_model
from uro_recs.pipeline.sync import run_sync

pytestmark = pytest.mark.slow
N = 5  # per kind, as make_config sets it
KINDS = ("avatar", "map", "prop")
IDLE_USER = "00000000-0000-4000-8000-00000000a1d1"  # a uro user since before the export, idle
NEWCOMER = "ffffffff-ffff-4fff-8fff-fffffffffe01"  # joins after the export, then plays a map


def add_uro_user(url: str, user: str, name: str) -> None:
    async def add(db: Database) -> None:
        await db.execute(
            "INSERT INTO users (id, username, display_name, created_at, updated_at)"
            " VALUES ($1::UUID, $2, $2, now(), now())",
            user,
            name,
        )

    with_database(url, add)


@pytest.fixture(scope="module")
def store(community_database: str, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """A store with two published versions of "als" (the newer one CURRENT), exported from
    the community plus IDLE_USER, a uro user without a single interaction."""
    add_uro_user(community_database, IDLE_USER, "idle")
    path = tmp_path_factory.mktemp("batch_store")
    for _ in range(2):
        report = asyncio.run(run_sync(make_config(community_database, path), epochs=3))
        assert report.status == "published"
    return path


def run_batch(url: str, store: Path, **kwargs: Any) -> BatchReport:
    config = make_config(url, store, **kwargs.pop("database", {}))
    return asyncio.run(batch_recommend(config, **kwargs))


def live_rows(url: str, users: list[str] | None = None) -> list[dict[str, Any]]:
    async def read(db: Database) -> list[dict[str, Any]]:
        rows = await db.fetch(
            "SELECT user_id::TEXT AS user_id, item_kind, rank, item_id::TEXT AS item_id, score,"
            " model_version, generation, cold_start FROM recs_live_user_recommendations"
            + ("" if users is None else " WHERE user_id = ANY($1::UUID[])"),
            *([] if users is None else [users]),
        )
        return [dict(row) for row in rows]

    return with_database(url, read)


def test_batch_gives_each_user_the_models_ranking_restricted_to_each_kind(
    community_database: str,  # noqa: F811
    community: Community,  # noqa: F811
    store: Path,
) -> None:
    report = run_batch(community_database, store)
    rows = live_rows(community_database)
    assert report.n_rows == len(rows)
    assert {row["generation"] for row in rows} == {report.generation}
    assert {row["model_version"] for row in rows} == {current_version(store, "als")}

    loaded = load_model(store, "als")
    by_user: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for row in sorted(rows, key=lambda r: r["rank"]):
        if not row["cold_start"]:
            by_user[row["user_id"]][row["item_kind"]].append(row["item_id"])
    assert set(by_user) == set(loaded.data_info.user2id)  # every model user is a uro user
    for user in list(by_user)[:: max(1, len(by_user) // 25)]:
        consumed = len(loaded.data_info.user_consumed[loaded.data_info.user2id[user]])
        ranking = loaded.model.recommend_user(
            user=user, n_rec=loaded.data_info.n_items - consumed, filter_consumed=True
        )[user].tolist()
        for kind in ("avatar", "map", "prop"):
            expected = [item for item in ranking if community.public.get(item) == kind][:N]
            assert by_user[user][kind] == expected


def uro_users(url: str) -> set[str]:
    async def read(db: Database) -> set[str]:
        return {str(row["id"]) for row in await db.fetch("SELECT id FROM users")}

    return with_database(url, read)


def test_every_uro_user_gets_rows_and_users_the_model_does_not_know_get_the_popular_items(
    community_database: str,  # noqa: F811
    community: Community,  # noqa: F811
    store: Path,
) -> None:
    from uro_recs.worker.engine import load_engine

    add_uro_user(community_database, NEWCOMER, "newcomer")
    played = next(item for item, kind in sorted(community.public.items()) if kind == "map")

    async def play(db: Database) -> None:  # after the export: the model cannot know it
        await db.execute(
            "INSERT INTO recs_events (user_id, item_kind, item_id, event, occurred_at)"
            " VALUES ($1::UUID, 'map', $2::UUID, 'play', $3)",
            NEWCOMER,
            played,
            datetime.now(UTC),
        )

    with_database(community_database, play)
    started = time.perf_counter()
    report = run_batch(community_database, store)
    seconds = time.perf_counter() - started
    rows = live_rows(community_database)

    users = uro_users(community_database)
    known = set(load_model(store, "als").data_info.user2id)
    cold = users - known
    assert {IDLE_USER, NEWCOMER} <= cold
    assert {row["user_id"] for row in rows} == users  # every uro user, and only them
    assert report.n_users == len(users) and report.n_cold_start == len(cold)
    assert report.n_without_rows == 0 and report.n_rows == len(rows)
    assert all(row["cold_start"] == (row["user_id"] in cold) for row in rows)

    # The cold-start list is what the online `recommend` serves a user it does not know,
    # cut per kind; scored with the share of the model's users who interacted with the item.
    engine = load_engine(store, "als")
    online = engine.recommend([NEWCOMER], min(1000, engine.n_items), filter_consumed=True)[0]
    assert online.cold_start
    expected = {
        kind: [item for item in online.items if community.public.get(str(item)) == kind][:N]
        for kind in KINDS
    }
    assert all(len(items) == N for items in expected.values())
    pairs = community.expected_pairs()
    share = pairs.groupby("item")["user"].nunique() / pairs["user"].nunique()
    lists: dict[str, dict[str, list[tuple[int, str, float]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for row in rows:
        if row["cold_start"]:
            lists[row["user_id"]][row["item_kind"]].append(
                (row["rank"], row["item_id"], row["score"])
            )
    assert set(lists) == cold
    for user in cold:
        for kind in KINDS:
            ranked = sorted(lists[user][kind])
            assert [rank for rank, _, _ in ranked] == list(range(1, N + 1))
            assert [item for _, item, _ in ranked] == expected[kind], (user, kind)
            assert [score for *_, score in ranked] == pytest.approx(
                [share[item] for item in expected[kind]]
            )
    print(f"batch-recommend for {len(users)} uro users ({len(cold)} cold): {seconds:.2f} s")


def test_migration_0003_adds_cold_start_last_to_the_view_and_runs_again_harmlessly(
    empty_database: str,  # noqa: F811
) -> None:
    view_columns = (
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_name = 'recs_live_user_recommendations' ORDER BY ordinal_position"
    )
    before = [
        "user_id",
        "item_kind",
        "rank",
        "item_id",
        "score",
        "model_version",
        "generated_at",
        "generation",
    ]
    user, item = uuid.uuid4(), uuid.uuid4()

    async def upgrade(db: Database) -> tuple[list[str], list[str], bool, list[str]]:
        older = [m for m in load_migrations() if m.version < 3]
        await migrate(db, older)
        assert [r["column_name"] for r in await db.fetch(view_columns)] == before
        await db.execute(
            "INSERT INTO recs_recommendation_pointer (singleton, generation) VALUES (true, 1)"
        )
        await db.execute(
            "INSERT INTO recs_user_recommendations (generation, user_id, item_kind, rank,"
            " item_id, score, model_version, generated_at)"
            " VALUES (1, $1, 'map', 1, $2, 0.5, 'v1', now())",
            user,
            item,
        )
        applied = (await migrate(db)).applied
        (new,) = [m for m in load_migrations() if m.version == 3]
        for statement in new.statements():  # an interrupted migration is simply run again
            await db.execute(statement)
        again = (await migrate(db)).applied
        old_row = await db.fetchval(
            "SELECT cold_start FROM recs_live_user_recommendations WHERE user_id = $1", user
        )
        columns = [r["column_name"] for r in await db.fetch(view_columns)]
        return applied, again, old_row, columns

    applied, again, old_row, columns = with_database(empty_database, upgrade)
    assert applied == ["0003_recs_cold_start"] and again == []
    assert old_row is False  # rows written before the migration are model recommendations
    assert columns == [*before, "cold_start"]


def test_readers_never_see_two_generations_mixed_while_a_new_one_is_written(
    community_database: str,  # noqa: F811
    store: Path,
) -> None:
    from uro_recs.core.model_store import list_versions

    older, newer = list_versions(store, "als")[-2:]
    first = run_batch(community_database, store, version=older)
    users = sorted({row["user_id"] for row in live_rows(community_database)})[:40]
    seen: list[tuple[int, str]] = []

    async def reader(stop: asyncio.Event) -> None:
        conn = await asyncpg.connect(community_database)
        try:
            while not stop.is_set():
                async with conn.transaction(isolation="serializable"):
                    rows = await conn.fetch(
                        "SELECT user_id, item_kind, rank, generation, model_version"
                        " FROM recs_live_user_recommendations WHERE user_id = ANY($1::UUID[])",
                        users,
                    )
                generations = {(row["generation"], row["model_version"]) for row in rows}
                assert len(generations) == 1, f"one read saw {generations}"
                ranks: dict[tuple[Any, str], list[int]] = defaultdict(list)
                for row in rows:
                    ranks[(row["user_id"], row["item_kind"])].append(row["rank"])
                assert len({user for user, _ in ranks}) == len(users)
                assert all(sorted(r) == list(range(1, len(r) + 1)) for r in ranks.values())
                seen.append(generations.pop())
                await asyncio.sleep(0)
        finally:
            await conn.close()

    async def write_while_reading() -> BatchReport:
        stop = asyncio.Event()
        reading = asyncio.create_task(reader(stop))
        try:
            config = make_config(community_database, store, batch_rows=150)
            report = await batch_recommend(config, version=newer)
            await asyncio.sleep(0.2)  # a few more reads, of the new generation
            return report
        finally:
            stop.set()
            await reading

    second = asyncio.run(write_while_reading())
    assert second.generation == first.generation + 1
    assert {generation for generation, _ in seen} == {first.generation, second.generation}
    assert [version for _, version in seen] == sorted(
        (version for _, version in seen), key=[older, newer].index
    )  # never back to the old generation once the new one was seen


def test_generations_beyond_the_last_two_are_purged(
    community_database: str,  # noqa: F811
    store: Path,
) -> None:
    reports = [run_batch(community_database, store) for _ in range(3)]

    async def state(db: Database) -> tuple[dict[int, str], set[int]]:
        statuses = {
            int(r["generation"]): str(r["status"])
            for r in await db.fetch(
                "SELECT generation, status FROM recs_recommendation_generations"
            )
        }
        stored = {
            int(r["generation"])
            for r in await db.fetch("SELECT DISTINCT generation FROM recs_user_recommendations")
        }
        return statuses, stored

    statuses, stored = with_database(community_database, state)
    live, previous = reports[-1].generation, reports[-2].generation
    assert stored == {live, previous}
    assert statuses[live] == "live" and statuses[previous] == "retired"
    assert all(status == "purged" for g, status in statuses.items() if g not in stored)
    assert reports[-1].purged and max(reports[-1].purged) < previous


def inject_serialization_failures(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """From now on, every third batch's first attempt writes its rows, then fails with
    SQLSTATE 40001 before COMMIT, as if a concurrent writer had won: its transaction rolls
    back and is retried. Returns the list of failed batches, filled as they fail."""
    failed: list[int] = []
    attempts: dict[int, int] = defaultdict(int)

    def wrap(write: Any) -> Any:
        async def flaky(conn: Any, generation: int, version: str, at: Any, rows: Any) -> None:
            await write(conn, generation, version, at, rows)
            key = hash(rows[0][:3])
            attempts[key] += 1
            if key % 3 == 0 and attempts[key] == 1:
                failed.append(key)
                raise asyncpg.exceptions.SerializationError("injected: concurrent update")

        return flaky

    monkeypatch.setattr(batch_module, "_insert_batch", wrap(batch_module._insert_batch))
    monkeypatch.setattr(batch_module, "_copy_batch", wrap(batch_module._copy_batch))
    return failed


@pytest.mark.parametrize("use_copy", [False, True], ids=["insert", "copy"])
def test_batches_failing_with_serialization_errors_are_retried_and_the_result_is_complete(
    community_database: str,  # noqa: F811
    store: Path,
    monkeypatch: pytest.MonkeyPatch,
    use_copy: bool,
) -> None:
    clean = run_batch(community_database, store)
    expected = {
        (r["user_id"], r["item_kind"], r["rank"], r["item_id"])
        for r in live_rows(community_database)
    }
    flaky_writes = inject_serialization_failures(monkeypatch)
    report = run_batch(
        community_database, store, database={"use_copy": use_copy, "batch_rows": 200}
    )
    rows = live_rows(community_database)
    assert flaky_writes and report.retries >= len(flaky_writes)
    assert report.generation == clean.generation + 1
    assert {(r["user_id"], r["item_kind"], r["rank"], r["item_id"]) for r in rows} == expected
    assert len(rows) == len(expected) == report.n_rows


def test_a_batch_that_dies_before_the_flip_leaves_the_live_generation_alone(
    community_database: str,  # noqa: F811
    store: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    live = run_batch(community_database, store)
    before = live_rows(community_database)

    async def crash(*_args: Any) -> None:
        raise RuntimeError("killed before the flip")

    with monkeypatch.context() as patch:
        patch.setattr(batch_module, "_flip", crash)
        with pytest.raises(RuntimeError, match="before the flip"):
            run_batch(community_database, store)
    assert live_rows(community_database) == before

    after = run_batch(community_database, store)
    assert after.generation == live.generation + 2  # the dead build's number is not reused
    assert after.generation - 1 in after.purged  # and its rows are gone

    async def leftovers(db: Database) -> int:
        return int(
            await db.fetchval(
                "SELECT count(*) FROM recs_user_recommendations WHERE generation = $1",
                after.generation - 1,
            )
        )

    assert with_database(community_database, leftovers) == 0
    assert uuid.UUID(live_rows(community_database)[0]["user_id"])


@pytest.mark.parametrize("model", ["als", "deepfm"])
def test_both_scoring_paths_rank_like_libreco_within_each_kind(
    trained_store: Path, demo_interactions: pd.DataFrame, model: str
) -> None:
    """ALS is scored with its embeddings, DeepFM through libreco's predict: both must give
    libreco's own ranking, cut to the items of each kind."""
    kinds = dict(zip(demo_interactions["item"], demo_interactions["item_kind"], strict=False))
    loaded = load_model(trained_store, model)
    scorer = Scorer(loaded, kinds, n=N)
    users = np.arange(0, loaded.data_info.n_users, loaded.data_info.n_users // 8)[:8]
    for user, rows in zip(users.tolist(), scorer.rows(users), strict=True):
        assert not any(cold_start for *_, cold_start in rows)
        user_id = str(loaded.data_info.id2user[user])
        consumed = len(loaded.data_info.user_consumed[user])
        graph = loaded.graph.as_default() if loaded.graph is not None else nullcontext()
        with graph:
            ranking = loaded.model.recommend_user(
                user=user_id, n_rec=loaded.data_info.n_items - consumed, filter_consumed=True
            )[user_id].tolist()
        for kind in ("avatar", "map", "prop"):
            expected = [item for item in ranking if kinds[item] == kind][:N]
            got = [item for _, k, _, item, _, _ in rows if k == kind]
            assert got == expected, (model, kind)
        scores = [score for *_, score, _ in rows]
        assert all(0.0 < score < 1.0 for score in scores)


def test_the_cold_start_list_is_topped_up_by_interaction_counts_where_the_popular_list_ends(
    trained_store: Path, demo_interactions: pd.DataFrame
) -> None:
    """Per kind, the manifest's popular items come first; a kind with fewer than N of them
    there gets its other items by how many users interacted with them, the same order."""
    kinds = dict(zip(demo_interactions["item"], demo_interactions["item_kind"], strict=False))
    loaded = load_model(trained_store, "als")
    full = Scorer(loaded, kinds, n=N).popular
    assert all(len(full[kind]) == N for kind in KINDS)
    assert [item for item in loaded.popular_items if kinds[item] == "map"][:N] == [
        item for item, _ in full["map"]
    ]
    for cut in (0, 2, 7):
        short = dataclasses.replace(loaded, popular_items=loaded.popular_items[:cut])
        assert Scorer(short, kinds, n=N).popular == full, cut
