"""The baseline a Python team would build first: FastAPI on uvicorn, libreco in the process.

    URO_RECS_BENCH_STORE=var/bench/demo/store URO_RECS_BENCH_MODEL=als \
        python -m uvicorn perf.fastapi_app:app --port 8900

It serves the same saved model version as the sidecar, JSON in and out, and answers with
libreco's own `recommend_user` (through the libreco engine, which adds the deterministic
popular fallback for unknown users and nothing else). URO_RECS_BENCH_THREADS sets the BLAS,
OpenMP, torch and TF thread pools (default 1); the benchmark also runs it with one thread per
core, what the libraries pick when nobody sets them.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI
from pydantic import BaseModel

from uro_recs.worker.engine import load_engine

engine = load_engine(
    Path(os.environ["URO_RECS_BENCH_STORE"]),
    os.environ["URO_RECS_BENCH_MODEL"],
    threads=int(os.environ.get("URO_RECS_BENCH_THREADS", "1")),
    fast_path=False,
)
app = FastAPI()


class RecommendRequest(BaseModel):
    user: str
    n: int = 10


@app.post("/recommend")
def recommend(request: RecommendRequest) -> dict[str, object]:
    answer = engine.recommend([request.user], request.n, filter_consumed=True)[0]
    return {"user": request.user, "items": answer.items, "cold_start": answer.cold_start}
