"""Where a served answer's time goes above the two-hop floor, one request at a time.

Each rung adds one piece to the one before it; its p50 minus the previous rung's is what
that piece costs on this machine now:

  1. relay + echo: perf/floor.py's bare relay and echo processes (the two-hop floor);
  2. broker + echo worker, raw client: uro-recs's broker in place of the relay (decoding and
     checking the request, routing, deadlines, accounting); the worker speaks the worker
     protocol but answers with a fixed reply, reading only the request id;
  3. broker + echo worker, SDK: the same through `uro_recs.sdk.Client` (building the request,
     matching the reply, decoding it into a Recommendation);
  4. broker + real worker, raw client: `uro-recs worker` with the model in place of the echo
     worker (its loop, decoding, the model call, encoding);
  5. broker + real worker, SDK: what a Python caller sees.

In this process, for comparison: the model call alone (the engine the worker serves) and
the worker's own work on one request (decode, model call, encode; the request's own encoding,
a few microseconds, is timed with it), so that rung 4's step splits into that work and the
rest (the worker loop, its socket, and caches gone cold between requests). Every rung runs once per
round; rounds interleave; the table gives medians and ranges of the rounds' p50s.

    python -m perf.ladder [--catalogue demo] [--model als] [--seconds 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from uro_recs.app.cli import apply_thread_limits

apply_thread_limits(1)  # before numpy: one BLAS thread, as the served worker has

import msgpack  # noqa: E402
import zmq  # noqa: E402

from perf import floor  # noqa: E402
from perf.bench import prepare_store, server_config, shown, spread  # noqa: E402
from perf.loadgen import RequestMix, RunResult, sequential  # noqa: E402
from uro_recs.app.demo import wait_ready  # noqa: E402
from uro_recs.core import protocol  # noqa: E402
from uro_recs.core.config import BrokerConfig  # noqa: E402
from uro_recs.core.model_store import list_versions  # noqa: E402
from uro_recs.sdk import Client  # noqa: E402
from uro_recs.worker.engine import Engine, RecommendQuery, load_engine  # noqa: E402

N = 10
BROKER = BrokerConfig()  # the defaults the broker runs with here
HEARTBEAT_S = BROKER.heartbeat_ms / 1000  # silent for `liveness` of these, a worker is dead


def serve_echo_worker(endpoint: str, model: str, version: str) -> None:
    """A worker that answers every request with the same items, decoding only its id."""
    sock = floor.context().socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, b"echo-worker")  # the broker refuses libzmq's own names
    sock.connect(endpoint)
    info = {"class": "echo", "n_users": 0, "n_items": N, "ops": ["recommend"], "created_at": ""}
    hello = protocol.WorkerHello(model, version, 64, info, batch=64)
    sock.send_multipart(protocol.encode_ready(hello))
    result = {"user": "", "items": list(range(N)), "cold_start": False}
    next_heartbeat = time.monotonic() + HEARTBEAT_S
    while True:
        if sock.poll(int(HEARTBEAT_S * 1000)):
            frames = sock.recv_multipart()
            header = protocol.parse_worker_header(frames[0])
            if header.command == protocol.REQUEST:
                replies: list[bytes] = []
                for seq, _, body in protocol.parse_packed(protocol.REQUEST, frames):
                    request_id = msgpack.unpackb(body)["id"]
                    replies += (
                        protocol.worker_header(protocol.REPLY, seq),
                        protocol.encode_ok(request_id, result),
                    )
                sock.send_multipart(replies)
            elif header.command == protocol.DISCONNECT:
                sock.send_multipart(protocol.encode_ready(hello))
        if time.monotonic() >= next_heartbeat:
            sock.send(protocol.worker_header(protocol.HEARTBEAT))
            next_heartbeat = time.monotonic() + HEARTBEAT_S


class Setup:
    """A config for a broker serving one model from `store`, in a short temporary path."""

    def __init__(self, store: Path, model: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ladder-"))
        self.config = self.root / "uro-recs.toml"
        self.config.write_text(server_config(self.root / "run", store, model, 1))
        self.client_endpoint = f"ipc://{self.root / 'run' / 'client.sock'}"
        self.workers_endpoint = f"ipc://{self.root / 'run' / 'workers.sock'}"
        self.model = model
        self.version = list_versions(store, model)[-1]

    @contextmanager
    def running(self, worker: list[str]) -> Iterator[None]:
        """The broker and one worker (`worker`: its command line after `python -m`)."""
        cli = ["uro_recs.app.cli", "--config", str(self.config)]
        processes = [spawn([*cli, "broker"]), spawn(worker)]
        try:
            with Client(self.client_endpoint, timeout=2.0) as client:
                wait_ready(client, [self.model])
            yield
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
            for process in processes:
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()

    def echo_worker(self) -> list[str]:
        return ["perf.ladder", "echo-worker", self.workers_endpoint, self.model, self.version]

    def real_worker(self) -> list[str]:
        return ["uro_recs.app.cli", "--config", str(self.config), "worker", "--model", self.model]

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def spawn(module_and_args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", *module_and_args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def raw_client(endpoint: str, model: str, mix: RequestMix, seconds: float, name: str) -> RunResult:
    """A DEALER sending ready-encoded requests, reading replies without decoding them."""
    ids = itertools.count()
    sock = floor.context().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)

    def call(user: str) -> None:
        args = {"user": user, "n": N}
        sock.send_multipart([b"", protocol.encode_request(next(ids), "recommend", model, args)])
        sock.recv_multipart()

    try:
        return timed(call, mix, seconds, name)
    finally:
        sock.close()


def sdk_client(endpoint: str, model: str, mix: RequestMix, seconds: float, name: str) -> RunResult:
    with Client(endpoint, model=model, timeout=BROKER.default_timeout_ms / 1000) as client:
        return timed(lambda user: client.recommend(user, n=N), mix, seconds, name)


def timed(call: Callable[[str], object], mix: RequestMix, seconds: float, name: str) -> RunResult:
    sequential(call, mix, 0.3, name)  # warm-up: connections, lazy imports, caches
    return sequential(call, mix, seconds, name)


def in_process(engine: Engine, mix: RequestMix, seconds: float) -> list[RunResult]:
    """The served engine's model call alone, and with the worker's decoding and encoding."""
    ids = itertools.count()
    timeout_ms = BROKER.default_timeout_ms

    def model_call(user: str) -> object:
        return engine.recommend_batch([RecommendQuery(user, N)])

    def worker_work(user: str) -> bytes:
        args = {"user": user, "n": N}
        body = protocol.encode_request(next(ids), "recommend", engine.name, args, timeout_ms)
        request = protocol.decode_request(body, BROKER.max_message_bytes)
        [answer] = engine.recommend_batch([RecommendQuery(user, N)])
        result = {"user": user, "items": answer.items, "cold_start": answer.cold_start}
        return protocol.encode_ok(request.id, result)

    return [
        timed(model_call, mix, seconds, "model call (in process)"),
        timed(worker_work, mix, seconds, "decode + model call + encode (in process)"),
    ]


RUNGS = (
    "relay + echo (2 hops)",
    "broker + echo worker, raw client",
    "broker + echo worker, SDK",
    "broker + real worker, raw client",
    "broker + real worker, SDK",
)


def one_round(setup: Setup, mix: RequestMix, seconds: float) -> dict[str, float]:
    p50: dict[str, float] = {}
    for row in floor.measure(seconds):
        p50[row["system"]] = row["p50_ms"]
    workers = ((setup.echo_worker(), "echo worker"), (setup.real_worker(), "real worker"))
    for worker, label in workers:
        with setup.running(worker):
            for client, kind in ((raw_client, "raw client"), (sdk_client, "SDK")):
                name = f"broker + {label}, {kind}"
                result = client(setup.client_endpoint, setup.model, mix, seconds, name)
                p50[name] = result.summary()["p50_ms"]
    return p50


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "echo-worker":
        serve_echo_worker(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalogue", default="demo", help="demo (3k items) or large (48k)")
    parser.add_argument("--model", default="als")
    parser.add_argument("--seconds", type=float, default=3.0, help="per rung and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("var/bench"))
    args = parser.parse_args()
    store, data = prepare_store(args.dir, args.catalogue, [args.model])
    mix = RequestMix(known_users=sorted(set(data["user"])))
    setup = Setup(store, args.model)
    engine = load_engine(store, args.model, threads=1)
    rounds: list[dict[str, float]] = []
    try:
        for number in range(args.rounds):
            p50 = one_round(setup, mix, args.seconds)
            for result in in_process(engine, mix, args.seconds):
                p50[result.system] = result.summary()["p50_ms"]
            rounds.append(p50)
            print(f"round {number + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in p50.items()))
    finally:
        setup.remove()
    print_table(rounds)


def print_table(rounds: list[dict[str, Any]]) -> None:
    medians = {name: spread([r[name] for r in rounds]) for name in rounds[0]}
    print(f"\np50 ms, median [min-max] of {len(rounds)} round(s); step: this rung - the one above")
    previous = None
    for name in RUNGS:
        figure = medians[name]
        assert figure is not None
        step = "" if previous is None else f"{figure['median'] - previous:+.3f}"
        print(f"  {name:<44}{shown(figure, '.3f'):>24}{step:>10}")
        previous = figure["median"]
    for name in (n for n in medians if n not in RUNGS and n != "echo (1 hop)"):
        print(f"  {name:<44}{shown(medians[name], '.3f'):>24}")
    work = medians["decode + model call + encode (in process)"]
    echo_raw, real_raw = medians[RUNGS[1]], medians[RUNGS[3]]
    assert work and echo_raw and real_raw
    loop = real_raw["median"] - echo_raw["median"] - work["median"]
    print(f"  the worker's loop and socket beyond the echo worker's: {loop:+.3f} ms")


if __name__ == "__main__":
    main()
