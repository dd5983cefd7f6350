"""`uro-recs rollout` and `rollback`: move a model's workers to another stored version.

The version is verified in the store, made CURRENT (so a worker that restarts loads it),
then the broker is told on its control endpoint. Each worker loads and warms the new version
beside the old one while it keeps serving, then switches between two batches: no worker
leaves, so no request fails. This command waits until every worker reports the version.
"""

from __future__ import annotations

import time

from uro_recs.config import Config
from uro_recs.sdk import Client
from uro_recs.worker.model_store import (
    current_version,
    list_versions,
    set_current,
    verify,
    version_dir,
)


class RolloutError(RuntimeError):
    pass


def previous_version(config: Config, model: str) -> str:
    """The newest stored version older than CURRENT: what a rollback goes back to."""
    current = current_version(config.store, model)
    older = [v for v in list_versions(config.store, model) if v < current]
    if not older:
        raise RolloutError(f"{model}: no version older than {current} in {config.store}")
    return older[-1]


def rollout(
    config: Config, model: str, version: str, timeout_s: float = 120.0
) -> dict[str, object]:
    """Verify, make CURRENT, tell the broker, and wait for every worker to serve `version`."""
    verify(version_dir(config.store, model, version))
    before = current_version(config.store, model)
    set_current(config.store, model, version)
    started = time.monotonic()
    with Client(config.control_endpoint, timeout=5.0) as control:
        told = control.rollout(model, version)
        deadline = started + timeout_s
        while True:
            state = control.stats()["models"].get(model, {})
            if state.get("workers", 0) > 0 and state.get("versions") == [version]:
                break
            if time.monotonic() > deadline:
                raise RolloutError(
                    f"{model}: workers still on {state.get('versions')} after {timeout_s:.0f} s"
                )
            time.sleep(0.1)
    return {
        "model": model,
        "from": before,
        "to": version,
        "workers": state["workers"],
        "moved": told.get("moving"),
        "seconds": round(time.monotonic() - started, 2),
    }


def print_summary(summary: dict[str, object]) -> None:
    print(
        f"{summary['model']}: {summary['from']} -> {summary['to']} on {summary['workers']} "
        f"worker(s) ({summary['moved']} moved) in {summary['seconds']} s"
    )
