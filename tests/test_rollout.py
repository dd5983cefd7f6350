"""Rollout and rollback under steady load: no failed request, answers from the new version."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zmq

from tests.cluster import Cluster
from uro_recs.app.rollout import previous_version, rollout
from uro_recs.core import protocol
from uro_recs.core.config import load_config
from uro_recs.core.model_store import current_version, set_current
from uro_recs.pipeline.training import train_and_save
from uro_recs.worker.engine import Engine, Id, load_engine

NEW_VERSION = "2026-11-28T000000Z"


@pytest.fixture(scope="module")
def two_version_store(
    trained_store: Path, demo_interactions: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    store = tmp_path_factory.mktemp("rollout_store")
    shutil.copytree(trained_store / "als", store / "als")
    train_and_save(
        store, "als", demo_interactions, "als", version=NEW_VERSION, seed=5, make_current=False
    )
    return store


class SteadyLoad:
    """Closed-loop load on one DEALER socket: (send time, latency, ok) of every request."""

    def __init__(self, endpoint: str, users: list[str], in_flight: int = 8) -> None:
        self.endpoint = endpoint
        self.users = users
        self.in_flight = in_flight
        self.samples: list[tuple[float, float, bool]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        sent: dict[int, float] = {}
        ids = iter(range(10**9))

        def send() -> None:
            request_id = next(ids)
            args = {"user": self.users[request_id % len(self.users)], "n": 10}
            body = protocol.encode_request(request_id, "recommend", "als", args, 5_000)
            sent[request_id] = time.perf_counter()
            sock.send_multipart([b"", body])

        for _ in range(self.in_flight):
            send()
        while sent:
            if not sock.poll(6_000):
                break  # a lost request shows as a missing sample: the test counts them
            reply = protocol.decode_reply(sock.recv_multipart()[1])
            assert isinstance(reply.id, int)
            began = sent.pop(reply.id)
            self.samples.append((began, time.perf_counter() - began, reply.ok))
            if not self.stop.is_set():
                send()
        self.unanswered = len(sent)
        sock.close()

    def p99_ms(self, start: float, end: float) -> float:
        window = [lat for began, lat, _ in self.samples if start <= began < end]
        return float(np.percentile(window, 99) * 1000)


def answers_of(engine: Engine, users: list[str]) -> dict[str, list[Id]]:
    return {u: rec.items for u, rec in zip(users, engine.recommend(users, 10, True), strict=True)}


def served(cluster: Cluster, users: list[str]) -> list[list[Id]]:
    replies = [cluster.call("recommend", model="als", args={"user": u, "n": 10}) for u in users]
    return [reply["result"]["items"] for reply in replies]


def test_rollout_and_rollback_under_load_fail_no_request(
    two_version_store: Path, demo_users: list[str]
) -> None:
    with Cluster(two_version_store, {"als": 2}).start() as cluster:
        config = load_config(cluster.config_path)
        old = current_version(two_version_store, "als")
        old_answers = answers_of(load_engine(two_version_store, "als", old), demo_users)
        new_answers = answers_of(load_engine(two_version_store, "als", NEW_VERSION), demo_users)
        # Users the two versions answer differently: what shows which one serves.
        telling = [u for u in demo_users if old_answers[u] != new_answers[u]][:10]
        assert telling, "the two versions answer every user alike"
        assert served(cluster, telling) == [old_answers[u] for u in telling]
        load = SteadyLoad(cluster.client_endpoint, demo_users)
        load.thread.start()
        time.sleep(2.0)
        steady_end = time.perf_counter()
        set_current(two_version_store, "als", NEW_VERSION)  # as a sync does before the rollout
        summary = rollout(config, "als", NEW_VERSION, timeout_s=60)
        rolled = time.perf_counter()
        time.sleep(1.0)
        assert summary["to"] == NEW_VERSION and summary["workers"] == 2
        assert summary["from"] == old  # what the workers served, not the store's pointer
        assert current_version(two_version_store, "als") == NEW_VERSION

        # Answers now come from the new version.
        assert served(cluster, telling) == [new_answers[u] for u in telling]

        assert previous_version(config, "als") == old
        back = rollout(config, "als", previous_version(config, "als"), timeout_s=60)
        assert (back["from"], back["to"]) == (NEW_VERSION, old)
        assert served(cluster, telling) == [old_answers[u] for u in telling]
        time.sleep(1.0)
        load.stop.set()
        load.thread.join(timeout=30)

        assert load.unanswered == 0
        failed = [s for s in load.samples if not s[2]]
        assert failed == [], f"{len(failed)} of {len(load.samples)} requests failed"
        steady = load.p99_ms(0, steady_end)
        during = load.p99_ms(steady_end, rolled)
        print(
            f"\nrollout under load: {len(load.samples)} requests, 0 failed; "
            f"p99 steady {steady:.2f} ms, during rollout {during:.2f} ms "
            f"({during / steady:.1f}x); switch took {summary['seconds']} s"
        )
        assert cluster.stats()["models"]["als"]["versions"] == [old]


def test_rollout_is_refused_on_the_client_socket_and_checked_on_control(
    trained_store: Path,
) -> None:
    with Cluster(trained_store, {"als": 1}).start() as cluster:
        args = {"version": "2026-11-28T000000Z"}
        refused = cluster.call("rollout", model="als", args=args)
        assert refused["error"]["code"] == "bad_request"
        unknown = cluster.call(
            "rollout", model="nope", args=args, endpoint=cluster.control_endpoint
        )
        assert unknown["error"]["code"] == "unknown_model"
        no_version = cluster.call("rollout", model="als", endpoint=cluster.control_endpoint)
        assert no_version["error"]["code"] == "bad_request"


def test_rollout_command_defaults_to_the_sync_model_and_its_current_version(
    trained_store: Path,
) -> None:
    with Cluster(trained_store, {"als": 1}).start() as cluster:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "uro_recs.app.cli",
                "--config",
                str(cluster.config_path),
                "rollout",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        current = current_version(trained_store, "als")
        assert done.stdout.startswith(f"als: {current} -> {current} on 1 worker(s)")
