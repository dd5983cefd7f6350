"""Overhead of one `recommend` through the sidecar against the same call in-process.

Trains (or reuses) the demo models, starts `uro-recs serve` with N ALS workers on IPC, then in
one run, one request at a time, on the same saved model and the same users:
  - libreco's `recommend_user` called in this process (the floor);
  - the worker's engine called in this process (what a worker does per request);
  - the SDK's `Client.recommend` over IPC through the broker;
and reports p50/p90/p99 for each, the overhead of the sidecar, and RSS/PSS per worker.

    python perf/overhead.py [--requests 5000] [--workers 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from uro_recs.cli import apply_thread_limits

apply_thread_limits(1)  # like for like: workers run with one thread each

import numpy as np  # noqa: E402

from uro_recs.config import load_config  # noqa: E402
from uro_recs.demo import prepare, start_serving, wait_ready  # noqa: E402
from uro_recs.sdk import Client  # noqa: E402
from uro_recs.worker.engine import load_engine  # noqa: E402
from uro_recs.worker.libreco_engine import LibrecoEngine  # noqa: E402


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    values = np.asarray(samples_ms)
    return {
        "p50_ms": round(float(np.percentile(values, 50)), 4),
        "p90_ms": round(float(np.percentile(values, 90)), 4),
        "p99_ms": round(float(np.percentile(values, 99)), 4),
        "max_ms": round(float(values.max()), 4),
    }


def timed(call: Callable[[str], object], users: list[str]) -> list[float]:
    samples = []
    for user in users:
        started = time.perf_counter_ns()
        call(user)
        samples.append((time.perf_counter_ns() - started) / 1e6)
    return samples


def memory_kib(pid: int) -> dict[str, int]:
    """RSS and PSS (shared pages divided among the processes sharing them) of one process."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("Rss", "Pss"):
            fields[name.lower() + "_kib"] = int(rest.split()[0])
    return fields


def worker_pids(serve_pid: int) -> list[int]:
    children = Path(f"/proc/{serve_pid}/task/{serve_pid}/children").read_text().split()
    return [
        int(pid)
        for pid in children
        if b"worker" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=Path("var/demo"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    config_path, data = prepare(args.dir)
    config = load_config(config_path)
    rng = random.Random(11)
    known = sorted(set(data["user"]))
    users = [rng.choice(known) for _ in range(args.requests)]

    engine = load_engine(config.store, "als", threads=1)  # what a worker serves with
    through_libreco = load_engine(config.store, "als", threads=1, fast_path=False)
    assert isinstance(through_libreco, LibrecoEngine)
    model = through_libreco.libreco_model
    warm = users[:200]
    timed(lambda u: model.recommend_user(user=u, n_rec=10), warm)
    timed(lambda u: engine.recommend([u], 10, True), warm)
    in_process = timed(lambda u: model.recommend_user(user=u, n_rec=10), users)
    engine_call = timed(lambda u: engine.recommend([u], 10, True), users)

    # Only ALS workers, so the numbers are about one model.
    bench_config = config_path.with_name("overhead.toml")
    text = config_path.read_text().split("[[models]]")[0]
    bench_config.write_text(f'{text}[[models]]\nname = "als"\nworkers = {args.workers}\n')
    serve = start_serving(bench_config)
    try:
        with Client(config.client_endpoint, model="als", timeout=5.0) as client:
            wait_ready(client, ["als"])
            while sum(m.workers for m in client.info()) < args.workers:
                time.sleep(0.1)
            timed(lambda u: client.recommend(u, n=10), warm)
            over_ipc = timed(lambda u: client.recommend(u, n=10), users)
        memory = {str(pid): memory_kib(pid) for pid in worker_pids(serve.pid)}
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)

    results: dict[str, Any] = {
        "requests": args.requests,
        "workers": args.workers,
        "catalogue_items": engine.n_items,
        "libreco_recommend_user_in_process": percentiles(in_process),
        "engine_in_process": percentiles(engine_call),
        "sdk_over_ipc": percentiles(over_ipc),
        "worker_memory": memory,
    }
    base = results["libreco_recommend_user_in_process"]
    ipc = results["sdk_over_ipc"]
    results["overhead_p50_us"] = round(1000 * (ipc["p50_ms"] - base["p50_ms"]), 1)
    print(f"ALS, {engine.n_items} items, {args.requests} sequential recommend calls, n=10\n")
    print(f"{'path':<40}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for name in ("libreco_recommend_user_in_process", "engine_in_process", "sdk_over_ipc"):
        row = results[name]
        print(
            f"{name:<40}{row['p50_ms']:>10.3f}{row['p90_ms']:>10.3f}"
            f"{row['p99_ms']:>10.3f}{row['max_ms']:>10.3f}"
        )
    print(f"\nsidecar overhead at p50: {results['overhead_p50_us']} µs")
    for pid, mem in memory.items():
        rss, pss = mem["rss_kib"] / 1024, mem["pss_kib"] / 1024
        print(f"worker {pid}: RSS {rss:.0f} MiB, PSS {pss:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
