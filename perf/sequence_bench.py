"""Sequence models and live events: what following a user's events costs a request, and how
soon an ingested event changes what the user is offered.

Trains a sequence model (RNN4Rec by default) on the demo data, serves it with one worker that
follows recent events (`recent_events_refresh_ms`) and one ingest worker, on a throwaway
database of the local PostgreSQL. Then, one request at a time:
- `recommend` latency for users with no events since the export (the model's precomputed
  user embedding), the same users once each has an event (their sequence goes through the
  model), and with an explicit `seq` in the request;
- per user, the time from the `ingest` reply to the first `recommend` (polled every 5 ms)
  whose answer changed (users whose top 10 the event did not move within 5 s are counted).

    python -m perf.sequence_bench [--kind rnn4rec] [--users 40] [--refresh-ms 1000]
                                  [--epochs 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.cluster import Cluster
from tests.db_fixtures import fresh_database
from uro_recs.core.config import DatabaseConfig
from uro_recs.core.db import Database, migrate
from uro_recs.core.logs import configure_logging
from uro_recs.pipeline.demo_data import make_interactions
from uro_recs.pipeline.training import train_and_save
from uro_recs.sdk import Client, Event

POLL_S = 0.005
# Well past the refresh interval: an answer still the same then is one the event did not move.
UNCHANGED_AFTER_S = 5.0


def timed(call: Any, rounds: int = 1) -> list[float]:
    seconds = []
    for _ in range(rounds):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return seconds


def summary(name: str, seconds: list[float]) -> dict[str, Any]:
    ordered = sorted(seconds)
    return {
        "what": name,
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3),
    }


def measure(client: Client, data: Any, users: list[str]) -> list[dict[str, Any]]:
    kinds = data.drop_duplicates("item").set_index("item")["item_kind"]
    consumed = data.groupby("user")["item"].agg(set)
    plain = [s for u in users for s in timed(lambda u=u: client.recommend(u, n=10), 5)]
    rows = [summary("recommend, no events", plain)]
    explicit = [list(kinds.index[i : i + 10]) for i in range(len(users))]
    rows.append(
        summary(
            "recommend, explicit seq of 10",
            [
                s
                for u, seq in zip(users, explicit, strict=True)
                for s in timed(lambda u=u, seq=seq: client.recommend(u, n=10, seq=seq), 5)
            ],
        )
    )
    delays, unchanged = [], 0
    for k, user in enumerate(users):
        before = list(client.recommend(user, n=10).items)
        played = next(
            item
            for item in kinds.index[k * 7 :]
            if item not in consumed[user] and item not in before
        )
        event = Event(user, kinds[played], played, "play", datetime.now(UTC))
        client.ingest([event])
        acknowledged = time.perf_counter()
        while list(client.recommend(user, n=10).items) == before:
            if time.perf_counter() - acknowledged > UNCHANGED_AFTER_S:
                unchanged += 1  # the new sequence ranks the same top 10: nothing to time
                break
            time.sleep(POLL_S)
        else:
            delays.append(time.perf_counter() - acknowledged)
    rows.append(summary(f"ingest reply -> changed answer ({unchanged} unchanged)", delays))
    rows.append(
        summary(
            "recommend, after an event (sequence through the model)",
            [s for u in users for s in timed(lambda u=u: client.recommend(u, n=10), 5)],
        )
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", default="rnn4rec")
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--refresh-ms", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    configure_logging("json", "warning")
    data = make_interactions()
    users = data["user"].drop_duplicates().head(args.users).tolist()
    with tempfile.TemporaryDirectory(prefix="sequence-bench-") as scratch:
        store = Path(scratch)
        train_and_save(store, args.kind, data, args.kind, "v1", epochs=args.epochs, test_fraction=0)
        for url in fresh_database():
            asyncio.run(_migrate(url))
            cluster = Cluster(
                store,
                {args.kind: 1},
                worker={"recent_events": True, "recent_events_refresh_ms": args.refresh_ms},
                database={"url": url},
                ingest_workers=1,
            )
            with cluster:
                cluster.start()
                with Client(cluster.client_endpoint, model=args.kind, timeout=30) as client:
                    rows = measure(client, data, users)
    print(
        f"\n{args.kind} on the demo data, 1 worker, recent_events_refresh_ms {args.refresh_ms},"
        " one request at a time"
    )
    print(f"{'what':<56} {'n':>5} {'p50 ms':>9} {'p99 ms':>9}")
    for row in rows:
        print(f"{row['what']:<56} {row['n']:>5} {row['p50_ms']:>9} {row['p99_ms']:>9}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


async def _migrate(url: str) -> None:
    async with await Database.connect(DatabaseConfig(url=url)) as db:
        await migrate(db)


if __name__ == "__main__":
    main()
