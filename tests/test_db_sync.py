"""Export and sync against a real PostgreSQL with uro's tables, trained with real libreco:
what gets exported, what gets published, and what a failure leaves behind."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from tests.db_fixtures import (  # noqa: F401
    Community,
    TcpProxy,
    community,
    community_database,
    make_config,
    proxy,
    wait_until,
    with_database,
)
from uro_recs.core.db import Database, DatabaseError, Lease, LeaseHeld
from uro_recs.core.model_store import (
    VersionNotFound,
    current_version,
    list_versions,
    verify,
    version_dir,
)
from uro_recs.pipeline import registry
from uro_recs.pipeline.export import export_interactions
from uro_recs.pipeline.sync import SyncReport, run_sync

pytestmark = pytest.mark.slow


def sync(url: str, store: Path, model: str, **kwargs: Any) -> SyncReport:
    config = make_config(url, store, **kwargs.pop("database", {}))
    return asyncio.run(run_sync(config, model=model, **kwargs))


def versions(url: str, model: str) -> dict[str, str]:
    async def read(db: Database) -> dict[str, str]:
        return {v.version: v.status for v in await registry.versions(db, model)}

    return with_database(url, read)


def current_or_none(store: Path, model: str) -> str | None:
    try:
        return current_version(store, model)
    except VersionNotFound:
        return None


def assert_consistent(store: Path, url: str, model: str) -> None:
    """Every published version is complete in the store, CURRENT is published, nothing that
    was not published is left in the store, and no temporary directory is left."""
    statuses = versions(url, model)
    published = {v for v, status in statuses.items() if status == "published"}
    for version in published:
        verify(version_dir(store, model, version))
    assert current_or_none(store, model) in published | {None}
    assert set(list_versions(store, model)) <= published
    assert not list((store / model).glob(".*.tmp-*")) if (store / model).exists() else True


def test_export_reads_saves_and_events_of_public_items_once_per_pair(
    community_database: str,  # noqa: F811
    community: Community,  # noqa: F811
) -> None:
    async def both(db: Database) -> tuple[Any, Any]:
        paged = await export_interactions(db, page_rows=997, save_weight=1.0)
        whole = await export_interactions(db, page_rows=1_000_000, save_weight=1.0)
        return paged, whole

    paged, whole = with_database(community_database, both)
    expected = community.expected_pairs()
    got = paged.interactions
    assert len(got) == len(expected)
    merged = got.merge(expected, on=["user", "item"], suffixes=("", "_expected"))
    assert len(merged) == len(expected)
    assert (merged["label"] == merged["label_expected"]).all()
    assert set(got["item"]) <= set(community.public)
    assert (got["item"].map(community.public) == got["item_kind"]).all()
    # Each item's uploader (a user id), the second item feature models train on.
    assert got.groupby("item")["item_uploader"].nunique().eq(1).all()
    assert set(got["item_uploader"]) <= set(community.interactions["user"])
    assert got["item_uploader"].nunique() > 1
    assert paged.n_skipped > 0  # interactions with private items were read and dropped
    assert paged.catalog == community.public
    pd.testing.assert_frame_equal(got, whole.interactions)


def test_sync_publishes_a_version_into_store_registry_and_current(
    community_database: str,  # noqa: F811
    community: Community,  # noqa: F811
    tmp_path: Path,
) -> None:
    report = sync(community_database, tmp_path, "als")
    assert report.status == "published"
    assert report.metrics["recall@10"] >= report.metrics["popularity_recall@10"]
    assert current_version(tmp_path, "als") == report.version
    manifest = verify(version_dir(tmp_path, "als", report.version))
    assert manifest.metrics["popularity_recall@10"] > 0
    assert manifest.data["n_interactions"] == len(community.expected_pairs())  # refit on all
    assert versions(community_database, "als") == {report.version: "published"}
    assert "uro-recs rollout als" in report.summary()

    again = sync(community_database, tmp_path, "als")
    assert again.version > report.version
    assert current_version(tmp_path, "als") == again.version
    assert_consistent(tmp_path, community_database, "als")


def test_with_go_live_off_a_published_version_waits_for_a_rollout(
    community_database: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    model = "als-manual"  # a registry history of its own in the module's database
    live = sync(community_database, tmp_path, model)
    config = make_config(community_database, tmp_path)
    config = dataclasses.replace(config, sync=dataclasses.replace(config.sync, go_live=False))
    waiting = asyncio.run(run_sync(config, model=model))
    assert (waiting.status, waiting.went_live) == ("published", False)
    assert current_version(tmp_path, model) == live.version  # serving is untouched
    assert versions(community_database, model)[waiting.version] == "published"
    assert f"uro-recs rollout {model} {waiting.version}" in waiting.summary()
    assert_consistent(tmp_path, community_database, model)


def test_a_rollback_marks_the_version_it_left_rolled_back(
    community_database: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    model = "als-rollback"
    first = sync(community_database, tmp_path, model)
    second = sync(community_database, tmp_path, model)

    async def roll_back(db: Database) -> tuple[bool, bool, str | None]:
        marked = await registry.record_rollback(db, model, second.version)
        unknown = await registry.record_rollback(db, model, "2020-01-01T000000Z")
        return marked, unknown, await registry.newest_published(db, model)

    marked, unknown, newest = with_database(community_database, roll_back)
    assert (marked, unknown) == (True, False)
    assert versions(community_database, model)[second.version] == "rolled_back"
    assert newest == first.version  # the rolled-back version is no longer the newest


def test_a_model_below_the_popularity_baseline_is_published_only_when_forced(
    community_database: str,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import uro_recs.pipeline.training as training
    from uro_recs.pipeline.evaluation import Evaluation

    worthless = Evaluation(recall=0.0, ndcg=0.0, coverage=0.0, users=1)
    monkeypatch.setattr(training, "evaluate_model", lambda *_args: worthless)
    rejected = sync(community_database, tmp_path, "gated")
    assert rejected.status == "rejected"
    assert "below the popularity baseline" in rejected.summary()
    assert current_or_none(tmp_path, "gated") is None
    assert list_versions(tmp_path, "gated") == []

    forced = sync(community_database, tmp_path, "gated", force=True)
    assert forced.status == "published"
    assert versions(community_database, "gated") == {
        rejected.version: "rejected",
        forced.version: "published",
    }


def hook_transactions(monkeypatch: pytest.MonkeyPatch, before: Callable[[str], None]) -> None:
    """Call `before(name)` ahead of every transaction and every lone read."""
    transaction, fetch = Database.transaction, Database.fetch

    async def hooked_transaction(self: Database, fn: Any, name: str) -> Any:
        before(name)
        return await transaction(self, fn, name)

    async def hooked_fetch(self: Database, query: str, *args: object) -> Any:
        before("fetch")
        return await fetch(self, query, *args)

    monkeypatch.setattr(Database, "transaction", hooked_transaction)
    monkeypatch.setattr(Database, "fetch", hooked_fetch)


def test_a_database_outage_during_the_export_is_ridden_out(
    community_database: str,  # noqa: F811
    proxy: TcpProxy,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fetches = 0

    def outage_at_the_tenth_page(name: str) -> None:
        nonlocal fetches
        fetches += name == "fetch"
        if fetches == 10:
            proxy.outage(1.0)  # drops the connections, refuses new ones for a second

    hook_transactions(monkeypatch, outage_at_the_tenth_page)
    report = sync(proxy.url(community_database), tmp_path, "outage", database={"page_rows": 500})
    assert proxy.outages == 1
    assert report.status == "published"
    assert report.retries > 0
    assert current_version(tmp_path, "outage") == report.version
    assert_consistent(tmp_path, community_database, "outage")


def test_an_outage_at_publish_fails_cleanly_and_the_next_sync_recovers(
    community_database: str,  # noqa: F811
    proxy: TcpProxy,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def outage_at_publish(name: str) -> None:
        if name == "publish":
            proxy.outage(3.0)  # longer than the retries below wait

    url = proxy.url(community_database)
    with monkeypatch.context() as patch:
        hook_transactions(patch, outage_at_publish)
        with pytest.raises(DatabaseError, match="publish"):
            sync(url, tmp_path, "cut", database={"retry_attempts": 3})
    # Nothing half-published: the version is only 'trained', CURRENT was never set.
    (failed,) = versions(community_database, "cut")
    assert versions(community_database, "cut") == {failed: "trained"}
    assert current_or_none(tmp_path, "cut") is None

    wait_until(lambda: proxy.server is not None, timeout_s=10)
    report = sync(url, tmp_path, "cut")
    assert report.status == "published"
    assert any(failed in note for note in report.recovered)
    assert versions(community_database, "cut") == {failed: "abandoned", report.version: "published"}
    assert not version_dir(tmp_path, "cut", failed).exists()
    assert_consistent(tmp_path, community_database, "cut")


def test_a_killed_sync_leaves_store_and_registry_consistent_and_the_next_one_succeeds(
    community_database: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    config = tmp_path / "uro-recs.toml"
    config.write_text(
        f'store = "{tmp_path / "store"}"\nlog_format = "json"\n'
        f'[database]\nurl = "{community_database}"\n[sync]\nmodel = "killed"\n'
    )
    command = [sys.executable, "-m", "uro_recs.app.cli", "--config", str(config), "sync"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with (tmp_path / "sync.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until(lambda: "training" in versions(community_database, "killed").values())
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    (killed,) = versions(community_database, "killed")
    store = tmp_path / "store"
    assert current_or_none(store, "killed") is None
    assert list_versions(store, "killed") == []

    report = sync(community_database, store, "killed")  # takes over the dead process's lease
    assert report.status == "published"
    assert versions(community_database, "killed") == {
        killed: "abandoned",
        report.version: "published",
    }
    assert_consistent(store, community_database, "killed")


def test_two_syncs_of_one_model_never_run_at_once(
    community_database: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    async def hold_and_sync(db: Database) -> None:
        async with Lease(db, "sync:busy", ttl_s=30):
            with pytest.raises(LeaseHeld):
                await run_sync(make_config(community_database, tmp_path), model="busy")

    with_database(community_database, hold_and_sync)
    assert versions(community_database, "busy") == {}
