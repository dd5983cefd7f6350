"""End to end through the SDK: broker and workers as real processes, answers equal to libreco's."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from tests.cluster import Cluster
from tests.conftest import Reference
from uro_recs.sdk import AsyncClient, Client, Unsupported


@pytest.fixture(scope="module")
def cluster(trained_store: Path) -> Iterator[Cluster]:
    with Cluster(trained_store, {"als": 2, "deepfm": 1}).start() as running:
        yield running


@pytest.mark.parametrize("model", ["als", "deepfm"])
def test_recommend_through_the_broker_equals_libreco_in_process(
    cluster: Cluster, references: dict[str, Reference], model: str
) -> None:
    reference = references[model]

    async def ask_concurrently() -> list[tuple[str, ...]]:
        async with AsyncClient(cluster.client_endpoint, model=model, timeout=10) as client:
            answers = await asyncio.gather(*(client.recommend(u, n=10) for u in reference.users))
        assert all(answer.cold_start is False for answer in answers)
        return [tuple(str(item) for item in answer.items) for answer in answers]

    through_broker = asyncio.run(ask_concurrently())
    expected = [tuple(reference.recommend(user, 10)) for user in reference.users]
    assert through_broker == expected
    with Client(cluster.client_endpoint, model=model, timeout=10) as client:
        many = client.recommend_many(reference.users, n=10)
    assert [tuple(str(i) for i in rec.items) for rec in many] == expected
    assert [rec.user for rec in many] == reference.users


def test_unknown_user_gets_the_same_popular_items_every_time(cluster: Cluster) -> None:
    with Client(cluster.client_endpoint, model="als") as client:
        first = client.recommend("not-a-uro-user", n=20)
        second = client.recommend("another-new-user", n=20)
    assert first.cold_start and second.cold_start
    assert first.items == second.items
    assert len(set(first.items)) == 20


def test_exclude_and_filter_consumed_are_applied(
    cluster: Cluster, references: dict[str, Reference]
) -> None:
    user = references["als"].users[10]
    with Client(cluster.client_endpoint, model="als") as client:
        plain = client.recommend(user, n=10)
        excluded = client.recommend(user, n=10, exclude=plain.items[:3])
        unfiltered = client.recommend(user, n=10, filter_consumed=False)
    assert excluded.items[:7] == plain.items[3:]
    assert not set(excluded.items) & set(plain.items[:3])
    assert tuple(unfiltered.items) == tuple(references["als"].recommend(user, 10, False))


def test_similar_items_is_unsupported_for_deepfm_and_answered_for_als(
    cluster: Cluster, demo_interactions: pd.DataFrame
) -> None:
    item = str(demo_interactions["item"].iloc[0])
    with Client(cluster.client_endpoint, model="als") as client:
        similar = client.similar_items(item, n=5)
        assert len(similar.items) == 5 and item not in similar.items
        with pytest.raises(Unsupported):
            client.similar_items(item, model="deepfm")


def test_info_lists_every_model_with_its_workers(cluster: Cluster) -> None:
    with Client(cluster.client_endpoint) as client:
        models = {m.name: m for m in client.info()}
    assert models["als"].workers == 2 and models["deepfm"].workers == 1
    assert models["als"].libreco_class == "ALS" and "similar_items" in models["als"].ops
    assert "similar_items" not in models["deepfm"].ops


def test_500_calls_in_flight_on_one_async_client(cluster: Cluster, demo_users: list[str]) -> None:
    async def burst() -> None:
        async with AsyncClient(cluster.client_endpoint, model="als", timeout=10) as client:
            answers = await asyncio.gather(
                *(client.recommend(demo_users[i % len(demo_users)], n=5) for i in range(500))
            )
        assert [a.user for a in answers] == [demo_users[i % len(demo_users)] for i in range(500)]
        assert all(len(a.items) == 5 for a in answers)

    asyncio.run(burst())


def test_one_sync_client_shared_by_threads(cluster: Cluster, demo_users: list[str]) -> None:
    failures: list[BaseException] = []
    with Client(cluster.client_endpoint, model="als", timeout=10) as client:

        def ask(offset: int) -> None:
            try:
                for i in range(25):
                    user = demo_users[(offset + i) % len(demo_users)]
                    assert client.recommend(user, n=3).user == user
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=ask, args=(k * 7,)) for k in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []


def test_two_stage_serving_answers_what_the_engine_ranks(
    trained_store: Path, references: dict[str, Reference]
) -> None:
    from uro_recs.worker.deepfm_engine import DeepFMEngine
    from uro_recs.worker.engine import load_engine

    engine = load_engine(trained_store, "deepfm")
    assert isinstance(engine, DeepFMEngine)
    engine.retrieve_with(load_engine(trained_store, "als"), 40)
    users = references["deepfm"].users
    expected = [answer.items for answer in engine.recommend(users, 10, True)]
    options = {"deepfm": {"retrieve_from": "als", "candidates": 40}}
    with (
        Cluster(trained_store, {"deepfm": 1}, model_options=options).start() as running,
        Client(running.client_endpoint, model="deepfm", timeout=10) as client,
    ):
        answers = client.recommend_many(users, n=10)
    assert [list(answer.items) for answer in answers] == expected


def test_two_stage_on_a_model_that_is_not_a_deepfm_stops_the_worker_with_one_line(
    trained_store: Path,
) -> None:
    options = {"als": {"retrieve_from": "deepfm"}}
    cluster = Cluster(trained_store, {"als": 1}, model_options=options)
    worker = cluster.spawn("worker", "--model", "als")
    assert worker.wait(timeout=120) == 2
    output = next(cluster.root.glob("worker-*.log")).read_text().strip().splitlines()
    assert output[-1].startswith("uro-recs worker: models['als'].retrieve_from: two-stage"), output
