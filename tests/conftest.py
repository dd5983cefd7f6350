"""Shared fixtures: a small demo data set and a model store with trained "als" and "deepfm".

Training happens once per test session, on demand; the heavy imports live inside the fixtures
so test modules that need no models never load TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pytest

if TYPE_CHECKING:
    from uro_recs.worker.engine import Id

# Small enough to train both models in a few seconds on two cores.
DEMO_SIZES = {"n_users": 800, "n_items": 1200, "n_interactions": 30_000, "seed": 7}
TRAINED_VERSION = "2026-11-27T000000Z"
TRAINED_MODELS: dict[str, str] = {"als": "als", "deepfm": "deepfm"}  # name -> kind


@pytest.fixture(scope="session")
def demo_interactions() -> pd.DataFrame:
    from uro_recs.pipeline.demo_data import make_interactions

    return make_interactions(**DEMO_SIZES)


@pytest.fixture(scope="session")
def trained_store(
    tmp_path_factory: pytest.TempPathFactory, demo_interactions: pd.DataFrame
) -> Path:
    """A store with models "als" and "deepfm", version TRAINED_VERSION, both CURRENT.

    Shared by the whole session: treat it as read-only (copy a version to break it).
    """
    from uro_recs.pipeline.training import train_and_save

    store = tmp_path_factory.mktemp("model_store")
    for name, kind in TRAINED_MODELS.items():
        train_and_save(store, name, demo_interactions, kind, version=TRAINED_VERSION)
    return store


@pytest.fixture(scope="session")
def demo_users(demo_interactions: pd.DataFrame) -> list[str]:
    """100 user ids every trained model knows, in order of first appearance."""
    users: list[str] = demo_interactions["user"].drop_duplicates().head(100).tolist()
    return users


@dataclass(frozen=True)
class Reference:
    """The same stored model, loaded with plain libreco calls: the behaviour to match."""

    model: Any
    data_info: Any
    users: list[str]  # 50 known users, light and heavy ones

    def recommend(self, user: str, n: int, filter_consumed: bool = True) -> list[str]:
        ranked = self.model.recommend_user(user=user, n_rec=n, filter_consumed=filter_consumed)
        items: list[str] = ranked[user].tolist()
        return items

    def scores(self, user: Id, items: list[Id]) -> list[float]:
        """libreco's predict for one known user and these items."""
        values: list[float] = self.model.predict(user=[user] * len(items), item=items).tolist()
        return values

    def consumed(self, user: str) -> int:
        return len(self.data_info.user_consumed[self.data_info.user2id[user]])


@pytest.fixture(scope="session")
def references(trained_store: Path) -> dict[str, Reference]:
    """The stored models loaded with plain libreco calls, each with 50 light-to-heavy users."""
    import tensorflow as tf
    from libreco.algorithms import ALS, DeepFM
    from libreco.data import DataInfo

    from uro_recs.core.model_store import MODEL_FILE_STEM, current_version, version_dir
    from uro_recs.worker.libreco_env import quiet

    loaded = {}
    for name, model_class in (("als", ALS), ("deepfm", DeepFM)):
        path = str(version_dir(trained_store, name, current_version(trained_store, name)))
        with quiet(stderr=True), tf.Graph().as_default():
            data_info = DataInfo.load(path, MODEL_FILE_STEM)
            model = model_class.load(path, MODEL_FILE_STEM, data_info)
        by_activity = sorted(
            data_info.user2id, key=lambda u: len(data_info.user_consumed[data_info.user2id[u]])
        )
        users = by_activity[:: max(1, len(by_activity) // 50)][:50]
        loaded[name] = Reference(model, data_info, users)
    return loaded
