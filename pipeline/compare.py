"""`uro-recs evaluate`: candidate families trained on one chronological split, side by side.

Each candidate trains on the same split (`train_model` with the same hold-out and seed) and is
scored as the sync's publish gate scores it (pipeline/evaluation.py), beside the popularity
baseline. The fitted model is then saved into a scratch store and loaded the way a worker
loads it, in a process of its own (`python -m uro_recs.pipeline.compare probe ...`), which
times `recommend` one user at a time and reads its own memory: what one worker costs.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pandas as pd

from uro_recs.pipeline.evaluation import EVAL_K

PROBE_USERS: Final = 300  # recommend calls timed per candidate, one user each
_PROBE_TIMEOUT_S: Final = 600


@dataclass(frozen=True)
class Row:
    name: str
    metrics: dict[str, float]
    train_s: float | None = None  # fitting only, evaluation not included
    serve_p50_ms: float | None = None
    worker_mib: float | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            **self.metrics,
            "train_s": self.train_s,
            "serve_p50_ms": self.serve_p50_ms,
            "worker_pss_mib": self.worker_mib,
            "error": self.error,
        }


def compare(
    df: pd.DataFrame,
    kinds: Sequence[str],
    *,
    say: Callable[[str], None] = lambda _: None,
    **options: Any,
) -> list[Row]:
    """The popularity baseline, then one row per kind (`options` as `train_model` takes them;
    `test_fraction` must be above 0). A kind that fails gets a row with its error."""
    from uro_recs.core.model_store import save_version
    from uro_recs.pipeline.training import train_model

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="uro-recs-evaluate-") as scratch:
        store = Path(scratch)
        for kind in kinds:
            say(f"evaluate: training {kind} ...")
            started = time.perf_counter()
            try:
                trained = train_model(df, kind, refit=False, **options)
            except Exception as exc:  # one candidate's failure is a row, not the end
                rows.append(Row(kind, {}, error=f"{type(exc).__name__}: {exc}"[:200]))
                continue
            train_s = round(trained.metrics.get("fit_seconds", time.perf_counter() - started), 1)
            if not rows:
                popularity = {
                    name.removeprefix("popularity_"): value
                    for name, value in trained.metrics.items()
                    if name.startswith("popularity_")
                }
                rows.append(Row("popularity", popularity))
            metrics = {
                name: value
                for name, value in trained.metrics.items()
                if name.endswith(f"@{EVAL_K}") and not name.startswith("popularity_")
            }
            save_version(store, kind, "candidate", trained.save, trained.manifest_fields())
            probe = _probe(store, kind, [str(u) for u in trained.data_info.user2id])
            row = Row(
                kind,
                metrics,
                train_s=train_s,
                serve_p50_ms=probe.get("p50_ms"),
                worker_mib=probe.get("pss_mib"),
                error=probe.get("error"),
            )
            rows.append(row)
            say(f"evaluate: {json.dumps(row.as_dict())}")  # a long run's rows as they come
    return rows


def table(rows: Sequence[Row]) -> str:
    """The rows as an aligned text table, best recall first after the baseline."""
    header = ["model", f"recall@{EVAL_K}", f"ndcg@{EVAL_K}", f"coverage@{EVAL_K}"]
    header += ["train s", "serve p50 ms", "worker MiB"]
    baseline = [r for r in rows if r.name == "popularity"]
    ranked = sorted(
        (r for r in rows if r.name != "popularity"),
        key=lambda r: -r.metrics.get(f"recall@{EVAL_K}", -1.0),
    )
    lines = [header]
    for row in [*baseline, *ranked]:
        cells = [row.name]
        for metric in ("recall", "ndcg", "coverage"):
            value = row.metrics.get(f"{metric}@{EVAL_K}")
            cells.append("-" if value is None else f"{value:.4f}")
        cells += [_number(row.train_s, 1), _number(row.serve_p50_ms, 3), _number(row.worker_mib, 0)]
        if row.error:
            cells.append(f"({row.error})")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines if i < len(line)) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(widths[i]) if i < len(widths) else cell for i, cell in enumerate(line)
        ).rstrip()
        for line in lines
    )


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _probe(store: Path, model: str, users: list[str]) -> dict[str, Any]:
    """Load `model` as a worker would, in a fresh process; its recommend p50 and memory."""
    command = [sys.executable, "-m", "uro_recs.pipeline.compare", "probe", str(store), model]
    done = subprocess.run(
        command,
        input=json.dumps(users[:PROBE_USERS]),
        capture_output=True,
        text=True,
        timeout=_PROBE_TIMEOUT_S,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"serving probe failed: {reason[:160]}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _probe_main(store: Path, model: str) -> None:
    from uro_recs.worker.engine import load_engine

    users = json.loads(sys.stdin.read())
    engine = load_engine(store, model, version="candidate")
    engine.warm_up()
    n = min(10, engine.n_items)
    seconds = []
    for user in users:
        started = time.perf_counter()
        engine.recommend([user], n, True)
        seconds.append(time.perf_counter() - started)
    result = {"p50_ms": round(statistics.median(seconds) * 1000, 3), "pss_mib": _pss_mib()}
    print(json.dumps(result))


def _pss_mib() -> float | None:
    """This process's proportional set size (Linux), the memory it adds to the machine."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


if __name__ == "__main__" and sys.argv[1:2] == ["probe"]:
    _probe_main(Path(sys.argv[2]), sys.argv[3])
