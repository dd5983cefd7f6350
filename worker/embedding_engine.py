"""The numpy engine for embedding models: libreco's saved arrays, no libreco at run time.

libreco's `recommend_user` for an embedding model is `scores = U[users] @ I.T`, then per user
a Python loop that drops consumed items (only while n + len(consumed) <= n_items), an
argpartition for the top n and an argsort. This engine does the same arithmetic on the same
float32 arrays for the whole batch at once: consumed (and excluded) items are masked to -inf
instead of removed, then one argpartition and one argsort over the batch. The tests check
the answers equal libreco's for every user.

Loading reads only the files libreco wrote (the checksums were verified first): the model's
`.npz` embeddings, the data info's id arrays and the consumed-items pickle. TensorFlow and
torch are never imported, which is most of a libreco worker's memory and start-up time.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from scipy.special import expit  # type: ignore[import-untyped]
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

from uro_recs.worker.engine import (
    Engine,
    Id,
    Recommendation,
    RecommendQuery,
    unit_rows,
)
from uro_recs.worker.model_store import Manifest, StoreCorrupt

# libreco's file names inside a version directory start with this stem.
FILE_STEM: Final = "model"


class EmbeddingEngine(Engine):
    def __init__(
        self,
        manifest: Manifest,
        user_ids: npt.NDArray[Any],
        item_ids: npt.NDArray[Any],
        user_embeds: npt.NDArray[np.float32],
        item_embeds: npt.NDArray[np.float32],
        user_consumed: dict[int, Any],
        sigmoid: bool,
    ) -> None:
        n_items = len(item_ids)
        user2id: dict[Id, int] = {u: i for i, u in enumerate(user_ids.tolist())}
        super().__init__(
            manifest, user2id, item_ids.tolist(), user_consumed, unit_rows(item_embeds[:n_items])
        )
        self._user_embeds = user_embeds  # row n_users: libreco's average ("oov") user
        self._item_embeds = item_embeds  # row n_items: the average item
        self._item_array = np.asarray(self._id2item, dtype=object)
        self._sigmoid = sigmoid

    def recommend_batch(self, queries: Sequence[RecommendQuery]) -> list[Recommendation]:
        """Like `recommend`, for requests that differ in n, filter_consumed or exclude."""
        for query in queries:
            self._check_n(query.n)
        results: list[Recommendation] = []
        known: list[tuple[int, int, RecommendQuery]] = []  # (result index, inner user, query)
        for query in queries:
            inner = self._user2id.get(query.user)
            if inner is None:
                results.append(Recommendation(self._popular_items(query), cold_start=True))
            else:
                results.append(Recommendation([], cold_start=False))
                known.append((len(results) - 1, inner, query))
        for start in range(0, len(known), self.users_per_call):
            chunk = known[start : start + self.users_per_call]
            for (index, _, _), items in zip(chunk, self._rank(chunk), strict=True):
                results[index] = Recommendation(items, cold_start=False)
        return results

    def _rank(self, chunk: list[tuple[int, int, RecommendQuery]]) -> list[list[Id]]:
        inner = np.fromiter((u for _, u, _ in chunk), dtype=np.int64, count=len(chunk))
        # The same expression as libreco's recommend_from_embedding, so the same BLAS call.
        scores = self._user_embeds[inner] @ self._item_embeds[: self.n_items].T
        need = 1
        for row, (_, user, query) in enumerate(chunk):
            consumed = self._user_consumed.get(user, ())
            if self._filters(query, len(consumed)):
                scores[row, consumed] = -np.inf
            if query.exclude:
                excluded = [self._item2id[i] for i in query.exclude if i in self._item2id]
                scores[row, excluded] = -np.inf
            need = max(need, query.n)
        top = np.argpartition(scores, -need, axis=1)[:, -need:]
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(top_scores, axis=1)[:, ::-1]
        ranked = np.take_along_axis(top, order, axis=1)
        ranked_scores = np.take_along_axis(top_scores, order, axis=1)
        answers = []
        for row, (_, _, query) in enumerate(chunk):
            keep = ranked[row, : query.n][ranked_scores[row, : query.n] > -np.inf]
            answers.append(self._item_array[keep].tolist())
        return answers

    def predict(self, user: Id, items: Sequence[Id]) -> tuple[list[float | None], bool]:
        """Scores as libreco's predict gives them; None for unknown items.

        An unknown user is scored with libreco's average user embedding (cold_start="average").
        """
        inner = self._user2id.get(user)
        cold_start = inner is None
        user_row = self._user_embeds[self.n_users if inner is None else inner]
        scores: list[float | None] = [None] * len(items)
        item2id = self._item2id
        known = [(pos, item2id[item]) for pos, item in enumerate(items) if item in item2id]
        if not known:
            return scores, cold_start
        rows = np.fromiter((i for _, i in known), dtype=np.int64, count=len(known))
        raw = np.sum(user_row * self._item_embeds[rows], axis=1)
        values = expit(raw) if self._sigmoid else raw
        for (pos, _), value in zip(known, values.tolist(), strict=True):
            scores[pos] = float(value)
        return scores, cold_start


def load_embedding_engine(directory: Path, manifest: Manifest, threads: int) -> EmbeddingEngine:
    """Read a verified version's embeddings, ids and consumed items as libreco saved them."""
    threadpool_limits(limits=threads)
    try:
        with np.load(directory / f"{FILE_STEM}.npz") as variables:
            user_embeds = np.asarray(variables["user_embed"], dtype=np.float32)
            item_embeds = np.asarray(variables["item_embed"], dtype=np.float32)
        # The id arrays are object arrays (pickled); the checksums were verified before this.
        with np.load(directory / f"{FILE_STEM}_data_info.npz", allow_pickle=True) as info:
            user_ids, item_ids = info["user_unique_vals"], info["item_unique_vals"]
        with (directory / f"{FILE_STEM}_user_consumed.pkl").open("rb") as fh:
            consumed = pickle.load(fh)
        user_consumed = {int(u): np.asarray(v, dtype=np.int64) for u, v in consumed.items()}
        hyper = json.loads((directory / f"{FILE_STEM}_hyper_parameters.json").read_text())
    except (OSError, KeyError, ValueError, AttributeError, pickle.UnpicklingError) as exc:
        raise StoreCorrupt(directory, f"{FILE_STEM}.npz", f"cannot read embeddings: {exc}") from exc
    if user_embeds.shape[0] != len(user_ids) + 1 or item_embeds.shape[0] != len(item_ids) + 1:
        raise StoreCorrupt(directory, f"{FILE_STEM}.npz", "embedding rows do not match the ids")
    sigmoid = hyper.get("task") == "ranking"  # libreco's predict applies expit for ranking
    return EmbeddingEngine(
        manifest, user_ids, item_ids, user_embeds, item_embeds, user_consumed, sigmoid
    )
