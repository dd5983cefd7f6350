"""The event-ingest rate: straight into the database (the SDK's `ingest_events`) and through the
broker (`ingest` requests answered by ingest worker processes after their commit).

Creates a throwaway database on the local PostgreSQL (as the tests do), then for each request
size keeps `--concurrency` requests in flight over one DEALER socket (closed loop, request
bodies encoded up front so the load generator costs little) and prints events/s with the
per-request latency. Every event is new, so every one is an insert.

    python -m perf.ingest_bench [--events 60000] [--sizes 1,10,100,1000] [--concurrency 64]
                                [--workers 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgpack
import zmq

from perf.loadgen import RunResult
from tests.cluster import Cluster
from tests.db_fixtures import fresh_database
from uro_recs.core import protocol
from uro_recs.core.config import DatabaseConfig
from uro_recs.core.db import Database, migrate
from uro_recs.core.logs import configure_logging
from uro_recs.pipeline.ingest import Event, ingest_events


def events(n: int, seed: int = 0) -> list[Event]:
    """n distinct events of 1,000 users with 5,000 items, one millisecond apart."""
    start = datetime(2026, 11, 27, tzinfo=UTC) + timedelta(days=seed)
    users = [uuid.uuid4() for _ in range(1_000)]
    items = [uuid.uuid4() for _ in range(5_000)]
    kinds = ("avatar", "map", "prop")
    return [
        Event(users[i % 1_000], kinds[i % 3], items[(i * 7) % 5_000], "play", start + i * _MS)
        for i in range(n)
    ]


_MS = timedelta(milliseconds=1)


async def direct_rate(url: str, n: int) -> dict[str, Any]:
    async with await Database.connect(DatabaseConfig(url=url)) as db:
        stats = await ingest_events(db, events(n, seed=1))
    return {"path": "direct (ingest_events)", "events_per_s": round(stats.events_per_s)}


def broker_rate(endpoint: str, n: int, size: int, concurrency: int, seed: int) -> dict[str, Any]:
    wire = [event.wire() for event in events(n, seed)]
    bodies = [
        protocol.encode_request(i, "ingest", None, {"events": wire[start : start + size]}, 30_000)
        for i, start in enumerate(range(0, n, size))
    ]
    result = RunResult(f"broker, {size}/request", "closed", 0.0, 0.0)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sent_at: dict[int, float] = {}
    pending = iter(enumerate(bodies))

    def send_next() -> None:
        for request_id, body in itertools.islice(pending, 1):
            sent_at[request_id] = time.perf_counter()
            sock.send_multipart([b"", body])
            result.sent += 1

    accepted = 0  # events stored (result.ok counts requests)
    started = time.perf_counter()
    for _ in range(concurrency):
        send_next()
    while sent_at:
        if not sock.poll(30_000):
            break
        _, body = sock.recv_multipart()
        reply = msgpack.unpackb(body)
        result.record((time.perf_counter() - sent_at.pop(reply["id"])) * 1e6)
        if reply["ok"]:
            result.ok += 1
            accepted += reply["result"]["accepted"]
        else:
            result.errors[reply["error"]["code"]] += 1
        send_next()
    seconds = time.perf_counter() - started
    sock.close()
    summary = result.summary()
    return {
        "path": f"broker, {size} event{'s' if size > 1 else ''}/request",
        "events_per_s": round(accepted / seconds),
        "requests_per_s": round(result.sent / seconds),
        "p50_ms": summary["p50_ms"],
        "p99_ms": summary["p99_ms"],
        "errors": dict(result.errors),
        "unanswered": summary["unanswered"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=60_000, help="per measurement")
    parser.add_argument("--sizes", default="1,10,100,1000", help="events per request")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    parser.add_argument("--workers", type=int, default=1, help="ingest workers")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    configure_logging("json")
    rows: list[dict[str, Any]] = []
    for url in fresh_database():
        asyncio.run(_migrate(url))
        rows.append(asyncio.run(direct_rate(url, args.events)))
        with tempfile.TemporaryDirectory(prefix="ingest-bench-") as store:
            cluster = Cluster(Path(store), {}, database={"url": url}, ingest_workers=args.workers)
            with cluster:
                cluster.start()
                for seed, size in enumerate(int(s) for s in args.sizes.split(",")):
                    row = broker_rate(
                        cluster.client_endpoint, args.events, size, args.concurrency, seed + 2
                    )
                    rows.append(row)
    print(
        f"\ningest, {args.events:,} new events per line, {args.workers} ingest worker(s),"
        f" {args.concurrency} requests in flight"
    )
    print(f"{'path':<32} {'events/s':>10} {'p50 ms':>8} {'p99 ms':>8}  errors")
    for row in rows:
        p50, p99 = row.get("p50_ms", ""), row.get("p99_ms", "")
        errors = row.get("errors") or ""
        print(f"{row['path']:<32} {row['events_per_s']:>10,} {p50:>8} {p99:>8}  {errors}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    failed = [row["path"] for row in rows if row.get("errors") or row.get("unanswered")]
    if failed:
        raise SystemExit(f"requests failed or went unanswered: {failed}")


async def _migrate(url: str) -> None:
    async with await Database.connect(DatabaseConfig(url=url)) as db:
        await migrate(db)


if __name__ == "__main__":
    main()
