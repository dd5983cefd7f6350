"""kill -9 of a random worker every 2 s under load: a caller with the SDK's defaults sees
nothing of it."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.cluster import Cluster
from uro_recs.sdk import AsyncClient, UroRecsError

DURATION_S = float(os.environ.get("URO_RECS_CHAOS_SECONDS", "20"))
IN_FLIGHT = 200
KILL_EVERY_S = 2.0

pytestmark = pytest.mark.timeout(180)


def test_kill_9_of_a_random_worker_every_2_s_costs_a_default_sdk_caller_nothing(
    trained_store: Path, demo_users: list[str]
) -> None:
    with Cluster(trained_store, {"als": 2}).start() as cluster:
        stop = threading.Event()
        killed: list[float] = []  # when each kill was made

        def killer() -> None:
            rng = random.Random(9)
            while not stop.wait(KILL_EVERY_S):
                # One worker dies while the other serves: the last replacement must have
                # registered first (it loads its model in about a second).
                while not stop.is_set() and cluster.stats()["models"]["als"]["workers"] < 2:
                    time.sleep(0.05)
                live = [w for w in cluster.workers if w.poll() is None]
                victim = rng.choice(live)
                os.kill(victim.pid, signal.SIGKILL)
                killed.append(time.monotonic())
                cluster.start_worker("als")  # what systemd's Restart= does

        errors: list[str] = []
        answered = 0

        async def caller(client: AsyncClient, index: int, until: float) -> None:
            nonlocal answered
            while time.monotonic() < until:
                user = demo_users[index % len(demo_users)]
                try:
                    recommendation = await client.recommend(user, n=10)
                except UroRecsError as error:
                    errors.append(f"{type(error).__name__}: {error}")
                    continue
                assert len(recommendation.items) == 10
                answered += 1

        async def load() -> None:
            async with AsyncClient(cluster.client_endpoint, model="als") as client:
                await asyncio.gather(*(caller(client, i, until) for i in range(IN_FLIGHT)))

        until = time.monotonic() + DURATION_S
        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        try:
            asyncio.run(load())
        finally:
            stop.set()
            thread.join()
        stats = cluster.stats()
        print(
            f"chaos: {answered} answered, {len(errors)} errors, {len(killed)} workers killed,"
            f" {stats['counters'].get('requests_redelivered', 0)} redelivered"
        )
        assert len(killed) >= int(DURATION_S / KILL_EVERY_S) - 1
        assert errors == [], errors[:10]
        assert stats["counters"]["workers_lost"] >= len(killed)
        # With 200 calls in flight and 64 slots, a worker killed while the load runs holds
        # requests: each such kill redelivers at least one.
        during_load = [at for at in killed if at < until]
        assert stats["counters"].get("requests_redelivered", 0) >= len(during_load)
        assert answered > 1000
