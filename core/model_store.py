"""The model store on disk: `<store>/<model>/<version>/` plus a `CURRENT` pointer per model.

A version directory holds LibRecommender's saved files and a `manifest.json` that lists every
file with its SHA-256. Some of those files are pickles, so nothing may be loaded from a version
until `verify` has checked it is exactly what was written. Versions appear atomically: they are
written into a hidden temporary directory next to their final place, synced, then renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TypeAlias, TypeVar

import structlog

log = structlog.get_logger(__name__)

FORMAT = 1
MANIFEST_NAME = "manifest.json"
CURRENT_NAME = "CURRENT"
HISTORY_NAME = "HISTORY"  # one line per set_current: "<UTC time> <version>"
_HISTORY_READ_BYTES = 64 * 1024
POPULAR_ITEMS_MAX = 1000
# The model's own files in a version directory start with this stem (libreco's save names).
MODEL_FILE_STEM = "model"
# Model and version names: one path component, never "..", "/", empty or hidden. \Z, not $:
# no trailing newline slips through.
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_CHUNK = 1 << 20
_RESERVED_FIELDS = frozenset({"format", "model", "version", "created_at", "files"})

_T = TypeVar("_T")
Id: TypeAlias = str | int
JsonValue: TypeAlias = str | int | float | bool | list["JsonValue"] | dict[str, "JsonValue"] | None


class StoreError(Exception):
    """The model store cannot do what was asked."""


class VersionNotFound(StoreError):
    """The model, version or CURRENT pointer does not exist."""


class StoreCorrupt(StoreError):
    """A version directory is not exactly what its manifest says; `file` names the culprit."""

    def __init__(self, version_dir: Path, file: str, reason: str) -> None:
        super().__init__(f"{version_dir}: {file}: {reason}")
        self.version_dir = version_dir
        self.file = file
        self.reason = reason


@dataclass(frozen=True)
class Manifest:
    format: int
    model: str
    version: str
    libreco_class: str
    libreco_version: str
    created_at: str
    data: Mapping[str, int]
    metrics: Mapping[str, float]
    params: Mapping[str, JsonValue]
    popular_items: tuple[Id, ...]
    files: Mapping[str, str]

    def to_json(self) -> dict[str, JsonValue]:
        return _plain_fields(asdict(self))

    @classmethod
    def from_json(cls, raw: object) -> Manifest:
        """Build a manifest from decoded JSON; raise ValueError on any schema violation."""
        if not isinstance(raw, dict):
            raise ValueError("manifest is not a JSON object")
        expected = set(cls.__dataclass_fields__)
        if set(raw) != expected:
            raise ValueError(f"manifest keys differ: {sorted(set(raw) ^ expected)}")
        manifest = cls(
            format=_typed(raw, "format", int),
            model=_typed(raw, "model", str),
            version=_typed(raw, "version", str),
            libreco_class=_typed(raw, "libreco_class", str),
            libreco_version=_typed(raw, "libreco_version", str),
            created_at=_typed(raw, "created_at", str),
            data=_typed_mapping(raw, "data", int),
            metrics=_typed_mapping(raw, "metrics", float),
            params=_typed(raw, "params", dict),
            popular_items=tuple(_typed(raw, "popular_items", list)),
            files=_typed_mapping(raw, "files", str),
        )
        if not all(_is_id(item) for item in manifest.popular_items):
            raise ValueError("popular_items must hold str or int ids")
        for name, digest in manifest.files.items():
            _check_relative_path(name)
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"bad sha256 for {name!r}")
        return manifest


def new_version_name(now: datetime | None = None) -> str:
    """A sortable UTC version name such as `2026-11-27T031500Z`."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H%M%SZ")


def version_dir(store: Path, model_name: str, version: str) -> Path:
    """The directory of one version, after checking both names are plain path components."""
    _check_name(model_name, "model name")
    _check_name(version, "version name")
    return store / model_name / version


def save_version(
    store: Path,
    model_name: str,
    version: str,
    save_fn: Callable[[Path], None],
    manifest_fields: Mapping[str, object],
) -> Path:
    """Write a new version atomically and return its directory.

    `save_fn` writes the model files into the (empty, temporary) directory it is given.
    `manifest_fields` supplies libreco_class, libreco_version, data, metrics, params and
    popular_items; format, model, version, created_at and files are filled in here.
    """
    _check_name(model_name, "model name")
    _check_name(version, "version name")
    reserved = _RESERVED_FIELDS.intersection(manifest_fields)
    if reserved:
        raise ValueError(f"manifest_fields may not set {sorted(reserved)}")
    model_dir = store / model_name
    model_dir.mkdir(parents=True, exist_ok=True)
    final_dir = model_dir / version
    if final_dir.exists():
        raise StoreError(f"{final_dir} already exists")

    work_dir = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=model_dir))
    try:
        save_fn(work_dir)
        if (work_dir / MANIFEST_NAME).exists():
            raise StoreError(f"save_fn wrote {MANIFEST_NAME}, which the store owns")
        files = _hash_and_sync_files(work_dir)
        manifest = Manifest.from_json(
            {
                **_plain_fields(manifest_fields),
                "format": FORMAT,
                "model": model_name,
                "version": version,
                "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "files": files,
            }
        )
        _write_synced(work_dir / MANIFEST_NAME, _manifest_bytes(manifest))
        for directory in sorted({p.parent for p in work_dir.rglob("*")}, reverse=True):
            _fsync_dir(directory)
        work_dir.chmod(0o755)  # mkdtemp makes it 0700; workers may run as another user
        os.rename(work_dir, final_dir)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    _fsync_dir(model_dir)
    log.info("model_version_saved", model=model_name, version=version, files=len(files))
    return final_dir


def set_current(store: Path, model_name: str, version: str) -> None:
    """Point `<store>/<model>/CURRENT` at an existing version, atomically."""
    _check_name(model_name, "model name")
    _check_name(version, "version name")
    model_dir = store / model_name
    if not (model_dir / version).is_dir():
        raise VersionNotFound(f"{model_name}/{version} does not exist")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{CURRENT_NAME}.tmp-", dir=model_dir)
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(f"{version}\n".encode())
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, model_dir / CURRENT_NAME)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(model_dir)
    with (model_dir / HISTORY_NAME).open("a", encoding="utf-8") as history:
        history.write(f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ} {version}\n")
        history.flush()
        os.fsync(history.fileno())
    log.info("model_current_set", model=model_name, version=version)


def current_history(store: Path, model_name: str) -> list[str]:
    """The versions that were CURRENT, oldest first, as `set_current` recorded them (the
    last 64 KiB of the record: thousands of entries)."""
    _check_name(model_name, "model name")
    try:
        with (store / model_name / HISTORY_NAME).open("rb") as history:
            start = max(0, history.seek(0, os.SEEK_END) - _HISTORY_READ_BYTES)
            history.seek(start)
            lines = history.read().decode("utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []
    if start > 0:
        lines = lines[1:]  # the first may be the tail of a line cut off by the seek
    versions = [line.rpartition(" ")[2] for line in lines]
    return [v for v in versions if _NAME_PATTERN.fullmatch(v)]


def current_version(store: Path, model_name: str) -> str:
    _check_name(model_name, "model name")
    pointer = store / model_name / CURRENT_NAME
    try:
        version = pointer.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise VersionNotFound(_no_current(store, model_name)) from None
    if not _NAME_PATTERN.fullmatch(version):
        raise StoreError(f"{pointer} holds no valid version name")
    return version


def list_models(store: Path) -> list[str]:
    """The models the store has a directory for, by name."""
    if not store.is_dir():
        return []
    return sorted(p.name for p in store.iterdir() if p.is_dir() and _NAME_PATTERN.fullmatch(p.name))


def _no_current(store: Path, model_name: str) -> str:
    """Why `model_name` has no CURRENT version, and what the store has instead."""
    if not (store / model_name).is_dir():
        models = list_models(store)
        has = f"it has {', '.join(models)}" if models else "it is empty"
        return (
            f"no model named {model_name!r} in the store {store} ({has}); publish one with "
            f"`uro-recs train --model {model_name} --csv FILE --publish` or `uro-recs sync`"
        )
    versions = list_versions(store, model_name)
    if versions:
        return (
            f"model {model_name!r} has no CURRENT version in {store} (versions: "
            f"{', '.join(versions[-5:])}); choose one with `uro-recs rollout {model_name} VERSION`"
        )
    return f"model {model_name!r} has no version in {store} yet: train and publish one first"


def list_versions(store: Path, model_name: str) -> list[str]:
    """Finished versions of a model, oldest first (version names sort by time)."""
    _check_name(model_name, "model name")
    model_dir = store / model_name
    if not model_dir.is_dir():
        return []
    return sorted(
        entry.name
        for entry in model_dir.iterdir()
        if entry.is_dir() and _NAME_PATTERN.fullmatch(entry.name)
    )


def verify(version_dir: Path) -> Manifest:
    """Check a version directory against its manifest before anything in it is loaded.

    Every listed file must exist with its recorded SHA-256, and nothing else may be there
    (no extra files, no symlinks). Raises `StoreCorrupt` naming the first bad file.
    """
    if not version_dir.is_dir():
        raise VersionNotFound(f"{version_dir} does not exist")
    manifest_path = version_dir / MANIFEST_NAME
    try:
        manifest = Manifest.from_json(json.loads(manifest_path.read_bytes()))
    except FileNotFoundError:
        raise StoreCorrupt(version_dir, MANIFEST_NAME, "missing") from None
    except ValueError as exc:  # includes JSON and UTF-8 decode errors
        raise StoreCorrupt(version_dir, MANIFEST_NAME, f"invalid: {exc}") from None
    if manifest.format != FORMAT:
        raise StoreCorrupt(version_dir, MANIFEST_NAME, f"unknown format {manifest.format}")
    if (manifest.model, manifest.version) != (version_dir.parent.name, version_dir.name):
        raise StoreCorrupt(
            version_dir,
            MANIFEST_NAME,
            f"describes {manifest.model}/{manifest.version}, not this directory",
        )

    present = _tree_files(version_dir) - {MANIFEST_NAME}
    unlisted = sorted(present - set(manifest.files))
    if unlisted:
        raise StoreCorrupt(version_dir, unlisted[0], "not listed in the manifest")
    for name, expected in sorted(manifest.files.items()):
        if name not in present:
            raise StoreCorrupt(version_dir, name, "missing")
        with (version_dir / name).open("rb") as handle:
            actual = _sha256(handle.fileno())
        if actual != expected:
            raise StoreCorrupt(version_dir, name, "checksum mismatch")
    return manifest


def _tree_files(root: Path) -> set[str]:
    """Relative POSIX paths of all regular files below root; anything else is corruption."""
    found: set[str] = set()
    for directory, subdirs, files in os.walk(root):
        for name in subdirs + files:
            path = Path(directory) / name
            relative = path.relative_to(root).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise StoreCorrupt(root, relative, "not a regular file")
            found.add(relative)
    return found


def _hash_and_sync_files(root: Path) -> dict[str, str]:
    digests: dict[str, str] = {}
    for relative in sorted(_tree_files(root)):
        with (root / relative).open("rb") as handle:
            digests[relative] = _sha256(handle.fileno())
            os.fsync(handle.fileno())
    return digests


def _sha256(fd: int) -> str:
    digest = hashlib.sha256()
    while chunk := os.read(fd, _CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _write_synced(path: Path, payload: bytes) -> None:
    with path.open("wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _manifest_bytes(manifest: Manifest) -> bytes:
    return (json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n").encode()


def check_model_name(name: str) -> None:
    """Raise ValueError, with a one-line message, unless `name` is a valid model name."""
    _check_name(name, "model name")


def check_version_name(version: str) -> None:
    """Raise ValueError, with a one-line message, unless `version` is a valid version name."""
    _check_name(version, "version name")


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name) or name == CURRENT_NAME:
        raise ValueError(
            f"invalid {what} {name!r}: 1 to 128 letters, digits, '.', '_' or '-', starting"
            " with a letter or digit"
        )


def _check_relative_path(name: str) -> None:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or path.as_posix() != name or name == MANIFEST_NAME:
        raise ValueError(f"bad file path {name!r} in manifest")


def _typed(raw: dict[str, object], key: str, kind: type[_T]) -> _T:
    value = raw[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"manifest field {key!r} must be {kind.__name__}")
    return value


def _typed_mapping(raw: dict[str, object], key: str, kind: type[_T]) -> dict[str, _T]:
    mapping = _typed(raw, key, dict)
    return {str(name): _typed(mapping, name, kind) for name in mapping}


def _is_id(value: object) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _plain_fields(fields: Mapping[str, object]) -> dict[str, JsonValue]:
    return {key: _plain(value) for key, value in fields.items()}


def _plain(value: object) -> JsonValue:
    """Turn mappings and tuples (and numpy scalars, via item()) into plain JSON values."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    item = getattr(value, "item", None)
    if callable(item):
        return _plain(item())
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")
