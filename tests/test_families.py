"""Every LibRecommender family uro-recs trains: trained on demo data, saved, loaded the way a
worker loads it, served through the real broker and workers, and answering exactly what the
in-process libreco model that was trained answers."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tests.cluster import Cluster
from uro_recs.core.families import FAMILIES, KINDS
from uro_recs.sdk import Client

VERSION = "v1"
# Tiny epochs and embeddings: this checks serving equals libreco, not model quality.
TINY: dict[str, Any] = {"epochs": 1, "embed_size": 8, "test_fraction": 0.0, "threads": 1}
SERVED_TOGETHER = 8  # models per cluster: bounds the memory of TensorFlow workers at once


@pytest.fixture(scope="module")
def small_data() -> pd.DataFrame:
    from uro_recs.pipeline.demo_data import make_interactions

    return make_interactions(n_users=120, n_items=200, n_interactions=3_000, seed=13)


@pytest.fixture(scope="module")
def family_store(tmp_path_factory: pytest.TempPathFactory, small_data: pd.DataFrame) -> Any:
    """Every family trained once: (store, {kind: TrainedModel}); the models stay in process."""
    from uro_recs.core.model_store import save_version, set_current
    from uro_recs.pipeline.training import train_model

    store = tmp_path_factory.mktemp("families")
    trained = {}
    for kind in KINDS:
        model = train_model(small_data, kind, **TINY)
        save_version(store, kind, VERSION, model.save, model.manifest_fields())
        set_current(store, kind, VERSION)
        trained[kind] = model
    return store, trained


def in_process(trained: Any, user: str, n: int, filter_consumed: bool) -> list[Any]:
    from uro_recs.worker.libreco_engine import make_fallbacks_deterministic

    make_fallbacks_deterministic(trained.data_info)  # as served: no random fallback
    with trained.in_graph():
        ranked = trained.model.recommend_user(user, n, filter_consumed=filter_consumed)
    return [str(item) for item in ranked[user]]


def same_ranking(trained: Any, user: str, got: list[Any], expected: list[Any]) -> bool:
    """Equal lists; or, where libreco's own scores tie exactly (its order among them is its
    sort's accident), lists whose items score the same rank by rank."""
    if got == expected:
        return True
    if len(got) != len(expected):
        return False
    with trained.in_graph():
        scores = [
            trained.model.predict(user=[user] * len(ids), item=ids) for ids in (got, expected)
        ]
    return bool(np.array_equal(*scores))


def cases(trained: Any) -> Iterator[tuple[str, int, bool]]:
    """Every user: n = 1, 10 and one past the user's consumed items; filtering on and off."""
    data_info = trained.data_info
    for user, inner in data_info.user2id.items():
        consumed = len(data_info.user_consumed[inner])
        for n in sorted({1, 10, min(consumed + 1, data_info.n_items)}):
            for filter_consumed in (True, False):
                yield user, n, filter_consumed


@pytest.mark.parametrize("kind", KINDS)
def test_the_engine_a_worker_loads_answers_what_libreco_answers_in_process(
    family_store: Any, kind: str
) -> None:
    from uro_recs.worker.engine import load_engine

    store, trained = family_store
    model = trained[kind]
    engine = load_engine(store, kind)
    expected_engine = {"embedding": "EmbeddingEngine", "deepfm": "DeepFMEngine"}
    assert type(engine).__name__ == expected_engine.get(FAMILIES[kind].engine, "LibrecoEngine")

    for user, n, filter_consumed in cases(model):
        (answer,) = engine.recommend([user], n, filter_consumed)
        expected = in_process(model, user, n, filter_consumed)
        assert same_ranking(model, user, answer.items, expected), (user, n, filter_consumed)
        assert not answer.cold_start

    (cold,) = engine.recommend(["no-such-user"], 10, True)
    assert cold.cold_start and cold.items == model.popular_items[:10]
    user = next(iter(model.data_info.user2id))
    items = [model.data_info.id2item[0], "no-such-item", model.data_info.id2item[1]]
    scores, cold_start = engine.predict(user, items)
    with model.in_graph():
        expected = model.model.predict(user=[user, user], item=[items[0], items[2]])
    assert scores[1] is None and not cold_start
    assert scores[0] is not None and scores[2] is not None
    assert np.allclose([scores[0], scores[2]], np.atleast_1d(expected), atol=1e-5)


def test_batches_do_not_change_answers(family_store: Any) -> None:
    """An answer is the same whether its user was scored alone or with others."""
    from uro_recs.worker.engine import load_engine

    store, trained = family_store
    for kind in ("als", "svd", "lightgcn"):
        engine = load_engine(store, kind)
        users = list(trained[kind].data_info.user2id)
        together = engine.recommend(users, 50, True)
        alone = [engine.recommend([user], 50, True)[0] for user in users]
        assert together == alone, kind


def test_numpy_served_families_load_without_tensorflow_torch_or_libreco(family_store: Any) -> None:
    """The workers of every embedding family (trained by TF or torch) and of DeepFM import
    none of the training libraries: one process loads them all and says what it imported."""
    store, _ = family_store
    kinds = [kind for kind in KINDS if FAMILIES[kind].engine in ("embedding", "deepfm")]
    script = (
        "import sys; from pathlib import Path; from uro_recs.worker.engine import load_engine\n"
        f"for kind in {kinds!r}:\n"
        f"    load_engine(Path({str(store)!r}), kind).warm_up()\n"
        "print(sorted(m for m in ('tensorflow', 'torch', 'libreco', 'gensim') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"  # the lines before are log events
    assert {"lightgcn", "svd", "item2vec", "deepfm"} <= set(kinds)


@pytest.mark.parametrize(
    "group", [KINDS[i : i + SERVED_TOGETHER] for i in range(0, len(KINDS), SERVED_TOGETHER)]
)
def test_every_family_is_served_through_the_broker_and_workers(
    family_store: Any, group: tuple[str, ...]
) -> None:
    store, trained = family_store
    with (
        Cluster(store, dict.fromkeys(group, 1)).start() as cluster,
        Client(cluster.client_endpoint, timeout=30) as client,
    ):
        for kind in group:
            model = trained[kind]
            users = list(model.data_info.user2id)
            answers = client.recommend_many(users, n=10, model=kind)
            for user, answer in zip(users, answers, strict=True):
                expected = in_process(model, user, 10, True)
                assert same_ranking(model, user, list(answer.items), expected), (kind, user)
            cold = client.recommend("no-such-user", n=5, model=kind)
            assert cold.cold_start and list(cold.items) == model.popular_items[:5]


def test_a_deepfm_without_item_features_is_served_by_libreco(
    tmp_path: Path, small_data: pd.DataFrame
) -> None:
    from uro_recs.pipeline.training import train_and_save
    from uro_recs.worker.engine import load_engine

    plain = small_data.drop(columns=["item_kind"])
    train_and_save(tmp_path, "deepfm", plain, "deepfm", version=VERSION, **TINY)
    engine = load_engine(tmp_path, "deepfm")
    user = str(plain["user"].iloc[0])
    assert type(engine).__name__ == "LibrecoEngine"
    assert len(engine.recommend([user], 10, True)[0].items) == 10


def test_an_unknown_hyperparameter_is_refused_naming_what_the_family_takes(
    small_data: pd.DataFrame,
) -> None:
    from uro_recs.pipeline.interactions import InvalidInput
    from uro_recs.pipeline.training import train_model

    with pytest.raises(InvalidInput) as refused:
        train_model(small_data, "item_cf", params={"k_simm": 5}, **TINY)
    message = str(refused.value)
    assert message.startswith("item_cf takes no parameter k_simm; it takes ")
    assert "k_sim" in message and "seed" not in message


def test_the_readme_lists_every_family() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    listed = {line.split("`")[1] for line in readme.splitlines() if line.startswith("| `")}
    assert set(KINDS) <= listed
