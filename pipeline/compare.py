"""`uro-recs evaluate`: candidate families trained on one chronological split, side by side.

Each candidate trains on the same split (`train_model` with the same hold-out and seed) and is
scored as the sync's publish gate scores it (pipeline/evaluation.py), beside the popularity
baseline. Each trains in a process of its own (`python -m uro_recs.pipeline.compare train
...`), so that one the kernel kills for its memory is a row, not the end of the comparison.
The fitted model is saved into a scratch store and loaded the way a worker loads it, in
another process (`... compare probe ...`), which times `recommend` one user at a time and
reads its own memory: what one worker costs.
"""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Final

import pandas as pd

from uro_recs.pipeline.evaluation import EVAL_K

PROBE_USERS: Final = 300  # recommend calls timed per candidate, one user each
_DATA_FILE: Final = "interactions.pkl"  # the interactions, as each candidate's process reads them
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
    """The popularity baseline, then one row per kind (`options` as `train_model` takes them,
    JSON values; `test_fraction` must be above 0). Each candidate trains in a process of its
    own, so one that fails, or that the kernel kills for its memory, is a row with its error
    and the others go on."""
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="uro-recs-evaluate-") as scratch:
        df.to_pickle(Path(scratch) / _DATA_FILE)
        for kind in kinds:
            say(f"evaluate: training {kind} ...")
            trained = _train(Path(scratch), kind, options)
            if "error" in trained:
                rows.append(Row(kind, {}, error=trained["error"]))
                say(f"evaluate: {json.dumps(rows[-1].as_dict())}")
                continue
            metrics: dict[str, float] = trained["metrics"]
            if not any(row.name == "popularity" for row in rows):  # first, from the same split
                popularity = {
                    name.removeprefix("popularity_"): value
                    for name, value in metrics.items()
                    if name.startswith("popularity_")
                }
                rows.insert(0, Row("popularity", popularity))
            probe = _probe(Path(scratch), kind, trained["users"])
            row = Row(
                kind,
                {
                    name: value
                    for name, value in metrics.items()
                    if name.endswith(f"@{EVAL_K}") and not name.startswith("popularity_")
                },
                train_s=round(metrics["fit_seconds"], 1),
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


def _train(scratch: Path, kind: str, options: dict[str, Any]) -> dict[str, Any]:
    """Train and save one candidate in a child process: its metrics and some user ids, or
    {"error": ...}."""
    command = [sys.executable, "-m", "uro_recs.pipeline.compare", "train", str(scratch), kind]
    done = subprocess.run(
        command, input=json.dumps(options), capture_output=True, text=True, check=False
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode < 0:
        signal_name = signal.Signals(-done.returncode).name
        why = " (out of memory?)" if done.returncode == -signal.SIGKILL else ""
        return {"error": f"training was killed by {signal_name}{why}"}
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _train_main(scratch: Path, kind: str) -> None:
    from uro_recs.core.model_store import save_version
    from uro_recs.pipeline.training import train_model

    options = json.loads(sys.stdin.read())
    try:
        trained = train_model(pd.read_pickle(scratch / _DATA_FILE), kind, refit=False, **options)
    except Exception as exc:  # the parent shows this line as the candidate's row
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    save_version(scratch, kind, "candidate", trained.save, trained.manifest_fields())
    users = [str(user) for user in islice(trained.data_info.user2id, PROBE_USERS)]
    print(json.dumps({"metrics": trained.metrics, "users": users}))


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
if __name__ == "__main__" and sys.argv[1:2] == ["train"]:
    _train_main(Path(sys.argv[2]), sys.argv[3])
