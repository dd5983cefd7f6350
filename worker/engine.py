"""What the worker loop calls: one verified model version behind a small API.

Implementations of `Engine`:
- the numpy engines score straight from libreco's saved files, with no libreco, TensorFlow or
  torch in the process: `EmbeddingEngine` (worker/embedding_engine.py; ALS: a batch of users
  is one matrix product plus a partial sort) and `DeepFMEngine` (worker/deepfm_engine.py;
  item-side work done at load), on what worker/numpy_engine.py reads and shares;
- `LibrecoEngine` (worker/libreco_engine.py) loads the model with libreco and calls its
  `recommend_user` / `predict`: any model, and the baseline the others are checked against.
All answer what libreco's `recommend_user` answers for the same saved model; the tests hold
them to it. `load_engine` verifies the version's checksums and picks one; this module imports
none of them, so choosing is cheap.
"""

from __future__ import annotations

import ctypes
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import structlog

from uro_recs.core.families import BY_CLASS
from uro_recs.core.model_store import Id as Id  # re-exported: the API speaks in Ids
from uro_recs.core.model_store import (
    Manifest,
    StoreCorrupt,
    current_version,
    verify,
    version_dir,
)

log = structlog.get_logger(__name__)

_WARM_UP_ROUNDS: Final = 3


class EngineError(Exception):
    """An engine cannot answer a request."""


class Unsupported(EngineError):
    """The model cannot do this operation (e.g. similar_items without item embeddings)."""


class UnknownItem(EngineError):
    """The item id was not in the model's training data."""


class BadArgument(EngineError):
    """An argument is out of range (e.g. n larger than the catalogue)."""


@dataclass(frozen=True)
class Recommendation:
    items: list[Id]
    cold_start: bool


@dataclass(frozen=True)
class RecommendQuery:
    """One user's recommend request, for batches whose requests differ in options."""

    user: Id
    n: int
    filter_consumed: bool = True
    exclude: frozenset[Id] = frozenset()
    seq: tuple[Id, ...] | None = None  # the user's recent items, oldest first (sequence models)


class Engine:
    """What both engines share: ids, the popular fallback, similar items, info, warm-up.

    Subclasses set the id maps and `_unit_items` (None without item embeddings) and
    implement `recommend_batch` and `predict`. Not thread-safe: one engine, one thread.
    """

    # Upper bound on user x item scores computed in one call: a memory guard for large
    # batches (numpy engines hold one float32 matrix of that many scores).
    max_scores_per_call: int = 4_000_000
    always_filters: bool = False  # see _filters
    takes_seq: bool = False  # recommend follows a query's `seq` (sequence models)

    def __init__(
        self,
        manifest: Manifest,
        user2id: dict[Id, int],
        item_ids: Sequence[Id],
        user_consumed: dict[int, Any],
        unit_items: npt.NDArray[np.float32] | None,
    ) -> None:
        self.manifest = manifest
        self.name = manifest.model
        self.version = manifest.version
        self.libreco_class = manifest.libreco_class
        self.n_users = len(user2id)
        self.n_items = len(item_ids)
        self._user2id = user2id
        self._id2item: list[Id] = [_plain_id(i) for i in item_ids]
        self._item2id: dict[Id, int] = {item: i for i, item in enumerate(self._id2item)}
        self._user_consumed = user_consumed
        self._popular: list[Id] = list(dict.fromkeys(manifest.popular_items))
        self._unit_items = unit_items
        # Models uro-recs trains have text ids (pipeline/training.py); a request may still
        # name a user or item by an integer, which then means its decimal text.
        self._text_ids = all(isinstance(i, str) for i in islice(user2id, 1)) and all(
            isinstance(i, str) for i in self._id2item[:1]
        )
        # Users one model call scores well at once; the worker splits larger batches.
        self.users_per_call = max(1, self.max_scores_per_call // max(1, self.n_items))
        ops = {"recommend", "predict"} | ({"similar_items"} if unit_items is not None else set())
        self.ops = frozenset(ops)

    def info(self) -> dict[str, object]:
        return {
            "name": self.name,
            "version": self.version,
            "class": self.libreco_class,
            "n_users": self.n_users,
            "n_items": self.n_items,
            "ops": sorted(self.ops),
            "created_at": self.manifest.created_at,
        }

    def recommend(
        self,
        users: Sequence[Id],
        n: int,
        filter_consumed: bool,
        exclude: Sequence[frozenset[Id]] = (),
    ) -> list[Recommendation]:
        """Top-n items per user; `exclude` is empty or holds one set per user.

        For a known user and no exclusions the items are exactly what libreco's
        `recommend_user(user=u, n_rec=n, filter_consumed=...)` returns. Unknown users get the
        training data's most popular items, deterministically, with `cold_start=True`.
        """
        if exclude and len(exclude) != len(users):
            raise BadArgument("exclude must be empty or hold one set per user")
        excluded = exclude or [frozenset[Id]()] * len(users)
        return self.recommend_batch(
            [RecommendQuery(u, n, filter_consumed, e) for u, e in zip(users, excluded, strict=True)]
        )

    def recommend_batch(self, queries: Sequence[RecommendQuery]) -> list[Recommendation]:
        """Like `recommend`, for requests that differ in n, filter_consumed or exclude."""
        if self._text_ids:
            queries = [self._as_text_query(query) for query in queries]
        return self._recommend_batch(queries)

    def predict(self, user: Id, items: Sequence[Id]) -> tuple[list[float | None], bool]:
        """A score per item (None for items the model does not know), and whether the user
        was unknown (then scored as libreco's average user)."""
        if self._text_ids:
            user, items = _as_text(user), [_as_text(item) for item in items]
        return self._predict(user, items)

    def _recommend_batch(self, queries: Sequence[RecommendQuery]) -> list[Recommendation]:
        raise NotImplementedError

    def _predict(self, user: Id, items: Sequence[Id]) -> tuple[list[float | None], bool]:
        raise NotImplementedError

    def _as_text_query(self, query: RecommendQuery) -> RecommendQuery:
        ints = any(type(item) is int for item in query.exclude) or (
            query.seq is not None and any(type(item) is int for item in query.seq)
        )
        if type(query.user) is str and not ints:
            return query
        exclude = frozenset(_as_text(item) for item in query.exclude)
        seq = None if query.seq is None else tuple(_as_text(item) for item in query.seq)
        return dataclasses.replace(query, user=_as_text(query.user), exclude=exclude, seq=seq)

    def training_sequence(self, user: Id) -> tuple[Id, ...]:
        """The items `user` consumed in the training data, oldest first (empty if unknown)."""
        inner = self._user2id.get(_as_text(user) if self._text_ids else user)
        if inner is None:
            return ()
        return tuple(self._id2item[int(i)] for i in self._user_consumed.get(inner, ()))

    def similar_items(self, item: Id, n: int) -> tuple[list[Id], list[float]]:
        """The n items with the most similar embeddings (cosine), most similar first.

        The item itself is left out; equal similarities are ordered by libreco's inner id.
        """
        if self._unit_items is None:
            raise Unsupported(f"{self.libreco_class} has no item embeddings")
        self._check_n(n)
        if self._text_ids:
            item = _as_text(item)
        index = self._item2id.get(item)
        if index is None:
            raise UnknownItem(f"unknown item: {item!r}")
        similarity = self._unit_items @ self._unit_items[index]
        similarity[index] = -np.inf
        n = min(n, self.n_items - 1)
        if n == 0:
            return [], []
        # Take everything tied with the n-th best, then sort: ties at the cut stay deterministic.
        cut = np.partition(similarity, -n)[-n]
        candidates = np.flatnonzero(similarity >= cut)
        order = candidates[np.lexsort((candidates, -similarity[candidates]))][:n]
        return [self._id2item[int(i)] for i in order], similarity[order].tolist()

    def warm_up(self) -> None:
        """Run each op a few times on real ids so the first real requests are not slow."""
        started = time.perf_counter()
        user = next(iter(self._user2id))
        item = self._id2item[0]
        n = min(10, self.n_items)
        for _ in range(_WARM_UP_ROUNDS):
            self.recommend([user, _unknown_id(self._user2id)], n, filter_consumed=True)
            self.predict(user, [item])
            if "similar_items" in self.ops:
                self.similar_items(item, n)
        log.info(
            "model_warmed_up",
            model=self.name,
            version=self.version,
            seconds=round(time.perf_counter() - started, 3),
        )

    def _check_n(self, n: int) -> None:
        if not 1 <= n <= self.n_items:
            raise BadArgument(f"n must be between 1 and {self.n_items}, got {n}")

    def _popular_items(self, query: RecommendQuery) -> list[Id]:
        return list(islice((i for i in self._popular if i not in query.exclude), query.n))

    def _filters(self, query: RecommendQuery, consumed: int) -> bool:
        # libreco's embedding and TF models filter consumed items only when
        # n_rec + len(consumed) <= n_items; its neighbourhood models always do.
        return (
            query.filter_consumed
            and consumed > 0
            and (self.always_filters or query.n + consumed <= self.n_items)
        )


def load_engine(
    store: Path,
    model_name: str,
    version: str | None = None,
    threads: int = 1,
    fast_path: bool = True,
) -> Engine:
    """Verify a stored version (the CURRENT one by default), then load it.

    Checksums are checked before any file is read. Embedding models (core/families.py) and
    DeepFM load into a numpy engine unless `fast_path` is off (or the DeepFM has a shape that
    engine does not compute); everything else goes through libreco.
    """
    if threads < 1:
        raise BadArgument(f"threads must be at least 1, got {threads}")
    started = time.perf_counter()
    chosen = version if version is not None else current_version(store, model_name)
    directory = version_dir(store, model_name, chosen)
    manifest = verify(directory)
    family = BY_CLASS.get(manifest.libreco_class)
    engine: Engine | None = None
    if fast_path and family is not None and family.engine == "embedding":
        from uro_recs.worker.embedding_engine import load_embedding_engine

        engine = load_embedding_engine(directory, manifest, threads)
    elif fast_path and family is not None and family.engine == "deepfm":
        from uro_recs.worker.deepfm_engine import load_deepfm_engine

        engine = load_deepfm_engine(directory, manifest, threads)
    if engine is None:
        from uro_recs.worker.libreco_engine import load_libreco_engine

        engine = load_libreco_engine(directory, manifest, threads)
    for key, actual in (("n_users", engine.n_users), ("n_items", engine.n_items)):
        if manifest.data.get(key) != actual:
            raise StoreCorrupt(directory, "manifest.json", f"data.{key} does not match model")
    log.info(
        "model_loaded",
        model=engine.name,
        version=engine.version,
        libreco_class=engine.libreco_class,
        engine=type(engine).__name__,
        n_users=engine.n_users,
        n_items=engine.n_items,
        threads=threads,
        seconds=round(time.perf_counter() - started, 3),
    )
    return_free_memory()
    return engine


def return_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim; elsewhere none).

    Loading a model builds large transient objects (libreco's pickled consumed items become a
    million Python ints on the way to numpy arrays); glibc keeps the pages they leave behind,
    and on a 48k-item DeepFM that was 18 MiB of every worker's resident memory.
    """
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # the process's own C library
    if trim is not None:
        trim(0)


def unit_rows(matrix: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    rows = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    unit: npt.NDArray[np.float32] = rows / np.maximum(norms, np.float32(1e-12))
    return unit


def _plain_id(value: object) -> Id:
    """libreco keeps int ids as numpy integers; callers want plain Python values."""
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, str | int):
        return value
    raise EngineError(f"id of unexpected type {type(value).__name__}")


def _as_text(value: Id) -> Id:
    return str(value) if isinstance(value, int) else value


def _unknown_id(known: dict[Id, int]) -> Id:
    candidate = "__uro_recs_warm_up__"
    while candidate in known:
        candidate += "_"
    return candidate
