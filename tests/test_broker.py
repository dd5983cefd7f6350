"""The broker and workers as real processes on real IPC sockets, serving real libreco models."""

from __future__ import annotations

import os
import random
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from tests.cluster import Cluster
from uro_recs.core import protocol


def _dealer(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> zmq.Socket[bytes]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def _send(sock: zmq.Socket[bytes], request_id: int, op: str, **fields: Any) -> None:
    sock.send_multipart([b"", protocol.encode_request(request_id, op, **fields)])


def _collect(sock: zmq.Socket[bytes], count: int, timeout_s: float) -> dict[Any, dict[str, Any]]:
    """Read `count` replies, keyed by request id (fails on a duplicate or a missing reply)."""
    replies: dict[Any, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while len(replies) < count:
        remaining_ms = int((deadline - time.monotonic()) * 1000)
        if remaining_ms <= 0 or not sock.poll(remaining_ms):
            raise AssertionError(f"only {len(replies)} of {count} replies in {timeout_s} s")
        frames = sock.recv_multipart()
        assert frames[0] == b""
        reply = msgpack.unpackb(frames[1])
        assert reply["id"] not in replies, f"duplicate reply for {reply['id']}"
        replies[reply["id"]] = reply
    return replies


@pytest.fixture
def users(demo_users: list[str]) -> list[str]:
    return demo_users


def test_kill_9_of_one_of_two_workers_loses_none_of_200_requests(
    trained_store: Path, users: list[str]
) -> None:
    # Heartbeats every 2 s: the stopped victim is not declared dead for 6 s, so what moves
    # its requests is the kill, seen through its pidfd.
    broker = {"heartbeat_ms": 2000}
    with Cluster(trained_store, {"als": 2}, broker=broker, worker={"slots": 4}).start() as cluster:
        sock = _dealer(cluster.context, cluster.client_endpoint)
        victim = cluster.workers[0]
        os.kill(victim.pid, signal.SIGSTOP)  # it fills its 4 slots and answers none of them

        def send(ids: range) -> None:
            for i in ids:
                args = {"user": users[i % len(users)], "n": 10}
                _send(sock, i, "recommend", model="als", args=args, timeout_ms=10_000)

        send(range(100))
        replies = _collect(sock, 96, timeout_s=10)
        assert cluster.stats()["models"]["als"]["in_flight"] == 4
        os.kill(victim.pid, signal.SIGKILL)
        send(range(100, 200))
        replies |= _collect(sock, 104, timeout_s=5)

        assert sorted(replies) == list(range(200))
        failed = {i: r["error"] for i, r in replies.items() if not r["ok"]}
        assert failed == {}
        assert victim.wait(timeout=5) == -signal.SIGKILL
        stats = cluster.stats()
        assert stats["models"]["als"]["workers"] == 1
        assert stats["counters"]["workers_lost"] == 1
        assert stats["counters"]["requests_redelivered"] == 4
        assert "answered_worker_lost" not in stats["counters"]
        sock.close()


def _handed_a_request(sockets: list[zmq.Socket[bytes]], timeout_ms: int) -> list[zmq.Socket[bytes]]:
    """The fake workers handed a REQUEST, once one is or the timeout passes (heartbeats are
    skipped)."""
    poller = zmq.Poller()
    for sock in sockets:
        poller.register(sock, zmq.POLLIN)
    deadline = time.monotonic() + timeout_ms / 1000
    handed: list[zmq.Socket[bytes]] = []
    while not handed and (left := deadline - time.monotonic()) > 0:
        for sock in dict(poller.poll(int(left * 1000) + 1)):
            header = protocol.parse_worker_header(sock.recv_multipart()[0])
            if header.command == protocol.REQUEST:
                handed.append(sock)
    return handed


def test_request_whose_second_worker_dies_too_is_answered_worker_lost(
    trained_store: Path, users: list[str]
) -> None:
    # Three fake workers, each "running" as a sleep process the broker watches: killing the
    # process is the worker's kill -9. Heartbeats every 5 s keep silence from counting.
    with Cluster(trained_store, {}, broker={"heartbeat_ms": 5000}).start() as cluster:
        processes = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
        try:
            workers = {
                cluster.fake_worker(
                    f"fake-{i}".encode(), protocol.WorkerHello("als", "v-test", 1, {}, p.pid)
                ): p
                for i, p in enumerate(processes)
            }
            cluster.wait_for_workers({"als": 3}, timeout_s=10)
            client = _dealer(cluster.context, cluster.client_endpoint)
            _send(client, 1, "recommend", model="als", args={"user": users[0]}, timeout_ms=10_000)

            for _ in range(2):  # the worker holding it dies, then the one it was redelivered to
                (holder,) = _handed_a_request(list(workers), 2000)
                workers.pop(holder).kill()
                if len(workers) == 2:
                    assert not client.poll(200), "answered instead of redelivered"

            reply = _collect(client, 1, timeout_s=5)[1]
            assert reply["error"]["code"] == "worker_lost" and reply["error"]["retry"] is True
            (survivor,) = workers
            assert _handed_a_request([survivor], 300) == [], "redelivered a second time"
            stats = cluster.stats()
            assert stats["models"]["als"]["workers"] == 1
            counters = stats["counters"]
            assert counters["workers_lost"] == 2
            assert counters["requests_redelivered"] == 1
            assert counters["answered_worker_lost"] == 1
            client.close()
        finally:
            for process in processes:
                process.kill()
                process.wait()


def test_request_whose_deadline_passes_in_the_queue_is_answered_and_never_run(
    trained_store: Path, users: list[str]
) -> None:
    with Cluster(trained_store, {"als": 1}, worker={"slots": 2}).start() as cluster:
        sock = _dealer(cluster.context, cluster.client_endpoint)
        worker = cluster.workers[0]
        os.kill(worker.pid, signal.SIGSTOP)  # the worker holds 2, the other 8 wait in the queue
        try:
            for i in range(10):
                _send(sock, i, "recommend", model="als", args={"user": users[i]}, timeout_ms=100)
            started = time.monotonic()
            queued = _collect(sock, 8, timeout_s=2)
            assert time.monotonic() - started < 0.5
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        held = _collect(sock, 2, timeout_s=5)
        replies = {**queued, **held}
        assert sorted(replies) == list(range(10))
        codes = {r["error"]["code"] for r in replies.values()}
        assert codes == {"deadline_exceeded"}, replies
        stats = cluster.stats()
        assert stats["counters"]["answered_deadline_exceeded"] == 8  # in the broker's queue
        assert stats["models"]["als"]["workers"] == 1
        sock.close()


def test_burst_of_1000_against_queue_limit_10_is_answered_or_rejected_quickly(
    trained_store: Path, users: list[str]
) -> None:
    config = {"queue_limit": 10}
    with Cluster(trained_store, {"als": 1}, broker=config, worker={"slots": 4}).start() as cluster:
        sock = _dealer(cluster.context, cluster.client_endpoint)
        started = time.monotonic()
        for i in range(1000):
            args = {"user": users[i % len(users)]}
            _send(sock, i, "recommend", model="als", args=args, timeout_ms=10_000)
        replies = _collect(sock, 1000, timeout_s=20)
        elapsed = time.monotonic() - started
        ok = [r for r in replies.values() if r["ok"]]
        overloaded = [r for r in replies.values() if not r["ok"]]
        assert {r["error"]["code"] for r in overloaded} == {"overloaded"}
        assert all(r["error"]["retry"] for r in overloaded)
        assert len(ok) >= 14  # at least the 4 slots plus the 10 queued
        assert len(overloaded) > 500
        assert elapsed < 10
        after = cluster.call("recommend", model="als", args={"user": users[0]})
        assert after["ok"], after
        sock.close()


def test_garbage_then_a_valid_request_gets_errors_then_an_answer(
    trained_store: Path, users: list[str]
) -> None:
    max_bytes = 64 * 1024
    broker = {"max_message_bytes": max_bytes}
    with Cluster(trained_store, {"als": 1}, broker=broker).start() as cluster:
        sock = _dealer(cluster.context, cluster.client_endpoint)
        rng = random.Random(3)
        valid = protocol.encode_request(99, "recommend", "als", {"user": users[0]})
        garbage: list[list[bytes]] = [
            [b"", rng.randbytes(200)],
            [b"", valid[:-7]],
            [b"", msgpack.packb({"v": 1, "id": 5, "op": "recommend", "model": 3})],
            [b"", msgpack.packb({"v": 1, "id": 6, "op": "recommend", "model": "als", "args": []})],
            [b"", msgpack.packb({"v": 1, "id": 7, "op": "stats", "pad": "x" * max_bytes})],
            [b"", valid, b"extra frame"],
            [valid],
        ]
        for frames in garbage:
            sock.send_multipart(frames)
        errors = [msgpack.unpackb(sock.recv_multipart()[1]) for _ in garbage]
        assert [e["error"]["code"] for e in errors] == [
            "bad_request",
            "bad_request",
            "bad_request",
            "bad_request",
            "too_large",
            "bad_request",
            "bad_request",
        ]
        sock.send_multipart([b"", valid])
        reply = _collect(sock, 1, timeout_s=5)[99]
        assert reply["ok"] and len(reply["result"]["items"]) == 10
        stats = cluster.stats()
        assert stats["counters"]["rejected_bad_request"] == 6
        assert stats["counters"]["rejected_too_large"] == 1
        sock.close()


def test_sigterm_under_load_finishes_in_flight_refuses_new_and_exits_0(
    trained_store: Path, users: list[str]
) -> None:
    with Cluster(trained_store, {"als": 1}, worker={"slots": 2}).start() as cluster:
        assert cluster.broker is not None
        sock = _dealer(cluster.context, cluster.client_endpoint)
        worker = cluster.workers[0]
        os.kill(worker.pid, signal.SIGSTOP)  # hold 50 accepted requests in flight and queued
        for i in range(50):
            _send(sock, i, "recommend", model="als", args={"user": users[i]}, timeout_ms=10_000)
        time.sleep(0.2)
        cluster.broker.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        _send(sock, 1000, "recommend", model="als", args={"user": users[0]}, timeout_ms=10_000)
        refused = _collect(sock, 1, timeout_s=2)
        assert refused[1000]["error"]["code"] == "unavailable"
        assert refused[1000]["error"]["retry"] is True
        os.kill(worker.pid, signal.SIGCONT)
        accepted = _collect(sock, 50, timeout_s=10)
        assert all(r["ok"] for r in accepted.values()), accepted
        assert cluster.broker.wait(timeout=10) == 0
        sock.close()


def test_req_socket_speaks_the_protocol(trained_store: Path, users: list[str]) -> None:
    with Cluster(trained_store, {"als": 1}).start() as cluster:
        req = cluster.context.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(cluster.client_endpoint)
        req.send(protocol.encode_request("r-1", "recommend", "als", {"user": users[1], "n": 3}))
        assert req.poll(5000)
        reply = protocol.decode_reply(req.recv())
        assert reply.id == "r-1" and reply.result is not None
        assert len(reply.result["items"]) == 3
        req.close()


class ZmtpDealer:
    """A hand-written ZMTP 3.0 DEALER over a Unix socket: the bytes docs/PROTOCOL.md gives."""

    GREETING = (
        b"\xff" + b"\x00" * 7 + b"\x01\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00"
    ) + b"\x00" * 31
    READY = bytes.fromhex("041c055245414459") + b"\x0bSocket-Type" + b"\x00\x00\x00\x06DEALER"

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.sock.sendall(self.GREETING)
        peer = self._read(64)
        assert peer[0] == 0xFF and peer[9] == 0x7F and peer[10] == 3
        self.sock.sendall(self.READY)
        self.peer_greeting = peer
        self.peer_ready = self._frame()

    def _read(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            assert chunk, "connection closed"
            data += chunk
        return data

    def _frame(self) -> tuple[int, bytes]:
        flags = self._read(1)[0]
        size = struct.unpack(">Q", self._read(8))[0] if flags & 0x02 else self._read(1)[0]
        return flags, self._read(size)

    def request(self, body: bytes) -> bytes:
        size = len(body)
        head = bytes([0, size]) if size < 256 else b"\x02" + struct.pack(">Q", size)
        self.sock.sendall(b"\x01\x00" + head + body)
        frames: list[bytes] = []
        while True:
            flags, data = self._frame()
            if flags & 0x04:
                continue  # a command (PING): not part of the message
            frames.append(data)
            if not flags & 0x01:
                break
        assert frames[0] == b"" and len(frames) == 2
        return frames[1]


def test_the_zmtp_bytes_protocol_md_gives_are_what_the_broker_sends(trained_store: Path) -> None:
    with Cluster(trained_store, {}).start() as cluster:
        client = ZmtpDealer(str(cluster.run_dir / "client.sock"))
        assert client.peer_greeting[10:12] == b"\x03\x01"  # ZMTP 3.1
        assert client.peer_greeting[12:32] == b"NULL".ljust(20, b"\x00")
        ready = bytes.fromhex(
            "04 29 05 52 45 41 44 59 0b 53 6f 63 6b 65 74 2d 54 79 70 65 00 00 00 06"
            " 52 4f 55 54 45 52 08 49 64 65 6e 74 69 74 79 00 00 00 00"
        )
        flags, body = client.peer_ready
        assert bytes([flags, len(body)]) + body == ready
        client.sock.sendall(bytes.fromhex("04 0b 04 50 49 4e 47 00 64 63 74 78 31"))
        flags, body = client._frame()
        assert bytes([flags, len(body)]) + body == bytes.fromhex("04 09 04 50 4f 4e 47 63 74 78 31")
        client.sock.close()
        pub = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        pub.settimeout(5)
        pub.connect(str(cluster.run_dir / "client.sock"))
        pub.sendall(ZmtpDealer.GREETING)
        received = b""
        while len(received) < 64:
            received += pub.recv(64 - len(received))
        pub.sendall(bytes.fromhex("04 19 05 52 45 41 44 59 0b") + b"Socket-Type\x00\x00\x00\x03PUB")
        while chunk := pub.recv(4096):
            received += chunk
        assert received[64:] == ready, "a PUB gets the broker's READY, then the connection closes"
        pub.close()


def test_hand_written_zmtp_client_gets_an_answer(trained_store: Path, users: list[str]) -> None:
    with Cluster(trained_store, {"als": 1}).start() as cluster:
        client = ZmtpDealer(str(cluster.run_dir / "client.sock"))
        body = protocol.encode_request(7, "recommend", "als", {"user": users[2], "n": 4})
        reply = protocol.decode_reply(client.request(body))
        assert reply.id == 7 and reply.result is not None
        assert len(reply.result["items"]) == 4
        long_body = protocol.encode_request(8, "predict", "als", {"user": users[2], "items": users})
        assert len(long_body) >= 256  # exercises the 8-byte frame size
        predicted = protocol.decode_reply(client.request(long_body))
        assert predicted.id == 8 and predicted.result is not None
        assert predicted.result["scores"] == [None] * len(users)  # user ids are not items
        client.sock.close()


def test_reply_to_a_client_that_went_away_is_counted_not_crashed_on(
    trained_store: Path, users: list[str]
) -> None:
    with Cluster(trained_store, {"als": 1}, worker={"slots": 1}).start() as cluster:
        worker = cluster.workers[0]
        os.kill(worker.pid, signal.SIGSTOP)
        gone = _dealer(cluster.context, cluster.client_endpoint)
        for i in range(5):
            _send(gone, i, "recommend", model="als", args={"user": users[i]}, timeout_ms=10_000)
        time.sleep(0.2)
        gone.close()  # the client leaves before any answer
        time.sleep(0.2)
        os.kill(worker.pid, signal.SIGCONT)
        deadline = time.monotonic() + 5
        while cluster.stats()["counters"].get("replies_undeliverable", 0) < 5:
            assert time.monotonic() < deadline, cluster.stats()
            time.sleep(0.05)
        assert cluster.call("recommend", model="als", args={"user": users[0]})["ok"]


def test_sigterm_to_one_of_two_workers_under_load_fails_no_request(
    trained_store: Path, users: list[str]
) -> None:
    with Cluster(trained_store, {"als": 2}, worker={"slots": 4}).start() as cluster:
        sock = _dealer(cluster.context, cluster.client_endpoint)
        leaving = cluster.workers[0]
        for i in range(300):
            args = {"user": users[i % len(users)]}
            _send(sock, i, "recommend", model="als", args=args, timeout_ms=10_000)
            if i == 30:
                leaving.send_signal(signal.SIGTERM)
        replies = _collect(sock, 300, timeout_s=20)
        assert [i for i, r in replies.items() if not r["ok"]] == []
        assert leaving.wait(timeout=10) == 0
        stats = cluster.stats()
        assert stats["models"]["als"]["workers"] == 1
        assert stats["counters"].get("workers_lost", 0) == 0  # it left cleanly, not by expiry
        sock.close()


def test_workers_register_again_with_a_restarted_broker(
    trained_store: Path, users: list[str]
) -> None:
    with Cluster(trained_store, {"als": 2}).start() as cluster:
        assert cluster.broker is not None
        cluster.broker.kill()
        cluster.broker.wait()
        cluster.broker = cluster.spawn("broker")
        cluster.wait_for_workers({"als": 2}, timeout_s=15)
        reply = cluster.call("recommend", model="als", args={"user": users[0]})
        assert reply["ok"], reply


def test_worker_reconnecting_before_its_old_connection_is_gone_still_gets_requests(
    trained_store: Path, users: list[str]
) -> None:
    """A worker that gives up on the broker opens a new socket with the same identity; the
    broker may still hold the old connection. The new one must take over, not be ignored."""
    with Cluster(trained_store, {}).start() as cluster:
        hello = protocol.WorkerHello(model="als", version="v-test", slots=4, info={})
        old = cluster.fake_worker(b"worker-same-identity", hello)
        cluster.wait_for_workers({"als": 1}, timeout_s=10)
        new = cluster.fake_worker(b"worker-same-identity", hello)
        time.sleep(0.3)  # the new connection is up while the old one is still open
        old.close()
        new.send(protocol.worker_header(protocol.HEARTBEAT))  # alive: a fake worker is silent
        client = _dealer(cluster.context, cluster.client_endpoint)
        _send(client, 7, "recommend", model="als", args={"user": users[0]})
        header = protocol.WorkerHeader(protocol.HEARTBEAT)
        while header.command == protocol.HEARTBEAT:  # the broker's heartbeats come first
            assert new.poll(2000), "the request never reached the worker's new connection"
            frames = new.recv_multipart()
            header = protocol.parse_worker_header(frames[0])
        assert header.command == protocol.REQUEST
        answer = protocol.encode_ok(7, {"items": []})
        new.send_multipart([protocol.worker_header(protocol.REPLY, header.seq), answer])
        assert _collect(client, 1, timeout_s=2)[7]["ok"]
        client.close()
        new.close()
