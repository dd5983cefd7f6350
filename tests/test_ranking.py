"""`top_columns`, the numpy engines' partial sort, against numpy's argpartition."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from uro_recs.worker.numpy_engine import SAMPLE_STRIDE, top_columns

# Scores as the engines make them: finite float32s, many equal ones, consumed items at -inf.
SCORES = st.sampled_from([-np.inf, -1.0, 0.0, 0.5, 1.0]) | st.floats(
    -10, 10, width=32, allow_nan=False
)


@settings(max_examples=300, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 3), st.integers(1, 4 * SAMPLE_STRIDE * 12)),
        elements=SCORES,
    ),
    st.integers(1, 12),
)
def test_top_columns_holds_the_same_scores_as_argpartition(
    scores: npt.NDArray[np.float32], need: int
) -> None:
    need = min(need, scores.shape[1])
    ours = top_columns(scores, need)
    theirs = np.argpartition(scores, -need, axis=1)[:, -need:]
    assert ours.shape == theirs.shape
    for row in range(len(scores)):
        assert len(set(ours[row].tolist())) == need  # distinct columns
        expected = np.sort(scores[row, theirs[row]])
        np.testing.assert_array_equal(np.sort(scores[row, ours[row]]), expected)


def test_a_long_row_takes_the_sampled_path_and_finds_the_top_exactly() -> None:
    rng = np.random.default_rng(3)
    scores = rng.standard_normal((2, 48_000)).astype(np.float32)
    scores[1, ::2] = -np.inf  # half of the second user's items consumed
    top = top_columns(scores, 10)
    for row in range(2):
        assert set(top[row].tolist()) == set(np.argsort(-scores[row])[:10].tolist())
