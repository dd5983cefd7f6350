"""A live broker fed 50,000 generated hostile messages: it answers each one and stays up."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import msgpack
import zmq

from tests.cluster import Cluster
from tests.hostile import hostile_message
from uro_recs.core import protocol

MESSAGES = int(os.environ.get("URO_RECS_FUZZ_MESSAGES", "50000"))
MAX_BYTES = 64 * 1024  # small, so bodies around the limit are cheap to send many of
CLIENTS = 8
WINDOW = 64  # messages in flight per client socket


def test_fifty_thousand_hostile_messages_are_each_answered_and_harm_nobody(
    trained_store: Path, demo_users: list[str]
) -> None:
    broker = {"max_message_bytes": MAX_BYTES}
    with Cluster(trained_store, {"als": 2}, broker=broker).start() as cluster:
        assert cluster.broker is not None
        pid = cluster.broker.pid
        before = cluster.call("recommend", model="als", args={"user": demo_users[0], "n": 10})
        assert before["ok"], before
        sockets = [cluster.context.socket(zmq.DEALER) for _ in range(CLIENTS)]
        for sock in sockets:
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(cluster.client_endpoint)
        rng = random.Random(20261201)
        outstanding = [0] * CLIENTS
        sent = answered = 0
        started = time.monotonic()
        poller = zmq.Poller()
        for sock in sockets:
            poller.register(sock, zmq.POLLIN)
        while answered < MESSAGES:
            for index, sock in enumerate(sockets):
                while sent < MESSAGES and outstanding[index] < WINDOW:
                    sock.send_multipart(hostile_message(rng, MAX_BYTES))
                    outstanding[index] += 1
                    sent += 1
            ready = dict(poller.poll(10_000))
            assert ready, f"no reply for 10 s after {answered} of {sent} answered"
            for index, sock in enumerate(sockets):
                while sock in ready:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    assert len(frames) == 2 and frames[0] == b""
                    reply = protocol.decode_reply(frames[1])  # a well-formed v1 reply
                    assert reply.ok or reply.error is not None
                    outstanding[index] -= 1
                    answered += 1
        elapsed = time.monotonic() - started
        print(f"fuzz: {answered} hostile messages answered in {elapsed:.1f} s")
        for sock in sockets:
            sock.close()
        assert cluster.broker.poll() is None and cluster.broker.pid == pid
        after = cluster.call("recommend", model="als", args={"user": demo_users[0], "n": 10})
        assert after["ok"] and after["result"] == before["result"]
        stats = cluster.stats()
        assert stats["counters"].get("workers_lost", 0) == 0, stats["counters"]
        assert stats["models"]["als"]["workers"] == 2
        assert msgpack.unpackb(msgpack.packb(stats))  # the broker's own state still encodes
