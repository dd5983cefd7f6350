"""Hostile and unlucky callers against a live `uro-recs serve`, with what each costs others.

    python -m perf.attacks [--dir build/attacks]

Serves the demo models (als x 2 workers, deepfm x 1, IPC) and runs, one after another:
- a 1,017-byte request nested 1,000 deep, three times;
- 20 valid requests that each carry ~1 MiB of empty arrays under an ignored key;
- 64 maximum-size valid recommends (1,000 users x n 20) from one caller;
- kill -9 of a random als worker every 2 s for 20 s under 200 calls in flight through
  `AsyncClient()` with its defaults, and the time from each kill to the redelivery;
- four waves of 800 answered requests with 256 KiB bodies and a one-hour timeout;
- 300 maximum-size recommends from a caller that never reads its replies.
Bystanders (one recommend at a time on their own connections) run through the first three
and report errors and the longest gap between two answers. Prints one table; the numbers
behind the README's and the issue's claims.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import msgpack
import zmq

from uro_recs.core import protocol
from uro_recs.core.config import load_config
from uro_recs.sdk import AsyncClient, Client, UroRecsError

MAX_SIZE_ARGS_USERS = 1_000
MAX_SIZE_N = protocol.MAX_RESULT_ITEMS // MAX_SIZE_ARGS_USERS


def deep_request(depth: int) -> bytes:
    """{"v": [[[...1...]]], "id": 1, "op": "stats"}: 1,017 bytes for depth 1,000."""
    return b"\x83\xa1v" + b"\x91" * depth + b"\x01" + b"\xa2id\x01\xa2op\xa5stats"


def padded_recommend(request_id: int, user: str, pad_bytes: int = (1 << 20) - 200) -> bytes:
    """A valid recommend with ~1 MiB of empty msgpack arrays under an ignored key."""
    head = {"v": 1, "id": request_id, "op": "recommend", "model": "als", "args": {"user": user}}
    return (
        b"\x86" + msgpack.packb(head)[1:] + msgpack.packb("pad") + msgpack.packb([[]] * pad_bytes)
    )


def max_size_recommend(request_id: int, users: list[str], timeout_ms: int = 60_000) -> bytes:
    """The largest recommend the protocol accepts: 1,000 users x n 20."""
    asked = [users[i % len(users)] for i in range(MAX_SIZE_ARGS_USERS)]
    args = {"users": asked, "n": MAX_SIZE_N}
    return protocol.encode_request(request_id, "recommend", "als", args, timeout_ms)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def dealer(context: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> zmq.Socket[bytes]:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def collect(sock: zmq.Socket[bytes], count: int, timeout_s: float) -> list[dict[str, Any]]:
    """`count` replies, decoded, or AssertionError naming how many came."""
    return [msgpack.unpackb(body) for body in collect_raw(sock, count, timeout_s)]


def collect_raw(sock: zmq.Socket[bytes], count: int, timeout_s: float) -> list[bytes]:
    """`count` reply bodies, or AssertionError naming how many came."""
    bodies: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while len(bodies) < count:
        remaining = int((deadline - time.monotonic()) * 1000)
        if remaining <= 0 or not sock.poll(remaining):
            raise AssertionError(f"{len(bodies)} of {count} replies in {timeout_s} s")
        bodies.append(sock.recv_multipart()[1])
    return bodies


class Bystander:
    """Another caller sending one recommend at a time; records errors and the longest gap."""

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        endpoint: str,
        user: str,
        model: str = "als",
        timeout_ms: int = 2000,
    ) -> None:
        self.sock = dealer(context, endpoint)
        self.user = user
        self.model = model
        self.timeout_ms = timeout_ms
        self.errors: list[str] = []
        self.answered = 0
        self.longest_gap = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last = time.monotonic()
        request_id = 0
        while not self._stop.is_set():
            request_id += 1
            args = {"user": self.user}
            body = protocol.encode_request(
                request_id, "recommend", self.model, args, self.timeout_ms
            )
            self.sock.send_multipart([b"", body])
            if not self.sock.poll(10_000):
                self.errors.append("no reply in 10 s")
                return
            reply = msgpack.unpackb(self.sock.recv_multipart()[1])
            now = time.monotonic()
            self.longest_gap = max(self.longest_gap, now - last)
            last = now
            if reply["ok"]:
                self.answered += 1
            else:
                self.errors.append(reply["error"]["code"])

    def __enter__(self) -> Bystander:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)
        self.sock.close()


# --- the live run -------------------------------------------------------------------------


class Served:
    """`uro-recs serve` with the demo models: als x 2 workers, deepfm x 1."""

    def __init__(self, directory: Path) -> None:
        from uro_recs.app.demo import prepare

        config_path, data = prepare(directory)
        text = config_path.read_text().replace(
            'name = "als"\nworkers = 1', 'name = "als"\nworkers = 2'
        )
        self.config_path = directory / "attacks.toml"
        self.config_path.write_text(text)
        self.config = load_config(self.config_path)
        self.users: list[str] = data["user"].drop_duplicates().head(200).tolist()
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.log = directory / "serve.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [
            sys.executable,
            "-m",
            "uro_recs.app.cli",
            "--config",
            str(self.config_path),
            "serve",
        ]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        with Client(self.config.control_endpoint, timeout=1.0) as control:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    models = control.stats()["models"]
                    if models.get("als", {}).get("workers") == 2 and models.get("deepfm", {}).get(
                        "workers"
                    ):
                        return
                except UroRecsError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"serve was not ready in 120 s; see {self.log}")

    def stats(self) -> dict[str, Any]:
        with Client(self.config.control_endpoint, timeout=2.0) as control:
            return control.stats()

    def broker_pid(self) -> int:
        return int((self.config.run_dir / "broker.lock").read_text().strip())

    def worker_pids(self, model: str) -> list[int]:
        out = subprocess.run(
            ["pgrep", "-f", f"worker --model {model}"], capture_output=True, text=True
        ).stdout
        return [int(p) for p in out.split()]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.context.destroy(linger=0)


@contextmanager
def bystanders(served: Served) -> Iterator[list[Bystander]]:
    endpoint = served.config.client_endpoint
    group = [
        Bystander(served.context, endpoint, served.users[0], "als"),
        Bystander(served.context, endpoint, served.users[1], "deepfm"),
    ]
    for bystander in group:
        bystander.__enter__()
    time.sleep(0.5)
    try:
        yield group
    finally:
        time.sleep(0.5)
        for bystander in group:
            bystander.__exit__()


def _bystander_row(name: str, group: list[Bystander], lost: int, extra: str) -> list[str]:
    errors = sum(len(b.errors) for b in group)
    gap_ms = max(b.longest_gap for b in group) * 1000
    answered = sum(b.answered for b in group)
    return [name, f"{errors} of {answered + errors}", f"{gap_ms:.0f} ms", str(lost), extra]


def run(directory: Path) -> list[list[str]]:
    served = Served(directory)
    served.start()
    rows: list[list[str]] = []
    endpoint = served.config.client_endpoint
    try:
        broker = served.broker_pid()

        def lost() -> int:
            return int(served.stats()["counters"].get("workers_lost", 0))

        sock = dealer(served.context, endpoint)
        for _ in range(3):
            sock.send_multipart([b"", deep_request(1000)])
        codes = {r["error"]["code"] for r in collect(sock, 3, 10)}
        rows.append(
            [
                "1,017-byte request nested 1,000 deep x 3",
                "-",
                "-",
                str(lost()),
                f"answered {sorted(codes)}; broker pid unchanged: {served.broker_pid() == broker}",
            ]
        )

        before = lost()
        # Payloads are built before and replies decoded after the bystanders' window, so the
        # attacker's own packing does not hold this process's GIL while they are timed.
        padded = [padded_recommend(i, served.users[2]) for i in range(20)]
        with bystanders(served) as group:
            for body in padded:
                sock.send_multipart([b"", body])
            raw = collect_raw(sock, 20, 60)
        replies = [msgpack.unpackb(frame) for frame in raw]
        codes = {r["error"]["code"] if not r["ok"] else "ok" for r in replies}
        rows.append(
            _bystander_row(
                "20 requests with ~1 MiB of ignored arrays",
                group,
                lost() - before,
                f"attacker got {sorted(codes)}",
            )
        )

        before = lost()
        started = time.monotonic()
        largest = [max_size_recommend(i, served.users) for i in range(64)]
        with bystanders(served) as group:
            for body in largest:
                sock.send_multipart([b"", body])
            raw = collect_raw(sock, 64, 120)
        ok = sum(1 for frame in raw if msgpack.unpackb(frame)["ok"])
        rows.append(
            _bystander_row(
                "64 maximum-size recommends (1,000 users x 20)",
                group,
                lost() - before,
                f"{ok} of 64 answered ok in {time.monotonic() - started:.1f} s",
            )
        )
        sock.close()

        rows.append(_chaos(served))

        pad = "x" * (256 * 1024)
        long_sock = dealer(served.context, endpoint)
        rss = [rss_mib(broker)]
        for _ in range(4):
            for i in range(800):
                value = msgpack.unpackb(
                    protocol.encode_request(
                        i, "recommend", "als", {"user": served.users[i % 100]}, 3_600_000
                    )
                )
                value["pad"] = pad
                long_sock.send_multipart([b"", msgpack.packb(value)])
                if i % 50 == 49:
                    collect(long_sock, 50, 60)
            rss.append(rss_mib(broker))
        long_sock.close()
        rows.append(
            [
                "4 waves of 800 answered 256 KiB requests, 1 h timeout",
                "-",
                "-",
                "-",
                "broker RSS " + " -> ".join(f"{r:.0f}" for r in rss) + " MiB",
            ]
        )

        start = rss_mib(broker)
        never_reads = dealer(served.context, endpoint)
        never_reads.setsockopt(zmq.RCVHWM, 1)
        never_reads.setsockopt(zmq.RCVBUF, 4096)
        for i in range(300):
            never_reads.send_multipart([b"", max_size_recommend(i, [f"n{j}" for j in range(1000)])])
        time.sleep(8)
        peak = rss_mib(broker)
        dropped = served.stats()["counters"].get("replies_dropped_slow_consumer", 0)
        never_reads.close()
        time.sleep(1)
        rows.append(
            [
                "300 maximum-size replies never read",
                "-",
                "-",
                "-",
                f"broker RSS {start:.0f} -> {peak:.0f} MiB; {dropped} replies dropped as"
                " slow consumer",
            ]
        )
        rows.append(
            [
                "broker process",
                "-",
                "-",
                "-",
                f"same pid throughout: {served.broker_pid() == broker}",
            ]
        )
    finally:
        served.stop()
    return rows


def _chaos(served: Served, seconds: float = 20.0, in_flight: int = 200) -> list[str]:
    """kill -9 of a random als worker every 2 s under `AsyncClient()` defaults."""
    errors: list[str] = []
    answered = 0
    killed: dict[int, float] = {}  # pid -> wall-clock time of the kill
    stop = threading.Event()

    def killer() -> None:
        rng = random.Random(5)
        with Client(served.config.control_endpoint, timeout=1.0) as control:
            while not stop.wait(2.0):
                # One worker dies while the other serves: wait for the supervisor to have
                # brought the last one back (its restart backoff grows with each crash).
                while not stop.is_set() and control.stats()["models"]["als"]["workers"] < 2:
                    time.sleep(0.05)
                pids = served.worker_pids("als")
                if stop.is_set() or len(pids) < 2:
                    continue
                victim = rng.choice(pids)
                os.kill(victim, signal.SIGKILL)
                killed[victim] = time.time()

    async def caller(client: AsyncClient, index: int, until: float) -> None:
        nonlocal answered
        while time.monotonic() < until:
            try:
                await client.recommend(served.users[index % len(served.users)], n=10)
                answered += 1
            except UroRecsError as error:
                errors.append(f"{type(error).__name__}: {error}")

    async def load() -> None:
        async with AsyncClient(served.config.client_endpoint, model="als") as client:
            until = time.monotonic() + seconds
            await asyncio.gather(*(caller(client, i, until) for i in range(in_flight)))

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        asyncio.run(load())
    finally:
        stop.set()
        thread.join()
    counters = served.stats()["counters"]
    detections = sorted(_lost_after_kill(served.log, killed))
    worst = detections[-1] * 1000 if detections else float("nan")
    median = detections[len(detections) // 2] * 1000 if detections else float("nan")
    return [
        f"kill -9 of an als worker every 2 s, {in_flight} in flight, SDK defaults",
        f"{len(errors)} of {answered + len(errors)}",
        "-",
        f"{len(detections)} of {len(detections) + len(killed)} killed",
        f"kill -9 to worker_lost and redelivery: median {median:.1f} ms, worst {worst:.1f} ms;"
        f" {counters.get('requests_redelivered', 0)} redelivered"
        + (f"; errors: {dict(Counter(e.split(':')[0] for e in errors))}" if errors else ""),
    ]


def _lost_after_kill(log: Path, killed: dict[int, float]) -> list[float]:
    """Seconds from each kill to the broker's `worker_lost` for that worker (which is when it
    redelivered what the worker held), from the broker's JSON log."""
    delays = []
    for line in log.read_text(errors="replace").splitlines():
        if '"worker_lost"' not in line:
            continue
        event = json.loads(line)
        pid = int(str(event.get("worker", "")).rpartition("-")[2] or 0)
        if pid in killed:
            at = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
            delays.append(at - killed.pop(pid))
    return delays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("build/attacks"))
    args = parser.parse_args()
    shutil.rmtree(args.dir / "run", ignore_errors=True)
    rows = run(args.dir)
    header = ["attack", "bystander errors", "longest gap", "workers lost", "notes"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print(" | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
