"""The numpy engines' partial sort: `top_columns` against one argpartition, same answers?

    python -m perf.topk                  # 48k-item catalogue, ALS and DeepFM
    python -m perf.topk --catalogue demo

On the saved models of perf/bench.py's catalogue (reused from --dir), one known user per
`recommend` call as a request asks (n=10, consumed items filtered), in this process: p50 and
p99 per call with the engines' `top_columns` and with a plain argpartition over every item
(SAMPLE_STRIDE set past any row's length), the two interleaved, and how many answers agree.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from perf import bench
from perf.two_stage import quantile
from uro_recs.worker import numpy_engine
from uro_recs.worker.engine import Id, RecommendQuery, load_engine

STRIDES = {"argpartition": 1 << 62, "top_columns": numpy_engine.SAMPLE_STRIDE}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalogue", default="large", choices=sorted(bench.CATALOGUES))
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("var/bench"))
    args = parser.parse_args()
    store, _ = bench.prepare_store(args.dir, args.catalogue, ["als", "deepfm"])
    for model in ("als", "deepfm"):
        engine = load_engine(store, model, threads=1)
        users = random.Random(1).sample(sorted(engine._user2id, key=str), args.users)
        times: dict[str, list[float]] = {label: [] for label in STRIDES}
        answers: dict[str, list[list[Id]]] = {label: [] for label in STRIDES}
        for _ in range(args.rounds):
            for label, stride in STRIDES.items():
                numpy_engine.SAMPLE_STRIDE = stride
                for user in users:
                    started = time.perf_counter()
                    (answer,) = engine.recommend_batch([RecommendQuery(user, 10, True)])
                    times[label].append((time.perf_counter() - started) * 1000)
                    answers[label].append(answer.items)
        numpy_engine.SAMPLE_STRIDE = STRIDES["top_columns"]
        same = sum(a == b for a, b in zip(*answers.values(), strict=True))
        print(f"{model}, {engine.n_items} items:")
        for label, values in times.items():
            p50, p99 = statistics.median(values), quantile(values, 0.99)
            print(f"  {label:<13} p50 {p50:.3f} ms  p99 {p99:.3f} ms")
        print(f"  same answers: {same} of {len(answers['top_columns'])}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
