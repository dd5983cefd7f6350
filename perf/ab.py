"""Two builds of uro-recs side by side: is a change faster, and by how much?

    python -m perf.ab --base var/ab/base              # this tree against an installed build
    python -m perf.ab --base var/ab/base --repeats 5 --workers 1,2

`--base` is a folder holding another build of the `uro_recs` package, made with
`pip install --no-deps --target DIR .` from a checkout of the revision to compare against; its
servers run with that folder first on PYTHONPATH, the others with this environment's install.
Both serve the same saved model (demo catalogue, ALS) to the same request mix with one BLAS
thread. Each round, for each build and worker count in turn (interleaved, so the machine's
drift falls on both): p50 one request at a time through the SDK; p50 and p99 at an open-loop
200/s (the latency target's rate); CPU per answered request of the server's whole process tree
at an open-loop --cpu-rate; throughput and CPU per request with 64 requests in flight. Each
round also measures the two-hop ZeroMQ floor (perf/floor.py) and in-process libreco's CPU per
call. Prints each figure's median over the rounds with its range, and the ratio of the two
builds' medians; writes the rounds as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from functools import partial
from pathlib import Path
from typing import Any

from perf import bench, floor
from perf.loadgen import RequestMix, sequential, zmq_closed_loop, zmq_open_loop
from uro_recs.sdk import Client
from uro_recs.worker.engine import load_engine
from uro_recs.worker.libreco_engine import LibrecoEngine

MODEL = "als"
# What each round records per build and worker count, in the order the table prints them.
FIGURES = {
    "sdk_p50_ms": "p50 one at a time (SDK), ms",
    "p50_200_ms": "p50 at 200/s, ms",
    "p99_200_ms": "p99 at 200/s, ms",
    "cpu_fixed_ms": "CPU per request at --cpu-rate, ms",
    "p99_fixed_ms": "p99 at --cpu-rate, ms",
    "saturated_rate": "throughput, 64 in flight, /s",
    "cpu_saturated_ms": "CPU per request, 64 in flight, ms",
}


@contextmanager
def python_path(folder: Path | None) -> Iterator[None]:
    """Servers started inside run the build in `folder` (None: this environment's)."""
    before = os.environ.get("PYTHONPATH")
    if folder is not None:
        os.environ["PYTHONPATH"] = str(folder.absolute())
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


def measure_build(
    root: Path, store: Path, mix: RequestMix, build: Path | None, workers: int, args: Any
) -> dict[str, float | None]:
    name = f"{'base' if build else 'this'} {workers}w"
    with python_path(build), bench.uro_recs_server(root, store, MODEL, workers) as (end, serve):
        with Client(end, model=MODEL, timeout=5.0) as client:
            sequential(partial(client.recommend, n=mix.n), mix, 1.0, name)  # warm-up
            sdk = sequential(partial(client.recommend, n=mix.n), mix, args.step_s, name).summary()
        low = zmq_open_loop(end, MODEL, mix, 200.0, args.step_s, name).summary()
        fixed, cpu_fixed = with_cpu(
            serve.pid,
            lambda: zmq_open_loop(end, MODEL, mix, args.cpu_rate, args.step_s, name).summary(),
        )
        saturated, cpu_saturated = with_cpu(
            serve.pid,
            lambda: zmq_closed_loop(end, MODEL, mix, 64, args.step_s, name).summary(),
        )
    row = {
        "sdk_p50_ms": sdk["p50_ms"],
        "p50_200_ms": low["p50_ms"],
        "p99_200_ms": low["p99_ms"],
        "cpu_fixed_ms": cpu_fixed,
        "p99_fixed_ms": fixed["p99_ms"],
        "saturated_rate": saturated["achieved_rate"],
        "cpu_saturated_ms": cpu_saturated,
    }
    errors = sum(s["errors"] or 0 for s in (sdk, low, fixed, saturated))
    print(f"    {name:<8} " + "  ".join(f"{k} {v}" for k, v in row.items()) + f"  errors {errors}")
    return row


def with_cpu(root: int, run: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], float | None]:
    before = bench.tree_cpu_seconds(root)
    summary = run()
    return summary, bench.per_request(bench.tree_cpu_seconds(root) - before, summary)


def in_process_cpu(store: Path, mix: RequestMix, seconds: float) -> float | None:
    engine = load_engine(store, MODEL, threads=1, fast_path=False)
    assert isinstance(engine, LibrecoEngine)
    model = engine.libreco_model
    before = time.process_time()
    with open(os.devnull, "w") as null, redirect_stdout(null):  # libreco prints unknowns
        summary = sequential(
            lambda u: model.recommend_user(user=u, n_rec=mix.n, cold_start="popular"),
            mix,
            seconds,
            bench.IN_PROCESS,
        ).summary()
    return bench.per_request(time.process_time() - before, summary)


def spread(values: list[float | None]) -> str:
    return bench.shown(bench.spread(values), ".3f")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="folder of the other build")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", default="1", help="worker counts, comma-separated")
    parser.add_argument("--step-s", type=float, default=3.0)
    parser.add_argument("--cpu-rate", type=float, default=2000.0)
    parser.add_argument("--dir", type=Path, default=Path("var/bench"))
    parser.add_argument("--out", type=Path, default=Path("perf/results/ab.json"))
    args = parser.parse_args()
    if not (args.base / "uro_recs").is_dir():
        parser.error(f"{args.base} holds no uro_recs package: pip install --no-deps --target it")
    store, data = bench.prepare_store(args.dir, "demo", [MODEL])
    mix = RequestMix(known_users=sorted(set(data["user"])))
    counts = [int(w) for w in args.workers.split(",")]
    builds: list[tuple[str, Path | None]] = [("base", args.base), ("this", None)]
    rows: dict[str, list[dict[str, float | None]]] = {
        f"{b} {w}w": [] for w in counts for b, _ in builds
    }
    floors: list[float] = []
    in_process: list[float | None] = []
    with tempfile.TemporaryDirectory(prefix="ab-") as tmp:
        for round_ in range(args.repeats):
            print(f"-- round {round_ + 1} of {args.repeats}")
            floors.append(floor.measure(args.step_s)[1]["p50_ms"])
            in_process.append(in_process_cpu(store, mix, args.step_s))
            print(f"    two-hop floor p50 {floors[-1]:.3f} ms, in-process CPU {in_process[-1]} ms")
            # Alternate which build goes first, so neither always follows the other.
            order = builds if round_ % 2 == 0 else builds[::-1]
            for workers in counts:
                for label, build in order:
                    root = Path(tmp) / f"{label}-{workers}-{round_}"
                    root.mkdir()
                    rows[f"{label} {workers}w"].append(
                        measure_build(root, store, mix, build, workers, args)
                    )
    print(f"\ntwo-hop ZeroMQ floor p50: {spread(list(floors))} ms")
    print(f"in-process libreco CPU per call: {spread(in_process)} ms")
    print(f"medians over {args.repeats} rounds [min-max]; ratio = this / base")
    for workers in counts:
        base, this = rows[f"base {workers}w"], rows[f"this {workers}w"]
        print(f"\n{workers} worker(s)          {'base':>24} {'this':>24}   ratio")
        for key, label in FIGURES.items():
            before = bench.spread([r[key] for r in base])
            after = bench.spread([r[key] for r in this])
            print(
                f"  {label:<36} {bench.shown(before, '.3f'):>24}"
                f" {bench.shown(after, '.3f'):>24}   {bench.times(bench.ratio(after, before))}"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"floor_p50_ms": floors, "in_process_cpu_ms": in_process, "rounds": rows}
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
