"""The Elixir client (sdk/elixir) next to the Python SDK, in one run, on one broker and workers.

    python -m perf.elixir_bench                  # 10 s a measurement, about 90 s in all
    python -m perf.elixir_bench --smoke          # 1 s a measurement (CI)
    python -m perf.elixir_bench --json out.json  # also writes every measurement

Trains the demo catalogue's ALS model as perf/bench.py does (or reuses it from --dir), serves
it with --workers workers over IPC, and measures, taking turns so that whatever else the
machine does hits both clients alike:
  1. one `recommend` at a time (one user, n=10): the Python SDK's `Client`, then the Elixir
     client (`UroRecs.recommend`);
  2. a closed loop with 32 requests in flight on one connection: `AsyncClient` with 32 tasks,
     then one Elixir connection (pool_size 1) with 32 processes calling it;
  3. the same with 256 in flight.
Both clients ask for the same users in the same order (perf/loadgen.py's RequestMix: known
users plus 5% unknown), each call with a 5 s budget, after the same warm-up. The Elixir side
is `mix run bench/load.exs` in sdk/elixir (needs Elixir), one run a measurement. Prints a
table: metric, Python SDK, Elixir, and Elixir / Python.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from perf.bench import prepare_store, uro_recs_server
from perf.loadgen import RequestMix, RunResult, sequential
from uro_recs.sdk import AsyncClient, Client, UroRecsError

ELIXIR_DIR = Path(__file__).resolve().parent.parent / "sdk" / "elixir"
MODEL: Final[str] = "als"
TIMEOUT_S = 5.0  # each call's budget, both clients: long enough that 256 in flight never hit it
USERS_IN_FILE = 200_000  # the Elixir side cycles through them; more than a run sends


@dataclass(frozen=True)
class Plan:
    duration_s: float  # each measurement
    warmup: int  # requests one at a time before each measurement
    in_flight: tuple[int, ...]
    workers: int


def python_sequential(endpoint: str, mix: RequestMix, plan: Plan) -> dict[str, Any]:
    """The SDK's blocking `Client`, one `recommend` at a time."""
    errors: Counter[str] = Counter()
    with Client(endpoint, model=MODEL, timeout=TIMEOUT_S) as client:

        def call(user: str) -> None:
            try:
                client.recommend(user, n=mix.n)
            except UroRecsError as exc:
                errors[exc.code.value] += 1

        warm = mix.users()
        for _ in range(plan.warmup):
            client.recommend(warm(), n=mix.n)
        result = sequential(call, mix, plan.duration_s, "python")
    result.ok -= sum(errors.values())  # sequential() counts every call it timed
    result.errors = errors
    return result.summary()


async def _closed_loop(endpoint: str, mix: RequestMix, in_flight: int, plan: Plan) -> RunResult:
    result = RunResult("python", "closed", 0.0, plan.duration_s)
    next_user = mix.users()
    async with AsyncClient(endpoint, model=MODEL, timeout=TIMEOUT_S) as client:
        for _ in range(plan.warmup):
            await client.recommend(next_user(), n=mix.n)
        next_user = mix.users()  # measured from the first user, as the Elixir side is
        start = time.perf_counter()
        end = start + plan.duration_s

        async def caller() -> None:
            while (began := time.perf_counter()) < end:
                result.sent += 1
                try:
                    await client.recommend(next_user(), n=mix.n)
                    result.ok += 1
                except UroRecsError as exc:
                    result.errors[exc.code.value] += 1
                result.record((time.perf_counter() - began) * 1e6)

        await asyncio.gather(*(caller() for _ in range(in_flight)))
        result.duration_s = time.perf_counter() - start
    return result


def python_closed_loop(
    endpoint: str, mix: RequestMix, in_flight: int, plan: Plan
) -> dict[str, Any]:
    """`AsyncClient`: `in_flight` tasks on one socket, each sending again once answered."""
    return asyncio.run(_closed_loop(endpoint, mix, in_flight, plan)).summary()


def elixir_run(
    endpoint: str, users: Path, plan: Plan, mode: str, in_flight: int = 1
) -> dict[str, Any]:
    """One measurement by sdk/elixir/bench/load.exs; its JSON summary."""
    command = ["mix", "run", "bench/load.exs", "--", "--endpoint", endpoint, "--model", MODEL]
    command += ["--users", str(users.absolute()), "--mode", mode, "--in-flight", str(in_flight)]
    command += ["--duration", str(plan.duration_s), "--warmup", str(plan.warmup)]
    command += ["--timeout", str(round(TIMEOUT_S * 1000))]
    done = subprocess.run(
        command,
        cwd=ELIXIR_DIR,
        capture_output=True,
        text=True,
        timeout=plan.duration_s + 120,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout + done.stderr)
        raise RuntimeError(f"bench/load.exs failed (exit status {done.returncode})")
    summary: dict[str, Any] = json.loads(lines[-1])  # mix may print before it
    return summary


def print_run(client: str, what: str, summary: dict[str, Any]) -> None:
    errors = sum(summary["errors"].values())
    print(
        f"    {client:<7} {what:<15} {summary['achieved_rate']:>8.0f}/s  "
        f"p50 {summary['p50_ms']:7.3f}  p99 {summary['p99_ms']:7.3f} ms  "
        f"{summary['ok']} ok, {errors} errors",
        flush=True,
    )


def table(runs: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rows of metric, Python, Elixir and Elixir / Python."""
    rows = []
    for name, pair in runs.items():
        metrics = [("p50 ms", "p50_ms"), ("p99 ms", "p99_ms")]
        if name != "one at a time":
            metrics.insert(0, ("req/s", "achieved_rate"))
        for label, key in metrics:
            python, elixir = pair["python"][key], pair["elixir"][key]
            ratio = elixir / python if python else None
            rows.append(
                {"metric": f"{name}, {label}", "python": python, "elixir": elixir, "ratio": ratio}
            )
    errors = {
        client: sum(sum(pair[client]["errors"].values()) for pair in runs.values())
        for client in ("python", "elixir")
    }
    rows.append({"metric": "errors, all runs", **errors, "ratio": None})
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    def cell(value: float | None, metric: str) -> str:
        if value is None:
            return "-"
        if "req/s" in metric or "errors" in metric:
            return f"{value:,.0f}"
        return f"{value:.3f}"

    print("\n| metric | Python SDK | Elixir | Elixir / Python |\n|---|---|---|---|")
    for row in rows:
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "-"
        print(
            f"| {row['metric']} | {cell(row['python'], row['metric'])} | "
            f"{cell(row['elixir'], row['metric'])} | {ratio} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="1 s a measurement, for CI")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds a measurement")
    parser.add_argument("--workers", type=int, default=2, help="ALS workers behind the broker")
    parser.add_argument("--dir", type=Path, default=Path("var/bench"), help="model store, sockets")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    args = parser.parse_args()
    plan = Plan(
        duration_s=1.0 if args.smoke else args.duration,
        warmup=50 if args.smoke else 500,
        in_flight=(32, 256),
        workers=args.workers,
    )
    if shutil.which("mix") is None:
        print("mix not found: install Elixir (apt-get install -y elixir)", file=sys.stderr)
        return 1
    started = time.perf_counter()
    # Compiled before anything is measured, and before the broker and workers run.
    subprocess.run(["mix", "compile"], cwd=ELIXIR_DIR, check=True, stdout=sys.stderr)
    store, data = prepare_store(args.dir, "demo", [MODEL])
    mix = RequestMix(known_users=sorted(set(data["user"])))
    users = args.dir / "elixir-bench-users.txt"
    next_user = mix.users()
    users.write_text("".join(f"{next_user()}\n" for _ in range(USERS_IN_FILE)))
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    print(f"\n== demo catalogue, {MODEL}, {plan.workers} workers, {plan.duration_s:g} s each")
    with uro_recs_server(args.dir, store, MODEL, plan.workers) as (endpoint, _serve):
        name = "one at a time"
        python = python_sequential(endpoint, mix, plan)
        print_run("python", name, python)
        elixir = elixir_run(endpoint, users, plan, "latency")
        print_run("elixir", name, elixir)
        runs[name] = {"python": python, "elixir": elixir}
        for in_flight in plan.in_flight:
            name = f"{in_flight} in flight"
            python = python_closed_loop(endpoint, mix, in_flight, plan)
            print_run("python", name, python)
            elixir = elixir_run(endpoint, users, plan, "closed", in_flight)
            print_run("elixir", name, elixir)
            runs[name] = {"python": python, "elixir": elixir}
    rows = table(runs)
    print_table(rows)
    elapsed = time.perf_counter() - started
    print(f"\n{elapsed:.0f} s in all")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "plan": {**plan.__dict__, "model": MODEL, "timeout_s": TIMEOUT_S},
            "table": rows,
            "runs": runs,
        }
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
