"""`uro-recs import` (a model LibRecommender saved elsewhere) and `uro-recs evaluate` (the
candidates side by side), through the real command line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from uro_recs.app.cli import EXIT_USAGE
from uro_recs.core.model_store import CURRENT_NAME


def run(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "uro_recs.app.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def data() -> pd.DataFrame:
    from uro_recs.pipeline.demo_data import make_interactions

    return make_interactions(n_users=150, n_items=220, n_interactions=4_000, seed=17)


@pytest.fixture(scope="module")
def saved_elsewhere(tmp_path_factory: pytest.TempPathFactory, data: pd.DataFrame) -> Any:
    """An SVD and an ItemCF trained and saved with libreco's own API, as its users do."""
    from uro_recs.worker.libreco_env import tf

    # isort: split
    from libreco.algorithms import SVD, ItemCF
    from libreco.data import DatasetPure

    root = tmp_path_factory.mktemp("elsewhere")
    models = {}
    for name, cls, params in (
        ("svd", SVD, {"embed_size": 8, "n_epochs": 1}),
        ("item_cf", ItemCF, {"k_sim": 10}),
    ):
        graph = tf.Graph()
        with graph.as_default():
            train_set, data_info = DatasetPure.build_trainset(data[["user", "item", "label"]])
            model = cls("ranking", data_info, **params)
            model.fit(train_set, neg_sampling=True, verbose=0)
            directory = root / name
            data_info.save(str(directory), "my_model")
            model.save(str(directory), "my_model", inference_only=True)
        models[name] = (directory, model, graph)
    return models


def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "uro-recs.toml"
    path.write_text(f'store = "{tmp_path / "store"}"\n')
    return path


@pytest.mark.parametrize("kind", ["svd", "item_cf"])
def test_an_import_round_trips_and_answers_as_the_model_it_came_from(
    saved_elsewhere: Any, tmp_path: Path, kind: str
) -> None:
    from uro_recs.worker.engine import load_engine

    directory, model, graph = saved_elsewhere[kind]
    config = config_file(tmp_path)
    done = run("--config", str(config), "import", "--model", kind, "--kind", kind)
    assert done.returncode == EXIT_USAGE  # --dir is required
    done = run(
        *("--config", str(config), "import", "--model", kind, "--kind", kind),
        *("--dir", str(directory), "--version", "v1", "--publish"),
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["version"] == "v1"
    assert (tmp_path / "store" / kind / CURRENT_NAME).read_text().strip() == "v1"

    engine = load_engine(tmp_path / "store", kind)
    users = list(model.data_info.user2id)[:60]
    with graph.as_default():
        expected = model.recommend_user(users, 10, filter_consumed=True)
    for user, answer in zip(users, engine.recommend(users, 10, True), strict=True):
        assert answer.items == [str(i) for i in expected[user]]


def test_a_corrupted_or_mismatched_import_is_refused_and_leaves_nothing(
    saved_elsewhere: Any, tmp_path: Path
) -> None:
    directory, _, _ = saved_elsewhere["svd"]
    config = config_file(tmp_path)
    base = ("--config", str(config), "import", "--model", "m", "--version", "v1")

    wrong_kind = run(*base, "--kind", "als", "--dir", str(directory))
    assert wrong_kind.returncode == EXIT_USAGE
    assert "not a ALS save: its hyperparameters differ" in wrong_kind.stderr
    assert "Traceback" not in wrong_kind.stderr

    broken = tmp_path / "broken"
    shutil.copytree(directory, broken)
    embeddings = broken / "my_model.npz"
    embeddings.write_bytes(embeddings.read_bytes()[:100])
    corrupted = run(*base, "--kind", "svd", "--dir", str(broken))
    assert corrupted.returncode == EXIT_USAGE
    assert "libreco cannot load it as SVD" in corrupted.stderr.splitlines()[-1]

    (broken / "my_model_data_info.npz").unlink()
    incomplete = run(*base, "--kind", "svd", "--dir", str(broken))
    assert "my_model_data_info.npz is missing" in incomplete.stderr
    nothing = run(*base, "--kind", "svd", "--dir", str(tmp_path / "nowhere"))
    assert nothing.returncode == EXIT_USAGE and "not a directory" in nothing.stderr
    assert not (tmp_path / "store" / "m" / "v1").exists()


def test_evaluate_prints_each_candidate_beside_popularity_with_the_gates_numbers(
    data: pd.DataFrame, tmp_path: Path
) -> None:
    from uro_recs.pipeline.training import train_model

    csv = tmp_path / "interactions.csv"
    data.to_csv(csv, index=False)
    config = config_file(tmp_path)
    base = ("--config", str(config), "evaluate", "--csv", str(csv), "--epochs", "1")

    shown = run(*base, "--kinds", "als,item_cf")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["model", "recall@10", "ndcg@10", "coverage@10"]
    assert [line.split()[0] for line in lines[1:]][:1] == ["popularity"]
    assert {line.split()[0] for line in lines[1:]} == {"popularity", "als", "item_cf"}

    as_json = run(*base, "--kinds", "als", "--json")
    rows = {row["name"]: row for row in json.loads(as_json.stdout.splitlines()[-1])}
    gate = train_model(data, "als", epochs=1, test_fraction=0.2).metrics
    assert rows["als"]["recall@10"] == gate["recall@10"]
    assert rows["popularity"]["recall@10"] == gate["popularity_recall@10"]
    assert rows["als"]["serve_p50_ms"] > 0 and rows["als"]["worker_pss_mib"] > 0

    unknown = run(*base, "--kinds", "als,word2vec")
    assert unknown.returncode == EXIT_USAGE and "unknown kind word2vec" in unknown.stderr


def test_a_candidate_that_fails_is_a_row_said_as_it_fails_and_popularity_still_leads(
    data: pd.DataFrame,
) -> None:
    """Each candidate trains in a process of its own: one that fails (here ALS refusing a
    neighbourhood model's parameter) is a row with its one-line error; the rest go on."""
    from uro_recs.pipeline.compare import compare

    said: list[str] = []
    rows = compare(
        data, ["als", "item_cf"], say=said.append, params={"k_sim": 5}, test_fraction=0.2
    )
    assert [row.name for row in rows] == ["popularity", "als", "item_cf"]
    assert rows[1].error is not None
    assert rows[1].error.startswith("InvalidInput: als takes no parameter k_sim; it takes")
    assert rows[0].metrics["recall@10"] > 0 and rows[2].metrics["recall@10"] > 0
    assert rows[2].serve_p50_ms is not None and rows[2].error is None
    assert any('"als"' in line and "takes no parameter k_sim" in line for line in said)
