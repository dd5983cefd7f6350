"""The baseline a Python team would build first: FastAPI on uvicorn, libreco in the process.

    URO_RECS_BENCH_STORE=var/bench/demo/store URO_RECS_BENCH_MODEL=als \
        python -m uvicorn perf.fastapi_app:app --port 8900 [--workers 2]

Written as FastAPI's users write a model endpoint: an `async def` handler (no thread-pool hop)
that calls LibRecommender's `recommend_user` on the model loaded at start, nothing in between.
It serves the same saved model version as the sidecar; loading goes through the store's
loader only so that TensorFlow's session gets the same thread settings. With `--workers N`
uvicorn runs N processes, each holding the model (each touches a file named by its pid in
URO_RECS_BENCH_READY_DIR, if set, once loaded). URO_RECS_BENCH_THREADS sets the BLAS,
OpenMP, torch and TF thread pools (default 1).
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI
from pydantic import BaseModel

from uro_recs.core.model_store import current_version, verify, version_dir
from uro_recs.worker.libreco_engine import load_libreco_model

store = Path(os.environ["URO_RECS_BENCH_STORE"])
name = os.environ["URO_RECS_BENCH_MODEL"]
directory = version_dir(store, name, current_version(store, name))
model, _, _ = load_libreco_model(
    directory,
    verify(directory).libreco_class,
    threads=int(os.environ.get("URO_RECS_BENCH_THREADS", "1")),
)
if "URO_RECS_BENCH_READY_DIR" in os.environ:  # the benchmark waits for every worker's file
    (Path(os.environ["URO_RECS_BENCH_READY_DIR"]) / str(os.getpid())).touch()
app = FastAPI()


class RecommendRequest(BaseModel):
    user: str
    n: int = 10


@app.post("/recommend")
async def recommend(request: RecommendRequest) -> dict[str, object]:
    ranked = model.recommend_user(user=request.user, n_rec=request.n, cold_start="popular")
    return {"user": request.user, "items": ranked[request.user].tolist()}
