"""Load generators: open loop (Poisson arrivals) and closed loop, over ZeroMQ or HTTP.

Open loop: requests are scheduled at exponentially distributed gaps for the target rate and
each latency is measured from its *intended* send time, so a server that falls behind is
charged for the queueing it causes (no coordinated omission). Closed loop: a fixed number of
requests in flight, a new one sent as each answer arrives. Latencies go into an HDR
histogram (microseconds).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import select
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq
from hdrh.histogram import HdrHistogram

from uro_recs.core import protocol

MAX_LATENCY_US = 60_000_000


@dataclass
class RunResult:
    """One measured run: what was offered, what came back, and how long it took."""

    system: str
    mode: str  # "open", "closed" or "sequential"
    offered_rate: float  # requests/s asked for (open loop); 0 for closed loop
    duration_s: float
    sent: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    histogram: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, MAX_LATENCY_US, 3))

    def record(self, latency_us: float) -> None:
        self.histogram.record_value(max(1, min(int(latency_us), MAX_LATENCY_US)))

    def summary(self) -> dict[str, Any]:
        h = self.histogram
        answered = self.ok + sum(self.errors.values())
        return {
            "system": self.system,
            "mode": self.mode,
            "offered_rate": round(self.offered_rate, 1),
            "achieved_rate": round(self.ok / self.duration_s, 1) if self.duration_s else 0.0,
            "sent": self.sent,
            "ok": self.ok,
            "unanswered": self.sent - answered,
            "errors": dict(self.errors),
            "p50_ms": h.get_value_at_percentile(50) / 1000,
            "p90_ms": h.get_value_at_percentile(90) / 1000,
            "p99_ms": h.get_value_at_percentile(99) / 1000,
            "p999_ms": h.get_value_at_percentile(99.9) / 1000,
            "max_ms": h.get_max_value() / 1000,
        }


@dataclass(frozen=True)
class RequestMix:
    """Random known users plus a share of unknown ones, as uro's traffic has."""

    known_users: list[str]
    unknown_share: float = 0.05
    n: int = 10
    seed: int = 1

    def users(self) -> Callable[[], str]:
        rng = random.Random(self.seed)
        counter = itertools.count()

        def next_user() -> str:
            if rng.random() < self.unknown_share:
                return f"unknown-user-{next(counter)}"
            return rng.choice(self.known_users)

        return next_user


# --- ZeroMQ (the uro-recs wire format) ------------------------------------------------------


def zmq_open_loop(
    endpoint: str, model: str, mix: RequestMix, rate: float, duration_s: float, system: str
) -> RunResult:
    result = RunResult(system, "open", rate, duration_s)
    sock = _dealer(endpoint)
    next_user = mix.users()
    rng = random.Random(mix.seed + 1)
    intended: dict[int, float] = {}
    start = time.perf_counter()
    next_send = start
    end = start + duration_s
    drain_until = end + 5.0
    ids = itertools.count()
    try:
        while True:
            now = time.perf_counter()
            while next_send <= now and next_send < end:
                request_id = next(ids)
                args = {"user": next_user(), "n": mix.n}
                body = protocol.encode_request(request_id, "recommend", model, args, 10_000)
                sock.send_multipart([b"", body])
                intended[request_id] = next_send
                result.sent += 1
                next_send += rng.expovariate(rate)
            if next_send >= end and not intended:
                break
            if now > drain_until:
                break
            wait_s = max(0.0, min(next_send, drain_until) - now) if next_send < end else 0.1
            _wait_readable(sock, wait_s)
            while True:
                try:
                    _, reply = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                _account_zmq(result, reply, intended, time.perf_counter())
    finally:
        sock.close()
    return result


def zmq_closed_loop(
    endpoint: str, model: str, mix: RequestMix, concurrency: int, duration_s: float, system: str
) -> RunResult:
    result = RunResult(system, "closed", 0.0, duration_s)
    sock = _dealer(endpoint)
    next_user = mix.users()
    intended: dict[int, float] = {}
    ids = itertools.count()

    def send() -> None:
        request_id = next(ids)
        args = {"user": next_user(), "n": mix.n}
        sock.send_multipart([b"", protocol.encode_request(request_id, "recommend", model, args)])
        intended[request_id] = time.perf_counter()
        result.sent += 1

    start = time.perf_counter()
    end = start + duration_s
    for _ in range(concurrency):
        send()
    try:
        while intended and time.perf_counter() < end + 5.0:
            if not sock.poll(1000):
                continue
            _, reply = sock.recv_multipart()
            _account_zmq(result, reply, intended, time.perf_counter())
            if time.perf_counter() < end:
                send()
    finally:
        sock.close()
    result.duration_s = time.perf_counter() - start
    return result


def _wait_readable(sock: zmq.Socket[bytes], timeout_s: float) -> None:
    """Sleep until a reply may be waiting or `timeout_s` passes, to the microsecond.

    zmq's poll counts whole milliseconds: below 1 ms it returns at once, and an open loop at
    thousands of requests per second would spin, taking a core from the servers it measures
    on a small machine. select() on the socket's file descriptor sleeps for any fraction of a
    millisecond. That descriptor only signals changes, so check EVENTS before sleeping.
    """
    events, fd = sock.getsockopt(zmq.EVENTS), sock.getsockopt(zmq.FD)
    assert isinstance(events, int) and isinstance(fd, int)
    if not events & zmq.POLLIN:
        select.select([fd], [], [], timeout_s)


def _dealer(endpoint: str) -> zmq.Socket[bytes]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)  # open loop: never block the schedule on a full pipe
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(endpoint)
    return sock


def _account_zmq(result: RunResult, reply: bytes, intended: dict[int, float], now: float) -> None:
    decoded = msgpack.unpackb(reply)
    sent_at = intended.pop(decoded["id"], None)
    if sent_at is None:
        return
    result.record((now - sent_at) * 1e6)
    if decoded["ok"]:
        result.ok += 1
    else:
        result.errors[decoded["error"]["code"]] += 1


# --- HTTP (the FastAPI baseline) --------------------------------------------------------------


class _HttpConnection:
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> _HttpConnection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def post_json(self, host: str, path: str, payload: dict[str, Any]) -> tuple[int, bytes]:
        body = json.dumps(payload).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionResetError("the server closed the connection")
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        content = await self.reader.readexactly(length)
        return int(status_line.split()[1]), content

    def close(self) -> None:
        self.writer.close()


async def _http_run(
    host: str,
    port: int,
    mix: RequestMix,
    rate: float,
    concurrency: int,
    duration_s: float,
    result: RunResult,
) -> None:
    connections = [await _HttpConnection.open(host, port) for _ in range(concurrency)]
    idle: asyncio.Queue[_HttpConnection] = asyncio.Queue()
    for connection in connections:
        idle.put_nowait(connection)
    next_user = mix.users()
    rng = random.Random(mix.seed + 1)
    loop = asyncio.get_running_loop()

    async def one(intended_at: float) -> None:
        connection = await idle.get()
        try:
            status, _ = await connection.post_json(
                host, "/recommend", {"user": next_user(), "n": mix.n}
            )
            result.record((loop.time() - intended_at) * 1e6)
            if status == 200:
                result.ok += 1
            else:
                result.errors[f"http_{status}"] += 1
        except (OSError, asyncio.IncompleteReadError) as exc:
            result.errors[type(exc).__name__] += 1
        finally:
            idle.put_nowait(connection)

    tasks: set[asyncio.Task[None]] = set()
    start = loop.time()
    end = start + duration_s
    if rate > 0:  # open loop: schedule at Poisson times, whatever is still in flight
        next_send = start
        while next_send < end:
            delay = next_send - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(next_send))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            result.sent += 1
            next_send += rng.expovariate(rate)
    else:  # closed loop: each connection sends again as soon as it is answered

        async def keep_busy() -> None:
            while loop.time() < end:
                result.sent += 1
                await one(loop.time())

        tasks = {asyncio.create_task(keep_busy()) for _ in range(concurrency)}
    if tasks:
        await asyncio.wait(tasks, timeout=duration_s + 5.0)
    result.duration_s = max(duration_s, loop.time() - start) if rate <= 0 else duration_s
    for connection in connections:
        connection.close()


def http_run(
    host: str,
    port: int,
    mix: RequestMix,
    *,
    rate: float,
    concurrency: int,
    duration_s: float,
    system: str,
) -> RunResult:
    """Open loop when rate > 0 (on up to `concurrency` connections), else closed loop."""
    result = RunResult(system, "open" if rate > 0 else "closed", rate, duration_s)
    asyncio.run(_http_run(host, port, mix, rate, concurrency, duration_s, result))
    return result


# --- in-process ------------------------------------------------------------------------------


def sequential(
    call: Callable[[str], object], mix: RequestMix, duration_s: float, system: str
) -> RunResult:
    """One caller, one request at a time: the in-process floor and its throughput."""
    result = RunResult(system, "sequential", 0.0, duration_s)
    next_user = mix.users()
    start = time.perf_counter()
    end = start + duration_s
    while True:
        user = next_user()
        began = time.perf_counter()
        if began >= end:
            break
        call(user)
        result.record((time.perf_counter() - began) * 1e6)
        result.sent += 1
        result.ok += 1
    result.duration_s = time.perf_counter() - start
    return result


def main() -> None:
    """Drive a running broker by hand: `python -m perf.loadgen --mode open --rate 2000`."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--endpoint", default="ipc://var/demo/run/client.sock")
    parser.add_argument("--model", default="als")
    parser.add_argument("--mode", choices=["open", "closed"], default="open")
    parser.add_argument("--rate", type=float, default=1000.0, help="requests/s (open loop)")
    parser.add_argument("--concurrency", type=int, default=16, help="in flight (closed loop)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds")
    parser.add_argument("--users", nargs="+", required=True, help="known user ids to ask for")
    args = parser.parse_args()
    mix = RequestMix(known_users=args.users)
    if args.mode == "open":
        result = zmq_open_loop(args.endpoint, args.model, mix, args.rate, args.duration, "cli")
    else:
        result = zmq_closed_loop(
            args.endpoint, args.model, mix, args.concurrency, args.duration, "cli"
        )
    print(json.dumps(result.summary(), indent=1))


if __name__ == "__main__":
    main()
