"""What training makes of the interactions it is given: text ids, merged repeats, positives
by threshold, named feature columns, and a chronological split that is the same every run."""

from __future__ import annotations

from typing import Any

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uro_recs.pipeline.interactions import InvalidInput
from uro_recs.pipeline.training import prepare_interactions, split_chrono

ROWS = st.lists(
    st.tuples(
        st.integers(0, 6),  # user
        st.integers(0, 9),  # item
        st.sampled_from([0.5, 1.0, 2.0, 5.0]),  # label
        st.integers(0, 3),  # time: few values, so many rows share one
    ),
    min_size=1,
    max_size=80,
)


def frame(rows: list[tuple[int, int, float, int]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=["user", "item", "label", "time"])
    df["item_kind"] = df["item"].map(lambda i: "map" if i % 2 else "avatar")
    return df


@settings(max_examples=60, deadline=None)
@given(ROWS)
def test_repeated_pairs_merge_into_one_row_with_summed_labels_and_the_newest_time(
    rows: list[tuple[int, int, float, int]],
) -> None:
    df = frame(rows)
    prepared = prepare_interactions(df)
    out = prepared.frame

    assert not out.duplicated(["user", "item"]).any()
    assert prepared.merged_duplicates == len(df) - len(out)
    assert out["user"].map(type).eq(str).all() and out["item"].map(type).eq(str).all()
    expected = df.assign(user=df["user"].astype(str), item=df["item"].astype(str))
    sums = expected.groupby(["user", "item"])["label"].sum()
    newest = expected.groupby(["user", "item"])["time"].max()
    got = out.set_index(["user", "item"])
    assert got["label"].sort_index().tolist() == sums.sort_index().tolist()
    assert got["time"].sort_index().tolist() == newest.sort_index().tolist()
    assert out["time"].is_monotonic_increasing
    assert prepared.item_features == ("item_kind",)


@settings(max_examples=60, deadline=None)
@given(ROWS)
def test_the_split_holds_out_each_users_newest_rows_and_is_the_same_every_run(
    rows: list[tuple[int, int, float, int]],
) -> None:
    prepared = prepare_interactions(frame(rows)).frame
    train, test = split_chrono(prepared, 0.5)
    again_train, again_test = split_chrono(prepare_interactions(frame(rows)).frame, 0.5)

    assert train.equals(again_train) and test.equals(again_test)
    rows_of = prepared.groupby("user").size()
    for user, held in test.groupby("user"):
        kept = train[train["user"] == user]
        assert held["time"].min() >= kept["time"].max()
        assert rows_of[user] > 3  # users with 3 or fewer keep everything for training
    assert set(test["item"]) <= set(train["item"])  # held-out items the model cannot know: out


def test_a_positive_threshold_keeps_rows_at_or_above_it_as_label_one() -> None:
    df = frame([(1, 1, 4.0, 0), (1, 2, 2.0, 1), (2, 1, 3.0, 0), (2, 1, 5.0, 2)])
    prepared = prepare_interactions(df, positive_threshold=3.0)

    assert prepared.below_threshold == 1
    assert sorted(zip(prepared.frame["user"], prepared.frame["item"], strict=True)) == [
        ("1", "1"),
        ("2", "1"),
    ]
    assert prepared.frame["label"].tolist() == [1.0, 2.0]  # (2, 1) seen twice: 1.0 + 1.0
    with pytest.raises(InvalidInput, match="no interaction has a label of at least 9"):
        prepare_interactions(df, positive_threshold=9)


def test_feature_columns_are_named_and_a_missing_one_is_refused() -> None:
    df = frame([(1, 1, 1.0, 0), (1, 2, 1.0, 1), (2, 1, 1.0, 2)])
    df["genre"] = ["rpg", "racing", "shooter"]

    assert prepare_interactions(df, item_features=["genre"]).item_features == ("genre",)
    assert prepare_interactions(df, item_features=[]).item_features == ()
    # an item's feature is the value of its newest row
    genres = prepare_interactions(df, item_features=["genre"]).frame.set_index("item")["genre"]
    assert genres.to_dict() == {"2": "racing", "1": "shooter"}
    with pytest.raises(InvalidInput, match=r"item feature columns colour are not in the data"):
        prepare_interactions(df, item_features=["genre", "colour"])
    with pytest.raises(InvalidInput, match="label cannot be an item feature"):
        prepare_interactions(df, item_features=["label"])


def test_evaluation_can_score_a_seeded_sample_of_the_held_out_users() -> None:
    from uro_recs.pipeline.demo_data import make_interactions
    from uro_recs.pipeline.training import train_model

    data = make_interactions(n_users=120, n_items=150, n_interactions=3_000, seed=3)
    options: dict[str, Any] = {"epochs": 1, "test_fraction": 0.2, "eval_users": 25}
    sampled = train_model(data, "als", **options)
    again = train_model(data, "als", **options)
    everyone = train_model(data, "als", epochs=1, test_fraction=0.2)

    assert sampled.data["n_eval_users"] == 25
    assert everyone.data["n_eval_users"] == everyone_users(data)
    assert sampled.metrics["recall@10"] == again.metrics["recall@10"]  # the same sample


def everyone_users(data: pd.DataFrame) -> int:
    """Held-out users of the default split: more than the sample of 25."""
    held = split_chrono(prepare_interactions(data).frame, 0.2)[1]
    count = int(held["user"].nunique())
    assert count > 25
    return count


@pytest.mark.parametrize(("kind", "side"), [("rs_item_cf", "item"), ("rs_user_cf", "user")])
def test_a_rust_neighbourhood_model_refuses_more_pairs_than_it_can_index(
    kind: str, side: str
) -> None:
    """recfarm fails past 46,340 items (or users) after minutes of work: refused up front."""
    from uro_recs.core.families import MAX_PAIR_SIDE
    from uro_recs.pipeline.training import train_model

    count = MAX_PAIR_SIDE + 1
    other = "user" if side == "item" else "item"
    df = pd.DataFrame({side: range(count), other: [i % 50 for i in range(count)]})
    df["label"], df["time"] = 1.0, range(count)
    with pytest.raises(InvalidInput, match=f"{kind} trains on at most 46,340 {side}s .* 46,341"):
        train_model(df, kind, test_fraction=0.0)
