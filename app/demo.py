"""`uro-recs demo`: bundled data -> trained models -> broker + workers on IPC -> answers.

Everything lives under one directory (default var/demo): the model store, the IPC sockets and
the configuration the demo writes for `uro-recs serve`.
"""

from __future__ import annotations

import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from uro_recs.app.cli import apply_thread_limits
from uro_recs.core.config import load_config
from uro_recs.sdk import Client, UroRecsError

if TYPE_CHECKING:
    import pandas as pd

# model name -> the libreco kind trained for it
MODELS: dict[str, str] = {"als": "als", "deepfm": "deepfm"}


def _config_text(directory: Path) -> str:
    lines = [
        f'run_dir = "{(directory / "run").absolute()}"',
        f'store = "{(directory / "store").absolute()}"',
        "",
        "[worker]",
        "slots = 32",
        "threads = 1",
    ]
    for name in MODELS:
        lines += ["", "[[models]]", f'name = "{name}"', "workers = 1"]
    return "\n".join(lines) + "\n"


def train_missing(store: Path, data: pd.DataFrame, retrain: bool = False) -> None:
    """Train the demo models that the store lacks (all of them with `retrain`)."""
    from uro_recs.core.model_store import list_versions
    from uro_recs.pipeline.training import train_and_save

    missing = [m for m in MODELS if retrain or not list_versions(store, m)]
    if not missing:
        print(f"models already in {store}: {', '.join(MODELS)} (use --retrain to train again)")
        return
    print(
        f"demo data: {data['user'].nunique()} users, {data['item'].nunique()} items, "
        f"{len(data)} interactions"
    )
    for name in missing:
        started = time.perf_counter()
        path = train_and_save(store, name, data, MODELS[name])  # also makes it CURRENT
        print(f"trained {name} -> {path} in {time.perf_counter() - started:.1f} s")


def prepare(directory: Path, retrain: bool = False) -> tuple[Path, pd.DataFrame]:
    """Write the demo configuration and train what is missing: (config path, demo data)."""
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / "uro-recs.toml"
    config_path.write_text(_config_text(directory))
    apply_thread_limits(2)
    from uro_recs.pipeline.demo_data import make_interactions

    data = make_interactions()
    train_missing(load_config(config_path).store, data, retrain)
    return config_path, data


def start_serving(config_path: Path, quiet: bool = False) -> subprocess.Popen[bytes]:
    """`uro-recs serve` as a child process; `quiet` sends its logs to /dev/null."""
    command = [sys.executable, "-m", "uro_recs.app.cli", "--config", str(config_path), "serve"]
    output = subprocess.DEVNULL if quiet else None
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output, stderr=output)


def wait_ready(client: Client, models: Iterable[str], timeout_s: float = 120) -> None:
    """Block until every model has a live worker."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ready = {m.name for m in client.info(timeout=1.0) if m.workers > 0}
        except UroRecsError:
            ready = set()
        if ready >= set(models):
            return
        time.sleep(0.2)
    raise TimeoutError(f"workers were not ready within {timeout_s:.0f} s")


def _timed(label: str, call: object) -> None:
    started = time.perf_counter()
    try:
        result = call() if callable(call) else call
    except UroRecsError as exc:
        result = f"{type(exc).__name__}: {exc}"
    print(f"{label:<44} {1000 * (time.perf_counter() - started):7.2f} ms  {result}")


def _sample(client: Client, user: str, item: str) -> None:
    print("\nsample requests through the SDK over IPC:")
    _timed("recommend als (known user)", lambda: client.recommend(user, n=5))
    _timed("recommend deepfm (known user)", lambda: client.recommend(user, n=5, model="deepfm"))
    _timed("recommend als (unknown user -> cold start)", lambda: client.recommend("new-user", n=5))
    _timed("predict als", lambda: client.predict(user, [item, "no-such-item"]))
    _timed("similar_items als", lambda: client.similar_items(item, n=5))
    _timed(
        "similar_items deepfm (no embeddings)", lambda: client.similar_items(item, model="deepfm")
    )
    latencies = []
    for _ in range(500):
        started = time.perf_counter()
        client.recommend(user, n=10)
        latencies.append(1000 * (time.perf_counter() - started))
    latencies.sort()
    print(
        f"\n500 x recommend als, one at a time: p50 {statistics.median(latencies):.3f} ms, "
        f"p99 {latencies[int(0.99 * len(latencies))]:.3f} ms"
    )


def run_demo(directory: Path, once: bool, retrain: bool) -> int:
    config_path, data = prepare(directory, retrain)
    config = load_config(config_path)
    user, item = str(data["user"].iloc[0]), str(data["item"].iloc[0])
    serve = start_serving(config_path)
    try:
        with Client(config.client_endpoint, model="als", timeout=2.0) as client:
            wait_ready(client, MODELS)
            print(f"\nserving on {config.client_endpoint}")
            _sample(client, user, item)
            print(f"\nstats: {client.stats()}")
        if not once:
            print("\nserving until Ctrl-C; try: uro-recs --config", config_path, "recommend", user)
            serve.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
        code = serve.wait(timeout=60)
    return 0 if code == 0 else 1
