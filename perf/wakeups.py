"""Context switches per request: how often a request wakes a thread, server and client side.

    python -m perf.wakeups [--rate 500] [--seconds 4]

On a VM where waking an idle core costs up to a millisecond, latency at low load follows the
number of wake-ups per request more than the work done. This counts the voluntary and
involuntary context switches of every thread of the server's processes (uro-recs: serve,
broker, worker; FastAPI: uvicorn) and of this process (the load generator) over an open-loop
run at a fixed rate, against the same saved ALS model as perf/bench.py, and divides by the
answers. Needs the store perf/bench.py trains (`var/bench/demo/store`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from perf.bench import CATALOGUES, fastapi_server, prepare_store, process_tree, uro_recs_server
from perf.loadgen import RequestMix, RunResult, http_run, zmq_open_loop


def context_switches(root: int) -> int:
    """Context switches so far of every thread of `root` and of the processes under it."""
    total = 0
    for pid in process_tree(root):
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                for line in (task / "status").read_text().splitlines():
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
        except OSError:
            continue  # gone meanwhile
    return total


def measured(server: int, run: Callable[[], RunResult]) -> dict[str, float]:
    """Context switches per answered request of the server and of the load generator."""
    server_before, own_before = context_switches(server), context_switches(os.getpid())
    summary = run().summary()
    answered = max(summary["ok"], 1)
    return {
        "server": (context_switches(server) - server_before) / answered,
        "load generator": (context_switches(os.getpid()) - own_before) / answered,
        "p50_ms": summary["p50_ms"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--dir", type=Path, default=Path("var/bench"))
    args = parser.parse_args()
    store, data = prepare_store(args.dir, "demo", ["als"])
    mix = RequestMix(known_users=sorted(set(data["user"])))
    results = {}
    with uro_recs_server(args.dir, store, "als", 1) as (endpoint, serve):
        results["uro-recs, 1 worker"] = measured(
            serve.pid, lambda: zmq_open_loop(endpoint, "als", mix, args.rate, args.seconds, "u")
        )
    with fastapi_server(store, "als", 1) as (port, uvicorn, _):
        results["FastAPI, 1 process"] = measured(
            uvicorn,
            lambda: http_run(
                "127.0.0.1",
                port,
                mix,
                rate=args.rate,
                concurrency=64,
                duration_s=args.seconds,
                system="f",
            ),
        )
    print(
        f"context switches per request at {args.rate:.0f}/s"
        f" (ALS, {CATALOGUES['demo']['n_items']:,}-item demo catalogue)"
    )
    for system, row in results.items():
        print(
            f"{system:<22} server {row['server']:6.2f}  load generator {row['load generator']:6.2f}"
            f"  p50 {row['p50_ms']:.3f} ms"
        )


if __name__ == "__main__":
    main()
