"""The numpy engine for embedding models: scores are `U[user] @ I.T`, as in libreco.

Every family whose answer is a function of saved embeddings (core/families.py, engine
"embedding": ALS, SVD, SVD++, BPR, Item2Vec, DeepWalk, LightGCN, NGCF, GraphSage, PinSage,
TwoTower) saves `user_embed` and `item_embed` (with libreco's bias columns folded in), and
libreco's `recommend_user` computes exactly this product on the same float32 arrays (the same
BLAS call for one user), so the ranking in `NumpyEngine` gives its answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy.special import expit  # type: ignore[import-untyped]
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

from uro_recs.core.model_store import MODEL_FILE_STEM, Manifest, StoreCorrupt
from uro_recs.worker.engine import Id, unit_rows
from uro_recs.worker.numpy_engine import NumpyEngine, SavedData, read_saved_data


class EmbeddingEngine(NumpyEngine):
    def __init__(
        self,
        manifest: Manifest,
        saved: SavedData,
        user_embeds: npt.NDArray[np.float32],
        item_embeds: npt.NDArray[np.float32],
    ) -> None:
        n_items = len(saved.item_ids)
        super().__init__(manifest, saved, unit_rows(item_embeds[:n_items]))
        self._user_embeds = user_embeds  # row n_users: libreco's average ("oov") user
        self._item_embeds = item_embeds  # row n_items: the average item
        self._sigmoid = saved.hyper_parameters.get("task") == "ranking"  # as libreco's predict

    def _scores(self, users: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        # One user at a time, as libreco's recommend_user scores one user: a matrix product of
        # several users may round differently (another BLAS kernel), and an answer must not
        # depend on which other requests share its batch.
        items = self._item_embeds[: self.n_items].T
        scores = np.empty((len(users), self.n_items), dtype=np.float32)
        for row, user in enumerate(users.tolist()):
            np.matmul(self._user_embeds[user : user + 1], items, out=scores[row : row + 1])
        return scores

    def _predict(self, user: Id, items: Sequence[Id]) -> tuple[list[float | None], bool]:
        """Scores as libreco's predict gives them; None for unknown items.

        An unknown user is scored with libreco's average user embedding (cold_start="average").
        """
        inner = self._user2id.get(user)
        cold_start = inner is None
        user_row = self._user_embeds[self.n_users if inner is None else inner]
        scores: list[float | None] = [None] * len(items)
        positions, rows = self._known_items(items)
        if not positions:
            return scores, cold_start
        raw = np.sum(user_row * self._item_embeds[rows], axis=1)
        values = expit(raw) if self._sigmoid else raw
        for pos, value in zip(positions, values.tolist(), strict=True):
            scores[pos] = float(value)
        return scores, cold_start


def load_embedding_engine(directory: Path, manifest: Manifest, threads: int) -> EmbeddingEngine:
    """Read a verified version's embeddings, ids and consumed items as libreco saved them."""
    threadpool_limits(limits=threads)
    saved = read_saved_data(directory)
    try:
        with np.load(directory / f"{MODEL_FILE_STEM}.npz") as variables:
            user_embeds = np.asarray(variables["user_embed"], dtype=np.float32)
            item_embeds = np.asarray(variables["item_embed"], dtype=np.float32)
    except (OSError, KeyError, ValueError) as exc:
        raise StoreCorrupt(
            directory, f"{MODEL_FILE_STEM}.npz", f"cannot read embeddings: {exc}"
        ) from exc
    n_users, n_items = len(saved.user_ids), len(saved.item_ids)
    if user_embeds.shape[0] != n_users + 1 or item_embeds.shape[0] != n_items + 1:
        raise StoreCorrupt(
            directory, f"{MODEL_FILE_STEM}.npz", "embedding rows do not match the ids"
        )
    return EmbeddingEngine(manifest, saved, user_embeds, item_embeds)
