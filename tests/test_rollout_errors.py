"""A rollout that cannot succeed fails fast, says why, and changes nothing.

Two need the broker to refuse versions it cannot serve and to list the workers' failed loads
(stats: models.<model>.load_errors), and the workers to report them (LOAD_FAILED):
test_rollout_fails_within_seconds_naming_why_the_worker_could_not_load and
test_the_broker_refuses_a_malformed_or_unknown_version. The same decisions are checked against a
scripted control endpoint (FakeControl) too, without broker or workers.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from tests.cluster import Cluster
from tests.conftest import TRAINED_VERSION
from uro_recs.app.rollout import RolloutError, rollout
from uro_recs.core import protocol
from uro_recs.core.config import Config, load_config
from uro_recs.core.model_store import (
    MANIFEST_NAME,
    StoreCorrupt,
    check_version_name,
    current_version,
    set_current,
    verify,
)
from uro_recs.core.protocol import ErrorCode

BROKEN = "2026-11-29T000000Z"  # verifies, but its manifest's n_users is not the model's
CORRUPT = "2026-11-30T000000Z"  # a file differs from its checksum
OTHER = "2026-11-28T000000Z"  # a good second version of the model "ghost"
MISSING = "2026-12-31T000000Z"  # in no store


def copy_version(src: Path, dst: Path, model: str, version: str, *, n_users_delta: int = 0) -> Path:
    """A copy of `src` (a version directory) as <dst>/<model>/<version>, its manifest rewritten
    to describe it; `n_users_delta` makes the manifest disagree with the model it lists."""
    target = dst / model / version
    shutil.copytree(src, target)
    manifest: dict[str, Any] = json.loads((target / MANIFEST_NAME).read_text())
    manifest["model"], manifest["version"] = model, version
    manifest["data"]["n_users"] += n_users_delta
    (target / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return target


@pytest.fixture(scope="module")
def store(trained_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from uro_recs.worker.engine import load_engine

    store = tmp_path_factory.mktemp("rollout_errors_store")
    shutil.copytree(trained_store / "als", store / "als")
    trained = trained_store / "als" / TRAINED_VERSION
    copy_version(trained, store, "als", BROKEN, n_users_delta=1)
    verify(store / "als" / BROKEN)  # nothing a checksum can tell...
    with pytest.raises(StoreCorrupt, match="does not match model"):
        load_engine(store, "als", BROKEN)  # ...but no worker can load it
    corrupt = copy_version(trained, store, "als", CORRUPT)
    with (corrupt / "model.npz").open("r+b") as handle:
        handle.write(b"\0\0\0\0")
    # "ghost": in the store, unknown to the broker.
    copy_version(trained, store, "ghost", TRAINED_VERSION)
    copy_version(trained, store, "ghost", OTHER)
    (store / "ghost" / "CURRENT").write_text(f"{TRAINED_VERSION}\n")
    return store


@pytest.fixture(scope="module")
def cluster(store: Path) -> Iterator[Cluster]:
    with Cluster(store, {"als": 1}).start() as cluster:
        yield cluster


@pytest.fixture
def config(cluster: Cluster) -> Config:
    return load_config(cluster.config_path)


@dataclasses.dataclass(frozen=True)
class Run:
    code: int
    said: str  # the last line on stderr (before it: the store's JSON log lines)
    took_s: float


def cli_rollout(cluster: Cluster, *args: str) -> Run:
    command = [sys.executable, "-m", "uro_recs.app.cli", "--config", str(cluster.config_path)]
    started = time.monotonic()
    done = subprocess.run([*command, "rollout", *args], capture_output=True, text=True, timeout=120)
    lines = done.stderr.splitlines()
    return Run(done.returncode, lines[-1] if lines else "", time.monotonic() - started)


def assert_unchanged(cluster: Cluster, store: Path) -> None:
    """CURRENT, the broker's target and the worker are where the module started them."""
    assert current_version(store, "als") == TRAINED_VERSION
    state = cluster.stats()["models"]["als"]
    assert state["versions"] == [TRAINED_VERSION] and state["workers"] == 1
    assert state["target_version"] in (None, TRAINED_VERSION)
    reply = cluster.call("recommend", model="als", args={"user": "u1", "n": 3})
    assert reply["ok"], reply


def put_back(cluster: Cluster, store: Path) -> None:
    """After a test that may have failed half-way: CURRENT and the broker's target as they were,
    so the tests after it start from there."""
    set_current(store, "als", TRAINED_VERSION)
    args = {"version": TRAINED_VERSION}
    cluster.call("rollout", model="als", args=args, endpoint=cluster.control_endpoint)


@pytest.mark.parametrize("name", ["2026-11-27T000000Z", "v1", "v1.2_build-4", "a" * 128, "0"])
def test_check_version_name_accepts_plain_names(name: str) -> None:
    check_version_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "../../etc",
        "..",
        ".hidden",
        "-v1",
        "a/b",
        "a b",
        "v1\n",
        "a" * 129,
        "é",
        "CURRENT/x",
        "v1:2",
        "CURRENT",
    ],
)
def test_check_version_name_refuses_anything_else_in_one_line(name: str) -> None:
    with pytest.raises(ValueError, match="invalid version name") as refused:
        check_version_name(name)
    assert "\n" not in str(refused.value)


def test_a_malformed_version_name_fails_at_once_and_changes_nothing(
    cluster: Cluster, store: Path
) -> None:
    done = cli_rollout(cluster, "als", "../../etc")
    assert done.code == 1
    assert done.said.startswith("rollout failed: als: invalid version name '../../etc': ")
    assert done.took_s < 10
    assert_unchanged(cluster, store)


@pytest.mark.parametrize(
    ("version", "reason"),
    [
        (MISSING, "does not exist"),
        (CORRUPT, "model.npz: checksum mismatch"),
        ("CURRENT", "invalid version"),
    ],
)
def test_a_version_the_store_cannot_give_fails_at_once_and_changes_nothing(
    cluster: Cluster, store: Path, config: Config, version: str, reason: str
) -> None:
    started = time.monotonic()
    with pytest.raises(RolloutError, match=reason):
        rollout(config, "als", version, timeout_s=60)
    assert time.monotonic() - started < 3
    assert_unchanged(cluster, store)


def test_rollout_fails_within_seconds_naming_why_the_worker_could_not_load(
    cluster: Cluster, store: Path
) -> None:
    try:
        done = cli_rollout(cluster, "als", BROKEN, "--timeout", "30")
        assert done.code == 1
        assert done.said.startswith(f"rollout failed: als: 1 worker(s) could not load {BROKEN}: ")
        assert "data.n_users does not match model" in done.said
        assert done.said.endswith(f"; CURRENT is back at {TRAINED_VERSION}")
        assert done.took_s < 20, f"took {done.took_s:.1f} s: the rollout waited, not failed"
        assert_unchanged(cluster, store)
        # The worker was not left trying, and the next rollout works.
        time.sleep(1.0)
        assert cluster.stats()["models"]["als"]["versions"] == [TRAINED_VERSION]
        assert cli_rollout(cluster, "als", TRAINED_VERSION).code == 0
    finally:
        put_back(cluster, store)


def test_a_refused_rollout_puts_current_back(cluster: Cluster, store: Path, config: Config) -> None:
    with pytest.raises(RolloutError) as refused:
        rollout(config, "ghost", OTHER, timeout_s=60)
    message = str(refused.value)
    assert message.startswith(f"ghost: the broker refused the rollout to {OTHER} (unknown_model")
    assert message.endswith(f"CURRENT is back at {TRAINED_VERSION}")
    assert current_version(store, "ghost") == TRAINED_VERSION
    assert_unchanged(cluster, store)


def test_an_unreachable_broker_changes_nothing(store: Path, tmp_path: Path) -> None:
    config = dataclasses.replace(load_config(None), store=store, run_dir=tmp_path)
    with pytest.raises(RolloutError, match="cannot ask the broker") as failed:
        rollout(config, "ghost", OTHER, timeout_s=60)
    assert str(failed.value).endswith(f"nothing changed, CURRENT is still {TRAINED_VERSION}")
    assert current_version(store, "ghost") == TRAINED_VERSION


def test_the_broker_refuses_a_malformed_or_unknown_version(cluster: Cluster, store: Path) -> None:
    try:
        for version in ("../../etc", MISSING, "v1\n"):
            reply = cluster.call(
                "rollout", model="als", args={"version": version}, endpoint=cluster.control_endpoint
            )
            assert reply["ok"] is False, (version, reply)
            assert reply["error"]["code"] == "bad_request" and reply["error"]["message"]
        assert_unchanged(cluster, store)
    finally:
        put_back(cluster, store)


# --- against a scripted control endpoint ----------------------------------------------------


class FakeControl:
    """A broker's control endpoint that answers `stats` with `stats[i]` (the last one again once
    they run out) and `rollout` with `rollout_reply`, recording the rollouts it was sent."""

    def __init__(
        self, run_dir: Path, stats: list[dict[str, Any]], refuse: tuple[ErrorCode, str] | None
    ) -> None:
        self.stats, self.refuse = stats, refuse
        self.rollouts: list[dict[str, Any]] = []
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(f"ipc://{run_dir / 'control.sock'}")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        answered = 0
        while not self.stop.is_set():
            if not self.socket.poll(50):
                continue
            client, empty, body = self.socket.recv_multipart()
            request = msgpack.unpackb(body)
            if request["op"] == "rollout":
                self.rollouts.append(request)
                if self.refuse is None:
                    reply = protocol.encode_ok(request["id"], {"moving": 2})
                else:
                    reply = protocol.encode_error(request["id"], *self.refuse)
            else:
                result = self.stats[min(answered, len(self.stats) - 1)]
                answered += 1
                reply = protocol.encode_ok(request["id"], result)
            self.socket.send_multipart([client, empty, reply])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.socket.close()
        self.context.destroy(linger=0)


@pytest.fixture
def two_versions(trained_store: Path, tmp_path: Path) -> Path:
    """A store of its own: "als" at TRAINED_VERSION (CURRENT) and OTHER."""
    store = tmp_path / "store"
    shutil.copytree(trained_store / "als", store / "als")
    copy_version(trained_store / "als" / TRAINED_VERSION, store, "als", OTHER)
    return store


def stats_of(versions: list[str], load_errors: list[dict[str, str]]) -> dict[str, Any]:
    state = {"workers": 2, "versions": versions, "load_errors": load_errors}
    return {"uptime_s": 1.0, "draining": False, "models": {"als": state}, "counters": {}}


def run_against(
    store: Path,
    stats: list[dict[str, Any]],
    refuse: tuple[ErrorCode, str] | None = None,
    timeout_s: float = 30.0,
) -> tuple[str, FakeControl]:
    """Roll "als" out to OTHER against a FakeControl; the RolloutError's message."""
    run_dir = Path(tempfile.mkdtemp(prefix="ur-"))  # IPC paths must stay short
    fake = FakeControl(run_dir, stats, refuse)
    config = dataclasses.replace(load_config(None), store=store, run_dir=run_dir)
    try:
        with pytest.raises(RolloutError) as failed:
            rollout(config, "als", OTHER, timeout_s=timeout_s)
    finally:
        fake.close()
        shutil.rmtree(run_dir)
    return str(failed.value), fake


def test_the_first_load_error_for_the_version_fails_the_rollout_and_puts_current_back(
    two_versions: Path,
) -> None:
    error = {"version": OTHER, "error": "StoreCorrupt: model.npz: checksum mismatch"}
    stats = [
        stats_of([TRAINED_VERSION], []),  # before: is the broker there?
        stats_of([TRAINED_VERSION], [{"worker": "w9", "version": "old", "error": "gone"}]),
        stats_of([TRAINED_VERSION], [{"worker": "w1", **error}, {"worker": "w2", **error}]),
    ]
    started = time.monotonic()
    message, fake = run_against(two_versions, stats)
    assert time.monotonic() - started < 5
    assert message == (
        f"als: 2 worker(s) could not load {OTHER}: StoreCorrupt: model.npz: checksum mismatch; "
        f"CURRENT is back at {TRAINED_VERSION}"
    )
    assert [r["args"] for r in fake.rollouts] == [{"version": OTHER}]
    assert current_version(two_versions, "als") == TRAINED_VERSION


def test_a_refusal_puts_current_back_and_says_why(two_versions: Path) -> None:
    refusal = (ErrorCode.BAD_REQUEST, f"als has no version {OTHER} in the store")
    message, _ = run_against(two_versions, [stats_of([TRAINED_VERSION], [])], refuse=refusal)
    assert message == (
        f"als: the broker refused the rollout to {OTHER} (bad_request: als has no version "
        f"{OTHER} in the store); CURRENT is back at {TRAINED_VERSION}"
    )
    assert current_version(two_versions, "als") == TRAINED_VERSION


def test_workers_that_take_too_long_leave_the_new_current_and_say_so(two_versions: Path) -> None:
    message, _ = run_against(two_versions, [stats_of([TRAINED_VERSION], [])], timeout_s=0.5)
    assert message == (
        f"als: workers still on ['{TRAINED_VERSION}'] after 0 s; "
        f"CURRENT is {OTHER} (roll out {TRAINED_VERSION} to go back)"
    )
    assert current_version(two_versions, "als") == OTHER
