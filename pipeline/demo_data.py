"""Synthetic uro interaction logs: deterministic, shaped like the real tables, fast to build.

Users and items carry UUID-style ids as in uro's `users`, `avatars`, `maps` and `props` tables.
Items have Zipf popularity and belong to one of a few topic clusters; each user prefers a few
clusters, so a recommender has real signal to learn.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt
import pandas as pd

from uro_recs.core.protocol import ITEM_KINDS

N_TOPICS = 20
HISTORY_DAYS = 90
# A fixed end keeps the data identical from run to run, not only from seed to seed.
HISTORY_END = int(datetime(2026, 11, 27, tzinfo=UTC).timestamp())
_TOPIC_BOOST = 30.0  # how much more likely a user picks an item from a preferred cluster
_USER_CHUNK = 256  # users scored at once: bounds memory at _USER_CHUNK x n_items floats


def make_interactions(
    n_users: int = 2000,
    n_items: int = 3000,
    n_interactions: int = 100_000,
    seed: int = 7,
) -> pd.DataFrame:
    """Return implicit-feedback interactions, one row per distinct (user, item) pair.

    Columns: `user`, `item` (UUID strings), `label` (1.0), `time` (unix seconds over the
    last 90 days, strictly increasing per user), `item_kind` ("avatar", "map" or "prop").
    Rows are sorted by time. Items nobody picked are absent, so the frame may hold slightly
    fewer than `n_items` distinct items.
    """
    if n_users < 1 or n_items < 2:
        raise ValueError("need at least one user and two items")
    if not n_users <= n_interactions <= n_users * n_items:
        raise ValueError("n_interactions must be between n_users and n_users * n_items")
    rng = np.random.default_rng(seed)
    user_ids = _uuids(rng, n_users)
    item_ids = _uuids(rng, n_items)
    item_kinds = rng.choice(np.array(ITEM_KINDS), size=n_items, p=[0.3, 0.25, 0.45])
    item_topics = rng.integers(0, N_TOPICS, size=n_items)
    popularity_rank = rng.permutation(n_items) + 1
    log_popularity = -1.0 * np.log(popularity_rank)  # Zipf with exponent 1

    counts = _interactions_per_user(rng, n_users, n_items, n_interactions)
    n_liked = rng.integers(1, 4, size=n_users)
    liked_topics = [rng.choice(N_TOPICS, size=k, replace=False) for k in n_liked]

    picked: list[npt.NDArray[np.int64]] = []
    for start in range(0, n_users, _USER_CHUNK):
        stop = min(start + _USER_CHUNK, n_users)
        liked = np.zeros((stop - start, N_TOPICS), dtype=bool)
        for row, topics in enumerate(liked_topics[start:stop]):
            liked[row, topics] = True
        log_weight = log_popularity + np.log(_TOPIC_BOOST) * liked[:, item_topics]
        # Gumbel top-k: the k largest perturbed log-weights are a weighted sample
        # without replacement, for every user of the chunk at once.
        keys = log_weight + rng.gumbel(size=log_weight.shape)
        # Each user's picks in descending key order: a partition to the chunk's largest
        # count, then a sort of only those (a full argsort of every row took minutes on the
        # 50k-item benchmark catalogue).
        most = int(counts[start:stop].max())
        top = np.argpartition(-keys, most - 1, axis=1)[:, :most]
        order = np.take_along_axis(top, np.argsort(-np.take_along_axis(keys, top, 1), 1), 1)
        # Copies: a view would keep the chunk's whole order alive (16 GB for that catalogue).
        picked.extend(order[row, : counts[start + row]].copy() for row in range(stop - start))

    user_index = np.repeat(np.arange(n_users), counts)
    item_index = np.concatenate(picked)
    frame = pd.DataFrame(
        {
            "user": user_ids[user_index],
            "item": item_ids[item_index],
            "label": np.ones(len(item_index), dtype=np.float32),
            "time": _timestamps(rng, counts),
            "item_kind": item_kinds[item_index],
        }
    )
    return frame.sort_values(["time", "user"], kind="stable", ignore_index=True)


def _uuids(rng: np.random.Generator, n: int) -> npt.NDArray[np.object_]:
    raw = rng.bytes(16 * n)
    ids = [
        str(uuid.UUID(int=int.from_bytes(raw[i : i + 16], "big"), version=4))
        for i in range(0, 16 * n, 16)
    ]
    return np.array(ids, dtype=object)


def _interactions_per_user(
    rng: np.random.Generator, n_users: int, n_items: int, total: int
) -> npt.NDArray[np.int64]:
    """Split `total` over users with a heavy tail, each user at least 1 and at most half the
    catalogue (or all of it when the total leaves no choice)."""
    cap = max(n_items // 2, -(-total // n_users))
    weights = rng.lognormal(mean=0.0, sigma=1.0, size=n_users)
    shares = np.floor(weights / weights.sum() * total)
    counts: npt.NDArray[np.int64] = np.clip(shares, 1, cap).astype(np.int64)
    # Hand out what rounding and clipping left over, one interaction at a time, to the
    # most active users that still have room (or take from them when over).
    by_activity = np.argsort(-weights, kind="stable")
    while (missing := total - int(counts.sum())) != 0:
        step = 1 if missing > 0 else -1
        room = counts[by_activity] < cap if step > 0 else counts[by_activity] > 1
        chosen = by_activity[room][: abs(missing)]
        counts[chosen] += step
    return counts


def _timestamps(rng: np.random.Generator, counts: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Per user: `count` strictly increasing unix seconds inside the history window."""
    span = HISTORY_DAYS * 86_400
    start = HISTORY_END - span
    total = int(counts.sum())
    offsets = np.empty(total, dtype=np.int64)
    position = 0
    for count in counts.tolist():
        # Sorted draws plus their rank are strictly increasing and stay inside the span.
        draws = np.sort(rng.integers(0, span - count, size=count))
        offsets[position : position + count] = draws + np.arange(count)
        position += count
    offsets += start
    return offsets
