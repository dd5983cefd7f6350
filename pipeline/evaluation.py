"""How well a model ranks each user's held-out newest interactions, beside popularity.

Every candidate is scored the same way on the same split: for each user with held-out items,
the top `EVAL_K` items it recommends (consumed items filtered as in serving) against the
items held out for that user.

- recall@k: held-out items found in the top k, over the user's held-out count; mean over users.
- ndcg@k: the standard normalised discounted cumulative gain: DCG of the hits over the DCG of
  a perfect list (min(k, held-out count) hits at the top). libreco's own `evaluate` builds the
  ideal list from the hits only, which gives about 1.8x this figure on uro-like data; the
  numbers here are the standard ones.
- coverage@k: distinct items in anyone's top k over the catalogue the model knows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any, Final

import pandas as pd

EVAL_K: Final = 10
# Users per libreco recommend_user call: feature models build a tensor per (user, item) pair.
_USERS_PER_CALL: Final = 256


@dataclass(frozen=True)
class Evaluation:
    recall: float
    ndcg: float
    coverage: float
    users: int

    def metrics(self) -> dict[str, float]:
        return {
            "recall": round(self.recall, 6),
            "ndcg": round(self.ndcg, 6),
            "coverage": round(self.coverage, 6),
        }


def score_lists(
    recommended: Mapping[Any, Sequence[Any]], held_out: Mapping[Any, set[Any]], n_items: int
) -> Evaluation:
    """The metrics of `recommended` (top-k per user) against `held_out` (per user)."""
    recalls, ndcgs, seen = [], [], set()
    for user, truth in held_out.items():
        top = list(recommended.get(user, ()))[:EVAL_K]
        seen.update(top)
        hits = [rank for rank, item in enumerate(top) if item in truth]
        recalls.append(len(hits) / len(truth))
        dcg = sum(1.0 / math.log2(rank + 2) for rank in hits)
        ideal = sum(1.0 / math.log2(rank + 2) for rank in range(min(EVAL_K, len(truth))))
        ndcgs.append(dcg / ideal)
    count = len(recalls)
    return Evaluation(
        recall=sum(recalls) / count if count else 0.0,
        ndcg=sum(ndcgs) / count if count else 0.0,
        coverage=len(seen) / n_items if n_items else 0.0,
        users=count,
    )


def held_out_items(test: pd.DataFrame) -> dict[Any, set[Any]]:
    return {user: set(items) for user, items in test.groupby("user", sort=False)["item"]}


def evaluate_model(model: Any, test: pd.DataFrame) -> Evaluation:
    """A fitted libreco model (inside its graph, for TF) on the held-out rows."""
    truth = held_out_items(test)
    users = list(truth)
    recommended: dict[Any, Sequence[Any]] = {}
    for start in range(0, len(users), _USERS_PER_CALL):
        chunk = users[start : start + _USERS_PER_CALL]
        ranked = model.recommend_user(user=chunk, n_rec=EVAL_K, filter_consumed=True)
        recommended.update({user: list(ranked[user]) for user in chunk})
    return score_lists(recommended, truth, int(model.n_items))


def evaluate_popularity(train: pd.DataFrame, test: pd.DataFrame) -> Evaluation:
    """The most popular training items each user has not consumed (filtered as libreco
    filters: only while k + consumed <= catalogue), on the same held-out rows."""
    truth = held_out_items(test)
    counts = train.groupby("item", sort=False)["user"].nunique().rename("users").reset_index()
    order = counts.sort_values(["users", "item"], ascending=[False, True], kind="stable")
    ranked = order["item"].tolist()  # as the served popular list orders them
    consumed = train.groupby("user", sort=False)["item"].agg(set)
    n_items = len(ranked)
    recommended = {
        user: _top_unconsumed(ranked, consumed.get(user, set()), n_items) for user in truth
    }
    return score_lists(recommended, truth, n_items)


def _top_unconsumed(ranked: Iterable[Any], consumed: set[Any], n_items: int) -> list[Any]:
    skip = consumed if EVAL_K + len(consumed) <= n_items else set()
    return list(islice((item for item in ranked if item not in skip), EVAL_K))
