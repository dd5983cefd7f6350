"""`uro-recs rollout` and `rollback`: move a model's workers to another stored version.

The version name is checked, the version verified in the store, made CURRENT (so a worker that
restarts loads it), then the broker is told on its control endpoint. Each worker loads and warms
the new version beside the old one while it keeps serving, then switches between two batches: no
worker leaves, so no request fails. This command waits until every worker reports the version.

A rollout that fails changes nothing it can undo: if the broker cannot be reached or refuses, or
a worker reports that it could not load the version (the broker's stats, `load_errors`), the
command fails at once, CURRENT goes back to what it was, and the error says so and why.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from uro_recs.core.config import Config


class RolloutError(RuntimeError):
    pass


def previous_version(config: Config, model: str) -> str:
    """The version that was CURRENT before the present one, from the store's record of them
    (never merely the newest older name: that may be a version nobody chose to serve)."""
    from uro_recs.core.model_store import current_history, current_version, list_versions

    current = current_version(config.store, model)
    stored = set(list_versions(config.store, model))
    for version in reversed(current_history(config.store, model)):
        if version != current and version in stored:
            return version
    raise RolloutError(
        f"{model}: the store records no version served before {current}; "
        f"name one: uro-recs rollout {model} VERSION"
    )


def rollout(
    config: Config, model: str, version: str, timeout_s: float = 120.0
) -> dict[str, object]:
    """Check, verify, make CURRENT, tell the broker, and wait for every worker to serve
    `version`. Raises RolloutError, with CURRENT as it was, if the name is invalid, the version
    is not in the store or is corrupt, the broker is unreachable or refuses, or a worker cannot
    load it; raises RolloutError, with CURRENT at `version`, if the workers take too long."""
    from uro_recs.core.model_store import StoreError, VersionNotFound, current_version, verify
    from uro_recs.core.model_store import version_dir as stored_version_dir
    from uro_recs.sdk import Client, RequestRejected, UroRecsError

    try:
        directory = stored_version_dir(config.store, model, version)  # checks the name
    except ValueError as exc:
        raise RolloutError(f"{model}: {exc}") from None
    try:
        verify(directory)
    except StoreError as exc:  # not there, or not what its manifest says
        raise RolloutError(f"{model}: cannot roll out {version}: {exc}") from None
    try:
        before: str | None = current_version(config.store, model)
    except VersionNotFound:
        before = None
    except StoreError as exc:
        raise RolloutError(f"{model}: {exc}") from None

    started = time.monotonic()
    with Client(config.control_endpoint, timeout=5.0) as control:
        try:
            served = control.stats()["models"].get(model, {}).get("versions", [])
        except UroRecsError as exc:
            raise RolloutError(
                f"{model}: cannot ask the broker on {config.control_endpoint} ({exc}); "
                f"nothing changed, CURRENT is still {before}"
            ) from None
        _set_current(config, model, version)
        try:
            told = control.rollout(model, version)
        except UroRecsError as exc:
            if isinstance(exc, RequestRejected):
                what = f"the broker refused the rollout to {version}"
            else:
                what = f"the broker could not be told to roll out {version}"
            restored = _restore_current(config, model, before, version)
            raise RolloutError(f"{model}: {what} ({exc}); {restored}") from None

        deadline = started + timeout_s
        while True:
            state = control.stats()["models"].get(model, {})
            if state.get("workers", 0) > 0 and state.get("versions") == [version]:
                break
            # The broker empties load_errors when it accepts a rollout: these are this one's.
            failed = [
                entry
                for entry in state.get("load_errors", [])
                if isinstance(entry, Mapping) and entry.get("version") == version
            ]
            if failed:
                restored = _restore_current(config, model, before, version)
                raise RolloutError(f"{_load_failures(model, version, failed)}; {restored}")
            if time.monotonic() > deadline:
                raise RolloutError(
                    f"{model}: workers still on {state.get('versions')} after {timeout_s:.0f} s; "
                    f"CURRENT is {version} (roll out {before} to go back)"
                )
            time.sleep(0.1)
    return {
        "model": model,
        "from": ",".join(served) or before,  # what the workers served, else the store's CURRENT
        "to": version,
        "workers": state["workers"],
        "moved": told.get("moving"),
        "seconds": round(time.monotonic() - started, 2),
    }


def _set_current(config: Config, model: str, version: str) -> None:
    from uro_recs.core.model_store import StoreError, set_current

    try:
        set_current(config.store, model, version)
    except (StoreError, OSError) as exc:
        raise RolloutError(f"{model}: cannot make {version} CURRENT: {exc}") from None


def _restore_current(config: Config, model: str, before: str | None, version: str) -> str:
    """Put CURRENT back to `before`; returns the clause that says how that went."""
    from uro_recs.core.model_store import CURRENT_NAME, StoreError, set_current

    if before == version:
        return f"CURRENT was {version} already and stays so"
    try:
        if before is None:
            (config.store / model / CURRENT_NAME).unlink(missing_ok=True)
            return "CURRENT is unset again, as it was"
        set_current(config.store, model, before)
    except (StoreError, OSError) as exc:
        return f"CURRENT is still {version}: it could not be put back to {before} ({exc})"
    return f"CURRENT is back at {before}"


def _load_failures(model: str, version: str, failed: Sequence[Mapping[str, Any]]) -> str:
    workers = {str(entry.get("worker", "?")) for entry in failed}
    reasons = list(dict.fromkeys(str(entry.get("error", "no reason given")) for entry in failed))
    return f"{model}: {len(workers)} worker(s) could not load {version}: {'; '.join(reasons)}"


def print_summary(summary: dict[str, object]) -> None:
    print(
        f"{summary['model']}: {summary['from']} -> {summary['to']} on {summary['workers']} "
        f"worker(s) ({summary['moved']} moved) in {summary['seconds']} s"
    )
