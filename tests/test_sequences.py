"""Sequence models: a request's `seq`, and the live sequence the recent events make, ranked
exactly as libreco's `recommend_user(user, n, seq=...)` ranks them."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from tests.cluster import Cluster
from tests.db_fixtures import empty_database, wait_until, with_database  # noqa: F401
from uro_recs.core.db import migrate
from uro_recs.sdk import Client, Event, Unsupported

TINY: dict[str, Any] = {"epochs": 1, "embed_size": 8, "test_fraction": 0.0, "threads": 1}


@pytest.fixture(scope="module")
def rnn(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, pd.DataFrame]:
    from uro_recs.core.model_store import save_version, set_current
    from uro_recs.pipeline.demo_data import make_interactions
    from uro_recs.pipeline.training import train_model

    data = make_interactions(n_users=150, n_items=250, n_interactions=4_000, seed=21)
    store = tmp_path_factory.mktemp("sequences")
    trained = train_model(data, "rnn4rec", **TINY)
    save_version(store, "rnn4rec", "v1", trained.save, trained.manifest_fields())
    set_current(store, "rnn4rec", "v1")
    return store, trained, data


def libreco_with_seq(trained: Any, user: str, n: int, seq: list[str]) -> list[str]:
    with trained.graph.as_default():
        ranked = trained.model.recommend_user(user, n, seq=seq, filter_consumed=True)
    return [str(item) for item in ranked[user]]


def test_an_explicit_seq_is_ranked_as_libreco_ranks_it(rnn: tuple[Path, Any, Any]) -> None:
    from uro_recs.worker.engine import RecommendQuery, load_engine

    store, trained, _ = rnn
    engine = load_engine(store, "rnn4rec")
    items = [trained.data_info.id2item[i] for i in range(trained.data_info.n_items)]
    rng = random.Random(5)
    users = list(trained.data_info.user2id)[:40]
    for user in [*users, "someone-new"]:
        seq = rng.sample(items, rng.randint(1, 15))
        (got,) = engine.recommend_batch([RecommendQuery(user, 10, True, seq=tuple(seq))])
        assert got.items == libreco_with_seq(trained, user, 10, seq), user
        assert not got.cold_start
        (without,) = engine.recommend_batch([RecommendQuery(user, 10, True)])
        assert without.cold_start == (user == "someone-new")

    user = users[0]
    seq = rng.sample(items, 4)
    (with_unknown,) = engine.recommend_batch(
        [RecommendQuery(user, 10, True, seq=("no-such-item", *seq))]
    )
    assert with_unknown.items == libreco_with_seq(trained, user, 10, seq)


def test_only_sequence_models_take_a_seq(
    rnn: tuple[Path, Any, Any], trained_store: Path, tmp_path: Path
) -> None:
    store, trained, _ = rnn
    user = next(iter(trained.data_info.user2id))
    item = trained.data_info.id2item[0]
    (tmp_path / "als").symlink_to(trained_store / "als")
    (tmp_path / "rnn4rec").symlink_to(store / "rnn4rec")
    with (
        Cluster(tmp_path, {"als": 1, "rnn4rec": 1}).start() as cluster,
        Client(cluster.client_endpoint, timeout=10) as client,
    ):
        answer = client.recommend(user, n=5, seq=[item], model="rnn4rec")
        assert list(answer.items) == libreco_with_seq(trained, user, 5, [item])
        with pytest.raises(Unsupported, match="takes no seq"):
            client.recommend(user, n=5, seq=[item], model="als")


def test_an_ingested_event_changes_what_a_sequence_model_offers_next(
    rnn: tuple[Path, Any, pd.DataFrame],
    empty_database: str,  # noqa: F811
) -> None:
    store, trained, data = rnn
    with_database(empty_database, migrate)
    user = str(data["user"].iloc[0])
    consumed = set(data[data["user"] == user]["item"])
    kinds = data.drop_duplicates("item").set_index("item")["item_kind"]
    cluster = Cluster(
        store,
        {"rnn4rec": 1},
        worker={"recent_events": True, "recent_events_refresh_ms": 100},
        database={"url": empty_database},
        ingest_workers=1,
    )
    with cluster.start(), Client(cluster.client_endpoint, model="rnn4rec", timeout=10) as client:
        before = list(client.recommend(user, n=10).items)
        played = next(item for item in kinds.index if item not in consumed and item not in before)
        assert client.ingest([Event(user, kinds[played], played, "play", datetime.now(UTC))]) == 1
        wait_until(lambda: list(client.recommend(user, n=10).items) != before, timeout_s=10)
        after = list(client.recommend(user, n=10).items)

    # The worker ranks from the training sequence plus the new item, and leaves the new item
    # out as consumed: libreco's answer for that sequence, without it.
    with trained.graph.as_default():
        sequence = [
            trained.data_info.id2item[i]
            for i in trained.data_info.user_consumed[trained.data_info.user2id[user]]
        ]
    expected = [i for i in libreco_with_seq(trained, user, 11, [*sequence, played]) if i != played]
    assert after == expected[:10]
