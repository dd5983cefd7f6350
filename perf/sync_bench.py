"""Time the database half on a synthetic uro community: sync (export -> train -> evaluate ->
publish), batch-recommend's write rate and the event-ingest rate.

Creates a throwaway database on the server at URO_RECS_TEST_POSTGRES (default: local
PostgreSQL, trust auth), fills uro's tables (a quarter of the interactions as recs_events),
runs everything with the default settings, prints a table, drops the database.

    python -m perf.sync_bench [--interactions 1000000] [--users 20000] [--items 10000]
                              [--events 100000] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from uro_recs.app.cli import apply_thread_limits

apply_thread_limits(2)

from perf.ingest_bench import events  # noqa: E402
from tests.db_fixtures import fresh_database, load_community, load_events, make_community  # noqa: E402
from uro_recs.core.config import Config, DatabaseConfig, SyncConfig  # noqa: E402
from uro_recs.core.db import Database, migrate  # noqa: E402
from uro_recs.core.logs import configure_logging  # noqa: E402
from uro_recs.pipeline.batch import batch_recommend  # noqa: E402
from uro_recs.pipeline.ingest import ingest_events  # noqa: E402
from uro_recs.pipeline.sync import run_sync  # noqa: E402


async def measure(url: str, store: Path, args: argparse.Namespace) -> dict[str, Any]:
    config = Config(
        store=store,
        database=DatabaseConfig(url=url),
        sync=replace(SyncConfig(), batch_n=args.n),
    )
    async with await Database.connect(config.database) as db:
        await migrate(db)
    results: dict[str, Any] = {}
    started = time.perf_counter()
    sync = await run_sync(config, force=True, say=print)  # times it, whatever it scores
    results["sync_seconds"] = round(time.perf_counter() - started, 1)
    results["sync_phases"] = {k: round(v, 1) for k, v in sync.timings.items()}
    results["sync_status"] = sync.status
    results["metrics"] = sync.metrics
    print(sync.summary())

    report = await batch_recommend(config, say=print)
    results["batch_rows"] = report.n_rows
    results["batch_rows_per_s"] = round(report.rows_per_s)
    results["batch_phases"] = {k: round(v, 1) for k, v in report.timings.items()}
    print(report.summary())

    async with await Database.connect(config.database) as db:
        stats = await ingest_events(db, events(args.events))
    results["ingest_events"] = stats.received
    results["ingest_events_per_s"] = round(stats.events_per_s)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interactions", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("-n", type=int, default=SyncConfig.batch_n, help="per user and kind")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    configure_logging("json")

    started = time.perf_counter()
    community = make_community(
        n_users=args.users, n_items=args.items, n_interactions=args.interactions
    )
    for url in fresh_database():
        asyncio.run(prepare(url, community))
        print(
            f"community: {args.interactions:,} interactions of {args.users:,} users with"
            f" {args.items:,} items, loaded in {time.perf_counter() - started:.0f} s"
        )
        with tempfile.TemporaryDirectory(prefix="sync-bench-") as store:
            results = asyncio.run(measure(url, Path(store), args))
    results["interactions"] = args.interactions
    print(
        f"\nsync of {args.interactions:,} interactions: {results['sync_seconds']} s"
        f" ({results['sync_phases']})\n"
        f"batch-recommend: {results['batch_rows']:,} rows"
        f" at {results['batch_rows_per_s']:,} rows/s\n"
        f"ingest: {results['ingest_events']:,} events"
        f" at {results['ingest_events_per_s']:,} events/s"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


async def prepare(url: str, community: Any) -> None:
    await load_community(url, community)
    async with await Database.connect(DatabaseConfig(url=url)) as db:
        await migrate(db)
    await load_events(url, community)


if __name__ == "__main__":
    main()
