"""The command line as an operator meets it: through the real entry point, checking the one
line it prints and the exit status, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster import Cluster
from tests.db_fixtures import empty_database, with_database  # noqa: F401
from uro_recs.app.cli import EXIT_FAILED, EXIT_UNREACHABLE, EXIT_USAGE
from uro_recs.core.db import Database
from uro_recs.core.model_store import CURRENT_NAME
from uro_recs.pipeline import registry


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "uro_recs.app.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def one_line_error(result: subprocess.CompletedProcess[str], status: int, *needles: str) -> str:
    assert result.returncode == status, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert lines, "no message"
    for needle in needles:
        assert needle in lines[-1], lines
    return lines[-1]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "uro-recs.toml"
    path.write_text(
        f'run_dir = "{tmp_path / "run"}"\nstore = "{tmp_path / "store"}"\n'
        '[[models]]\nname = "als"\nworkers = 1\n'
    )
    return path


def test_version_and_help() -> None:
    assert run("--version").stdout.startswith("uro-recs ")
    help_text = run("--help").stdout
    assert "exit status" in help_text and "check-config" in help_text


def test_config_is_taken_before_or_after_the_command(config: Path, tmp_path: Path) -> None:
    before = run("--config", str(config), "check-config")
    after = run("check-config", "--config", str(config))
    assert before.returncode == after.returncode == 0, before.stderr + after.stderr
    assert before.stdout == after.stdout
    assert str(tmp_path / "store") in after.stdout and "als (1 worker)" in after.stdout


def test_a_missing_config_file_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    one_line_error(run("--config", str(missing), "check-config"), EXIT_USAGE, str(missing))


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = run("--config", str(tmp_path / "nope.toml"), "check-config", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_an_unknown_model_names_the_ones_there(config: Path, tmp_path: Path) -> None:
    (tmp_path / "store" / "als").mkdir(parents=True)
    (tmp_path / "store" / "deepfm").mkdir()
    line = one_line_error(
        run("--config", str(config), "worker", "--model", "alss"),
        EXIT_USAGE,
        "no model named 'alss'",
    )
    assert "als, deepfm" in line and "--publish" in line


def test_serve_with_an_empty_store_says_how_to_publish(config: Path) -> None:
    one_line_error(run("--config", str(config), "serve"), EXIT_USAGE, "no model named 'als'")


def test_recommend_without_a_broker_says_none_is_listening(config: Path, tmp_path: Path) -> None:
    socket_path = tmp_path / "run" / "client.sock"
    one_line_error(
        run("--config", str(config), "recommend", "u1"),
        EXIT_UNREACHABLE,
        f"no broker is listening at ipc://{socket_path}",
    )


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        ("", ["is empty"]),
        ("user;item;label;time\nu;i;1;0\n", ["separated by semicolons"]),
        ("user,item,rating\nu,i,1\n", ["lacks the columns label,time", "found user,item,rating"]),
        ("user,item,label,time\nu,i,play,0\n", [":2: label 'play' is not a number"]),
        ("user,item,label,time\nu,i,1\n", [":2: 3 fields, the header has 4"]),
        ("user,item,label,time\n", ["no interactions"]),
    ],
)
def test_train_checks_its_csv_before_training(
    config: Path, tmp_path: Path, content: str, needles: list[str]
) -> None:
    csv = tmp_path / "interactions.csv"
    csv.write_text(content)
    args = ("--config", str(config), "train", "--model", "als", "--csv", str(csv))
    one_line_error(run(*args), EXIT_USAGE, str(csv), *needles)
    assert not (tmp_path / "store").exists()


def test_train_needs_data_named_explicitly(config: Path) -> None:
    result = run("--config", str(config), "train", "--model", "als")
    assert result.returncode == EXIT_USAGE and "--csv" in result.stderr


def test_train_publishes_only_when_asked_and_past_the_gate(config: Path, tmp_path: Path) -> None:
    csv = tmp_path / "tiny.csv"
    # One interaction per user: nothing can be held out, so nothing shows it beats popularity.
    rows = [f"u{u},i{u % 7},1.0,{u}" for u in range(40)]
    csv.write_text("user,item,label,time\n" + "\n".join(rows) + "\n")
    base = ("--config", str(config), "train", "--model", "als", "--csv", str(csv))
    current = tmp_path / "store" / "als" / CURRENT_NAME

    saved = run(*base, "--version", "v1")
    assert saved.returncode == 0, saved.stderr
    assert '"published": false' in saved.stdout and "rollout als v1" in saved.stderr
    assert (tmp_path / "store" / "als" / "v1").is_dir() and not current.exists()

    gated = run(*base, "--version", "v2", "--publish")
    assert gated.returncode == EXIT_FAILED, gated.stderr
    assert "not published" in gated.stderr and not current.exists()

    forced = run(*base, "--version", "v3", "--publish", "--force")
    assert forced.returncode == 0, forced.stderr
    assert current.read_text().strip() == "v3"


def test_train_takes_any_family_with_its_options_and_ids_as_text(
    config: Path, tmp_path: Path
) -> None:
    from uro_recs.worker.engine import load_engine

    csv = tmp_path / "ratings.csv"
    # Numeric ids (pandas would read them as integers), a genre column, ratings 1-5, one
    # repeated (user, item) pair.
    rows = [
        f"{u},0{(u * 3 + k) % 40},{1 + (u + k) % 5},{k},g{k % 3}"
        for u in [*range(60), 813]
        for k in range(8)
    ]
    rows += ["813,05,5,9,g0", "813,05,4,10,g0"]
    csv.write_text("user,item,label,time,genre\n" + "\n".join(rows) + "\n")
    trained = run(
        *("--config", str(config), "train", "--model", "fm", "--kind", "fm", "--csv", str(csv)),
        *("--epochs", "1", "--embed-size", "4", "--test-fraction", "0.25"),
        *("--item-features", "genre", "--positive-threshold", "3", "--param", "lr=0.01"),
        *("--version", "v1", "--publish", "--force"),
    )
    assert trained.returncode == 0, trained.stderr
    assert "item features genre" in trained.stderr
    assert "2 repeated (user, item) rows merged" in trained.stderr, trained.stderr
    engine = load_engine(tmp_path / "store", "fm")
    assert engine.manifest.params["item_features"] == ["genre"]
    assert engine.manifest.params["lr"] == 0.01 and engine.manifest.params["n_epochs"] == 1
    assert engine.manifest.params["refit"] is True
    (by_text,) = engine.recommend(["813"], 5, True)
    (by_int,) = engine.recommend([813], 5, True)
    assert not by_text.cold_start and by_text == by_int
    assert "05" in engine._item2id  # a leading zero is kept: ids are text

    bad = run(
        *("--config", str(config), "train", "--model", "x", "--kind", "item_cf", "--csv", str(csv)),
        *("--param", "k_simm=5"),
    )
    one_line_error(bad, EXIT_USAGE, "item_cf takes no parameter k_simm; it takes ")
    unknown_kind = run("--config", str(config), "train", "--model", "x", "--kind", "svd2")
    assert unknown_kind.returncode == EXIT_USAGE and "invalid choice: 'svd2'" in unknown_kind.stderr


def test_health_follows_the_live_workers(trained_store: Path) -> None:
    with Cluster(trained_store, {"als": 1}).start() as cluster:
        args = ("--config", str(cluster.config_path), "health")
        healthy = run(*args)
        assert healthy.returncode == 0, healthy.stderr
        assert "healthy: als (1 worker)" in healthy.stdout
        cluster.workers[0].kill()
        cluster.workers[0].wait()
        one_line_error(run(*args), EXIT_FAILED, "unhealthy: no live worker for als")
        assert cluster.broker is not None
        cluster.broker.kill()
        cluster.broker.wait()
        one_line_error(run(*args), EXIT_UNREACHABLE, "no broker is listening")


def test_sync_against_a_database_without_uros_tables_says_so(
    empty_database: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    config = tmp_path / "db.toml"
    config.write_text(
        f'store = "{tmp_path / "store"}"\n[database]\nurl = "{empty_database}"\n'
        f'retry_attempts = 1\n[sync]\nmetrics_dir = "{tmp_path}"\n'
    )
    not_migrated = run("--config", str(config), "sync")
    assert not_migrated.returncode == EXIT_FAILED
    assert "run `uro-recs db migrate`" in not_migrated.stderr.splitlines()[-1]
    assert run("--config", str(config), "db", "migrate").returncode == 0
    # uro-recs' tables are there now, uro's (avatars, maps, ...) are not.
    one_line_error(run("--config", str(config), "sync"), EXIT_USAGE, "has no such table")
    # The failed runs are on record for Prometheus' textfile collector, with no success yet.
    recorded = (tmp_path / "uro_recs_sync.prom").read_text()
    assert 'uro_recs_job_success{job="sync",model="als"} 0.0' in recorded
    assert "uro_recs_job_last_success_timestamp_seconds" not in recorded


def test_a_published_train_is_in_the_registry_and_a_database_outage_costs_one_line(
    empty_database: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    csv = tmp_path / "tiny.csv"
    csv.write_text("user,item,label,time\n" + "\n".join(f"u{u},i{u % 7},1,{u}" for u in range(40)))
    config = tmp_path / "db.toml"
    config.write_text(f'store = "{tmp_path / "store"}"\n[database]\nurl = "{empty_database}"\n')
    assert run("--config", str(config), "db", "migrate").returncode == 0
    train = ("train", "--model", "als", "--csv", str(csv), "--publish", "--force")
    done = run("--config", str(config), *train, "--version", "v1")
    assert done.returncode == 0, done.stderr
    assert "als/v1 registered as published" in done.stderr

    async def statuses(db: Database) -> dict[str, str]:
        return {v.version: v.status for v in await registry.versions(db, "als")}

    assert with_database(empty_database, statuses) == {"v1": "published"}

    gone = tmp_path / "gone.toml"
    gone.write_text(
        f'store = "{tmp_path / "store"}"\n[database]\n'
        'url = "postgresql://postgres@127.0.0.1:1/nowhere"\n'
    )
    offline = run("--config", str(gone), *train, "--version", "v2")
    assert offline.returncode == 0, offline.stderr  # published in the store all the same
    assert "als/v2 not registered (the database:" in offline.stderr
    assert (tmp_path / "store" / "als" / CURRENT_NAME).read_text().strip() == "v2"


def test_help_shows_each_options_default() -> None:
    train_help = run("train", "--help").stdout
    assert "(default: als)" in train_help  # --kind


def test_a_rollout_to_a_malformed_version_is_one_line_and_changes_nothing(
    config: Path, tmp_path: Path
) -> None:
    result = run("--config", str(config), "rollout", "als", "../v1")
    assert result.returncode == EXIT_FAILED
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("rollout failed: als: ") and "Traceback" not in result.stderr
    assert not (tmp_path / "store" / "als" / CURRENT_NAME).exists()
