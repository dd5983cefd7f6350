"""The floor under a brokered request on this machine: ZeroMQ round trips between Python
processes doing nothing else, one request at a time.

  - "echo": client DEALER -> ROUTER echo process (one hop: what any out-of-process design pays);
  - "relay + echo": client DEALER -> ROUTER/ROUTER relay process -> DEALER echo process (two
    hops: the shape of uro-recs, a broker in front of workers).

The bodies are real recommend requests and replies of the demo's size. Anything uro-recs
adds above "relay + echo" is its own work (decoding, validation, routing, the model call);
what lies between in-process and "relay + echo" is the price of the two process hops.

    python -m perf.floor [--seconds 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import zmq

from perf.loadgen import RunResult
from uro_recs.core import protocol

REQUEST = protocol.encode_request(1, "recommend", "als", {"user": "u" * 36, "n": 10}, 5000)
Context = zmq.Context[zmq.Socket[bytes]]
REPLY = protocol.encode_ok(1, {"user": "u" * 36, "items": list(range(10)), "cold_start": False})


def context() -> Context:
    instance: Context = zmq.Context.instance()
    return instance


def serve_echo(endpoint: str) -> None:
    sock = context().socket(zmq.ROUTER)
    sock.bind(endpoint)
    while True:
        identity, delimiter, _body = sock.recv_multipart()
        sock.send_multipart([identity, delimiter, REPLY])


def serve_relay(front: str, back: str) -> None:
    """A minimal broker: client frames to the one worker and back, nothing decoded."""
    clients, workers = context().socket(zmq.ROUTER), context().socket(zmq.ROUTER)
    clients.bind(front)
    workers.bind(back)
    worker = workers.recv_multipart()[0]  # the worker says hello first
    poller = zmq.Poller()
    poller.register(clients, zmq.POLLIN)
    poller.register(workers, zmq.POLLIN)
    while True:
        for sock, _ in poller.poll():
            if sock is clients:
                client, _, body = clients.recv_multipart()
                workers.send_multipart([worker, client, body])
            else:
                _, client, body = workers.recv_multipart()
                clients.send_multipart([client, b"", body])


def serve_worker(back: str) -> None:
    sock = context().socket(zmq.DEALER)
    sock.connect(back)
    sock.send(b"hello")
    while True:
        client, _body = sock.recv_multipart()
        sock.send_multipart([client, REPLY])


@contextmanager
def processes(*commands: list[str]) -> Iterator[None]:
    started = [
        subprocess.Popen([sys.executable, "-m", "perf.floor", *command]) for command in commands
    ]
    try:
        time.sleep(1.0)  # bound, connected, the relay has its worker
        yield
    finally:
        for process in started:
            process.kill()
            process.wait()


def one_at_a_time(endpoint: str, seconds: float, system: str) -> dict[str, Any]:
    sock = context().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    for _ in range(200):  # warm-up: connections and caches
        sock.send_multipart([b"", REQUEST])
        sock.recv_multipart()
    result = RunResult(system, "sequential", 0.0, seconds)
    end = time.perf_counter() + seconds
    while (began := time.perf_counter()) < end:
        sock.send_multipart([b"", REQUEST])
        sock.recv_multipart()
        result.record((time.perf_counter() - began) * 1e6)
        result.sent += 1
        result.ok += 1
    sock.close()
    return result.summary()


def measure(seconds: float) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="floor-") as tmp:
        echo, front, back = (f"ipc://{Path(tmp) / name}" for name in ("e.sock", "f.sock", "b.sock"))
        with processes(["echo", echo]):
            bare = one_at_a_time(echo, seconds, "echo (1 hop)")
        with processes(["relay", front, back], ["worker", back]):
            relayed = one_at_a_time(front, seconds, "relay + echo (2 hops)")
    return [bare, relayed]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("echo", "relay", "worker"):
        role, endpoints = sys.argv[1], sys.argv[2:]
        if role == "echo":
            serve_echo(*endpoints)
        elif role == "relay":
            serve_relay(*endpoints)
        else:
            serve_worker(*endpoints)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    for row in measure(args.seconds):
        print(f"{row['system']:<24} p50 {row['p50_ms']:.3f} ms  p99 {row['p99_ms']:.3f} ms")


if __name__ == "__main__":
    main()
