"""The LibRecommender algorithms uro-recs trains and serves, by the name `kind` takes.

One table for the trainer (which class, which dataset, what defaults), the workers (which
engine serves a saved model) and the README's list. Pure data: importing it imports nothing
heavy, so the CLI and the config check can name the kinds in a second.

uro's data is implicit feedback (backpacks and events) with item features (the item's kind)
and no user features, so every model trains in libreco's "ranking" task with negative
sampling. The families that cannot apply are in `NOT_APPLICABLE`, with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

Group: TypeAlias = Literal["neighbourhood", "embedding", "ranking", "sequence"]
# What training needs besides numpy: the worker needs it too unless `numpy_engine` is set.
Backend: TypeAlias = Literal["numpy", "tensorflow", "torch", "gensim", "rust"]
Engine: TypeAlias = Literal["embedding", "deepfm", "libreco"]

# Hyperparameters every family gets unless its config says otherwise (only those the class
# takes are passed): small enough to train uro-sized data in seconds to minutes on 2 cores.
COMMON_DEFAULTS: Final[Mapping[str, object]] = {
    "embed_size": 16,
    "n_epochs": 2,
    "lr": 1e-3,
    "batch_size": 512,
    "num_neg": 1,
    "sampler": "random",
    "recent_num": 10,
}


@dataclass(frozen=True)
class Family:
    kind: str  # the name in the config and on the CLI
    libreco_class: str
    group: Group
    backend: Backend
    item_features: bool  # trains on item feature columns (libreco's DatasetFeat)
    sequence: bool  # recommend_user takes `seq`: the user's most recent items
    engine: Engine  # what serves it: a numpy engine reads saved files, libreco loads the model
    defaults: Mapping[str, object]  # over COMMON_DEFAULTS
    # recfarm's neighbourhood models index (user or item) pairs with 32-bit integers: more
    # than MAX_PAIR_SIDE of them fails ("out of range integral type conversion").
    pairs_of: Literal["user", "item"] | None = None

    def default_params(self) -> dict[str, object]:
        return {**COMMON_DEFAULTS, **self.defaults}


def _family(
    kind: str,
    libreco_class: str,
    group: Group,
    backend: Backend,
    engine: Engine,
    *,
    item_features: bool = False,
    sequence: bool = False,
    pairs_of: Literal["user", "item"] | None = None,
    **defaults: object,
) -> Family:
    return Family(
        kind, libreco_class, group, backend, item_features, sequence, engine, defaults, pairs_of
    )


MAX_PAIR_SIDE: Final = 46_340  # the largest n with n * n <= 2**31 - 1


_TABLE: Final = (
    _family("user_cf", "UserCF", "neighbourhood", "numpy", "libreco", k_sim=20),
    _family("item_cf", "ItemCF", "neighbourhood", "numpy", "libreco", k_sim=20),
    _family(
        "rs_user_cf", "RsUserCF", "neighbourhood", "rust", "libreco", k_sim=20, pairs_of="user"
    ),
    _family(
        "rs_item_cf", "RsItemCF", "neighbourhood", "rust", "libreco", k_sim=20, pairs_of="item"
    ),
    _family("swing", "Swing", "neighbourhood", "rust", "libreco", top_k=20),
    _family(
        "als",
        "ALS",
        "embedding",
        "numpy",
        "embedding",
        embed_size=32,
        n_epochs=10,
        reg=5.0,  # libreco's ALS rejects reg=None despite documenting it
        alpha=10,
        use_cg=True,
    ),
    _family("svd", "SVD", "embedding", "tensorflow", "embedding"),
    _family("svdpp", "SVDpp", "embedding", "tensorflow", "embedding"),
    _family("bpr", "BPR", "embedding", "tensorflow", "embedding"),
    _family("item2vec", "Item2Vec", "embedding", "gensim", "embedding", window_size=3),
    _family("deepwalk", "DeepWalk", "embedding", "gensim", "embedding", n_walks=5),
    _family("lightgcn", "LightGCN", "embedding", "torch", "embedding"),
    _family("ngcf", "NGCF", "embedding", "torch", "embedding"),
    _family("graphsage", "GraphSage", "embedding", "torch", "embedding", item_features=True),
    _family("pinsage", "PinSage", "embedding", "torch", "embedding", item_features=True),
    _family("two_tower", "TwoTower", "embedding", "tensorflow", "embedding", item_features=True),
    _family("ncf", "NCF", "ranking", "tensorflow", "libreco"),
    _family("fm", "FM", "ranking", "tensorflow", "libreco", item_features=True),
    _family(
        "wide_deep",
        "WideDeep",
        "ranking",
        "tensorflow",
        "libreco",
        item_features=True,
        lr={"wide": 0.01, "deep": 1e-3},  # one rate per part
    ),
    _family(
        "deepfm",
        "DeepFM",
        "ranking",
        "tensorflow",
        "deepfm",
        item_features=True,
        lr=3e-3,
        hidden_units=[64, 32],
        use_bn=True,
    ),
    _family("autoint", "AutoInt", "ranking", "tensorflow", "libreco", item_features=True),
    _family(
        "youtube_retrieval",
        "YouTubeRetrieval",
        "sequence",
        "tensorflow",
        "libreco",
        sequence=True,  # libreco's YouTubeRetrieval takes no item features
    ),
    _family(
        "youtube_ranking",
        "YouTubeRanking",
        "sequence",
        "tensorflow",
        "libreco",
        item_features=True,
        sequence=True,
    ),
    _family("rnn4rec", "RNN4Rec", "sequence", "tensorflow", "libreco", sequence=True),
    _family("caser", "Caser", "sequence", "tensorflow", "libreco", sequence=True),
    _family("wavenet", "WaveNet", "sequence", "tensorflow", "libreco", sequence=True),
    _family(
        "transformer",
        "Transformer",
        "sequence",
        "tensorflow",
        "libreco",
        item_features=True,
        sequence=True,
    ),
    _family("sim", "SIM", "sequence", "tensorflow", "libreco", item_features=True, sequence=True),
    _family("din", "DIN", "sequence", "tensorflow", "libreco", item_features=True, sequence=True),
)

FAMILIES: Final[Mapping[str, Family]] = {family.kind: family for family in _TABLE}
BY_CLASS: Final[Mapping[str, Family]] = {family.libreco_class: family for family in _TABLE}
KINDS: Final = tuple(FAMILIES)

# LibRecommender classes uro-recs does not train, and why.
NOT_APPLICABLE: Final[Mapping[str, str]] = {
    "GraphSageDGL": "needs the DGL library (not installed); GraphSage is the same model in torch",
    "PinSageDGL": "needs the DGL library (not installed); PinSage is the same model in torch",
}


def family(kind: str) -> Family:
    """The family named `kind`, or ValueError listing the kinds there are."""
    found = FAMILIES.get(kind)
    if found is None:
        raise ValueError(f"unknown model kind {kind!r}; the kinds are {', '.join(KINDS)}")
    return found
