"""`uro-recs import`: a model LibRecommender saved elsewhere, checked, then a store version.

What libreco's `save` wrote (its `<name>_hyper_parameters.json`, `<name>_data_info.npz`, the
model's variables or embeddings, ...) is copied under the store's file stem, loaded with
libreco as the family `kind` names, and asked for recommendations. Refused, in one line, when
the files are not one complete save, when their hyperparameters are not those of that
family's class, or when libreco cannot load or query them; and when the engine a worker would
serve it with answers otherwise than libreco. Only then is it written into the store (with a
manifest and checksums) as a new version.
"""

from __future__ import annotations

import json
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Final

from uro_recs.core.families import Family, family
from uro_recs.core.model_store import (
    MODEL_FILE_STEM,
    POPULAR_ITEMS_MAX,
    Id,
    Manifest,
    save_version,
    verify,
    version_dir,
)
from uro_recs.pipeline.interactions import InvalidInput

HYPER_SUFFIX: Final = "_hyper_parameters.json"
CHECKED_USERS: Final = 50  # users whose served answers must equal libreco's
_NOT_SAVED: Final = frozenset({"data_info", "device"})  # libreco's save_params leaves these out


def import_model(store: Path, model: str, source: Path, kind: str, version: str) -> Path:
    """Check the save in `source` and write it into the store as `model`/`version`."""
    chosen = family(kind)
    stem = _stem(source)
    with tempfile.TemporaryDirectory(prefix="uro-recs-import-") as scratch:
        staged = Path(scratch)
        for path in source.iterdir():
            if path.is_file() and path.name.startswith((f"{stem}_", f"{stem}.")):
                shutil.copyfile(path, staged / (MODEL_FILE_STEM + path.name[len(stem) :]))
        _check_hyperparameters(staged, source, chosen)
        fields, users = _manifest_fields(staged, source, chosen.libreco_class)

        def copy_in(directory: Path) -> None:
            for path in staged.iterdir():
                shutil.copyfile(path, directory / path.name)

        path = save_version(store, model, version, copy_in, fields)
    try:
        _check_served_answers(store, model, version, source, users)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)  # never left in the store half-checked
        raise
    return path


def _stem(source: Path) -> str:
    if not source.is_dir():
        raise InvalidInput(f"{source}: not a directory (give the folder libreco saved into)")
    stems = sorted(p.name[: -len(HYPER_SUFFIX)] for p in source.glob(f"*{HYPER_SUFFIX}"))
    if len(stems) != 1:
        found = "none" if not stems else ", ".join(stems)
        raise InvalidInput(
            f"{source}: expected one libreco save (a <name>{HYPER_SUFFIX}), found {found}"
        )
    if not (source / f"{stems[0]}_data_info.npz").is_file():
        raise InvalidInput(f"{source}: {stems[0]}_data_info.npz is missing: save the data info too")
    return stems[0]


def _check_hyperparameters(staged: Path, source: Path, chosen: Family) -> None:
    import inspect

    from uro_recs.pipeline.training import model_class

    libreco_class = chosen.libreco_class
    try:
        saved = json.loads((staged / f"{MODEL_FILE_STEM}{HYPER_SUFFIX}").read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"{source}: cannot read the hyperparameters: {exc}") from None
    signature = inspect.signature(model_class(chosen).__init__).parameters
    expected = set(signature) - {"self"} - _NOT_SAVED
    if not isinstance(saved, dict) or set(saved) != expected:
        keys = set(saved) if isinstance(saved, dict) else set()
        odd = sorted(keys - expected) or sorted(expected - keys)
        raise InvalidInput(
            f"{source}: not a {libreco_class} save: its hyperparameters differ in "
            f"{', '.join(odd[:6])}; is --kind right?"
        )


def _manifest_fields(
    staged: Path, source: Path, libreco_class: str
) -> tuple[dict[str, object], list[Id]]:
    """Load the save with libreco (InvalidInput when it cannot); its manifest fields and the
    first users, whose answers are checked once it is in the store."""
    from uro_recs.worker.libreco_engine import load_libreco_model

    try:
        model, data_info, _ = load_libreco_model(staged, libreco_class, threads=1)
    except Exception as exc:  # what a broken save raises is libreco's, of every kind
        raise InvalidInput(
            f"{source}: libreco cannot load it as {libreco_class}: {type(exc).__name__}: {exc}"
        ) from None
    with (staged / f"{MODEL_FILE_STEM}_item_consumed.pkl").open("rb") as fh:
        item_consumed: dict[int, Any] = pickle.load(fh)
    counts = {data_info.id2item[i]: len(users) for i, users in item_consumed.items()}
    popular: list[Id] = [
        _plain(item) for item, _ in sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
    ][:POPULAR_ITEMS_MAX]
    from libreco import __version__ as libreco_version

    users = [_plain(data_info.id2user[i]) for i in range(min(CHECKED_USERS, data_info.n_users))]
    return {
        "libreco_class": libreco_class,
        "libreco_version": libreco_version,
        "data": {
            "n_users": int(data_info.n_users),
            "n_items": int(data_info.n_items),
            "n_interactions": int(sum(counts.values())),
        },
        "metrics": {},
        "params": {"imported_from": str(source), "model_class": type(model).__name__},
        "popular_items": popular,
    }, users


def _check_served_answers(
    store: Path, model: str, version: str, source: Path, users: list[Id]
) -> None:
    """The engine a worker would load answers as libreco does for these users."""
    from uro_recs.worker.engine import load_engine
    from uro_recs.worker.libreco_engine import load_libreco_engine

    directory = version_dir(store, model, version)
    manifest: Manifest = verify(directory)
    try:
        served = load_engine(store, model, version)
    except Exception as exc:
        raise InvalidInput(
            f"{source}: a worker cannot serve it: {exc} (save embedding models with "
            "inference_only=True)"
        ) from None
    reference = load_libreco_engine(directory, manifest, threads=1)
    n = min(10, reference.n_items)
    answers = zip(
        served.recommend(users, n, True), reference.recommend(users, n, True), strict=True
    )
    for user, (got, expected) in zip(users, answers, strict=True):
        if got.items != expected.items and not _tied(reference, user, got.items, expected.items):
            raise InvalidInput(
                f"{source}: served answers differ from libreco's for user {user!r}; not imported"
            )


def _tied(reference: Any, user: Id, got: list[Id], expected: list[Id]) -> bool:
    """Lists that differ only in the order of items libreco scores exactly alike."""
    if len(got) != len(expected):
        return False
    return bool(reference.predict(user, got)[0] == reference.predict(user, expected)[0])


def _plain(value: Any) -> Id:
    if isinstance(value, str):
        return value
    return int(value)
