"""Train any LibRecommender family (core/families.py) on an interaction log; save versions.

The data first goes through `prepare_interactions`: ids become text, repeated (user, item)
rows merge into one, labels become weights or (with a threshold) positives. Then each user's
interactions are split in time order (libreco's per-user ratio split, on a stable sort by
time): the newest `test_fraction` is held out to measure the model against the popularity
baseline (pipeline/evaluation.py), and the model trains on the rest; with `refit` it then
trains again on everything, so the published model has seen every user's newest items.

TensorFlow models are built in a graph of their own, so several can live in one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pandas as pd
import structlog

from uro_recs.core.families import MAX_PAIR_SIDE, Family, family
from uro_recs.core.model_store import (
    MODEL_FILE_STEM,
    POPULAR_ITEMS_MAX,
    Id,
    JsonValue,
    new_version_name,
    save_version,
    set_current,
)
from uro_recs.pipeline.evaluation import EVAL_K, Evaluation, evaluate_model, evaluate_popularity
from uro_recs.pipeline.interactions import REQUIRED_COLUMNS, InvalidInput
from uro_recs.worker.libreco_env import (
    in_graph,
    native_output_discarded,
    quiet,
    tf,
    tf_session_config,
)

# isort: split
# After libreco_env, which quietens TensorFlow before libreco first imports it.
import libreco.algorithms
from libreco import __version__ as libreco_version
from libreco.bases import EmbedBase, TfBase
from libreco.data import DatasetFeat, DatasetPure, split_by_ratio

log = structlog.get_logger(__name__)
logging.getLogger("gensim").setLevel(logging.ERROR)  # per-epoch chatter and advice on stderr

# The item feature columns used when none are named, those the data has: uro's item kind and
# uploader (pipeline/export.py).
DEFAULT_ITEM_FEATURES: Final = ("item_kind", "item_uploader")
# Set by uro-recs itself (the task, the data, the seed, threads, CPU), not by the config.
_NOT_PARAMS: Final = frozenset(
    {
        "self",
        "task",
        "data_info",
        "seed",
        "tf_sess_config",
        "n_threads",
        "num_threads",
        "device",
        "lower_upper_bound",
        "with_training",
    }
)


@dataclass(frozen=True)
class Prepared:
    """Interactions ready to train on, and what preparing them changed."""

    frame: pd.DataFrame  # user, item (text), label, time, feature columns; sorted by time
    item_features: tuple[str, ...]
    rows_read: int
    merged_duplicates: int  # rows folded into an earlier (user, item) row
    below_threshold: int  # rows dropped by positive_threshold

    def summary(self) -> dict[str, JsonValue]:
        return {
            "rows_read": self.rows_read,
            "merged_duplicates": self.merged_duplicates,
            "below_threshold": self.below_threshold,
            "item_features": list(self.item_features),
        }


def prepare_interactions(
    df: pd.DataFrame,
    *,
    item_features: Sequence[str] | None = None,
    positive_threshold: float | None = None,
) -> Prepared:
    """The rows a model trains on; InvalidInput names what is wrong with the input.

    - ids are text: an id read as the integer 813 is the user "813", in training and in every
      request (core/protocol.py reads integer ids the same way);
    - labels are weights (ALS turns them into confidence; models with negative sampling treat
      every row as a positive) unless `positive_threshold` is set: then rows with a label below
      it are dropped and the rest get label 1.0;
    - repeated (user, item) rows become one: labels summed, the newest time and features;
    - `item_features` names the item feature columns (default: item_kind and item_uploader,
      those present); each item takes the value of its newest row.
    """
    missing = [column for column in REQUIRED_COLUMNS if column not in df.columns]
    if missing:
        raise InvalidInput(f"interactions lack columns {missing}")
    if item_features is None:
        features = tuple(c for c in DEFAULT_ITEM_FEATURES if c in df.columns)
    else:
        features = tuple(dict.fromkeys(item_features))
        absent = [c for c in features if c not in df.columns]
        if absent:
            found = ", ".join(str(c) for c in df.columns)
            raise InvalidInput(
                f"item feature columns {', '.join(absent)} are not in the data (it has {found})"
            )
        clash = [c for c in features if c in REQUIRED_COLUMNS]
        if clash:
            raise InvalidInput(f"{', '.join(clash)} cannot be an item feature")
    frame = df[[*REQUIRED_COLUMNS, *features]].copy()
    for column in ("user", "item", *features):
        frame[column] = frame[column].astype(str)
    frame["label"] = frame["label"].astype("float64")
    frame["time"] = pd.to_numeric(frame["time"])
    rows_read = len(frame)
    below = 0
    if positive_threshold is not None:
        keep = frame["label"] >= positive_threshold
        below = int((~keep).sum())
        frame = frame[keep].assign(label=1.0)
        if frame.empty:
            raise InvalidInput(f"no interaction has a label of at least {positive_threshold}")
    # A stable sort keeps rows of equal time in file order: the split is the same every run.
    frame = frame.sort_values("time", kind="stable").reset_index(drop=True)
    before = len(frame)
    grouped = frame.groupby(["user", "item"], sort=False)
    newest = grouped.tail(1).set_index(["user", "item"])
    newest["label"] = grouped["label"].sum()
    frame = newest.reset_index().sort_values("time", kind="stable").reset_index(drop=True)
    if features:
        latest = frame.groupby("item", sort=False)[list(features)].transform("last")
        frame[list(features)] = latest
    return Prepared(frame, features, rows_read, before - len(frame), below)


def split_chrono(frame: pd.DataFrame, test_fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each user's newest `test_fraction` of interactions held out (users with 3 or fewer keep
    all theirs); held-out rows of users or items absent from training are dropped."""
    train, test = split_by_ratio(frame, order=True, test_size=test_fraction)
    return train.reset_index(drop=True), test.reset_index(drop=True)


@dataclass(frozen=True)
class TrainedModel:
    kind: str
    libreco_class: str
    model: Any
    data_info: Any
    graph: Any  # the tf.Graph a TensorFlow model lives in, else None
    params: dict[str, JsonValue]
    metrics: dict[str, float]
    data: dict[str, JsonValue]
    popular_items: list[Id]

    def save(self, directory: Path) -> None:
        """Write libreco's files (data_info and what inference needs of the model)."""
        path = str(directory)
        with quiet(stderr=True), native_output_discarded(), self.in_graph():
            self.data_info.save(path, MODEL_FILE_STEM)
            if isinstance(self.model, TfBase):
                # Only what inference needs: variables without optimizer slots.
                self.model.save(path, MODEL_FILE_STEM, manual=True, inference_only=True)
            elif isinstance(self.model, EmbedBase):
                # The embeddings (sequence models also keep their TF variables).
                self.model.save(path, MODEL_FILE_STEM, inference_only=True)
            else:
                self.model.save(path, MODEL_FILE_STEM)

    def in_graph(self) -> contextlib.AbstractContextManager[Any]:
        """The model's TF graph as the default one, for calling it in process."""
        return in_graph(self.graph)

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
    kind: str,
    *,
    seed: int = 42,
    epochs: int | None = None,
    embed_size: int | None = None,
    test_fraction: float = 0.2,
    threads: int = 1,
    refit: bool = False,
    params: Mapping[str, Any] | None = None,
    item_features: Sequence[str] | None = None,
    positive_threshold: float | None = None,
    eval_users: int | None = None,
) -> TrainedModel:
    """Train the family named `kind`; hyperparameters are its defaults, then `params`, then
    `epochs` and `embed_size` when given.

    With a hold-out (`test_fraction > 0`) the metrics are recall@10, ndcg@10 and coverage@10
    of the model and of the popularity baseline (`popularity_<metric>`) on the same held-out
    interactions. With `refit` the model is then trained again on all of `df` (the metrics stay
    those of the hold-out). With `test_fraction=0` it trains on everything, without metrics.
    `eval_users` scores a seeded sample of that many held-out users instead of all (ranking
    every item for every user is what evaluation costs on big catalogues).
    """
    chosen = family(kind)
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    started = time.perf_counter()
    prepared = prepare_interactions(
        df, item_features=item_features, positive_threshold=positive_threshold
    )
    _check_size(chosen, prepared.frame)
    model_params = _model_params(chosen, params, epochs, embed_size)
    features = prepared.item_features if chosen.item_features else ()
    if test_fraction > 0:
        train, test = split_chrono(prepared.frame, test_fraction)
        if eval_users is not None:
            test = _sample_users(test, eval_users, seed)
        evaluated: pd.DataFrame | None = None if test.empty else test
    else:
        train, evaluated = prepared.frame, None

    built = _fit(chosen, train, features, model_params, seed, threads)
    metrics: dict[str, float] = {"fit_seconds": built.fit_seconds}
    if evaluated is not None:
        with built.in_graph():
            model_eval = evaluate_model(built.model, evaluated)
        metrics.update(_named(model_eval, ""))
        metrics.update(_named(evaluate_popularity(train, evaluated), "popularity_"))
    final = built
    if refit and evaluated is not None:
        final = _fit(chosen, prepared.frame, features, model_params, seed, threads)
        metrics["refit_seconds"] = final.fit_seconds
    trained_on = prepared.frame if final is not built else train
    data_info = final.data_info
    trained = TrainedModel(
        kind=chosen.kind,
        libreco_class=chosen.libreco_class,
        model=final.model,
        data_info=data_info,
        graph=final.graph,
        params={
            **{k: _json(v) for k, v in model_params.items()},
            "seed": seed,
            "test_fraction": test_fraction,
            "refit": final is not built,
            "item_features": list(features),
            "positive_threshold": positive_threshold,
        },
        metrics=metrics,
        data={
            "n_users": int(data_info.n_users),
            "n_items": int(data_info.n_items),
            "n_interactions": len(trained_on),
            "n_eval_interactions": 0 if evaluated is None else len(evaluated),
            "n_eval_users": 0 if evaluated is None else int(evaluated["user"].nunique()),
            **{k: v for k, v in prepared.summary().items() if k != "item_features"},
        },
        popular_items=popular_items(trained_on),
    )
    log.info(
        "model_trained",
        kind=chosen.kind,
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
    kind: str,
    version: str | None = None,
    *,
    make_current: bool = True,
    **options: Any,
) -> Path:
    """Train (`options` as `train_model` takes them), save as a new store version (named for
    the current UTC time unless given), and make it CURRENT unless told not to."""
    trained = train_model(df, kind, **options)
    chosen = version if version is not None else new_version_name()
    path = save_version(store, model_name, chosen, trained.save, trained.manifest_fields())
    if make_current:
        set_current(store, model_name, chosen)
    return path


def popular_items(train: pd.DataFrame, limit: int = POPULAR_ITEMS_MAX) -> list[Id]:
    """Items with the most users, most first; equal counts ordered by item id."""
    counts = train.groupby("item", sort=False)["user"].nunique().rename("count").reset_index()
    ranked = counts.sort_values(["count", "item"], ascending=[False, True], kind="stable")
    items: list[Id] = ranked["item"].head(limit).tolist()
    return items


def model_class(chosen: Family) -> type[Any]:
    found: type[Any] = getattr(libreco.algorithms, chosen.libreco_class)
    return found


def accepted_params(chosen: Family) -> list[str]:
    """The hyperparameters the family's libreco class takes, in its own order."""
    signature = inspect.signature(model_class(chosen).__init__)
    return [name for name in signature.parameters if name not in _NOT_PARAMS]


def _check_size(chosen: Family, frame: pd.DataFrame) -> None:
    if chosen.pairs_of is None:
        return
    count = frame[chosen.pairs_of].nunique()
    if count > MAX_PAIR_SIDE:
        instead = "item_cf" if chosen.pairs_of == "item" else "user_cf"
        raise InvalidInput(
            f"{chosen.kind} trains on at most {MAX_PAIR_SIDE:,} {chosen.pairs_of}s (its Rust"
            f" similarity indexes pairs with 32-bit integers) and this data has {count:,}:"
            f" use {instead} or an embedding model such as als"
        )


def _model_params(
    chosen: Family, params: Mapping[str, Any] | None, epochs: int | None, embed_size: int | None
) -> dict[str, Any]:
    accepted = accepted_params(chosen)
    given = dict(params or {})
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise InvalidInput(
            f"{chosen.kind} takes no parameter {', '.join(unknown)}; it takes {', '.join(accepted)}"
        )
    if epochs is not None:
        given["n_epochs"] = epochs
    if embed_size is not None:
        given["embed_size"] = embed_size
    merged = {**chosen.default_params(), **given}
    return {name: merged[name] for name in accepted if name in merged}


@dataclass(frozen=True)
class _Fitted:
    model: Any
    data_info: Any
    graph: Any
    fit_seconds: float

    def in_graph(self) -> contextlib.AbstractContextManager[Any]:
        return in_graph(self.graph)


def _fit(
    chosen: Family,
    train: pd.DataFrame,
    features: Sequence[str],
    model_params: Mapping[str, Any],
    seed: int,
    threads: int,
) -> _Fitted:
    """Build libreco's training set and model (in a graph of its own for TF), fit it."""
    cls = model_class(chosen)
    accepted = inspect.signature(cls.__init__).parameters
    extra: dict[str, Any] = {
        "seed": seed,
        "tf_sess_config": tf_session_config(threads),
        "n_threads": threads,
        "num_threads": threads,
        "device": "cpu",
    }
    args = {**{k: v for k, v in extra.items() if k in accepted}, **model_params}
    graph = tf.Graph() if "tf_sess_config" in accepted else None
    columns = ["user", "item", "label", *features]
    fitted = _Fitted(None, None, graph, 0.0)
    with fitted.in_graph(), quiet(stderr=True), native_output_discarded():
        if features:
            train_set, data_info = DatasetFeat.build_trainset(
                train[columns], item_col=list(features), sparse_col=list(features)
            )
        else:
            train_set, data_info = DatasetPure.build_trainset(train[columns])
        if "num_sampled_per_batch" in accepted and args.get("num_sampled_per_batch") is None:
            # Sampled softmax draws distinct items: never more than the catalogue holds.
            batch = args.get("batch_size", 256)
            args["num_sampled_per_batch"] = max(1, min(batch, data_info.n_items - 1))
        model = cls("ranking", data_info, **args)
        fit_started = time.perf_counter()
        model.fit(train_set, neg_sampling=True, verbose=0)
        seconds = round(time.perf_counter() - fit_started, 3)
    return dataclasses.replace(fitted, model=model, data_info=data_info, fit_seconds=seconds)


def _sample_users(test: pd.DataFrame, count: int, seed: int) -> pd.DataFrame:
    users = test["user"].drop_duplicates().sort_values(kind="stable")
    if len(users) <= count:
        return test
    chosen = set(users.sample(n=count, random_state=seed))
    return test[test["user"].isin(chosen)].reset_index(drop=True)


def _named(evaluation: Evaluation, prefix: str) -> dict[str, float]:
    return {f"{prefix}{name}@{EVAL_K}": value for name, value in evaluation.metrics().items()}


def _json(value: Any) -> JsonValue:
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_json(v) for v in value]
    return str(value)
