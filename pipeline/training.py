"""Train LibRecommender models on an interaction log and save them as store versions.

The interactions are split per user in time order (libreco's `split_by_ratio_chrono`): each
user's latest `test_fraction` of interactions is held out to measure recall@10 and ndcg@10,
and the model is trained on the rest. TensorFlow models are built in a graph of their own,
so several can live in one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias

import pandas as pd
import structlog

from uro_recs.core.model_store import (
    MODEL_FILE_STEM,
    POPULAR_ITEMS_MAX,
    Id,
    JsonValue,
    new_version_name,
    save_version,
    set_current,
)
from uro_recs.pipeline.interactions import REQUIRED_COLUMNS
from uro_recs.worker.libreco_env import quiet, tf, tf_session_config

# isort: split
# After libreco_env, which quietens TensorFlow before libreco first imports it.
from libreco import __version__ as libreco_version
from libreco.algorithms import ALS, DeepFM
from libreco.data import DatasetFeat, DatasetPure, split_by_ratio_chrono
from libreco.evaluation import evaluate
from libreco.evaluation.metrics import listwise_scores, ndcg_at_k, recall_at_k

log = structlog.get_logger(__name__)

ModelKind: TypeAlias = Literal["als", "deepfm"]
# Item columns DeepFM uses as sparse features when the data has them.
ITEM_FEATURES: Final = ("item_kind",)
EVAL_K: Final = 10


@dataclass(frozen=True)
class TrainedModel:
    kind: ModelKind
    libreco_class: str
    model: Any
    data_info: Any
    graph: Any  # the tf.Graph a TensorFlow model lives in, else None
    params: dict[str, JsonValue]
    metrics: dict[str, float]
    data: dict[str, int]
    popular_items: list[Id]

    def save(self, directory: Path) -> None:
        """Write libreco's files (data_info and model variables) into `directory`."""
        path = str(directory)
        in_graph = self.graph.as_default() if self.graph is not None else contextlib.nullcontext()
        with quiet(stderr=True), in_graph:
            self.data_info.save(path, MODEL_FILE_STEM)
            if self.graph is None:
                self.model.save(path, MODEL_FILE_STEM)
            else:
                # Only what inference needs: variables without optimizer slots.
                self.model.save(path, MODEL_FILE_STEM, manual=True, inference_only=True)

    def manifest_fields(self) -> dict[str, object]:
        return {
            "libreco_class": self.libreco_class,
            "libreco_version": libreco_version,
            "data": self.data,
            "metrics": self.metrics,
            "params": self.params,
            "popular_items": self.popular_items,
        }


def train_model(
    df: pd.DataFrame,
    kind: ModelKind,
    *,
    seed: int = 42,
    epochs: int | None = None,
    embed_size: int | None = None,
    test_fraction: float = 0.2,
    threads: int = 1,
    refit: bool = False,
) -> TrainedModel:
    """Train an ALS or DeepFM ranking model; `epochs` and `embed_size` default per kind.

    With a hold-out (`test_fraction > 0`) the metrics include a popularity baseline scored on
    the same users and items (`popularity_recall@10`, `popularity_ndcg@10`). With `refit` the
    model is then trained again on all of `df`, so the published model has seen the newest
    interactions too; the metrics stay those of the hold-out evaluation.
    With `test_fraction=0` the model trains on everything and no metrics are computed.
    """
    if kind not in ("als", "deepfm"):
        raise ValueError(f"unknown model kind {kind!r}")
    missing = [column for column in REQUIRED_COLUMNS if column not in df.columns]
    if missing:
        raise ValueError(f"interactions lack columns {missing}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    started = time.perf_counter()
    if test_fraction > 0:
        train, test = split_by_ratio_chrono(df, test_size=test_fraction, seed=seed)
        test = None if test.empty else test  # every user too new to hold anything out
    else:
        train, test = df, None

    graph = tf.Graph() if kind == "deepfm" else None
    in_graph = graph.as_default() if graph is not None else contextlib.nullcontext()
    with in_graph:
        built = _build(kind, train, test, seed, epochs, embed_size, threads)
        fit_started = time.perf_counter()
        with quiet(stderr=True):
            built.model.fit(built.train_set, neg_sampling=True, verbose=0)
        fit_seconds = time.perf_counter() - fit_started
        metrics = {} if built.test_set is None else _evaluate(built.model, built.test_set, seed)
        if built.test_set is not None:
            metrics.update(_evaluate_popularity(built.data_info, train, built.test_set))
    metrics["fit_seconds"] = round(fit_seconds, 3)
    if refit and test is not None:
        final = train_model(
            df,
            kind,
            seed=seed,
            epochs=epochs,
            embed_size=embed_size,
            test_fraction=0,
            threads=threads,
        )
        return dataclasses.replace(
            final,
            metrics={**metrics, "refit_seconds": final.metrics["fit_seconds"]},
            params={**final.params, "test_fraction": test_fraction, "refit": True},
            data={**final.data, "n_eval_interactions": len(test)},
        )

    data_info = built.data_info
    trained = TrainedModel(
        kind=kind,
        libreco_class=type(built.model).__name__,
        model=built.model,
        data_info=data_info,
        graph=graph,
        params={**built.params, "seed": seed, "test_fraction": test_fraction},
        metrics=metrics,
        data={
            "n_users": int(data_info.n_users),
            "n_items": int(data_info.n_items),
            "n_interactions": len(train),
            "n_eval_interactions": 0 if test is None else len(test),
        },
        popular_items=popular_items(train),
    )
    log.info(
        "model_trained",
        kind=kind,
        n_users=trained.data["n_users"],
        n_items=trained.data["n_items"],
        seconds=round(time.perf_counter() - started, 3),
        **{name.replace("@", "_at_"): value for name, value in metrics.items()},
    )
    return trained


def train_and_save(
    store: Path,
    model_name: str,
    df: pd.DataFrame,
    kind: ModelKind,
    version: str | None = None,
    *,
    make_current: bool = True,
    seed: int = 42,
    epochs: int | None = None,
    embed_size: int | None = None,
    test_fraction: float = 0.2,
    threads: int = 1,
    refit: bool = False,
) -> Path:
    """Train, save as a new store version (named for the current UTC time unless given),
    and make it the model's CURRENT version unless told not to. Returns the version dir."""
    trained = train_model(
        df,
        kind,
        seed=seed,
        epochs=epochs,
        embed_size=embed_size,
        test_fraction=test_fraction,
        threads=threads,
        refit=refit,
    )
    chosen = version if version is not None else new_version_name()
    path = save_version(store, model_name, chosen, trained.save, trained.manifest_fields())
    if make_current:
        set_current(store, model_name, chosen)
    return path


def popular_items(train: pd.DataFrame, limit: int = POPULAR_ITEMS_MAX) -> list[Id]:
    """Most interacted-with items, most first; equal counts ordered by item id."""
    counts = train.groupby("item", sort=False).size().rename("count").reset_index()
    ranked = counts.sort_values(["count", "item"], ascending=[False, True], kind="stable")
    items: list[Id] = ranked["item"].head(limit).tolist()
    return items


@dataclass(frozen=True)
class _Built:
    model: Any
    data_info: Any
    train_set: Any
    test_set: Any
    params: dict[str, JsonValue]


def _build(
    kind: ModelKind,
    train: pd.DataFrame,
    test: pd.DataFrame | None,
    seed: int,
    epochs: int | None,
    embed_size: int | None,
    threads: int,
) -> _Built:
    """Build libreco's datasets and an unfitted model (inside the caller's graph)."""
    features = [c for c in ITEM_FEATURES if c in train.columns] if kind == "deepfm" else []
    columns = ["user", "item", "label", *features]
    # libreco keeps the training vocabulary in class attributes: build train, then test.
    if features:
        train_set, data_info = DatasetFeat.build_trainset(
            train[columns], item_col=features, sparse_col=features
        )
        test_set = None if test is None else DatasetFeat.build_testset(test[columns])
    else:
        train_set, data_info = DatasetPure.build_trainset(train[columns])
        test_set = None if test is None else DatasetPure.build_testset(test[columns])

    params: dict[str, JsonValue]
    if kind == "als":
        params = {
            "embed_size": embed_size or 32,
            "n_epochs": epochs or 10,
            "reg": 5.0,  # libreco's ALS rejects reg=None despite documenting it
            "alpha": 10,
            "use_cg": True,
            "n_threads": threads,
        }
        model = ALS("ranking", data_info, seed=seed, **params)
    else:
        params = {
            "embed_size": embed_size or 16,
            "n_epochs": epochs or 2,
            "lr": 3e-3,
            "batch_size": 512,
            "num_neg": 1,
            "sampler": "random",
            "hidden_units": [64, 32],
            "use_bn": True,
            "item_features": list(features),
        }
        model_args = {k: v for k, v in params.items() if k != "item_features"}
        model = DeepFM(
            "ranking",
            data_info,
            seed=seed,
            tf_sess_config=tf_session_config(threads),
            **model_args,
        )
    return _Built(model, data_info, train_set, test_set, params)


def _evaluate(model: Any, test_set: Any, seed: int) -> dict[str, float]:
    with quiet(stderr=True):  # evaluate draws tqdm bars on stderr
        scores = evaluate(
            model, test_set, neg_sampling=True, metrics=["recall", "ndcg"], k=EVAL_K, seed=seed
        )
    return {f"{name}@{EVAL_K}": round(float(value), 6) for name, value in scores.items()}


def _evaluate_popularity(data_info: Any, train: pd.DataFrame, test_set: Any) -> dict[str, float]:
    """recall@10 and ndcg@10 of "the most popular items the user has not consumed", computed
    exactly as libreco's `evaluate` scores a model: same users, same held-out items."""
    ranked = [data_info.item2id[item] for item in popular_items(train, limit=len(train))]
    recommended = {}
    for user in test_set.positive_consumed:
        consumed = data_info.user_consumed.get(user, [])
        # libreco filters consumed items only while k + len(consumed) <= n_items
        skip = set(consumed) if EVAL_K + len(consumed) <= data_info.n_items else set()
        recommended[user] = list(islice((i for i in ranked if i not in skip), EVAL_K))
    users = list(test_set.positive_consumed)
    return {
        f"popularity_{name}@{EVAL_K}": round(
            float(listwise_scores(fn, test_set.positive_consumed, recommended, users, EVAL_K)), 6
        )
        for name, fn in (("recall", recall_at_k), ("ndcg", ndcg_at_k))
    }
