"""Two-stage serving against full ranking: how much of DeepFM's top 10 it keeps, how fast.

    python -m perf.two_stage                       # 48k-item catalogue, K = 50 ... 2000
    python -m perf.two_stage --catalogue demo --candidates 100,500 --served 200

ALS and DeepFM are trained on the same catalogue (perf/bench.py's, reused from --dir). For a
fixed sample of known users, in this process, one user per call as a request asks: DeepFM's
numpy engine ranks every item (the reference), then, for each first stage (ALS; DeepFM's own
linear and FM terms, "@fm") and each K, the first stage retrieves K candidates (consumed
items removed) and DeepFM ranks only those. recall@10 is the share of the full ranking's top
10 that two-stage also returns (mean, and the worst user's); latency is per call. With
--served K, uro-recs serves DeepFM over IPC (1 worker) with full ranking and with each first
stage at that K, and each gets bench.py's open-loop rate sweep (highest rate with p99 within
10 ms, p99 at half of it).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

from perf import bench
from perf.loadgen import RequestMix, zmq_open_loop
from uro_recs.core.config import OWN_FM
from uro_recs.worker.deepfm_engine import DeepFMEngine
from uro_recs.worker.engine import load_engine

N = 10


def per_call_ms(recommend: object, users: list[str]) -> tuple[list[list[str]], list[float]]:
    answers, times = [], []
    for user in users:
        started = time.perf_counter()
        (answer,) = recommend([user], N, True)  # type: ignore[operator]
        times.append((time.perf_counter() - started) * 1000)
        answers.append(answer.items)
    return answers, times


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def served(root: Path, store: Path, mix: RequestMix, options: str, label: str) -> None:
    plan = bench.Plan(
        catalogues=[], models=[], step_s=3.0, growth=1.5, max_steps=12, bisect_steps=3,
        min_samples=1000, smoke=False, default_threads=False,
    )  # fmt: skip
    root.mkdir(parents=True)
    with bench.uro_recs_server(root, store, "deepfm", 1, options) as (endpoint, serve):
        (memory,) = bench.worker_memory(serve.pid)
        steps = bench.sweep(
            lambda rate, seconds: zmq_open_loop(endpoint, "deepfm", mix, rate, seconds, label),
            plan,
            20.0,
        )
    best = bench.best_rate(steps)
    half = next((s for s in steps if s.get("half_of_best")), None)
    half_p99 = f"{half['p99_ms']:.2f} ms" if half else "-"
    print(
        f"  {label}: highest rate with p99 <= 10 ms {best:.0f}/s; p99 at half of it {half_p99};"
        f" worker PSS {memory['pss_kib'] / 1024:.0f} MiB",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalogue", default="large", choices=sorted(bench.CATALOGUES))
    parser.add_argument("--candidates", default="50,100,200,500,1000,2000")
    parser.add_argument("--retrievers", default=f"als,{OWN_FM}", help="first stages")
    parser.add_argument("--users", type=int, default=300, help="known users sampled")
    parser.add_argument("--served", type=int, default=0, help="also sweep served rates at K")
    parser.add_argument("--dir", type=Path, default=Path("var/bench"))
    args = parser.parse_args()
    counts = [int(k) for k in args.candidates.split(",")]
    store, data = bench.prepare_store(args.dir, args.catalogue, ["als", "deepfm"])
    full = load_engine(store, "deepfm", threads=1)
    if not isinstance(full, DeepFMEngine):
        parser.error("this DeepFM is not served by the numpy engine: two-stage does not apply")
    known = sorted(set(data["user"]))
    users = random.Random(5).sample(known, min(args.users, len(known)))
    full.recommend(users[:5], N, True)  # warm-up
    reference, full_times = per_call_ms(full.recommend, users)
    print(f"\n== {args.catalogue}: {full.n_items} items, {len(users)} users, top {N}")
    print(f"{'ranking':<22} {'recall@10':>10} {'worst':>6} {'p50 ms':>8} {'p99 ms':>8}  speed-up")
    full_p50 = statistics.median(full_times)
    print(
        f"{'full (every item)':<22} {1:>10.3f} {1:>6.2f} {full_p50:>8.3f}"
        f" {quantile(full_times, 0.99):>8.3f} {1:>8.1f}x"
    )
    retrievers = args.retrievers.split(",")
    for source in retrievers:
        for k in counts:
            staged = load_engine(store, "deepfm", threads=1)
            assert isinstance(staged, DeepFMEngine)
            staged.retrieve_with(None if source == OWN_FM else load_engine(store, source), k)
            staged.recommend(users[:5], N, True)
            answers, times = per_call_ms(staged.recommend, users)
            recalls = [bench.recall_of(a, r) for a, r in zip(answers, reference, strict=True) if r]
            p50 = statistics.median(times)
            print(
                f"{f'{source}, K={k}':<22} {statistics.mean(recalls):>10.3f} {min(recalls):>6.2f}"
                f" {p50:>8.3f} {quantile(times, 0.99):>8.3f} {full_p50 / p50:>8.1f}x",
                flush=True,
            )
    if args.served:
        mix = RequestMix(known_users=known)
        with tempfile.TemporaryDirectory(prefix="two-stage-") as tmp:
            served(Path(tmp) / "full", store, mix, "", "full ranking")
            for source in retrievers:
                options = f'retrieve_from = "{source}"\ncandidates = {args.served}\n'
                label = f"{source} K={args.served}"
                served(Path(tmp) / source.strip("@"), store, mix, options, label)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
