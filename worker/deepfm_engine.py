"""The numpy engine for DeepFM: libreco's saved variables, item-side work done once at load.

libreco scores a user by feeding (user, item, item features) for every item through the TF
graph. DeepFM's output is a sum of parts that mostly split into a user half and an item half:

    output = w_lin · linear + w_fm · fm + w_deep · mlp + b
    linear = L · [user, item, item features]                   (first-order weights)
    fm     = ½((Σ_f e_f)² - Σ_f e_f²), elementwise over the embedding
           = e_user ⊙ E_item + ½(E_item² - Σ_item fields e_f²)  with E_item = Σ_item fields e_f
    mlp    = W_L · bn(relu(… bn(relu(W_1 · bn(x) + b_1)) …)) + b_L
    W_1 · bn(x) = W_1u · bn(e_user) + W_1i · bn(item fields)   (x = [e_user, item fields])

So at load this engine computes, per item, a constant, E_item and the item half of the first
dense layer; per request, per user, only `relu(H_item + c_user)` and what follows it depends
on both. With libreco's [64, 32] hidden units the last layer, its batch norm and w_deep fold
into one vector, leaving an add, a relu and a matrix-vector product per user (what that saves
against libreco's graph: `python -m perf.bench`).

Only the DeepFM shape uro-recs trains from uro's data is served here: categorical item
features (one value each), no user features, no numeric features, task "ranking".
`load_deepfm_engine` returns None for anything else (a DeepFM trained without item features
included), and the worker falls back to libreco. The tests check the answers equal
libreco's for every user, except where libreco's own scores of two items are within 1e-6
(float32 sums in another order differ from TF's by ~3e-7, and TF's own gaps between ranked
items go down to ~1e-8), and predict's scores to 1e-5.

Two-stage serving (`retrieve_with`): each user's top K candidates, consumed and excluded items
removed, come from another engine (an embedding model such as ALS) or from this model's own
linear and FM terms, which are an embedding model too (the user's FM vector against each
item's summed field embeddings, plus per-item constants: one matrix-vector product of
k columns); this one then ranks only those through the whole model, the MLP included. Its
answers are DeepFM's ranking of the candidates, so they equal full ranking exactly where the
full top n lies among them (`python -m perf.two_stage` measures how often, and the speed).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import structlog
from scipy.special import expit  # type: ignore[import-untyped]
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

from uro_recs.core.config import OWN_FM
from uro_recs.core.model_store import MODEL_FILE_STEM, Manifest, StoreCorrupt
from uro_recs.worker.engine import Engine, Id, RecommendQuery
from uro_recs.worker.numpy_engine import NumpyEngine, SavedData, read_saved_data, top_columns

log = structlog.get_logger(__name__)

# tf.layers.batch_normalization's default, which libreco's dense_nn uses.
BN_EPSILON: Final = 1e-3
# The column groups of libreco's name mapping this engine computes.
SUPPORTED_COLUMNS: Final = frozenset({"sparse_col", "item_sparse_col"})

# Items scored at a time: a block of the first hidden layer (512 KiB at 64 units) stays in
# the CPU cache through the add, the relu and the product that follow.
ITEM_BLOCK: Final = 2048

Float32Array = npt.NDArray[np.float32]


@dataclass(frozen=True)
class _Affine:
    """x * scale + shift: a batch norm at inference (or the identity without one)."""

    scale: npt.NDArray[np.float64]
    shift: npt.NDArray[np.float64]


@dataclass(frozen=True)
class _UserTerms:
    """What one user adds: to the first hidden layer, to the FM part, to the linear part."""

    first_layer: Float32Array
    fm: Float32Array
    linear: np.float32


@dataclass(frozen=True)
class _HiddenLayer:
    """(relu(z) * scale + shift) @ kernel + bias: a batch norm, then a hidden layer."""

    scale: Float32Array
    shift: Float32Array
    kernel: Float32Array
    bias: Float32Array

    def __call__(self, z: Float32Array) -> Float32Array:
        np.maximum(z, 0, out=z)
        out: Float32Array = (z * self.scale + self.shift) @ self.kernel + self.bias
        return out


class DeepFMEngine(NumpyEngine):
    def __init__(self, manifest: Manifest, saved: SavedData, variables: dict[str, Any]) -> None:
        super().__init__(manifest, saved, unit_items=None)
        v = {name.removesuffix(":0"): np.asarray(x, np.float64) for name, x in variables.items()}
        n_items, k = self.n_items, v["embedding/user_embeds_var"].shape[1]
        hidden = list(saved.hyper_parameters["hidden_units"])
        use_bn = bool(saved.hyper_parameters["use_bn"])
        sparse = np.asarray(saved.arrays["item_sparse_unique"], np.int64)[:n_items]

        # Per item: the item's own fields (item id, then each categorical feature).
        item_fields = [v["embedding/item_embeds_var"][:n_items]]
        item_fields += [
            v["embedding/sparse_embeds_var"][sparse[:, j]] for j in range(sparse.shape[1])
        ]
        item_linear = np.stack(
            [v["embedding/item_linear_var"][:n_items, 0]]
            + [v["embedding/sparse_linear_var"][sparse[:, j]] for j in range(sparse.shape[1])],
            axis=1,
        )
        linear_kernel, linear_bias = v["dense/kernel"][:, 0], v["dense/bias"][0]
        out_kernel, out_bias = v["dense_1/kernel"][:, 0], v["dense_1/bias"][0]
        w_linear, w_fm, w_deep = out_kernel[0], out_kernel[1 : 1 + k], out_kernel[1 + k :]

        def norm(name: str, size: int) -> _Affine:
            if not use_bn:
                return _Affine(np.ones(size), np.zeros(size))
            scale = v[f"mlp/{name}/gamma"] / np.sqrt(v[f"mlp/{name}/moving_variance"] + BN_EPSILON)
            return _Affine(scale, v[f"mlp/{name}/beta"] - v[f"mlp/{name}/moving_mean"] * scale)

        kernels = [v[f"mlp/mlp_layer{i}/kernel"] for i in range(1, len(hidden) + 1)]
        biases = [v[f"mlp/mlp_layer{i}/bias"] for i in range(1, len(hidden) + 1)]
        input_norm = norm("batch_normalization", kernels[0].shape[0])
        norms = [norm(f"batch_normalization_{i}", hidden[i - 1]) for i in range(1, len(hidden))]

        # The first dense layer, split at the user's k inputs.
        item_inputs = np.concatenate(item_fields, axis=1)
        first_item = (item_inputs * input_norm.scale[k:] + input_norm.shift[k:]) @ kernels[0][k:]
        self._first_item: Float32Array = (first_item + biases[0]).astype(np.float32)
        self._user_norm = _Affine(input_norm.scale[:k], input_norm.shift[:k])
        self._first_user_kernel = kernels[0][:k]
        # Layers 2..L-1 as they are; the last one, its batch norm and w_deep fold into a vector.
        self._middle = [
            _HiddenLayer(*(a.astype(np.float32) for a in (n.scale, n.shift, kernel, bias)))
            for n, kernel, bias in zip(norms[:-1], kernels[1:-1], biases[1:-1], strict=True)
        ]
        constant = w_linear * linear_bias + out_bias
        if len(hidden) == 1:  # the MLP is one linear layer: deep = first layer's output
            self._deep_vector = w_deep.astype(np.float32)
            self._relu_last = False
        else:
            folded = kernels[-1] @ w_deep
            self._deep_vector = (norms[-1].scale * folded).astype(np.float32)
            self._relu_last = True
            constant += norms[-1].shift @ folded + biases[-1] @ w_deep
        fields_sum = sum(item_fields[1:], item_fields[0])
        squares_sum = sum((f * f for f in item_fields[1:]), item_fields[0] * item_fields[0])
        self._item_constant: Float32Array = (
            w_linear * (item_linear @ linear_kernel[1:])
            + 0.5 * ((fields_sum * fields_sum - squares_sum) @ w_fm)
            + constant
        ).astype(np.float32)
        self._item_fields_sum: Float32Array = fields_sum.astype(np.float32)
        # Per user (row n_users: libreco's "oov" user, what an unknown user is scored as).
        self._user_embeds = v["embedding/user_embeds_var"]
        self._user_linear = w_linear * linear_kernel[0] * v["embedding/user_linear_var"][:, 0]
        self._w_fm = w_fm
        self._hidden_buffer = np.empty(
            (min(ITEM_BLOCK, n_items), len(self._first_item[0])), np.float32
        )
        self._retriever: Engine | None = None
        self._candidates = 0  # 0: rank every item (no two-stage serving)

    def retrieve_with(self, retriever: Engine | None, candidates: int) -> None:
        """Rank only `candidates` items per user: the top ones `retriever` finds (for a user
        it knows; every item for the others), or with None the top ones by this model's own
        linear and FM terms (OWN_FM)."""
        self._retriever, self._candidates = retriever, candidates
        log.info(
            "two_stage_serving",
            model=self.name,
            version=self.version,
            retrieve_from=OWN_FM if retriever is None else retriever.name,
            retriever_version=self.version if retriever is None else retriever.version,
            candidates=candidates,
        )

    def _rank(self, chunk: list[tuple[int, int, RecommendQuery]]) -> list[list[Id]]:
        if not self._candidates:
            return super()._rank(chunk)
        found: list[npt.NDArray[np.int64] | None] = [None] * len(chunk)
        if self._retriever is not None:
            found = self._retrieve_elsewhere(chunk)
        answers = []
        for (index, user, query), rows in zip(chunk, found, strict=True):
            terms = self._user_terms(user)
            if self._retriever is None:
                rows = self._retrieve_own(user, query, terms)
            elif rows is None:  # a user the retriever does not know: rank every item
                answers += super()._rank([(index, user, query)])
                continue
            scores = np.empty(len(rows), np.float32)
            hidden = np.empty((len(rows), self._hidden_buffer.shape[1]), np.float32)
            self._score_items(terms, rows, hidden, out=scores)
            # Highest first; equal scores keep the order they were retrieved in.
            best = np.argsort(-scores, kind="stable")[: query.n]
            answers.append(self._item_array[rows[best]].tolist())
        return answers

    def _retrieve_elsewhere(
        self, chunk: list[tuple[int, int, RecommendQuery]]
    ) -> list[npt.NDArray[np.int64] | None]:
        """Each user's candidates from the retriever, as our inner ids (None: it does not know
        the user)."""
        assert self._retriever is not None
        queries = [
            RecommendQuery(q.user, self._candidates, q.filter_consumed, q.exclude)
            for _, _, q in chunk
        ]
        found: list[npt.NDArray[np.int64] | None] = []
        for (_, user, query), candidates in zip(
            chunk, self._retriever.recommend_batch(queries), strict=True
        ):
            if candidates.cold_start:
                found.append(None)
                continue
            _, rows = self._known_items(candidates.items)
            consumed = self._user_consumed.get(user, ())
            if self._filters(query, len(consumed)):
                # The retriever filters by its own rule (libreco's: only while n plus the
                # consumed items fit in the catalogue), which at K items may keep them.
                rows = rows[~np.isin(rows, consumed)]
            found.append(rows)
        return found

    def _retrieve_own(
        self, user: int, query: RecommendQuery, terms: _UserTerms
    ) -> npt.NDArray[np.int64]:
        """The top candidates by the linear and FM terms alone (the MLP left out): one
        product of the user's FM vector with every item's summed field embeddings."""
        shallow = self._item_fields_sum @ terms.fm
        shallow += self._item_constant
        self._mask_unwanted(shallow, user, query)
        top = top_columns(shallow[np.newaxis], min(self._candidates, self.n_items))[0]
        kept: npt.NDArray[np.int64] = top[shallow[top] > -np.inf]
        return kept

    def _scores(self, users: npt.NDArray[np.int64]) -> Float32Array:
        scores = np.empty((len(users), self.n_items), dtype=np.float32)
        terms = [self._user_terms(user) for user in users.tolist()]
        for start in range(0, self.n_items, ITEM_BLOCK):
            block = slice(start, min(start + ITEM_BLOCK, self.n_items))
            hidden = self._hidden_buffer[: block.stop - block.start]
            for row, user_terms in enumerate(terms):
                self._score_items(user_terms, block, hidden, out=scores[row, block])
        return scores

    def _user_terms(self, user: int) -> _UserTerms:
        embed = self._user_embeds[user]
        first = (embed * self._user_norm.scale + self._user_norm.shift) @ self._first_user_kernel
        return _UserTerms(
            first.astype(np.float32),
            (self._w_fm * embed).astype(np.float32),
            np.float32(self._user_linear[user]),
        )

    def _score_items(
        self,
        user: _UserTerms,
        items: slice | npt.NDArray[np.int64],
        hidden: Float32Array,
        out: Float32Array,
    ) -> None:
        """The model's output for one user and `items`, into `out`; `hidden` is scratch."""
        np.add(self._first_item[items], user.first_layer, out=hidden)
        for layer in self._middle:
            hidden = layer(hidden)
        if self._relu_last:
            np.maximum(hidden, 0, out=hidden)
        np.matmul(self._item_fields_sum[items], user.fm, out=out)
        out += self._item_constant[items]
        out += hidden @ self._deep_vector
        out += user.linear

    def _predict(self, user: Id, items: Sequence[Id]) -> tuple[list[float | None], bool]:
        """libreco's predict: the sigmoid of the output; None for unknown items.

        An unknown user is scored as libreco scores one: with the model's "oov" user row.
        """
        inner = self._user2id.get(user)
        scores: list[float | None] = [None] * len(items)
        positions, rows = self._known_items(items)
        if positions:
            terms = self._user_terms(self.n_users if inner is None else inner)
            hidden = np.empty((len(rows), self._hidden_buffer.shape[1]), np.float32)
            output = np.empty(len(rows), np.float32)
            self._score_items(terms, rows, hidden, out=output)
            values = expit(output)
            for pos, value in zip(positions, values.tolist(), strict=True):
                scores[pos] = float(value)
        return scores, inner is None


def load_deepfm_engine(directory: Path, manifest: Manifest, threads: int) -> DeepFMEngine | None:
    """The engine for a verified DeepFM version, or None when it uses what this one lacks."""
    threadpool_limits(limits=threads)
    columns = _name_mapping_columns(directory)
    if "item_sparse_col" not in columns:  # trained without item features
        log.info("deepfm_served_by_libreco", model=manifest.model, reason="no item features")
        return None
    saved = read_saved_data(directory, arrays=["item_sparse_unique"])
    reason = None
    if saved.hyper_parameters.get("task") != "ranking":
        reason = "task is not ranking"
    elif not columns <= SUPPORTED_COLUMNS:
        reason = f"uses {sorted(columns - SUPPORTED_COLUMNS)}"
    if reason is not None:
        log.info("deepfm_served_by_libreco", model=manifest.model, reason=reason)
        return None
    path = directory / f"{MODEL_FILE_STEM}_tf_variables.npz"
    try:
        with np.load(path) as archive:
            variables = {name: archive[name] for name in archive.files}
        return DeepFMEngine(manifest, saved, variables)
    except (OSError, KeyError, ValueError, IndexError) as exc:
        raise StoreCorrupt(directory, path.name, f"cannot read DeepFM variables: {exc}") from exc


def _name_mapping_columns(directory: Path) -> set[str]:
    """The column groups the model's data has ("sparse_col", "user_dense_col", ...)."""
    path = directory / f"{MODEL_FILE_STEM}_data_info_name_mapping.json"
    if not path.exists():  # libreco writes none for data without features
        return set()
    try:
        return set(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        raise StoreCorrupt(directory, path.name, f"cannot read: {exc}") from exc
