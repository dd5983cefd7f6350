"""The `ingest` op end to end: SDK -> broker -> ingest worker process -> PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from tests.cluster import Cluster
from tests.db_fixtures import TcpProxy, empty_database, proxy, with_database  # noqa: F401
from tests.test_db_ingest import START, count_events, make_events
from tests.test_metrics import free_port, get, sample
from uro_recs.core import protocol
from uro_recs.core.db import migrate
from uro_recs.sdk import AsyncClient, Client, Event, InvalidEvent, RetryPolicy, Unavailable


def migrated(url: str) -> str:
    with_database(url, migrate)
    return url


def stored(url: str) -> int:
    return with_database(url, count_events)


def ingest_cluster(
    tmp_path: Path,
    url: str,
    workers: int = 1,
    broker: dict[str, object] | None = None,
    **database: object,
) -> Cluster:
    settings = {"url": url, "retry_base_delay_s": 0.01, "retry_max_delay_s": 0.2, **database}
    return Cluster(tmp_path, {}, broker=broker, database=settings, ingest_workers=workers)


def test_events_sent_through_the_broker_are_stored_once_even_when_sent_again(
    tmp_path: Path,
    empty_database: str,  # noqa: F811
) -> None:
    url = migrated(empty_database)
    events = make_events(2_500, seed=11)
    with ingest_cluster(tmp_path, url) as cluster:
        cluster.start()
        with Client(cluster.client_endpoint, timeout=10) as client:
            first = client.ingest(events)  # three requests: 1000 + 1000 + 500
            after_first = stored(url)
            again = client.ingest(events[:1_200])

        async def concurrently() -> list[int]:
            fresh = make_events(2_000, seed=12)
            async with AsyncClient(cluster.client_endpoint, timeout=10) as client:
                calls = [client.ingest(fresh[i : i + 40]) for i in range(0, 2_000, 40)]
                return await asyncio.gather(*calls)

        accepted = asyncio.run(concurrently())
    assert (first, after_first, again) == (2_500, 2_500, 1_200)
    assert accepted == [40] * 50
    assert stored(url) == 4_500


def test_a_request_with_one_bad_event_is_refused_whole_and_the_worker_keeps_going(
    tmp_path: Path,
    empty_database: str,  # noqa: F811
) -> None:
    url = migrated(empty_database)
    good = [event.wire() for event in make_events(3, seed=13)]
    with ingest_cluster(tmp_path, url) as cluster:
        cluster.start()
        bad = cluster.call("ingest", args={"events": [*good, {**good[0], "item_kind": "hat"}]})
        wrong_op = cluster.call("recommend", model=protocol.INGEST_WORKERS, args={"user": 1})
        with Client(cluster.client_endpoint, timeout=10) as client:
            with pytest.raises(InvalidEvent):  # the SDK checks before sending
                client.ingest([Event("not-a-uuid", "map", good[0]["item_id"], "play", START)])
            ok = cluster.call("ingest", args={"events": good})
    assert bad["ok"] is False and bad["error"]["code"] == "bad_request"
    assert "events[3].item_kind" in bad["error"]["message"]
    assert wrong_op["error"]["code"] == "unsupported"
    assert ok["result"] == {"accepted": 3}
    assert stored(url) == 3


def test_without_an_ingest_worker_the_broker_says_so(tmp_path: Path) -> None:
    with Cluster(tmp_path, {}) as cluster:
        cluster.start()
        reply = cluster.call("ingest", args={"events": [make_events(1)[0].wire()]})
    assert reply["error"]["code"] == "unknown_model"
    assert "ingest" in reply["error"]["message"]


def test_killing_an_ingest_worker_under_load_loses_and_duplicates_nothing(
    tmp_path: Path,
    empty_database: str,  # noqa: F811
) -> None:
    url = migrated(empty_database)
    events = make_events(6_000, seed=14)
    with ingest_cluster(tmp_path, url, workers=2) as cluster:
        cluster.start()
        victim = cluster.workers[0]

        async def load() -> list[int]:
            async with AsyncClient(cluster.client_endpoint, timeout=15) as client:
                calls = []
                for i in range(0, len(events), 20):
                    calls.append(asyncio.ensure_future(client.ingest(events[i : i + 20])))
                    await asyncio.sleep(0.002)  # a stream, not one burst
                    if i == 1_000:
                        os.kill(victim.pid, signal.SIGKILL)
                return await asyncio.gather(*calls)

        accepted = asyncio.run(load())
        counters = cluster.stats()["counters"]
    assert victim.poll() == -signal.SIGKILL
    assert sum(accepted) == len(events)  # every request answered ok, after redelivery or retry
    assert stored(url) == len(events)  # and each event is in the table once
    assert counters.get("workers_lost", 0) == 1


def test_while_the_database_is_down_ingest_answers_unavailable_then_recovers(
    tmp_path: Path,
    empty_database: str,  # noqa: F811
    proxy: TcpProxy,  # noqa: F811
) -> None:
    url = migrated(empty_database)
    events = make_events(200, seed=15)
    # Retries give up after about 0.1 s, well inside the 3 s outage.
    metrics = f"127.0.0.1:{free_port()}"
    broker: dict[str, object] = {"metrics_address": metrics}
    with ingest_cluster(tmp_path, proxy.url(url), broker=broker, retry_attempts=3) as cluster:
        cluster.start()
        with Client(cluster.client_endpoint, timeout=10, retry=RetryPolicy(attempts=1)) as client:
            proxy.outage(3.0)
            with pytest.raises(Unavailable):
                client.ingest(events[:100])
            time.sleep(3.5)
            accepted = client.ingest(events)
        # The ingest worker's own figures reach the broker's metrics endpoint.
        scrape = get(f"http://{metrics}/metrics")
    assert accepted == 200
    assert stored(url) == 200
    assert sample(scrape, "uro_recs_ingest_events_total") == 200
    assert sample(scrape, "uro_recs_ingest_database_errors_total") >= 1


def test_serve_runs_the_ingest_workers_beside_the_models(
    trained_store: Path,
    empty_database: str,  # noqa: F811
) -> None:
    url = migrated(empty_database)
    cluster = Cluster(trained_store, {"als": 1}, database={"url": url}, ingest_workers=1)
    with cluster, cluster.serve() as serve:
        cluster.wait_for_workers({"als": 1, protocol.INGEST_WORKERS: 1})
        events = [event.wire() for event in make_events(5, seed=16)]
        reply = cluster.call("ingest", args={"events": events})
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=30) == 0
    assert reply["result"] == {"accepted": 5}
    assert stored(url) == 5
