from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from uro_recs.app.rollout import RolloutError, previous_version
from uro_recs.core.config import Config
from uro_recs.core.model_store import (
    HISTORY_NAME,
    Manifest,
    StoreCorrupt,
    StoreError,
    VersionNotFound,
    current_history,
    current_version,
    list_versions,
    new_version_name,
    save_version,
    set_current,
    verify,
)

FIELDS: dict[str, object] = {
    "libreco_class": "ALS",
    "libreco_version": "1.5.2",
    "data": {"n_users": 2, "n_items": 3, "n_interactions": 4},
    "metrics": {"recall@10": 0.25, "ndcg@10": 0.5},
    "params": {"embed_size": 8, "hidden_units": [4, 2]},
    "popular_items": ["b", "a", 7],
}


def _write_model(directory: Path) -> None:
    (directory / "model.npz").write_bytes(b"weights")
    (directory / "model_user_consumed.pkl").write_bytes(b"pickle")
    (directory / "extra").mkdir()
    (directory / "extra" / "notes.json").write_text("{}")


def _save(store: Path, version: str = "v1") -> Path:
    return save_version(store, "als", version, _write_model, FIELDS)


def test_save_version_writes_files_and_a_manifest_with_their_checksums(tmp_path: Path) -> None:
    path = _save(tmp_path)

    assert path == tmp_path / "als" / "v1"
    manifest = verify(path)
    assert manifest.model == "als"
    assert manifest.version == "v1"
    assert manifest.format == 1
    assert set(manifest.files) == {"model.npz", "model_user_consumed.pkl", "extra/notes.json"}
    assert manifest.popular_items == ("b", "a", 7)
    assert manifest.metrics == {"recall@10": 0.25, "ndcg@10": 0.5}
    assert datetime.strptime(manifest.created_at, "%Y-%m-%dT%H:%M:%SZ")
    on_disk = json.loads((path / "manifest.json").read_text())
    assert on_disk == manifest.to_json()
    assert Manifest.from_json(on_disk) == manifest


def test_save_version_leaves_nothing_behind_when_saving_fails(tmp_path: Path) -> None:
    def broken(directory: Path) -> None:
        (directory / "half-written.npz").write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_version(tmp_path, "als", "v1", broken, FIELDS)

    assert list((tmp_path / "als").iterdir()) == []
    assert list_versions(tmp_path, "als") == []


def test_save_version_refuses_to_overwrite_a_version(tmp_path: Path) -> None:
    _save(tmp_path)
    with pytest.raises(StoreError, match="already exists"):
        _save(tmp_path)


def test_save_version_rejects_names_that_are_not_plain_path_components(tmp_path: Path) -> None:
    for bad in ("../escape", ".hidden", "a/b", ""):
        with pytest.raises(ValueError):
            save_version(tmp_path, "als", bad, _write_model, FIELDS)


def test_save_version_refuses_manifest_fields_it_owns(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="version"):
        save_version(tmp_path, "als", "v1", _write_model, {**FIELDS, "version": "v2"})


def test_verify_detects_a_modified_file(tmp_path: Path) -> None:
    path = _save(tmp_path)
    (path / "model_user_consumed.pkl").write_bytes(b"evil pickle")

    with pytest.raises(StoreCorrupt, match="checksum") as caught:
        verify(path)
    assert caught.value.file == "model_user_consumed.pkl"


def test_verify_detects_a_file_the_manifest_does_not_list(tmp_path: Path) -> None:
    path = _save(tmp_path)
    (path / "extra" / "smuggled.pkl").write_bytes(b"pickle")

    with pytest.raises(StoreCorrupt, match="not listed") as caught:
        verify(path)
    assert caught.value.file == "extra/smuggled.pkl"


def test_verify_detects_a_missing_file(tmp_path: Path) -> None:
    path = _save(tmp_path)
    (path / "model.npz").unlink()

    with pytest.raises(StoreCorrupt, match="missing") as caught:
        verify(path)
    assert caught.value.file == "model.npz"


def test_verify_rejects_symlinks(tmp_path: Path) -> None:
    path = _save(tmp_path)
    (path / "model.npz").unlink()
    os.symlink(tmp_path / "elsewhere.npz", path / "model.npz")

    with pytest.raises(StoreCorrupt, match="not a regular file"):
        verify(path)


def test_verify_rejects_a_manifest_copied_from_another_version(tmp_path: Path) -> None:
    first, second = _save(tmp_path, "v1"), _save(tmp_path, "v2")
    (second / "manifest.json").write_bytes((first / "manifest.json").read_bytes())

    with pytest.raises(StoreCorrupt, match="describes als/v1"):
        verify(second)


def test_verify_rejects_an_unreadable_manifest(tmp_path: Path) -> None:
    path = _save(tmp_path)
    (path / "manifest.json").write_text('{"format": 1')

    with pytest.raises(StoreCorrupt) as caught:
        verify(path)
    assert caught.value.file == "manifest.json"


def test_verify_rejects_manifest_paths_outside_the_version(tmp_path: Path) -> None:
    path = _save(tmp_path)
    raw = json.loads((path / "manifest.json").read_text())
    raw["files"]["../escape"] = "0" * 64
    (path / "manifest.json").write_text(json.dumps(raw))

    with pytest.raises(StoreCorrupt, match="bad file path"):
        verify(path)


def test_verify_of_a_missing_version_raises_version_not_found(tmp_path: Path) -> None:
    with pytest.raises(VersionNotFound):
        verify(tmp_path / "als" / "nope")


def test_current_pointer_follows_set_current(tmp_path: Path) -> None:
    _save(tmp_path, "v1")
    _save(tmp_path, "v2")

    set_current(tmp_path, "als", "v1")
    assert current_version(tmp_path, "als") == "v1"
    set_current(tmp_path, "als", "v2")
    assert current_version(tmp_path, "als") == "v2"
    assert (tmp_path / "als" / "CURRENT").read_text() == "v2\n"
    # No temporary file left behind; the record of what was CURRENT beside the pointer.
    assert sorted(p.name for p in (tmp_path / "als").iterdir()) == [
        "CURRENT",
        "HISTORY",
        "v1",
        "v2",
    ]


def test_set_current_refuses_a_version_that_does_not_exist(tmp_path: Path) -> None:
    _save(tmp_path, "v1")
    with pytest.raises(VersionNotFound):
        set_current(tmp_path, "als", "v2")
    assert not (tmp_path / "als" / "CURRENT").exists()


def test_current_version_without_pointer_raises_version_not_found(tmp_path: Path) -> None:
    _save(tmp_path, "v1")
    with pytest.raises(VersionNotFound):
        current_version(tmp_path, "als")


def test_list_versions_is_sorted_and_skips_temporary_directories(tmp_path: Path) -> None:
    for version in ("2026-11-27T031500Z", "2026-01-02T000000Z", "2026-11-27T031459Z"):
        _save(tmp_path, version)
    (tmp_path / "als" / ".2026-12-01T000000Z.tmp-abc").mkdir()
    set_current(tmp_path, "als", "2026-01-02T000000Z")

    assert list_versions(tmp_path, "als") == [
        "2026-01-02T000000Z",
        "2026-11-27T031459Z",
        "2026-11-27T031500Z",
    ]
    assert list_versions(tmp_path, "unknown") == []


def test_new_version_names_are_utc_and_sortable() -> None:
    moment = datetime(2026, 11, 27, 3, 15, 0, tzinfo=UTC)
    assert new_version_name(moment) == "2026-11-27T031500Z"
    assert new_version_name(moment.replace(hour=10)) > new_version_name(moment)


def test_a_model_the_store_lacks_is_named_with_the_ones_it_has(tmp_path: Path) -> None:
    _save(tmp_path, "v1")
    with pytest.raises(VersionNotFound, match=r"no model named 'alss' .*it has als\)"):
        current_version(tmp_path, "alss")
    with pytest.raises(VersionNotFound, match=r"has no CURRENT version .*versions: v1"):
        current_version(tmp_path, "als")


def test_set_current_records_what_was_current_in_order(tmp_path: Path) -> None:
    for version in ("v1", "v2", "v3"):
        _save(tmp_path, version)
    for version in ("v2", "v1", "v3", "v1"):
        set_current(tmp_path, "als", version)
    assert current_history(tmp_path, "als") == ["v2", "v1", "v3", "v1"]
    assert current_history(tmp_path, "nobody") == []


def test_rollback_goes_to_what_was_served_before_not_the_newest_older_name(
    tmp_path: Path,
) -> None:
    for version in ("2026-01-01T000000Z", "2026-02-01T000000Z", "2026-03-01T000000Z"):
        _save(tmp_path, version)
    set_current(tmp_path, "als", "2026-01-01T000000Z")
    set_current(tmp_path, "als", "2026-03-01T000000Z")
    # February was trained (say, on synthetic data) and never served: a rollback skips it.
    config = Config(store=tmp_path)
    assert previous_version(config, "als") == "2026-01-01T000000Z"
    set_current(tmp_path, "als", "2026-01-01T000000Z")  # rolled back: a second one undoes it
    assert previous_version(config, "als") == "2026-03-01T000000Z"


def test_rollback_without_a_record_names_no_guess(tmp_path: Path) -> None:
    _save(tmp_path, "v1")
    _save(tmp_path, "v2")
    set_current(tmp_path, "als", "v2")
    (tmp_path / "als" / HISTORY_NAME).unlink()  # a store from before the record was kept
    with pytest.raises(RolloutError, match="records no version served before v2"):
        previous_version(Config(store=tmp_path), "als")


def test_the_record_is_read_from_its_end_when_long(tmp_path: Path) -> None:
    _save(tmp_path, "v1")
    _save(tmp_path, "v2")
    history = tmp_path / "als" / HISTORY_NAME
    history.write_text("2026-01-01T00:00:00Z v1\n" * 5000)  # over the 64 KiB read
    set_current(tmp_path, "als", "v2")
    assert current_history(tmp_path, "als")[-2:] == ["v1", "v2"]
