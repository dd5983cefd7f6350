from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pandas as pd
import pytest

from tests.conftest import Reference
from uro_recs.core.config import OWN_FM
from uro_recs.core.model_store import StoreCorrupt, current_version, verify, version_dir
from uro_recs.pipeline.training import train_model
from uro_recs.worker.deepfm_engine import DeepFMEngine
from uro_recs.worker.engine import (
    BadArgument,
    Engine,
    Id,
    RecommendQuery,
    UnknownItem,
    Unsupported,
    load_engine,
)
from uro_recs.worker.libreco_env import quiet

# isort: split
import tensorflow as tf
from libreco.data import split_by_ratio_chrono

MODELS = ("als", "deepfm")
# TF sums DeepFM's terms in float32 in its own order and the numpy engine in another (outputs
# differ by ~3e-7). The ALS engine scores a batch of users with one matrix product where libreco
# scores one user with a matrix-vector product, and BLAS may round those differently in the last
# float32 bit. So two items whose libreco scores are this close may come out in either order;
# every other position must be identical.
NEAR_TIE = 1e-6


def assert_same_ranking(
    name: str, ours: Sequence[Id], theirs: Sequence[Id], scores: Callable[[list[Id]], list[float]]
) -> None:
    """Identical lists, or lists that differ only at libreco's own near-ties."""
    if ours == theirs:
        return
    assert len(ours) == len(theirs)
    differ = [i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b]
    our_scores = scores([ours[i] for i in differ])
    their_scores = scores([theirs[i] for i in differ])
    for i, a, b in zip(differ, our_scores, their_scores, strict=True):
        assert abs(a - b) <= NEAR_TIE, f"position {i}: {ours[i]} {a} vs {theirs[i]} {b}"


@pytest.fixture(scope="module")
def engines(trained_store: Path) -> dict[str, Engine]:
    return {name: load_engine(trained_store, name) for name in MODELS}


@pytest.fixture(scope="module")
def through_libreco(trained_store: Path) -> dict[str, Engine]:
    return {name: load_engine(trained_store, name, fast_path=False) for name in MODELS}


@pytest.fixture
def store_copy(trained_store: Path, tmp_path: Path) -> Iterator[Path]:
    shutil.copytree(trained_store / "als", tmp_path / "als")
    yield tmp_path


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("filter_consumed", [True, False])
def test_recommend_for_known_users_equals_libreco_single_user_calls(
    engines: dict[str, Engine],
    references: dict[str, Reference],
    name: str,
    filter_consumed: bool,
) -> None:
    reference = references[name]
    answers = engines[name].recommend(reference.users, 10, filter_consumed)

    assert len(answers) == 50
    for user, answer in zip(reference.users, answers, strict=True):
        assert answer.items == reference.recommend(user, 10, filter_consumed)
        assert answer.cold_start is False


@pytest.mark.parametrize("name", MODELS)
def test_libreco_top_n_is_the_prefix_of_a_longer_top_n(
    references: dict[str, Reference], name: str
) -> None:
    # The engine relies on this to serve mixed n (and exclusions) from one libreco call.
    reference = references[name]
    for user in reference.users:
        top10 = reference.recommend(user, 10)
        for longer in (11, 17, 100):
            assert reference.recommend(user, longer)[:10] == top10


@pytest.mark.parametrize("name", MODELS)
def test_recommend_batch_with_mixed_options_equals_single_calls(
    engines: dict[str, Engine], references: dict[str, Reference], name: str
) -> None:
    reference = references[name]
    queries = [
        RecommendQuery(user, n=[1, 5, 10, 37][k % 4], filter_consumed=k % 3 != 0)
        for k, user in enumerate(reference.users)
    ]
    queries.append(queries[0])  # the same user twice in one batch

    answers = engines[name].recommend_batch(queries)

    for query, answer in zip(queries, answers, strict=True):
        assert isinstance(query.user, str)
        assert answer.items == reference.recommend(query.user, query.n, query.filter_consumed)


@pytest.mark.parametrize("name", MODELS)
def test_excluded_items_are_dropped_and_the_list_is_refilled_to_n(
    engines: dict[str, Engine], references: dict[str, Reference], name: str
) -> None:
    reference = references[name]
    users = reference.users[:10]
    excludes = [frozenset(reference.recommend(u, 10)[::3]) | {"no-such-item"} for u in users]

    answers = engines[name].recommend(users, 10, True, excludes)

    for user, exclude, answer in zip(users, excludes, answers, strict=True):
        expected = [i for i in reference.recommend(user, 15) if i not in exclude][:10]
        assert answer.items == expected
        assert len(answer.items) == 10
        assert not exclude & set(answer.items)


@pytest.mark.parametrize("name", MODELS)
def test_heavy_users_keep_libreco_consumed_filtering_in_a_batch_asking_for_more(
    engines: dict[str, Engine], references: dict[str, Reference], name: str
) -> None:
    # libreco only filters consumed items while n_rec + len(consumed) <= n_items, so a
    # heavy user must not be served from a call whose n_rec was raised for someone else.
    reference = references[name]
    heavy = max(reference.users, key=reference.consumed)
    light = reference.users[0]
    n = engines[name].n_items - reference.consumed(heavy)
    light_exclude = frozenset(reference.recommend(light, 5))

    heavy_answer, light_answer = engines[name].recommend(
        [heavy, light], n, True, [frozenset(), light_exclude]
    )
    too_many = engines[name].recommend([heavy], n + 1, True)[0]

    assert heavy_answer.items == reference.recommend(heavy, n)
    expected_light = [i for i in reference.recommend(light, n + 5) if i not in light_exclude]
    assert light_answer.items == expected_light[:n]
    # one more than the unconsumed items: libreco stops filtering, and so do we
    assert too_many.items == reference.recommend(heavy, n + 1)


@pytest.mark.parametrize("name", MODELS)
def test_unknown_user_gets_deterministic_popular_fallback(
    engines: dict[str, Engine], trained_store: Path, name: str
) -> None:
    engine = engines[name]
    popular = list(verify(trained_store / name / engine.version).popular_items)
    exclude = frozenset(popular[1:4])

    first, second, excluded = engine.recommend(
        ["new-user-1", "new-user-2", "new-user-3"], 20, True, [frozenset(), frozenset(), exclude]
    )
    again = engine.recommend(["new-user-1"], 20, False)[0]

    assert first.cold_start and second.cold_start and excluded.cold_start
    assert first.items == popular[:20] == second.items == again.items
    assert len(set(first.items)) == 20
    assert excluded.items == [i for i in popular if i not in exclude][:20]


def test_popular_fallback_is_ordered_by_training_count_then_id(
    engines: dict[str, Engine], trained_store: Path, demo_interactions: pd.DataFrame
) -> None:
    popular = verify(trained_store / "als" / engines["als"].version).popular_items
    train, _ = split_by_ratio_chrono(demo_interactions, test_size=0.2, seed=42)
    counts = train.groupby("item").size()

    assert len(popular) == len(set(popular)) == 1000
    keys = [(-counts[item], item) for item in popular]
    assert keys == sorted(keys)
    assert counts[popular[-1]] >= counts.drop(list(popular)).max()


@pytest.mark.parametrize("name", MODELS)
def test_predict_scores_known_items_like_libreco_and_none_for_unknown_items(
    engines: dict[str, Engine], references: dict[str, Reference], name: str
) -> None:
    reference = references[name]
    user = reference.users[7]
    items = [reference.data_info.id2item[i] for i in (0, 5, 9)]

    scores, cold_start = engines[name].predict(user, [items[0], "no-such-item", *items[1:]])
    expected = reference.model.predict(user=[user] * 3, item=items)

    assert cold_start is False
    assert scores[1] is None
    known = [s for s in scores if s is not None]
    assert all(type(s) is float and 0.0 < s < 1.0 for s in known)
    assert known == pytest.approx(expected.tolist(), rel=1e-6)
    assert engines[name].predict(user, []) == ([], False)


@pytest.mark.parametrize("name", MODELS)
def test_predict_for_an_unknown_user_uses_the_average_user(
    engines: dict[str, Engine], references: dict[str, Reference], name: str
) -> None:
    reference = references[name]
    items = [reference.data_info.id2item[i] for i in (1, 2)]

    scores, cold_start = engines[name].predict("new-user", items)
    with quiet():
        expected = reference.model.predict(user=["new-user"] * 2, item=items, cold_start="average")

    assert cold_start is True
    assert scores == pytest.approx(expected.tolist(), rel=1e-6)


def test_similar_items_ranks_als_items_by_cosine_without_the_item_itself(
    engines: dict[str, Engine], references: dict[str, Reference]
) -> None:
    reference = references["als"]
    item = reference.data_info.id2item[3]
    embeddings = reference.model.get_item_embedding().astype(np.float64)
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    cosine = unit @ unit[3]
    cosine[3] = -np.inf
    best = np.argsort(-cosine, kind="stable")[:10]

    items, scores = engines["als"].similar_items(item, 10)

    assert items == [reference.data_info.id2item[int(i)] for i in best]
    assert scores == pytest.approx(cosine[best].tolist(), abs=1e-5)
    assert item not in items
    assert scores == sorted(scores, reverse=True)
    assert engines["als"].similar_items(item, 10) == (items, scores)


def test_similar_items_is_unsupported_for_deepfm(engines: dict[str, Engine]) -> None:
    assert "similar_items" not in engines["deepfm"].ops
    assert "similar_items" in engines["als"].ops
    with pytest.raises(Unsupported):
        engines["deepfm"].similar_items("anything", 5)


def test_similar_items_of_an_unknown_item_raises_unknown_item(engines: dict[str, Engine]) -> None:
    with pytest.raises(UnknownItem):
        engines["als"].similar_items("no-such-item", 5)


@pytest.mark.parametrize("n", [0, -1, 10**6])
def test_n_outside_the_catalogue_is_a_bad_argument(engines: dict[str, Engine], n: int) -> None:
    engine = engines["als"]
    with pytest.raises(BadArgument):
        engine.recommend(["new-user"], n, True)
    with pytest.raises(BadArgument):
        engine.similar_items("no-such-item", n)


def test_exclude_must_match_the_users(engines: dict[str, Engine]) -> None:
    with pytest.raises(BadArgument):
        engines["als"].recommend(["a", "b"], 5, True, [frozenset()])


def test_two_tf_models_load_and_answer_in_one_process(
    trained_store: Path, engines: dict[str, Engine], references: dict[str, Reference]
) -> None:
    default_graph_ops = len(tf.compat.v1.get_default_graph().get_operations())
    first = load_engine(trained_store, "deepfm", fast_path=False)
    second = load_engine(trained_store, "deepfm", fast_path=False)
    als_again = load_engine(trained_store, "als", fast_path=False)
    users = references["deepfm"].users[:5]

    assert second.recommend(users, 10, True) == first.recommend(users, 10, True)
    assert second.recommend(users, 10, True) == engines["deepfm"].recommend(users, 10, True)
    assert als_again.recommend(users, 10, True) == engines["als"].recommend(users, 10, True)
    assert len(tf.compat.v1.get_default_graph().get_operations()) == default_graph_ops


def test_training_another_tf_model_leaves_loaded_engines_working(
    through_libreco: dict[str, Engine], references: dict[str, Reference]
) -> None:
    from uro_recs.pipeline.demo_data import make_interactions

    users = references["deepfm"].users[:5]
    before = through_libreco["deepfm"].recommend(users, 10, True)
    small = make_interactions(n_users=100, n_items=150, n_interactions=2_000, seed=3)

    trained = train_model(small, "deepfm", epochs=1, test_fraction=0.0)

    assert trained.metrics == {"fit_seconds": trained.metrics["fit_seconds"]}
    assert through_libreco["deepfm"].recommend(users, 10, True) == before


def test_load_refuses_a_store_with_a_tampered_file(store_copy: Path) -> None:
    copied = version_dir(store_copy, "als", current_version(store_copy, "als"))
    target = copied / "model_user_consumed.pkl"
    target.write_bytes(target.read_bytes() + b"\x00")

    with pytest.raises(StoreCorrupt) as caught:
        load_engine(store_copy, "als")
    assert caught.value.file == "model_user_consumed.pkl"


@pytest.mark.parametrize("name", MODELS)
def test_info_is_msgpack_portable(engines: dict[str, Engine], name: str) -> None:
    info = engines[name].info()
    assert msgpack.unpackb(msgpack.packb(info)) == info
    assert info["name"] == name
    assert info["class"] == {"als": "ALS", "deepfm": "DeepFM"}[name]
    assert isinstance(info["n_items"], int) and info["n_items"] > 1000


@pytest.mark.parametrize("name", MODELS)
def test_warm_up_runs_every_supported_op(
    engines: dict[str, Engine], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engines[name]
    calls: dict[str, list[tuple[Any, ...]]] = {}

    def spy(op: str) -> Callable[..., Any]:
        method = getattr(engine, op)

        def record(*args: Any, **kwargs: Any) -> Any:
            calls.setdefault(op, []).append(args)
            return method(*args, **kwargs)

        return record

    for op in ("recommend", "predict", "similar_items"):
        monkeypatch.setattr(engine, op, spy(op))

    engine.warm_up()

    assert set(calls) == engine.ops
    # on real ids: a known user, and an unknown one for the cold-start path
    recommended = {user for users, *_ in calls["recommend"] for user in users}
    assert any(user in engine._user2id for user in recommended)
    assert any(user not in engine._user2id for user in recommended)
    assert all(user in engine._user2id for user, _ in calls["predict"])


def test_ids_are_text_and_an_integer_in_a_request_means_its_decimal_text(
    tmp_path: Path,
) -> None:
    from uro_recs.pipeline.demo_data import make_interactions
    from uro_recs.pipeline.training import train_and_save

    data = make_interactions(n_users=100, n_items=150, n_interactions=2_000, seed=5)
    data["user"] = pd.factorize(data["user"])[0] + 1_000  # integer ids, as pandas reads "1000"
    data["item"] = pd.factorize(data["item"])[0] * 7
    train_and_save(tmp_path, "ints", data, "als", version="v1")
    engine = load_engine(tmp_path, "ints")
    known_user, known_item = int(data["user"].iloc[0]), int(data["item"].iloc[0])

    by_int, cold = engine.recommend([known_user, -1], 5, True)
    (by_text,) = engine.recommend([str(known_user)], 5, True)
    excluded = engine.recommend_batch(
        [RecommendQuery(known_user, 5, exclude=frozenset({int(by_text.items[0])}))]
    )[0]
    similar, _ = engine.similar_items(known_item, 3)
    scores, cold_start = engine.predict(known_user, [known_item, str(known_item), -1])

    assert by_int == by_text and not by_int.cold_start and cold.cold_start
    assert by_text.items[0] not in excluded.items and excluded.items[:4] == by_text.items[1:5]
    for item in [*by_int.items, *cold.items, *similar]:
        assert type(item) is str and item.isdigit()
    assert scores[0] == scores[1] and isinstance(scores[0], float) and scores[2] is None
    assert not cold_start


def test_als_and_deepfm_are_served_by_numpy_engines_unless_the_fast_path_is_off(
    engines: dict[str, Engine], through_libreco: dict[str, Engine]
) -> None:
    assert type(engines["als"]).__name__ == "EmbeddingEngine"
    assert type(engines["deepfm"]).__name__ == "DeepFMEngine"
    assert {type(e).__name__ for e in through_libreco.values()} == {"LibrecoEngine"}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("filter_consumed", [True, False])
@pytest.mark.parametrize("n", [1, 10, 57])
def test_numpy_engine_equals_libreco_for_every_user(
    engines: dict[str, Engine],
    references: dict[str, Reference],
    demo_interactions: pd.DataFrame,
    name: str,
    n: int,
    filter_consumed: bool,
) -> None:
    reference = references[name]
    users = [*sorted(set(demo_interactions["user"])), "unknown-1", "unknown-2"]
    answers = engines[name].recommend(users, n, filter_consumed)
    popular = engines[name].recommend(["unknown-3"], n, filter_consumed)[0].items
    for user, answer in zip(users, answers, strict=True):
        if user.startswith("unknown-"):
            assert answer.cold_start and answer.items == popular
        else:
            assert not answer.cold_start
            expected = reference.recommend(user, n, filter_consumed)
            assert_same_ranking(name, answer.items, expected, partial(reference.scores, user))


@pytest.mark.parametrize("name", MODELS)
def test_numpy_engine_agrees_with_the_libreco_engine_on_every_op(
    engines: dict[str, Engine],
    through_libreco: dict[str, Engine],
    references: dict[str, Reference],
    demo_interactions: pd.DataFrame,
    name: str,
) -> None:
    fast, slow = engines[name], through_libreco[name]
    users = [*sorted(set(demo_interactions["user"]))[:100], "somebody-new"]
    items = [*sorted(set(demo_interactions["item"]))[:50], "some-new-item"]
    queries = [
        RecommendQuery(user, 5 + i % 20, i % 3 != 0, frozenset(items[i % 7 : i % 7 + 5]))
        for i, user in enumerate(users)
    ]
    for query, a, b in zip(
        queries, fast.recommend_batch(queries), slow.recommend_batch(queries), strict=True
    ):
        assert a.cold_start == b.cold_start
        scores = partial(references[name].scores, query.user)
        assert_same_ranking(name, a.items, b.items, scores)
    for user in (users[0], users[-1]):
        fast_scores, fast_cold = fast.predict(user, items)
        slow_scores, slow_cold = slow.predict(user, items)
        assert fast_cold == slow_cold
        assert fast_scores[-1] is None and slow_scores[-1] is None
        np.testing.assert_allclose(fast_scores[:-1], slow_scores[:-1], rtol=1e-6)  # type: ignore[arg-type]
    if "similar_items" in slow.ops:
        assert fast.similar_items(items[0], 10) == slow.similar_items(items[0], 10)
    assert fast.info() == slow.info()


@pytest.mark.parametrize("name", MODELS)
def test_numpy_engine_loads_without_tensorflow_or_torch(trained_store: Path, name: str) -> None:
    script = (
        "import sys; from pathlib import Path; from uro_recs.worker.engine import load_engine;"
        f"e = load_engine(Path({str(trained_store)!r}), {name!r}); e.warm_up();"
        "print(sorted(m for m in ('tensorflow', 'torch', 'libreco') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"  # the lines before are log events


def _save_deepfm(store: Path, name: str, user_feature: bool = False, **params: Any) -> None:
    """Train a small DeepFM with libreco directly (shapes train_model does not make), save it."""
    from libreco.algorithms import DeepFM
    from libreco.data import DatasetFeat

    from uro_recs.core.model_store import save_version, set_current
    from uro_recs.pipeline.demo_data import make_interactions
    from uro_recs.pipeline.training import TrainedModel, popular_items

    data = make_interactions(n_users=150, n_items=300, n_interactions=4_000, seed=11)
    data["user_group"] = data["user"].str[0]  # a categorical user feature, when asked for
    user_cols = ["user_group"] if user_feature else []
    columns = ["user", "item", "label", "item_kind", *user_cols]
    graph = tf.Graph()
    with graph.as_default(), quiet(stderr=True):
        train_set, data_info = DatasetFeat.build_trainset(
            data[columns],
            user_col=user_cols,
            item_col=["item_kind"],
            sparse_col=["item_kind", *user_cols],
        )
        model = DeepFM("ranking", data_info, embed_size=8, n_epochs=1, seed=3, **params)
        model.fit(train_set, neg_sampling=True, verbose=0)
    trained = TrainedModel(
        kind="deepfm",
        libreco_class="DeepFM",
        model=model,
        data_info=data_info,
        graph=graph,
        params={},
        metrics={},
        data={"n_users": int(data_info.n_users), "n_items": int(data_info.n_items)},
        popular_items=popular_items(data),
    )
    save_version(store, name, "2026-11-27T000000Z", trained.save, trained.manifest_fields())
    set_current(store, name, "2026-11-27T000000Z")


@pytest.mark.parametrize(
    "params",
    [{"hidden_units": [8], "use_bn": False}, {"hidden_units": [16, 8, 4], "use_bn": True}],
    ids=["one-layer-no-bn", "three-layers-bn"],
)
def test_deepfm_engine_equals_libreco_for_other_mlp_shapes(
    tmp_path: Path, params: dict[str, Any]
) -> None:
    _save_deepfm(tmp_path, "deepfm", **params)
    fast = load_engine(tmp_path, "deepfm")
    slow = load_engine(tmp_path, "deepfm", fast_path=False)
    assert type(fast).__name__ == "DeepFMEngine"
    users = [str(user) for user in fast._user2id]  # UUID strings, as trained
    model = slow.libreco_model  # type: ignore[attr-defined]
    reference = Reference(model, model.data_info, users)

    for user, a, b in zip(
        users, fast.recommend(users, 10, True), slow.recommend(users, 10, True), strict=True
    ):
        assert_same_ranking("deepfm", a.items, b.items, partial(reference.scores, user))
    items = fast._id2item[:20]
    fast_scores, _ = fast.predict(users[0], items)
    slow_scores, _ = slow.predict(users[0], items)
    np.testing.assert_allclose(fast_scores, slow_scores, rtol=1e-5)  # type: ignore[arg-type]


def test_a_deepfm_with_user_features_is_served_by_libreco(tmp_path: Path) -> None:
    _save_deepfm(tmp_path, "deepfm", user_feature=True, hidden_units=[8], use_bn=True)
    assert type(load_engine(tmp_path, "deepfm")).__name__ == "LibrecoEngine"


# --- two-stage serving: ALS retrieves, DeepFM ranks the candidates ---------------------------


def two_stage(trained_store: Path, candidates: int, retrieve_from: str = "als") -> DeepFMEngine:
    engine = load_engine(trained_store, "deepfm")
    assert isinstance(engine, DeepFMEngine)
    retriever = None if retrieve_from == OWN_FM else load_engine(trained_store, retrieve_from)
    engine.retrieve_with(retriever, candidates)
    return engine


@pytest.mark.parametrize("retrieve_from", ["als", OWN_FM])
def test_two_stage_with_every_item_as_a_candidate_ranks_as_libreco_does(
    trained_store: Path, references: dict[str, Reference], retrieve_from: str
) -> None:
    reference = references["deepfm"]
    engine = two_stage(trained_store, engine_items(trained_store), retrieve_from)
    ours = engine.recommend(reference.users, 10, True)
    for user, answer in zip(reference.users, ours, strict=True):
        assert not answer.cold_start
        theirs = reference.recommend(user, 10)
        assert_same_ranking("deepfm", answer.items, theirs, partial(reference.scores, user))


def test_two_stage_ranks_only_the_retrievers_candidates_by_deepfm_score(
    trained_store: Path, engines: dict[str, Engine], references: dict[str, Reference]
) -> None:
    reference = references["deepfm"]
    users = reference.users[:20]
    engine = two_stage(trained_store, candidates=50)
    candidates = engines["als"].recommend(users, 50, True)
    answers = engine.recommend(users, 10, True)
    for user, answer, found in zip(users, answers, candidates, strict=True):
        assert len(answer.items) == 10 and set(answer.items) <= set(found.items)
        scores = reference.scores(user, answer.items)
        assert all(a >= b - NEAR_TIE for a, b in itertools.pairwise(scores)), scores
        rest = [item for item in found.items if item not in answer.items]
        assert max(reference.scores(user, rest)) <= scores[-1] + NEAR_TIE


def test_own_fm_retrieval_ranks_the_top_items_by_the_linear_and_fm_terms(
    trained_store: Path, references: dict[str, Reference]
) -> None:
    engine = two_stage(trained_store, 50, OWN_FM)
    full = load_engine(trained_store, "deepfm")
    assert isinstance(full, DeepFMEngine)
    for user in references["deepfm"].users[:20]:
        inner = full._user2id[user]
        terms = full._user_terms(inner)
        shallow = full._item_fields_sum @ terms.fm + full._item_constant
        shallow[full._user_consumed.get(inner, ())] = -np.inf
        top50 = {full._id2item[i] for i in np.argsort(-shallow)[:50]}
        (answer,) = engine.recommend([user], 10, True)
        assert len(answer.items) == 10 and set(answer.items) <= top50
        scores = references["deepfm"].scores(user, answer.items)
        assert all(a >= b - NEAR_TIE for a, b in itertools.pairwise(scores)), scores


@pytest.mark.parametrize("retrieve_from", ["als", OWN_FM])
def test_two_stage_takes_exclusions_and_answers_unknown_users_from_popularity(
    trained_store: Path,
    engines: dict[str, Engine],
    references: dict[str, Reference],
    retrieve_from: str,
) -> None:
    user = references["deepfm"].users[0]
    engine = two_stage(trained_store, 30, retrieve_from)
    first = engine.recommend([user], 5, True)[0].items
    again = engine.recommend([user], 5, True, exclude=[frozenset(first[:2])])[0].items
    assert len(again) == 5 and not set(first[:2]) & set(again)
    (unknown,) = engine.recommend(["no-such-user"], 5, True)
    assert unknown == engines["deepfm"].recommend(["no-such-user"], 5, True)[0]
    assert unknown.cold_start


def engine_items(trained_store: Path) -> int:
    return load_engine(trained_store, "als").n_items
