"""The benchmark: uro-recs against in-process libreco and a FastAPI service, in one run.

    python -m perf.bench                 # both catalogues, ALS and DeepFM (hours: see README)
    python -m perf.bench --catalogues demo --models als --repeats 3
    python -m perf.bench --smoke         # seconds: demo catalogue, ALS, short steps (CI)

For each catalogue and model, on the same saved model version and the same request mix
(random known users plus 5% unknown, n=10), with one BLAS/OpenMP/TF thread everywhere:
  - in-process: libreco's `recommend_user` called in this process, one call at a time;
  - FastAPI: uvicorn with 1 and with 2 worker processes, each holding the model, an
    `async def` handler calling libreco's `recommend_user` (perf/fastapi_app.py), JSON over
    HTTP; with --default-threads once more with the libraries' default thread pools;
  - uro-recs with 1 and with 2 workers, through the broker over IPC; for DeepFM also 1 worker
    serving it two-stage (its own FM terms retrieve 500 candidates, the whole model ranks
    them), with that ranking's recall@10 against full ranking for a sample of users.
Each server gets an open-loop rate sweep (Poisson arrivals, latency from the intended send
time; each step at least --step-s seconds and 1,000 requests); the result is the highest rate
whose p99 stays at or under 10 ms with no errors (bisected three times at the edge), and
the p99 at half that rate; then a closed-loop run with 64 requests in flight gives the
saturated throughput, whatever the latency. One sweep is not a number on a shared machine:
the whole round (in-process, then every server in turn) runs --repeats times, interleaved,
and the summary gives each figure's median with its range. CPU per answered request (the
whole server's process tree, from /proc) is measured at 2,000/s and at each server's edge,
against in-process's own CPU time per call. Each round starts with perf/floor.py: what one
and two ZeroMQ hops between idle Python processes cost on this machine at that moment. Writes a
JSON file and a PNG chart (perf/chart.py; `python -m perf.chart <json> <png>` redraws it),
prints a summary table with each system's ratio to the best FastAPI and to in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Final

from uro_recs.app.cli import apply_thread_limits

apply_thread_limits(1)  # before numpy: like for like, one thread in every system

import pandas as pd  # noqa: E402

from perf import floor  # noqa: E402
from perf.chart import chart  # noqa: E402
from perf.loadgen import (  # noqa: E402
    RequestMix,
    RunResult,
    http_run,
    sequential,
    zmq_closed_loop,
    zmq_open_loop,
)
from uro_recs.app.demo import start_serving, wait_ready  # noqa: E402
from uro_recs.core.config import OWN_FM  # noqa: E402
from uro_recs.core.model_store import list_versions  # noqa: E402
from uro_recs.core.run_lock import recorded_pid  # noqa: E402
from uro_recs.pipeline.demo_data import make_interactions  # noqa: E402
from uro_recs.pipeline.training import train_and_save  # noqa: E402
from uro_recs.sdk import Client  # noqa: E402
from uro_recs.worker.deepfm_engine import DeepFMEngine  # noqa: E402
from uro_recs.worker.engine import load_engine  # noqa: E402
from uro_recs.worker.libreco_engine import LibrecoEngine  # noqa: E402

IN_PROCESS: Final = "in-process libreco"
TWO_STAGE: Final = "uro-recs 1 worker, two-stage"
TWO_STAGE_CANDIDATES: Final = 500
TWO_STAGE_OPTIONS: Final = f'retrieve_from = "{OWN_FM}"\ncandidates = {TWO_STAGE_CANDIDATES}\n'

P99_BUDGET_MS = 10.0
SATURATION_IN_FLIGHT = 64
CATALOGUES: dict[str, dict[str, int]] = {
    "demo": {"n_users": 2000, "n_items": 3000, "n_interactions": 100_000, "seed": 7},
    "large": {"n_users": 40_000, "n_items": 50_000, "n_interactions": 1_000_000, "seed": 11},
}


@dataclass(frozen=True)
class Plan:
    catalogues: list[str]
    models: list[str]
    step_s: float
    growth: float
    max_steps: int
    bisect_steps: int  # after the first rate over budget, halve the gap this many times
    min_samples: int  # requests per step at least, so that its p99 means something
    smoke: bool
    default_threads: bool  # also sweep FastAPI with the libraries' default thread pools
    repeats: int = 1  # rounds of every system, interleaved
    cpu_rate: float = 2000.0  # requests/s at which CPU per request is compared


def prepare_store(root: Path, catalogue: str, models: list[str]) -> tuple[Path, pd.DataFrame]:
    store = root / catalogue / "store"
    data = make_interactions(**CATALOGUES[catalogue])
    for kind in models:
        if not list_versions(store, kind):
            started = time.perf_counter()
            # No hold-out evaluation: the benchmark needs the model, not its metrics (libreco's
            # evaluation scores every user against every item, hours for DeepFM at 50k items).
            train_and_save(store, kind, data, kind, threads=2, test_fraction=0.0)
            print(f"trained {kind} on {catalogue} in {time.perf_counter() - started:.0f} s")
    return store, data


# The lowest rate a sweep tries: at 1,000 requests a step, lower rates take minutes each.
MIN_SWEEP_RATE: Final = 10.0


def sweep(
    run_at: Callable[[float, float], RunResult], plan: Plan, first_rate: float
) -> list[dict[str, Any]]:
    """Raise the offered rate until p99 > budget or errors appear, narrow the gap between the
    last rate within budget and the first over it by bisection; then run at half the best.

    When the first rate is already over budget, lower it instead (down to half of it, and not
    under MIN_SWEEP_RATE: slower steps take minutes) to find a rate within budget to start from.
    """
    steps: list[dict[str, Any]] = []
    rate = first_rate
    best = 0.0
    failed = 0.0
    lowest = max(first_rate / 2, MIN_SWEEP_RATE)

    def run(rate: float) -> dict[str, Any]:
        # Long enough for min_samples requests: a p99 of 150 requests is its 2nd-worst one.
        return run_at(rate, max(plan.step_s, plan.min_samples / rate)).summary()

    run_at(rate, plan.step_s)  # warm-up, not counted: the first requests pay for lazy imports
    for _ in range(plan.max_steps):
        summary = run(rate)
        steps.append(summary)
        print_step(summary)
        if within_budget(summary):
            best = rate
            if failed:
                break  # a rate within budget below the first one over it
            rate *= plan.growth
        else:
            failed = rate
            rate /= plan.growth
            if best or rate < lowest:
                break
    for _ in range(plan.bisect_steps if best and failed else 0):
        rate = round((best + failed) / 2)
        summary = run(rate)
        steps.append(summary)
        print_step(summary, "bisecting")
        if within_budget(summary):
            best = rate
        else:
            failed = rate
    if best:
        half = run(best / 2)
        half["half_of_best"] = True
        steps.append(half)
        print_step(half, "half of best")
    return steps


def print_step(summary: dict[str, Any], note: str = "") -> None:
    print(
        f"    {summary['system']:<22} {summary['mode']:<10} offered "
        f"{summary['offered_rate']:>8.0f}/s  achieved {summary['achieved_rate']:>8.0f}/s  "
        f"p50 {summary['p50_ms']:7.3f}  p99 {summary['p99_ms']:8.3f} ms  "
        f"errors {summary['errors'] or 0}  {note}"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "TF_NUM_INTRAOP_THREADS",
    "TF_NUM_INTEROP_THREADS",
)


@contextmanager
def fastapi_server(
    store: Path, model: str, workers: int, threads: int = 1
) -> Iterator[tuple[int, int, list[int]]]:
    """A FastAPI baseline listening: its port, its pid, the pids of the processes holding the
    model."""
    port = free_port()
    env = {**os.environ, "URO_RECS_BENCH_STORE": str(store), "URO_RECS_BENCH_MODEL": model}
    env["URO_RECS_BENCH_THREADS"] = str(threads)
    ready = Path(tempfile.mkdtemp(prefix="fastapi-ready-"))
    env["URO_RECS_BENCH_READY_DIR"] = str(ready)
    if threads != 1:  # nothing pinned: the pools size themselves, as they do by default
        for name in THREAD_VARIABLES:
            env.pop(name, None)
    command = [sys.executable, "-m", "uvicorn", "perf.fastapi_app:app", "--port", str(port)]
    # The load generator keeps a pool of connections, idle for seconds at low rates: keep them
    # open as behind any pooling client (uvicorn closes them after 5 s by default).
    options = ["--log-level", "warning", "--no-access-log", "--timeout-keep-alive", "3600"]
    if workers > 1:
        options += ["--workers", str(workers)]
    # libreco prints a line for each unknown user: to nowhere, as a service would log it.
    process = subprocess.Popen(
        [*command, *options], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_listening(port, ready, process, workers)
        yield port, process.pid, [int(path.name) for path in ready.iterdir()]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        shutil.rmtree(ready)


def wait_listening(port: int, ready: Path, process: subprocess.Popen[bytes], workers: int) -> None:
    """Until every uvicorn worker process has loaded the model (each leaves a file saying so)
    and the port takes connections."""
    deadline = time.monotonic() + 180
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the FastAPI baseline did not start")
        if len(list(ready.iterdir())) >= workers:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                pass
        time.sleep(0.2)


def memory_kib(pid: int) -> dict[str, int]:
    """RSS and PSS (shared pages divided among the processes sharing them) of one process."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("Rss", "Pss"):
            fields[name.lower() + "_kib"] = int(rest.split()[0])
    return fields


def worker_memory(serve_pid: int) -> list[dict[str, int]]:
    """Memory of each worker that `uro-recs serve` (serve_pid) runs."""
    children = Path(f"/proc/{serve_pid}/task/{serve_pid}/children").read_text().split()
    workers = [
        int(pid)
        for pid in children
        if b"worker" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    ]
    return [memory_kib(pid) for pid in workers]


def server_config(run_dir: Path, store: Path, model: str, workers: int) -> str:
    """The benchmark's uro-recs config: one model, one BLAS thread and 64 slots per worker."""
    return (
        f'run_dir = "{run_dir.absolute()}"\nstore = "{store.absolute()}"\nlog_format = "json"\n'
        f'[worker]\nthreads = 1\nslots = 64\n[[models]]\nname = "{model}"\nworkers = {workers}\n'
    )


@contextmanager
def uro_recs_server(
    root: Path, store: Path, model: str, workers: int, model_options: str = ""
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`uro-recs serve` of one model; `model_options` are TOML lines for its [[models]] table."""
    run_dir = root / "run"
    config = root / f"uro-recs-{model}-{workers}.toml"
    config.write_text(server_config(run_dir, store, model, workers) + model_options)
    endpoint = f"ipc://{run_dir.absolute() / 'client.sock'}"
    process = start_serving(config, quiet=True)
    try:
        with Client(endpoint, timeout=2.0) as client:
            wait_ready(client, [model])
            while sum(m.workers for m in client.info() if m.name == model) < workers:
                time.sleep(0.1)
        # A broker answered: it must be ours, not one a concurrent benchmark left on run_dir.
        holder = recorded_pid(run_dir)
        if holder not in process_tree(process.pid):
            raise RuntimeError(
                f"another broker (pid {holder}) serves {run_dir}: is another benchmark running"
                f" with --dir {root}?"
            )
        yield endpoint, process
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def bench_model(root: Path, catalogue: str, model: str, plan: Plan) -> dict[str, Any]:
    store, data = prepare_store(root, catalogue, [model])
    mix = RequestMix(known_users=sorted(set(data["user"])))
    print(f"\n== {catalogue} catalogue, {model}")
    engine = load_engine(store, model, threads=1, fast_path=False)
    assert isinstance(engine, LibrecoEngine)
    libreco_model = engine.libreco_model

    def in_process() -> dict[str, Any]:
        cpu_before = time.process_time()
        with open(os.devnull, "w") as null, redirect_stdout(null):  # libreco prints unknowns
            summary = sequential(
                lambda u: libreco_model.recommend_user(user=u, n_rec=mix.n, cold_start="popular"),
                mix,
                max(plan.step_s, 1.0),
                IN_PROCESS,
            ).summary()
        summary["cpu_ms_per_request"] = per_request(time.process_time() - cpu_before, summary)
        print_step(summary)
        return summary

    # Each runner takes (its name, the sweep's first rate).
    servers: list[tuple[str, Callable[[str, float], dict[str, Any]]]] = [
        ("fastapi", partial(fastapi_run, store, model, mix, plan, 1, 1)),
        ("fastapi 2 workers", partial(fastapi_run, store, model, mix, plan, 2, 1)),
    ]
    if plan.default_threads:
        threads = os.cpu_count() or 1
        servers.append(
            ("fastapi default threads", partial(fastapi_run, store, model, mix, plan, 1, threads))
        )
    servers += [
        ("uro-recs 1 worker", partial(uro_recs_run, root, store, model, mix, plan, 1, "")),
        ("uro-recs 2 workers", partial(uro_recs_run, root, store, model, mix, plan, 2, "")),
    ]
    recall = None
    if model == "deepfm" and not plan.smoke:
        recall = two_stage_recall(store, mix.known_users, mix.n)
        print(
            f"  two-stage ({OWN_FM}, K={TWO_STAGE_CANDIDATES}) recall@{mix.n} against full"
            f" ranking: mean {recall['mean']:.3f}, worst user {recall['worst']:.2f}"
            f" ({recall['users']} users); one call in this process, p50: full ranking"
            f" {recall['full_p50_ms']:.3f} ms, two-stage {recall['two_stage_p50_ms']:.3f} ms"
        )
        two_stage = partial(uro_recs_run, root, store, model, mix, plan, 1, TWO_STAGE_OPTIONS)
        servers.append((TWO_STAGE, two_stage))
    in_process_runs: list[dict[str, Any]] = []
    floors: list[list[dict[str, Any]]] = []
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in servers}
    for round_ in range(plan.repeats):
        print(f"  -- round {round_ + 1} of {plan.repeats}")
        # What two process hops cost here before any work, this round: the bar under the
        # overhead target (it moves with the machine's load like everything else).
        floors.append(floor.measure(max(plan.step_s, 1.0)))
        for row in floors[-1]:
            print_step(row, "ZeroMQ floor, no work done")
        in_process_runs.append(in_process())
        # Start each sweep well below what one process manages in-process (slow models too).
        first = in_process_runs[0]["achieved_rate"]
        first_rate = 200.0 if plan.smoke else max(10.0, round(first / 20, -1))
        for name, run in servers:
            outcome = run(name, first_rate)
            runs[name].append({**outcome, "system": name, "max_rate": best_rate(outcome["steps"])})
    return {
        "catalogue": catalogue,
        "model": model,
        "zmq_floor": floors,
        "in_process": in_process_runs,
        "runs": runs,
        "two_stage_recall": recall,
    }


def two_stage_recall(
    store: Path,
    known_users: list[str],
    n: int,
    candidates: int = TWO_STAGE_CANDIDATES,
    sample: int = 300,
) -> dict[str, Any]:
    """The share of full ranking's top n that DeepFM served two-stage (OWN_FM retrieving
    `candidates`) also returns, for a fixed sample of known users, in this process: the mean
    and the worst user's; and the p50 of each engine's call, the two taking turns per user
    (what a worker's model call costs, without the hops)."""
    full = load_engine(store, "deepfm", threads=1)
    staged = load_engine(store, "deepfm", threads=1)
    assert isinstance(full, DeepFMEngine) and isinstance(staged, DeepFMEngine)
    staged.retrieve_with(None, candidates)
    users = random.Random(5).sample(known_users, min(sample, len(known_users)))
    full.recommend(users[:5], n, True)  # warm-up, not counted
    staged.recommend(users[:5], n, True)
    recalls, full_ms, staged_ms = [], [], []
    for user in users:
        started = time.perf_counter()
        (reference,) = full.recommend([user], n, True)
        full_ms.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        (answer,) = staged.recommend([user], n, True)
        staged_ms.append((time.perf_counter() - started) * 1000)
        if reference.items:
            recalls.append(recall_of(answer.items, reference.items))
    return {
        "retrieve_from": OWN_FM,
        "candidates": candidates,
        "users": len(recalls),
        "mean": statistics.mean(recalls),
        "worst": min(recalls),
        "full_p50_ms": statistics.median(full_ms),
        "two_stage_p50_ms": statistics.median(staged_ms),
    }


def recall_of(answer: list[Any], reference: list[Any]) -> float:
    """The share of `reference` (full ranking's top n) that `answer` also returns."""
    return len(set(answer) & set(reference)) / len(reference)


def fastapi_run(
    store: Path,
    model: str,
    mix: RequestMix,
    plan: Plan,
    workers: int,
    threads: int,
    name: str,
    first_rate: float,
) -> dict[str, Any]:
    with fastapi_server(store, model, workers, threads) as (port, server, pids):

        def at_rate(rate: float, seconds: float) -> RunResult:
            return http_run(
                "127.0.0.1", port, mix, rate=rate, concurrency=64, duration_s=seconds, system=name
            )

        steps = sweep(at_rate, plan, first_rate)
        cpu = cpu_steps(at_rate, server, plan, best_rate(steps))
        saturated = at_rate(0, plan.step_s).summary()
        print_step(saturated, f"{SATURATION_IN_FLIGHT} in flight")
        memory = [memory_kib(p) for p in pids]
        return {"steps": steps, "cpu": cpu, "saturated": saturated, "memory_kib": memory}


def uro_recs_run(
    root: Path,
    store: Path,
    model: str,
    mix: RequestMix,
    plan: Plan,
    workers: int,
    model_options: str,
    name: str,
    first_rate: float,
) -> dict[str, Any]:
    with uro_recs_server(root, store, model, workers, model_options) as (endpoint, serve):
        # One request at a time through the SDK, measured like the in-process baseline.
        with Client(endpoint, model=model, timeout=5.0) as client:
            unloaded = sequential(
                partial(client.recommend, n=mix.n), mix, max(plan.step_s, 1.0), name
            ).summary()
        print_step(unloaded, "one at a time through the SDK")
        memory = worker_memory(serve.pid)

        def at_rate(rate: float, seconds: float) -> RunResult:
            return zmq_open_loop(endpoint, model, mix, rate, seconds, name)

        steps = [{**unloaded, "unloaded": True}, *sweep(at_rate, plan, first_rate)]
        cpu = cpu_steps(at_rate, serve.pid, plan, best_rate(steps))
        saturated = zmq_closed_loop(
            endpoint, model, mix, SATURATION_IN_FLIGHT, plan.step_s, name
        ).summary()
        print_step(saturated, f"{SATURATION_IN_FLIGHT} in flight")
        return {"steps": steps, "cpu": cpu, "saturated": saturated, "memory_kib": memory}


def cpu_steps(
    at_rate: Callable[[float, float], RunResult], root: int, plan: Plan, edge: float
) -> list[dict[str, Any]]:
    """CPU per answered request of the whole server (every process under `root`: broker and
    workers, or uvicorn and its workers), at plan.cpu_rate and at the server's own edge."""
    steps = []
    for rate, where in ((plan.cpu_rate, "fixed"), (edge, "edge")):
        if not rate:
            continue
        before, loadgen_before = tree_cpu_seconds(root), time.process_time()
        summary = at_rate(rate, plan.step_s).summary()
        summary["cpu_ms_per_request"] = per_request(tree_cpu_seconds(root) - before, summary)
        # The load generator shares the machine's cores: what it costs per request too.
        loadgen = time.process_time() - loadgen_before
        summary["loadgen_cpu_ms_per_request"] = per_request(loadgen, summary)
        summary["cpu_at"] = where
        print_step(
            summary,
            f"CPU per request: server {summary['cpu_ms_per_request'] or 0:.3f} ms,"
            f" load generator {summary['loadgen_cpu_ms_per_request'] or 0:.3f} ms",
        )
        steps.append(summary)
    return steps


def per_request(cpu_seconds: float, summary: dict[str, Any]) -> float | None:
    return round(1000 * cpu_seconds / summary["ok"], 4) if summary["ok"] else None


def process_tree(root: int) -> list[int]:
    """`root` and every process under it that is still there (Linux /proc)."""
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue  # gone meanwhile
        found.append(pid)
    return found


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU time of `root` and every process under it."""
    total = 0.0
    for pid in process_tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def within_budget(summary: dict[str, Any]) -> bool:
    """p99 within budget, every request answered, none with an error.

    Open loop charges queueing to latency (measured from the intended send time), so a server
    (or a load generator) that cannot keep up shows as a p99 over budget.
    """
    return (
        summary["p99_ms"] <= P99_BUDGET_MS and not summary["errors"] and summary["unanswered"] == 0
    )


def best_rate(steps: list[dict[str, Any]]) -> float:
    rates = [
        s["offered_rate"]
        for s in steps
        if not s.get("unloaded") and not s.get("half_of_best") and within_budget(s)
    ]
    return max(rates, default=0.0)


def spread(values: list[float | None]) -> dict[str, float] | None:
    """Median and range of one figure over the rounds (None where no round has it)."""
    known = [v for v in values if v is not None]
    if not known:
        return None
    return {"median": statistics.median(known), "min": min(known), "max": max(known)}


def figures(run: dict[str, Any]) -> dict[str, float | None]:
    """One round of one server: its max rate, p50 one at a time, p99 at half, saturated, PSS."""
    steps = run["steps"]
    unloaded = next((s for s in steps if s.get("unloaded")), None)
    half = next((s for s in steps if s.get("half_of_best")), None)
    return {
        "max_rate": run["max_rate"],
        "p50_unloaded_ms": unloaded["p50_ms"] if unloaded else None,
        "p99_at_half_ms": half["p99_ms"] if half else None,
        "saturated_rate": run["saturated"]["achieved_rate"],
        "pss_mib": sum(m["pss_kib"] for m in run["memory_kib"]) / 1024,
        "cpu_ms_fixed": cpu_at(run, "fixed"),
        "cpu_ms_edge": cpu_at(run, "edge"),
    }


def cpu_at(run: dict[str, Any], where: str) -> float | None:
    return next((s["cpu_ms_per_request"] for s in run.get("cpu", []) if s["cpu_at"] == where), None)


FIGURES = (
    "max_rate",
    "p50_unloaded_ms",
    "p99_at_half_ms",
    "saturated_rate",
    "pss_mib",
    "cpu_ms_fixed",
    "cpu_ms_edge",
)


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A row per system: each figure's median and range over the rounds, and the max rate's
    and saturated rate's ratios to the best FastAPI (by median) and to in-process, and the
    CPU per request's ratio to in-process."""
    rows = []
    for result in results:
        base = [r["achieved_rate"] for r in result["in_process"]]
        in_process_cpu = spread([r.get("cpu_ms_per_request") for r in result["in_process"]])
        system_rows: list[dict[str, Any]] = [
            {
                "system": IN_PROCESS,
                "max_rate": spread(base),
                "p50_unloaded_ms": spread([r["p50_ms"] for r in result["in_process"]]),
                "p99_at_half_ms": None,
                "saturated_rate": spread(base),
                "pss_mib": None,
                # one call at a time on one core: its CPU per request, whatever the rate
                "cpu_ms_fixed": in_process_cpu,
                "cpu_ms_edge": in_process_cpu,
            }
        ]
        for system, runs in result["runs"].items():
            rounds = [figures(run) for run in runs]
            system_rows.append(
                {"system": system} | {k: spread([r[k] for r in rounds]) for k in FIGURES}
            )
        fastapi = [r for r in system_rows if r["system"].startswith("fastapi")]
        for row in system_rows:
            for figure in ("max_rate", "saturated_rate"):
                row[f"{figure}_vs_in_process"] = ratio(row[figure], system_rows[0][figure])
                best = max((r[figure]["median"] for r in fastapi if r[figure]), default=0.0)
                row[f"{figure}_vs_fastapi"] = ratio(row[figure], {"median": best})
            for figure in ("cpu_ms_fixed", "cpu_ms_edge"):
                row[f"{figure}_vs_in_process"] = ratio(row[figure], system_rows[0][figure])
            rows.append({"catalogue": result["catalogue"], "model": result["model"], **row})
    return rows


def ratio(a: dict[str, float] | None, b: dict[str, float] | None) -> float | None:
    if not a or not b or not b["median"]:
        return None
    return round(a["median"] / b["median"], 2)


def print_table(rows: list[dict[str, Any]], repeats: int, cpu_rate: float) -> None:
    print(f"\nmedian [min-max] of {repeats} round(s); ratios of medians")
    print(
        f"{'catalogue':<10}{'model':<8}{'system':<30}{'max rate/s p99<=10ms':>26}"
        f"{'xFastAPI':>9}{'xin-proc':>9}{'p50 unloaded ms':>24}{'p99 @ half ms':>20}"
        f"{'saturated/s':>22}{'xFastAPI':>9}{'PSS MiB':>9}"
        f"{f'CPU ms/req @{cpu_rate:.0f}/s':>24}{'xin-proc':>9}{'CPU ms/req @edge':>24}"
    )
    for row in rows:
        print(
            f"{row['catalogue']:<10}{row['model']:<8}{row['system']:<30}"
            f"{max_rate_shown(row['max_rate']):>26}{times(row['max_rate_vs_fastapi']):>9}"
            f"{times(row['max_rate_vs_in_process']):>9}"
            f"{shown(row['p50_unloaded_ms'], '.3f'):>24}{shown(row['p99_at_half_ms'], '.1f'):>20}"
            f"{shown(row['saturated_rate'], '.0f'):>22}{times(row['saturated_rate_vs_fastapi']):>9}"
            f"{shown(row['pss_mib'], '.0f', spread_too=False):>9}"
            f"{shown(row['cpu_ms_fixed'], '.3f'):>24}{times(row['cpu_ms_fixed_vs_in_process']):>9}"
            f"{shown(row['cpu_ms_edge'], '.3f'):>24}"
        )


def shown(figure: dict[str, float] | None, spec: str, spread_too: bool = True) -> str:
    if figure is None:
        return "-"
    median = format(figure["median"], spec)
    if not spread_too or figure["min"] == figure["max"]:
        return median
    return f"{median} [{figure['min']:{spec}}-{figure['max']:{spec}}]"


def max_rate_shown(figure: dict[str, float] | None) -> str:
    if figure is not None and figure["max"] == 0:
        return "none within budget"
    return shown(figure, ".0f")


def times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few seconds, for CI")
    parser.add_argument("--catalogues", default="demo,large")
    parser.add_argument("--models", default="als,deepfm")
    parser.add_argument("--step-s", type=float, default=3.0)
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds of every system, interleaved (default 3)"
    )
    parser.add_argument(
        "--default-threads",
        action="store_true",
        help="also FastAPI with the libraries' default thread pools (one per core)",
    )
    parser.add_argument("--dir", type=Path, default=Path("var/bench"))
    parser.add_argument("--out", type=Path, default=Path("perf/results"))
    args = parser.parse_args()
    plan = Plan(
        catalogues=["demo"] if args.smoke else args.catalogues.split(","),
        models=["als"] if args.smoke else args.models.split(","),
        step_s=0.5 if args.smoke else args.step_s,
        growth=2.0 if args.smoke else 1.5,
        max_steps=2 if args.smoke else 14,
        bisect_steps=0 if args.smoke else 3,
        min_samples=0 if args.smoke else 1_000,
        smoke=args.smoke,
        default_threads=args.default_threads and not args.smoke,
        repeats=1 if args.smoke else args.repeats,
        cpu_rate=200.0 if args.smoke else 2000.0,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name = "smoke" if args.smoke else f"bench-{stamp}"
    results: list[dict[str, Any]] = []
    report: dict[str, Any] = {}
    for catalogue in plan.catalogues:
        for model in plan.models:
            results.append(bench_model(args.dir, catalogue, model, plan))
            report = {  # rewritten after each model, so a long run keeps what it measured
                "created_at": stamp,
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "threads": "1 everywhere (OMP/OpenBLAS/MKL/TF intra+inter op), except"
                " 'fastapi default threads': one per core",
                "layout": "results[].runs[system][round] ="
                " {steps, cpu, saturated, memory_kib, max_rate}; results[].in_process[round];"
                " results[].zmq_floor[round]",
                "p99_budget_ms": P99_BUDGET_MS,
                "plan": plan.__dict__,
                "summary": summarize(results),
                "results": results,
            }
            (args.out / f"{name}.json").write_text(json.dumps(report, indent=1))
    print_table(summarize(results), plan.repeats, plan.cpu_rate)
    for result in results:
        floors = [row for rows in result["zmq_floor"] for row in rows]
        p50s = {
            row["system"]: spread([r["p50_ms"] for r in floors if r["system"] == row["system"]])
            for row in floors
        }
        print(
            f"ZeroMQ floor during {result['catalogue']} {result['model']}, one request at a time: "
            + ", ".join(f"{system} p50 {shown(p50, '.3f')} ms" for system, p50 in p50s.items())
        )
        if recall := result.get("two_stage_recall"):
            print(
                f"{TWO_STAGE} on {result['catalogue']}: {recall['retrieve_from']} retrieves"
                f" {recall['candidates']}, recall@10 against full ranking {recall['mean']:.3f}"
                f" (worst user {recall['worst']:.2f}, {recall['users']} users)"
            )
    chart(report, args.out / f"{name}.png")
    print(f"\nwrote {args.out / name}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
