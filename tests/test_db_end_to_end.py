"""The whole path through the command line: db migrate -> sync -> serve -> recommend -> ingest
-> recommend (the event filtered) -> batch-recommend, on uro's tables in a fresh PostgreSQL
database."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.cluster import Cluster
from tests.db_fixtures import (  # noqa: F401
    Community,
    community,
    empty_database,
    load_community,
    load_events,
    wait_until,
)
from uro_recs.sdk import Client, Event

pytestmark = pytest.mark.slow


def uro_recs(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "URO_RECS_LOG_FORMAT": "json"}
    return subprocess.run(
        [sys.executable, "-m", "uro_recs.app.cli", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )


def test_migrate_sync_serve_recommend_and_batch_recommend(
    empty_database: str,  # noqa: F811
    community: Community,  # noqa: F811
    tmp_path: Path,
) -> None:
    asyncio.run(load_community(empty_database, community))
    config = tmp_path / "uro-recs.toml"
    store = tmp_path / "store"
    config.write_text(
        f'store = "{store}"\n[database]\nurl = "{empty_database}"\n'
        '[sync]\nmodel = "als"\nkind = "als"\nbatch_n = 10\n'
    )

    migrated = uro_recs(config, "db", "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert "3 applied" in migrated.stdout
    again = uro_recs(config, "db", "migrate")
    assert "0 applied" in again.stdout and "3 already there" in again.stdout
    asyncio.run(load_events(empty_database, community))

    synced = uro_recs(config, "sync")
    assert synced.returncode == 0, synced.stderr
    assert "PUBLISHED" in synced.stdout and "uro-recs rollout als" in synced.stdout

    user = str(community.saves["user"].iloc[0])
    cluster = Cluster(
        store,
        {"als": 1},
        worker={"recent_events": True, "recent_events_refresh_ms": 100},
        database={"url": empty_database},
        ingest_workers=1,
    )
    with cluster.start(), Client(cluster.client_endpoint, model="als", timeout=10) as client:
        served = client.recommend(user, n=10)
        top = str(served.items[0])
        without_top = client.recommend(user, n=10, exclude=[top]).items
        # The user plays the top item now: through the broker into recs_events, and from there
        # into the model worker's filter, long before any retrain.
        played = Event(user, community.public[top], top, "play", datetime.now(UTC))
        assert client.ingest([played]) == 1
        wait_until(lambda: client.recommend(user, n=10).items == without_top, timeout_s=10)
        # Unfiltered, only items the user consumed in training can rank above `top`.
        trained_on = set(community.expected_pairs().query("user == @user")["item"])
        unfiltered = client.recommend(user, n=len(trained_on) + 1, filter_consumed=False).items
    assert not served.cold_start
    assert len(served.items) == 10
    assert all(str(item) in community.public for item in served.items)
    assert top not in without_top and len(without_top) == 10
    assert top in unfiltered  # only filter_consumed leaves recent items out

    batched = uro_recs(config, "batch-recommend")
    assert batched.returncode == 0, batched.stderr
    assert "generation 1 is LIVE" in batched.stdout

    async def rows_of(user: str) -> list[tuple[str, int, str]]:
        import asyncpg

        conn = await asyncpg.connect(empty_database)
        try:
            rows = await conn.fetch(
                "SELECT item_kind, rank, item_id::TEXT AS item_id"
                " FROM recs_live_user_recommendations WHERE user_id = $1 ORDER BY item_kind, rank",
                user,
            )
        finally:
            await conn.close()
        return [(r["item_kind"], r["rank"], r["item_id"]) for r in rows]

    rows = asyncio.run(rows_of(user))
    assert [(kind, rank) for kind, rank, _ in rows] == [
        (kind, rank) for kind in ("avatar", "map", "prop") for rank in range(1, 11)
    ]
    assert all(community.public[item] == kind for kind, _, item in rows)
    consumed = set(community.interactions[community.interactions["user"] == user]["item"])
    assert not consumed & {item for _, _, item in rows}


def test_the_sync_benchmark_runs_end_to_end_on_a_tiny_community(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    command = [
        sys.executable,
        "-m",
        "perf.sync_bench",
        "--interactions",
        "6000",
        "--users",
        "300",
        "--items",
        "400",
        "--events",
        "2000",
        "--json",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["sync_status"] == "published"
    assert results["batch_rows"] > 0
    assert results["ingest_events"] == 2000
