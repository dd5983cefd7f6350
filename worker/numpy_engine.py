"""What the numpy engines share: libreco's saved ids and consumed items, and the ranking.

libreco's `recommend_user` scores every item for a user, then in a Python loop per user drops
consumed items (only while n + len(consumed) <= n_items), takes the top n with an
argpartition and sorts them. A `NumpyEngine` gets the same scores for a batch of users from
its subclass (`_scores`), masks consumed and excluded items to -inf instead of removing them,
then does one argpartition and one argsort over the whole batch. The tests check the answers
equal libreco's for every user.

Loading reads only files libreco wrote, after their checksums were verified: no libreco,
TensorFlow or torch in the process, which is most of a libreco worker's memory and start-up.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from uro_recs.core.model_store import MODEL_FILE_STEM, Manifest, StoreCorrupt
from uro_recs.worker.engine import Engine, Id, Recommendation, RecommendQuery

# libreco's file names inside a version directory start with this stem.


@dataclass(frozen=True)
class SavedData:
    """The parts of libreco's data info every numpy engine needs."""

    user_ids: npt.NDArray[Any]
    item_ids: npt.NDArray[Any]
    user_consumed: dict[int, npt.NDArray[np.int64]]
    hyper_parameters: dict[str, Any]
    arrays: dict[str, npt.NDArray[Any]]  # the data info's arrays that were asked for


def read_saved_data(directory: Path, arrays: Sequence[str] = ()) -> SavedData:
    """The ids, consumed items and hyperparameters, plus these arrays of the data info.

    Only what is named is read: the data info also holds every training interaction as
    Python objects (hundreds of MB for a million of them).
    """
    names = ("user_unique_vals", "item_unique_vals", *arrays)
    try:
        # The id arrays are object arrays (pickled); the checksums were verified before this.
        with np.load(directory / f"{MODEL_FILE_STEM}_data_info.npz", allow_pickle=True) as info:
            read = {name: info[name] for name in names}
        with (directory / f"{MODEL_FILE_STEM}_user_consumed.pkl").open("rb") as fh:
            consumed = pickle.load(fh)
        user_consumed = {int(u): np.asarray(v, dtype=np.int64) for u, v in consumed.items()}
        hyper = json.loads((directory / f"{MODEL_FILE_STEM}_hyper_parameters.json").read_text())
        return SavedData(
            read["user_unique_vals"], read["item_unique_vals"], user_consumed, hyper, read
        )
    except (OSError, KeyError, ValueError, AttributeError, pickle.UnpicklingError) as exc:
        raise StoreCorrupt(
            directory, f"{MODEL_FILE_STEM}_data_info.npz", f"cannot read: {exc}"
        ) from exc


# Every this-many-th score makes the sample `top_columns` takes its threshold from.
SAMPLE_STRIDE = 16  # perf/topk.py sets it past any row to time the plain argpartition


def top_columns(scores: npt.NDArray[np.float32], need: int) -> npt.NDArray[np.int64]:
    """Each row's `need` highest columns, unordered: argpartition's answer, faster on long rows.

    A row's threshold is the need-th highest of every SAMPLE_STRIDE-th score: the sample's top
    `need` are scores of the row, so the row has at least `need` scores at or above it and its
    own top `need` are among them; only those are partitioned (on 48k items, tens of columns
    instead of 48k). Between equal scores at the boundary either may be taken, as with
    argpartition itself.
    """
    if need * SAMPLE_STRIDE * 4 > scores.shape[1]:  # short rows: one partition is cheaper
        top: npt.NDArray[np.int64] = np.argpartition(scores, -need, axis=1)[:, -need:]
        return top
    thresholds = np.partition(scores[:, ::SAMPLE_STRIDE], -need, axis=1)[:, -need]
    top = np.empty((len(scores), need), np.int64)
    for row, threshold in enumerate(thresholds.tolist()):
        columns = np.flatnonzero(scores[row] >= threshold)
        top[row] = columns[np.argpartition(scores[row, columns], -need)[-need:]]
    return top


class NumpyEngine(Engine):
    """Ranks with numpy; subclasses give the scores (`_scores`) and `predict`."""

    def __init__(
        self, manifest: Manifest, saved: SavedData, unit_items: npt.NDArray[np.float32] | None
    ) -> None:
        user2id: dict[Id, int] = {u: i for i, u in enumerate(saved.user_ids.tolist())}
        super().__init__(
            manifest, user2id, saved.item_ids.tolist(), saved.user_consumed, unit_items
        )
        self._item_array = np.asarray(self._id2item, dtype=object)

    def _scores(self, users: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """A new (len(users), n_items) array of libreco's scores for these inner users."""
        raise NotImplementedError

    def _recommend_batch(self, queries: Sequence[RecommendQuery]) -> list[Recommendation]:
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
        scores = self._scores(inner)
        need = 1
        for row, (_, user, query) in enumerate(chunk):
            self._mask_unwanted(scores[row], user, query)
            need = max(need, query.n)
        top = top_columns(scores, need)
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(top_scores, axis=1)[:, ::-1]
        ranked = np.take_along_axis(top, order, axis=1)
        ranked_scores = np.take_along_axis(top_scores, order, axis=1)
        answers = []
        for row, (_, _, query) in enumerate(chunk):
            keep = ranked[row, : query.n][ranked_scores[row, : query.n] > -np.inf]
            answers.append(self._item_array[keep].tolist())
        return answers

    def _mask_unwanted(
        self, scores: npt.NDArray[np.float32], user: int, query: RecommendQuery
    ) -> None:
        """Set to -inf, in one user's scores of every item, what `query` must not return: the
        user's consumed items (where libreco filters them) and the excluded ones."""
        consumed = self._user_consumed.get(user, ())
        if self._filters(query, len(consumed)):
            scores[consumed] = -np.inf
        if query.exclude:
            scores[[self._item2id[i] for i in query.exclude if i in self._item2id]] = -np.inf

    def _known_items(self, items: Sequence[Id]) -> tuple[list[int], npt.NDArray[np.int64]]:
        """Positions in `items` that the model knows, and their inner ids."""
        item2id = self._item2id
        known = [(pos, item2id[item]) for pos, item in enumerate(items) if item in item2id]
        rows = np.fromiter((i for _, i in known), dtype=np.int64, count=len(known))
        return [pos for pos, _ in known], rows
