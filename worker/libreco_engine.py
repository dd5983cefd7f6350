"""The libreco-backed engine: the model loaded by LibRecommender, its own calls answering.

Serves every family in core/families.py: the neighbourhood, ranking and sequence models, the
baseline the numpy engines are checked against, and what serves an embedding model when the
fast path is off or a DeepFM uses features the numpy engine does not compute. Each batch
costs as few libreco calls as its mix of options allows.

TensorFlow and libreco come through `libreco_env`, which quietens TensorFlow before its
first import. BLAS and OpenMP thread pools are capped at load time; a worker that wants them
capped from the very start should also set OMP_NUM_THREADS / OPENBLAS_NUM_THREADS in its
environment before it starts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import structlog

from uro_recs.core.families import BY_CLASS
from uro_recs.core.model_store import MODEL_FILE_STEM, Manifest, StoreCorrupt
from uro_recs.worker.engine import (
    Engine,
    EngineError,
    Id,
    Recommendation,
    RecommendQuery,
    unit_rows,
)
from uro_recs.worker.libreco_env import (
    in_graph,
    limit_threads,
    native_output_discarded,
    quiet,
    tf,
    tf_session_config,
)

# isort: split
import libreco.algorithms
from libreco.bases import DynEmbedBase, EmbedBase, TfBase
from libreco.data import DataInfo
from libreco.utils.save_load import load_tf_variables

log = structlog.get_logger(__name__)

# TF models: libreco's cost per user grows with the users in one call past a few (it builds
# feature tensors for every user-item pair at once), so a batch is served in calls of a few.
TF_USERS_PER_CALL: Final = 4


@dataclass(frozen=True)
class _Pending:
    index: int
    query: RecommendQuery
    need: int  # how many ranked items to ask libreco for, room for exclusions included
    consumed: int


class _MostPopularFirst:
    """Stands in for `data_info.np_rng` while serving. libreco draws random popular items
    where a neighbourhood model has nothing left to recommend for a known user (every
    candidate consumed); an answer must be repeatable, so those become the most popular
    items in libreco's order. Serving draws nothing else from this generator."""

    def choice(self, items: Any, size: int, *_: Any, **__: Any) -> Any:
        return np.asarray(items)[:size]


def make_fallbacks_deterministic(data_info: Any) -> None:
    data_info.np_rng = _MostPopularFirst()


class LibrecoEngine(Engine):
    """A model loaded with libreco. Not thread-safe: use one engine from one thread."""

    # libreco builds feature tensors per (user, item) pair for TF models, about 3 KB each.
    max_scores_per_call = 1_000_000

    def __init__(self, manifest: Manifest, model: Any, data_info: Any, graph: Any) -> None:
        unit_items = unit_rows(model.get_item_embedding()) if _has_embeddings(model) else None
        item_ids = [data_info.id2item[i] for i in range(data_info.n_items)]
        super().__init__(manifest, data_info.user2id, item_ids, data_info.user_consumed, unit_items)
        make_fallbacks_deterministic(data_info)
        # Neighbourhood models (CF, Swing) filter consumed items whatever n_rec is.
        self.always_filters = not isinstance(model, EmbedBase | TfBase)
        family = BY_CLASS.get(manifest.libreco_class)
        self.takes_seq = family is not None and family.sequence
        self._model = model
        self.libreco_model = model  # for in-process baselines; serving goes through the methods
        self._graph = graph
        if graph is not None:
            self.users_per_call = min(self.users_per_call, TF_USERS_PER_CALL)

    def _recommend_batch(self, queries: Sequence[RecommendQuery]) -> list[Recommendation]:
        for query in queries:
            self._check_n(query.n)
        results: list[Recommendation | None] = [None] * len(queries)
        by_filter: dict[bool, list[_Pending]] = {True: [], False: []}
        for index, query in enumerate(queries):
            if query.seq is not None and self.takes_seq:
                with_seq = self._recommend_with_seq(query)
                if with_seq is not None:
                    results[index] = with_seq
                    continue
            user_id = self._user2id.get(query.user)
            if user_id is None:
                results[index] = Recommendation(self._popular_items(query), cold_start=True)
                continue
            consumed = len(self._user_consumed.get(user_id, ()))
            # Decide as a single call with this query's own n would, and keep it that way.
            filtered, need = self._sizing(query, consumed)
            by_filter[filtered].append(_Pending(index, query, need, consumed))

        for filtered, pending in by_filter.items():
            for n_rec, group in self._plan_calls(pending, filtered):
                ranked = self._recommend_known([p.query.user for p in group], n_rec, filtered)
                for p in group:
                    items = ranked[p.query.user]
                    kept = [item for item in items if item not in p.query.exclude]
                    results[p.index] = Recommendation(kept[: p.query.n], cold_start=False)
        answered = [r for r in results if r is not None]
        assert len(answered) == len(queries), "every query gets exactly one answer"
        return answered

    def _predict(self, user: Id, items: Sequence[Id]) -> tuple[list[float | None], bool]:
        """Scores (libreco's sigmoid probabilities) for `user` and each item.

        Unknown items score None. An unknown user is scored as the average user (libreco's
        cold_start="average") and the second value is True.
        """
        cold_start = user not in self._user2id
        scores: list[float | None] = [None] * len(items)
        known = [(pos, item) for pos, item in enumerate(items) if item in self._item2id]
        if not known:
            return scores, cold_start
        known_items = [item for _, item in known]
        # libreco prints a line for unknown users; TF models need one user id per item.
        with quiet() if cold_start else contextlib.nullcontext(), self._in_graph():
            raw = self._model.predict(user=[user] * len(known_items), item=known_items)
        for (pos, _), score in zip(known, np.atleast_1d(raw).tolist(), strict=True):
            scores[pos] = float(score)
        return scores, cold_start

    def _plan_calls(
        self, pending: list[_Pending], filtered: bool
    ) -> Iterator[tuple[int, list[_Pending]]]:
        """Split known users into libreco calls of (n_rec, users).

        Asking for more than a user needs is safe (libreco sorts its top n_rec by score, so
        barring exact score ties a longer list starts with the shorter one), except that
        libreco stops filtering a user's consumed items once n_rec + len(consumed) > n_items:
        heavy users that would cross that line get a later call with a smaller n_rec.
        """
        remaining = sorted(pending, key=lambda p: p.need, reverse=True)
        while remaining:
            n_rec = remaining[0].need
            fits = [p for p in remaining if not self._crosses_the_line(filtered, n_rec, p)]
            remaining = [p for p in remaining if self._crosses_the_line(filtered, n_rec, p)]
            for start in range(0, len(fits), self.users_per_call):
                yield n_rec, fits[start : start + self.users_per_call]

    def _recommend_with_seq(self, query: RecommendQuery) -> Recommendation | None:
        """libreco's `recommend_user(user, n, seq=...)`: the user's representation computed
        from these items (it reads the last `recent_num` of them). None when no item of `seq`
        is in the model: the user is then served as without one."""
        seq = [item for item in query.seq or () if item in self._item2id]
        if not seq:
            return None
        user_id = self._user2id.get(query.user)
        consumed = 0 if user_id is None else len(self._user_consumed.get(user_id, ()))
        filtered, need = self._sizing(query, consumed)
        with self._in_graph():
            ranked = self._model.recommend_user(
                user=query.user, n_rec=need, seq=seq, filter_consumed=filtered, random_rec=False
            )
        items = [item for item in ranked[query.user].tolist() if item not in query.exclude]
        return Recommendation(items[: query.n], cold_start=False)

    def _sizing(self, query: RecommendQuery, consumed: int) -> tuple[bool, int]:
        """Whether libreco filters this query's consumed items, and the n_rec to ask for: n
        plus room for the excluded items it knows, never more than it can list (embedding
        and TF models list only unconsumed items; neighbourhood models list what they find,
        Swing tops up with popular items)."""
        filtered = self._filters(query, consumed)
        room = sum(1 for item in query.exclude if item in self._item2id)
        listable = self.n_items - consumed if filtered and not self.always_filters else self.n_items
        return filtered, min(query.n + room, listable)

    def _crosses_the_line(self, filtered: bool, n_rec: int, pending: _Pending) -> bool:
        """Whether asking for n_rec would stop libreco filtering this user's consumed items."""
        return filtered and not self.always_filters and n_rec + pending.consumed > self.n_items

    def _recommend_known(self, users: list[Id], n_rec: int, filtered: bool) -> dict[Id, list[Id]]:
        unique_users = list(dict.fromkeys(users))
        with self._in_graph():
            ranked = self._model.recommend_user(
                user=unique_users, n_rec=n_rec, filter_consumed=filtered, random_rec=False
            )
        return {user: ranked[user].tolist() for user in unique_users}

    def _in_graph(self) -> contextlib.AbstractContextManager[Any]:
        return in_graph(self._graph)


def load_libreco_engine(directory: Path, manifest: Manifest, threads: int) -> LibrecoEngine:
    """Load a verified version with libreco, its TF session (if any) capped at `threads`."""
    if manifest.libreco_class not in BY_CLASS:
        raise EngineError(f"unsupported libreco class {manifest.libreco_class!r}")
    model, data_info, graph = load_libreco_model(directory, manifest.libreco_class, threads)
    return LibrecoEngine(manifest, model, data_info, graph)


def load_libreco_model(directory: Path, libreco_class: str, threads: int) -> tuple[Any, Any, Any]:
    """libreco's model, data info and TF graph (None without TF) from the files in
    `directory`, saved under the store's file stem."""
    model_class: type[Any] = getattr(libreco.algorithms, libreco_class)
    limit_threads(threads)
    in_tf_graph = issubclass(model_class, TfBase | DynEmbedBase)
    graph = tf.Graph() if in_tf_graph else None
    path = str(directory)
    # libreco prints parameter counts, TF warns about deprecations, recfarm says it loads.
    with quiet(stderr=True), native_output_discarded():
        data_info = DataInfo.load(path, MODEL_FILE_STEM)
        if graph is None:
            model = model_class.load(path, MODEL_FILE_STEM, data_info)
        else:
            # Same as model_class.load(..., manual=True), except that the session gets our
            # thread settings instead of the ones saved with the training hyperparameters.
            factory = _with_session_config(model_class, tf_session_config(threads))
            with graph.as_default():
                model = load_tf_variables(factory, path, MODEL_FILE_STEM, data_info)
            if issubclass(model_class, DynEmbedBase):
                model.user_embeds_np, model.item_embeds_np = _embeddings(directory)
    return model, data_info, graph


def _embeddings(directory: Path) -> tuple[Any, Any]:
    try:
        with np.load(directory / f"{MODEL_FILE_STEM}.npz") as saved:
            return saved["user_embed"], saved["item_embed"]
    except (OSError, KeyError, ValueError) as exc:
        raise StoreCorrupt(directory, f"{MODEL_FILE_STEM}.npz", f"cannot read: {exc}") from exc


def _with_session_config(model_class: type[Any], config: dict[str, object]) -> Callable[..., Any]:
    def construct(**hparams: Any) -> Any:
        return model_class(**{**hparams, "tf_sess_config": config})

    return construct


def _has_embeddings(model: Any) -> bool:
    return isinstance(model, EmbedBase) and model.item_embeds_np is not None
