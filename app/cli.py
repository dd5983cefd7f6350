"""The `uro-recs` command line.

demo, serve, broker, worker, ingest-worker, train, recommend, rollout, rollback, db migrate,
sync, batch-recommend, install-systemd.

Heavy imports (numpy, TensorFlow, libreco) happen inside the commands that need them, after
the thread limits are in the environment, so `uro-recs recommend` starts in milliseconds.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeAlias

from uro_recs.core import families
from uro_recs.core.config import OWN_FM, Config, ConfigError, load_config
from uro_recs.core.logs import configure_logging
from uro_recs.core.sdnotify import Notifier


def apply_thread_limits(threads: int) -> None:
    """BLAS, OpenMP and TF pools read these once, at import: set them before importing."""
    for name in (
        "OMP_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "MKL_NUM_THREADS",
        "TF_NUM_INTRAOP_THREADS",
        "TF_NUM_INTEROP_THREADS",
    ):
        os.environ[name] = str(threads)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def cmd_broker(config: Config, _args: argparse.Namespace) -> int:
    from uro_recs.core.run_lock import EXIT_IN_USE, RunDirInUse, lock_run_dir

    # Before any socket is bound: a second broker would bind over the live one's sockets.
    try:
        run_lock = lock_run_dir(config.run_dir)
    except RunDirInUse as error:
        print(f"uro-recs: {error}", file=sys.stderr)
        return EXIT_IN_USE
    from uro_recs.broker.broker import Broker

    endpoints = [config.client_endpoint]
    if config.broker.tcp_endpoint:
        endpoints.append(config.broker.tcp_endpoint)
    broker = Broker(
        config.broker,
        client_endpoints=endpoints,
        worker_endpoint=config.worker_endpoint,
        control_endpoint=config.control_endpoint,
        known_models=known_models(config),
        store=config.store,  # a rollout's version must be there
        worker_metrics_dir=config.worker_metrics_dir,
    )
    broker.install_signal_handlers()
    systemd = Notifier.from_environ()
    try:
        broker.run(
            on_ready=lambda: systemd.ready("serving"),
            on_tick=systemd.tick,
            on_drain=lambda: systemd.stopping("draining"),
        )
    finally:
        broker.close()
        systemd.close()
        run_lock.release()
    return 0


def known_models(config: Config) -> list[str]:
    """What the broker queues for before any worker registers."""
    from uro_recs.core.protocol import INGEST_WORKERS

    names = [m.name for m in config.models]
    return [*names, INGEST_WORKERS] if config.ingest.enabled else names


def cmd_ingest_worker(config: Config, _args: argparse.Namespace) -> int:
    import dataclasses

    from uro_recs.core.db import DatabaseError
    from uro_recs.core.protocol import INGEST_WORKERS
    from uro_recs.pipeline.ingest_worker import IngestWorker

    loop_config = dataclasses.replace(
        config.worker, slots=config.ingest.slots, max_batch_delay_ms=0.0
    )
    from uro_recs.worker.metrics import WorkerMetrics

    metrics = WorkerMetrics(config.worker_metrics_dir, INGEST_WORKERS)
    service = IngestWorker(
        config.database, config.worker_endpoint, loop_config, config.broker, metrics=metrics
    )
    systemd = Notifier.from_environ()
    try:
        service.connect()
        service.install_signal_handlers()
        service.run(
            on_ready=lambda: systemd.ready("ingesting into recs_events"),
            on_tick=systemd.tick,
            on_drain=lambda: systemd.stopping("draining"),
        )
    except (DatabaseError, OSError) as error:
        print(f"ingest-worker: cannot reach the database: {error}", file=sys.stderr)
        return 1
    finally:
        service.close()
        systemd.close()
    return 0


def cmd_worker(config: Config, args: argparse.Namespace) -> int:
    apply_thread_limits(config.worker.threads)
    from uro_recs.worker.engine import Engine, load_engine
    from uro_recs.worker.metrics import WorkerMetrics
    from uro_recs.worker.service import WorkerService

    model = config.model(args.model or worker_instance_model(args.instance))
    version = args.version or model.version or None
    metrics = WorkerMetrics(config.worker_metrics_dir, model.name)  # before anything imports it

    def load(version: str | None) -> Engine:
        engine = load_engine(config.store, model.name, version, threads=config.worker.threads)
        if model.retrieve_from:
            from uro_recs.worker.deepfm_engine import DeepFMEngine

            if not isinstance(engine, DeepFMEngine):
                raise ConfigError(
                    f"models[{model.name!r}].retrieve_from: two-stage serving ranks with a DeepFM"
                    f" that the numpy engine serves; {model.name!r} is {engine.libreco_class}"
                    f" served by {type(engine).__name__}: remove retrieve_from"
                )
            retriever = None
            if model.retrieve_from != OWN_FM:
                retriever = load_engine(
                    config.store, model.retrieve_from, threads=config.worker.threads
                )
            engine.retrieve_with(retriever, model.candidates)
        engine.warm_up()
        return engine

    engine = load(version)
    recent = None
    if config.worker.recent_events:
        from uro_recs.worker.recent_events import RecentEvents, exported_at

        since = exported_at(engine.manifest)
        recent = RecentEvents(config.database, since, config.worker.recent_events_refresh_ms)
        try:
            recent.start()
        except Exception as error:  # whatever asyncpg raised: say it and exit; systemd retries
            print(f"worker: recent_events: cannot read recs_events: {error!r}", file=sys.stderr)
            return 1
    service = WorkerService(
        engine,
        config.worker_endpoint,
        config.worker,
        config.broker,
        loader=load,
        recent=recent,
        metrics=metrics,
    )
    service.install_signal_handlers()
    systemd = Notifier.from_environ()
    try:
        service.run(
            on_ready=lambda: systemd.ready(f"serving {engine.name} {engine.version}"),
            on_tick=systemd.tick,
            on_drain=lambda: systemd.stopping("draining"),
        )
    finally:
        service.close()
        if recent is not None:
            recent.stop()
        systemd.close()
    return 0


def worker_instance_model(instance: str) -> str:
    """The model of a systemd worker instance: "als-1" serves "als"."""
    name, _, number = instance.rpartition("-")
    if not name or not number.isdigit():
        raise SystemExit(f"worker: instance {instance!r} is not <model>-<number>, e.g. als-1")
    return name


def cmd_serve(config: Config, args: argparse.Namespace) -> int:
    from uro_recs.app.supervisor import Supervisor
    from uro_recs.core.model_store import current_version

    if not config.models:
        print("serve: the configuration names no [[models]] to serve", file=sys.stderr)
        return 2
    from uro_recs.core.run_lock import EXIT_IN_USE, RunDirInUse, lock_run_dir

    try:  # another broker on this run_dir comes first: nothing here may start then
        lock_run_dir(config.run_dir).release()
    except RunDirInUse as error:
        print(f"uro-recs: {error}", file=sys.stderr)
        return EXIT_IN_USE
    for model in config.models:  # a worker without a model would fail and restart forever
        if not model.version:
            current_version(config.store, model.name)  # VersionNotFound says what to do
    return Supervisor(config, args.config).run()


def cmd_train(config: Config, args: argparse.Namespace) -> int:
    """Train a version; it serves only once published (here with --publish, or by rollout)."""
    from uro_recs.pipeline.interactions import check_interactions_csv

    if args.csv is not None:
        rows = check_interactions_csv(args.csv)  # before the heavy imports below
        _say(f"train: {args.csv}: {rows} interactions")
    apply_thread_limits(2)
    import pandas as pd

    from uro_recs.core.model_store import new_version_name, save_version, set_current
    from uro_recs.pipeline.demo_data import make_interactions
    from uro_recs.pipeline.sync import GATED_METRICS, beats_baseline
    from uro_recs.pipeline.training import train_model

    # Ids are text (pipeline/training.py): "0813" stays "0813" instead of becoming 813.
    text_ids = {"user": str, "item": str}
    data = pd.read_csv(args.csv, dtype=text_ids) if args.csv is not None else make_interactions()
    family = families.family(args.kind)
    features = None if args.item_features is None else _column_list(args.item_features)
    trained = train_model(
        data,
        args.kind,
        epochs=args.epochs,
        embed_size=args.embed_size,
        test_fraction=args.test_fraction,
        refit=args.refit,
        params=_params(args.param),
        item_features=features,
        positive_threshold=args.positive_threshold,
    )
    _say(f"train: {_columns_used(trained.params, data.columns, family)}")
    if trained.data.get("merged_duplicates") or trained.data.get("below_threshold"):
        _say(
            f"train: {trained.data['merged_duplicates']} repeated (user, item) rows merged "
            f"(labels summed), {trained.data['below_threshold']} rows below "
            "--positive-threshold dropped"
        )
    version = args.version or new_version_name()
    path = save_version(config.store, args.model, version, trained.save, trained.manifest_fields())
    metrics = {k: v for k, v in trained.metrics.items() if k != "fit_seconds"}
    passed = beats_baseline(trained.metrics)
    published = args.publish and (passed or args.force)
    if published:
        set_current(config.store, args.model, version)
        registered = _register(config, args, version, len(data), metrics, publish=True)
        _say(f"train: registry: {registered}")
    print(
        json.dumps(
            {
                "model": args.model,
                "version": version,
                "path": str(path),
                "metrics": metrics,
                "published": published,
            }
        )
    )
    if not args.publish:
        _say(f"train: not published; to serve it: uro-recs rollout {args.model} {version}")
    elif not published:
        gate = " and ".join(GATED_METRICS)
        _say(
            f"train: not published: {gate} is below the popularity baseline (or there was no "
            "held-out data to measure it); --force publishes anyway"
        )
        return EXIT_FAILED
    return 0


def cmd_import(config: Config, args: argparse.Namespace) -> int:
    """Check a model saved by LibRecommender elsewhere and make it a store version."""
    from uro_recs.core.model_store import new_version_name, set_current
    from uro_recs.pipeline.importer import import_model

    version = args.version or new_version_name()
    path = import_model(config.store, args.model, args.dir, args.kind, version)
    _say(f"import: {args.dir}: loads as {families.family(args.kind).libreco_class} and answers")
    if args.publish:
        set_current(config.store, args.model, version)
    registered = _register(config, args, version, rows=0, metrics={}, publish=args.publish)
    _say(f"import: registry: {registered}")
    print(json.dumps({"model": args.model, "version": version, "path": str(path)}))
    if not args.publish:
        _say(f"import: not published; to serve it: uro-recs rollout {args.model} {version}")
    return 0


def cmd_evaluate(config: Config, args: argparse.Namespace) -> int:
    """Train candidate kinds on one chronological split; print their table beside popularity."""
    from uro_recs.pipeline.interactions import check_interactions_csv

    if args.csv is not None:
        _say(f"evaluate: {args.csv}: {check_interactions_csv(args.csv)} interactions")
    kinds = families.KINDS if args.kinds == "all" else _column_list(args.kinds)
    unknown = [kind for kind in kinds if kind not in families.FAMILIES]
    if unknown:
        raise ConfigError(
            f"--kinds: unknown kind {', '.join(unknown)}; the kinds are {', '.join(families.KINDS)}"
        )
    if args.test_fraction == 0:
        raise ConfigError("--test-fraction: evaluating needs a hold-out above 0")
    apply_thread_limits(2)
    import pandas as pd

    from uro_recs.pipeline.compare import compare, table
    from uro_recs.pipeline.demo_data import make_interactions

    text_ids = {"user": str, "item": str}
    data = pd.read_csv(args.csv, dtype=text_ids) if args.csv is not None else make_interactions()
    features = None if args.item_features is None else _column_list(args.item_features)
    rows = compare(
        data,
        kinds,
        say=_say,
        epochs=args.epochs,
        embed_size=args.embed_size,
        test_fraction=args.test_fraction,
        item_features=features,
        positive_threshold=args.positive_threshold,
        eval_users=args.eval_users,
    )
    if args.json:
        print(json.dumps([row.as_dict() for row in rows]))
    else:
        print(table(rows))
    return 0


def _column_list(text: str) -> list[str]:
    return [column.strip() for column in text.split(",") if column.strip()]


def _columns_used(params: dict[str, Any], columns: Any, family: families.Family) -> str:
    from uro_recs.pipeline.interactions import REQUIRED_COLUMNS

    features = list(params.get("item_features") or [])
    ignored = [str(c) for c in columns if c not in REQUIRED_COLUMNS and c not in features]
    used = "item features " + (", ".join(features) if features else "none")
    if not family.item_features:
        used += f" ({family.kind} takes none)"
    return used + (f"; columns ignored: {', '.join(ignored)}" if ignored else "")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _fraction(text: str) -> float:
    value = _finite_float(text)
    if not 0 <= value <= 0.9:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 0.9, got {text!r}")
    return value


def _param(text: str) -> tuple[str, Any]:
    """A --param KEY=VALUE: the value as JSON (5, 0.01, [64, 32], "gru"), else as text."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def _params(pairs: list[tuple[str, Any]] | None) -> dict[str, Any]:
    return dict(pairs or [])


def _live_stats(config: Config, args: argparse.Namespace) -> dict[str, Any]:
    """The broker's `stats`, at --endpoint or the configured client socket (health, status)."""
    from uro_recs.sdk import Client

    with Client(args.endpoint or config.client_endpoint, timeout=args.timeout) as client:
        return client.stats()


def cmd_health(config: Config, args: argparse.Namespace) -> int:
    """Exit 0 when the broker answers and every configured model (and ingest, when enabled)
    has a live worker; 1 naming those that have none; 4 when no broker answers."""
    from uro_recs.core.protocol import INGEST_WORKERS

    stats = _live_stats(config, args)
    live = {name: int(model.get("workers", 0)) for name, model in stats["models"].items()}
    wanted = [model.name for model in config.models]
    if config.ingest.enabled:
        wanted.append(INGEST_WORKERS)
    missing = [name for name in wanted if live.get(name, 0) < 1]
    if stats.get("draining"):
        print("unhealthy: the broker is draining (shutting down)", file=sys.stderr)
        return EXIT_FAILED
    if missing:
        print(f"unhealthy: no live worker for {', '.join(missing)}", file=sys.stderr)
        return EXIT_FAILED
    print("healthy: " + (", ".join(f"{n} ({_workers(live[n])})" for n in wanted) or "no models"))
    return 0


def cmd_status(config: Config, args: argparse.Namespace) -> int:
    """The live broker's models, workers and the last minute's traffic, for a terminal."""
    stats = _live_stats(config, args)
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
        return 0
    print(format_status(stats))
    return 0


def format_status(stats: dict[str, Any]) -> str:
    """`stats` as a table: one row per model, the last minute's traffic beside its state.
    Latencies are the upper bounds of the broker's histogram buckets, hence the "<="."""
    uptime = int(stats["uptime_s"])
    state = "draining" if stats["draining"] else "serving"
    lines = [
        f"broker: {state}, up {uptime // 3600}h{uptime % 3600 // 60:02d}m, "
        f"{stats['clients']} clients, {stats['pending_bytes']} bytes pending",
        "",
    ]
    header = (
        "model",
        "versions",
        "workers",
        "in flight",
        "queued",
        "req/s",
        "p50",
        "p99",
        "errors",
    )
    rows = [header]
    recent = stats.get("last_minute", {})
    for name, model in sorted(stats["models"].items()):
        minute = recent.get(name, {})
        rows.append(
            (
                name,
                ",".join(model["versions"]) or "-",
                str(model["workers"]),
                str(model["in_flight"]),
                str(model["queued"]),
                f"{minute.get('per_s', 0.0):g}",
                _ms(minute.get("p50_ms")),
                _ms(minute.get("p99_ms")),
                str(minute.get("errors", 0)),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.append("")
    lines.append("req/s, latency (broker receipt to reply) and errors: the last minute")
    return "\n".join(line.rstrip() for line in lines)


def _workers(count: int) -> str:
    return f"{count} worker" if count == 1 else f"{count} workers"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return "> 60 s" if value > 60_000 else f"<= {value:g} ms"


def cmd_check_config(config: Config, args: argparse.Namespace) -> int:
    """The configuration loaded (ConfigError otherwise), summed up for a person."""
    source = str(args.config) if args.config is not None else "no file: defaults and environment"
    models = ", ".join(f"{m.name} ({_workers(m.workers)})" for m in config.models) or "none"
    print(f"config: {source}")
    print(f"  run_dir: {config.run_dir.absolute()}  (client socket {config.client_endpoint})")
    print(f"  store:   {config.store.absolute()}")
    print(f"  models:  {models}")
    print(f"  ingest:  {'on' if config.ingest.enabled else 'off'}")
    return 0


def cmd_recommend(config: Config, args: argparse.Namespace) -> int:
    from uro_recs.sdk import Client

    endpoint = args.endpoint or config.client_endpoint
    with Client(endpoint, model=args.model) as client:
        rec = client.recommend(args.user, n=args.n)
    print(json.dumps({"user": rec.user, "items": rec.items, "cold_start": rec.cold_start}))
    return 0


def cmd_rollout(config: Config, args: argparse.Namespace) -> int:
    from uro_recs.app.rollout import RolloutError, print_summary, rollout
    from uro_recs.core.model_store import StoreError, current_version
    from uro_recs.sdk import UroRecsError

    model = args.model or config.sync.model
    try:
        version = args.version or current_version(config.store, model)
        print_summary(rollout(config, model, version, timeout_s=args.timeout))
    except (RolloutError, UroRecsError, StoreError, ValueError, OSError) as exc:
        print(f"rollout failed: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_rollback(config: Config, args: argparse.Namespace) -> int:
    from uro_recs.app.rollout import RolloutError, previous_version, print_summary
    from uro_recs.app.rollout import rollout as roll
    from uro_recs.core.model_store import StoreError
    from uro_recs.sdk import UroRecsError

    try:
        version = previous_version(config, args.model)
        summary = roll(config, args.model, version, timeout_s=args.timeout)
    except (RolloutError, UroRecsError, StoreError, ValueError, OSError) as exc:
        print(f"rollback failed: {exc}", file=sys.stderr)
        return 1
    print_summary(summary)
    left = str(summary["from"])
    if left != version and "," not in left:
        _say(f"rollback: registry: {_record_rollback(config, args.model, left)}")
    return 0


def _register(
    config: Config,
    args: argparse.Namespace,
    version: str,
    rows: int,
    metrics: dict[str, float],
    publish: bool,
) -> str:
    """Record a version `train` or `import` made in the registry, as sync records its own
    (published when it was made CURRENT); says how that went. A database that cannot be
    reached costs seconds, not the version."""
    from uro_recs.pipeline import registry

    async def register(db: Any) -> None:
        async def write(conn: Any) -> None:
            await registry.record_training(
                conn,
                model=args.model,
                version=version,
                kind=args.kind,
                holder=f"uro-recs {args.command}",
                n_interactions=rows,
                data_start=None,
                data_end=None,
            )
            await registry.set_status(
                conn, args.model, version, "trained", expected=("training",), metrics=metrics
            )
            if publish:
                await registry.set_status(
                    conn, args.model, version, "published", expected=("trained",)
                )

        await db.transaction(write, f"register_{args.command}")

    failure = _with_registry(config, register)
    if failure is not None:
        return f"{args.model}/{version} not registered (the database: {failure})"
    return f"{args.model}/{version} registered as {'published' if publish else 'trained'}"


def _with_registry(config: Config, work: Callable[[Any], Any]) -> str | None:
    """Run `work(db)` on a quickly given-up connection; the failure's text, or None."""
    import asyncio
    import dataclasses

    import asyncpg

    from uro_recs.core.db import Database, DatabaseError

    quick = dataclasses.replace(config.database, retry_attempts=1, connect_timeout_s=3.0)

    async def run() -> None:
        async with await Database.connect(quick) as db:
            await work(db)

    try:
        asyncio.run(run())
    except (DatabaseError, OSError, asyncpg.PostgresError) as exc:
        return str(exc)
    return None


def _record_rollback(config: Config, model: str, left: str) -> str:
    """Mark the version a rollback left `rolled_back` in the registry; says how that went. A
    registry that cannot be reached costs a few seconds, not the rollback already done."""
    from uro_recs.pipeline.registry import record_rollback

    outcome: list[bool] = []

    async def mark(db: Any) -> None:
        outcome.append(await record_rollback(db, model, left))

    failure = _with_registry(config, mark)
    if failure is not None:
        return f"{model}/{left} not marked rolled_back (the database: {failure})"
    if outcome[0]:
        return f"{model}/{left} marked rolled_back"
    return f"{model}/{left} has no published row to mark (published outside sync)"


def cmd_install_systemd(_config: Config, args: argparse.Namespace) -> int:
    from uro_recs.app.install import InstallError, install_systemd

    try:
        report = install_systemd(
            root=args.root, executable=args.exec, members=args.member, reload=not args.no_reload
        )
    except InstallError as error:
        print(f"install-systemd: {error}", file=sys.stderr)
        return 1
    print("\n".join(report))
    return 0


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def cmd_db_migrate(config: Config, _args: argparse.Namespace) -> int:
    import asyncio

    from uro_recs.core.db import Database, DatabaseError, migrate

    async def run() -> str:
        async with await Database.connect(config.database) as db:
            report = await migrate(db)
            return (
                f"db migrate ({db.flavor}): {len(report.applied)} applied"
                f" {report.applied or ''}, {len(report.already)} already there,"
                f" {report.seconds:.2f} s"
            )

    try:
        print(asyncio.run(run()))
    except (DatabaseError, OSError) as error:
        print(f"db migrate failed: {error}", file=sys.stderr)
        return 1
    return 0


Command: TypeAlias = Callable[[Config, argparse.Namespace], int]


def _timed_job(job: str, run: Command) -> Command:
    """Run a periodic job's command and, with [sync] metrics_dir set, record how it went."""

    def command(config: Config, args: argparse.Namespace) -> int:
        started = time.monotonic()
        status = EXIT_FAILED
        try:
            status = int(run(config, args))
            return status
        finally:
            if config.sync.metrics_dir:
                from uro_recs.app.job_metrics import record_job

                model = args.model or config.sync.model
                seconds = time.monotonic() - started
                record_job(Path(config.sync.metrics_dir), job, model, status == 0, seconds)

    return command


def cmd_sync(config: Config, args: argparse.Namespace) -> int:
    apply_thread_limits(config.sync.threads)
    import asyncio

    from uro_recs.core.db import DatabaseError
    from uro_recs.pipeline.sync import SyncError, run_sync

    try:
        report = asyncio.run(
            run_sync(
                config,
                model=args.model,
                kind=args.kind,
                force=args.force,
                progress=sys.stderr.isatty(),
                say=_say,
            )
        )
    except (SyncError, DatabaseError, OSError) as error:
        print(f"sync failed: {error}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0 if report.status == "published" else 3


def cmd_batch_recommend(config: Config, args: argparse.Namespace) -> int:
    apply_thread_limits(config.sync.threads)
    import asyncio

    from uro_recs.core.db import DatabaseError
    from uro_recs.core.model_store import StoreError
    from uro_recs.pipeline.batch import batch_recommend

    try:
        report = asyncio.run(
            batch_recommend(
                config,
                model=args.model,
                version=args.version,
                n=args.n,
                progress=sys.stderr.isatty(),
                say=_say,
            )
        )
    except (DatabaseError, StoreError, OSError) as error:
        print(f"batch-recommend failed, the live generation is unchanged: {error}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


def cmd_demo(_config: Config, args: argparse.Namespace) -> int:
    from uro_recs.app.demo import run_demo

    return run_demo(Path(args.dir), once=args.once, retrain=args.retrain)


_DESCRIPTION = """\
uro-recs serves LibRecommender models to uro over ZeroMQ: a broker, model workers, the
database sync that trains and publishes model versions, and the batch recommendations.

Start with `uro-recs demo`; in production, `uro-recs install-systemd`. Every command takes
--config FILE (before or after the command) and --debug (show tracebacks)."""

_EPILOG = """\
exit status: 0 done; 1 the operation failed; 2 a wrong command line, configuration or input
file; 3 another broker holds the run_dir (sync: the new model was not published);
4 the broker or the database cannot be reached."""


def _training_options(parser: argparse.ArgumentParser) -> None:
    """The options `train` and `evaluate` share: how the data is read and the model sized."""
    parser.add_argument("--epochs", type=_positive_int, default=None, help="default: per kind")
    parser.add_argument("--embed-size", type=_positive_int, default=None, help="default: per kind")
    parser.add_argument(
        "--test-fraction",
        type=_fraction,
        default=0.2,
        help="each user's newest interactions held out to measure it (default 0.2; 0: none)",
    )
    parser.add_argument(
        "--item-features",
        default=None,
        metavar="COLUMNS",
        help="comma-separated item feature columns (default: item_kind, item_uploader if there)",
    )
    parser.add_argument(
        "--positive-threshold",
        type=_finite_float,
        default=None,
        metavar="LABEL",
        help="keep rows with label >= LABEL as positives (default: labels are weights)",
    )


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="uro-recs",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, default=None, help="TOML configuration file")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of failures")
    parser.add_argument("--version", action="version", version=f"uro-recs {_version()}")
    # The same two options after the command; SUPPRESS keeps the top-level value when absent.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="TOML file")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(subparsers: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = subparsers.add_parser(
            name, parents=[common], formatter_class=formatter, **kwargs
        )
        return parser

    demo = add(sub, "demo", help="train demo models, serve them over IPC, ask them")
    demo.add_argument(
        "--dir", default="var/demo", help="where the demo keeps its store and sockets"
    )
    demo.add_argument("--once", action="store_true", help="exit after the sample requests")
    demo.add_argument("--retrain", action="store_true", help="train even if models exist")
    demo.set_defaults(func=cmd_demo)

    add(sub, "serve", help="run the broker and the configured workers").set_defaults(func=cmd_serve)
    add(sub, "broker", help="run the broker alone").set_defaults(func=cmd_broker)

    worker = add(sub, "worker", help="run one worker for one model")
    which = worker.add_mutually_exclusive_group(required=True)
    which.add_argument("--model")
    which.add_argument("--instance", help="a systemd instance name <model>-<n>, e.g. als-1")
    worker.add_argument("--version", default="", help="default: the store's CURRENT version")
    worker.set_defaults(func=cmd_worker)

    add(
        sub, "ingest-worker", help="run one ingest worker (the `ingest` op, into recs_events)"
    ).set_defaults(func=cmd_ingest_worker)

    train = add(
        sub, "train", help="train a model version into the store; --publish makes it CURRENT"
    )
    train.add_argument("--model", required=True, help="the model's name in the store")
    train.add_argument(
        "--kind", choices=families.KINDS, default="als", metavar="KIND", help="default: als"
    )
    data = train.add_mutually_exclusive_group(required=True)
    data.add_argument("--csv", type=Path, help="interactions: columns user,item,label,time")
    data.add_argument(
        "--demo-data", action="store_true", help="synthetic interactions, for trying it out"
    )
    train.add_argument("--version", default=None, help="default: named for the current time")
    train.add_argument(
        "--publish",
        action="store_true",
        help="make it CURRENT if it scores at least the popularity baseline",
    )
    train.add_argument("--force", action="store_true", help="with --publish: skip the gate")
    _training_options(train)
    train.add_argument(
        "--no-refit",
        dest="refit",
        action="store_false",
        help="publish the model fitted without the held-out part (default: refit on all)",
    )
    train.add_argument(
        "--param",
        type=_param,
        action="append",
        metavar="KEY=VALUE",
        help="a hyperparameter of the kind's libreco class, the value as JSON; repeatable",
    )
    train.set_defaults(func=cmd_train)

    imported = add(
        sub, "import", help="check a model LibRecommender saved elsewhere, add it to the store"
    )
    imported.add_argument("--model", required=True, help="the model's name in the store")
    imported.add_argument(
        "--kind", required=True, choices=families.KINDS, metavar="KIND", help="its family"
    )
    imported.add_argument(
        "--dir", required=True, type=Path, help="the folder libreco's save() wrote into"
    )
    imported.add_argument("--version", default=None, help="default: named for the current time")
    imported.add_argument("--publish", action="store_true", help="make it CURRENT")
    imported.set_defaults(func=cmd_import)

    evaluate = add(
        sub, "evaluate", help="train candidate kinds on one split and compare them with popularity"
    )
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", type=Path, help="interactions: columns user,item,label,time")
    source.add_argument("--demo-data", action="store_true", help="synthetic interactions")
    evaluate.add_argument(
        "--kinds", default="als,item_cf,deepfm", help="comma-separated kinds, or 'all'"
    )
    _training_options(evaluate)
    evaluate.add_argument(
        "--eval-users",
        type=_positive_int,
        default=None,
        help="score a seeded sample of this many held-out users (default: all)",
    )
    evaluate.add_argument("--json", action="store_true", help="one JSON line instead of a table")
    evaluate.set_defaults(func=cmd_evaluate)

    add(sub, "check-config", help="load the configuration and say what it holds").set_defaults(
        func=cmd_check_config
    )
    health = add(sub, "health", help="exit 0 when every configured model has a live worker")
    health.add_argument("--endpoint", default="", help="default: the configured IPC socket")
    health.add_argument("--timeout", type=float, default=1.0, help="seconds to wait")
    health.set_defaults(func=cmd_health)
    status = add(sub, "status", help="models, workers and the last minute's traffic")
    status.add_argument("--endpoint", default="", help="default: the configured IPC socket")
    status.add_argument("--timeout", type=float, default=1.0, help="seconds to wait")
    status.add_argument("--json", action="store_true", help="the broker's stats, as JSON")
    status.set_defaults(func=cmd_status)

    recommend = add(sub, "recommend", help="ask the running broker for one user")
    recommend.add_argument("user")
    recommend.add_argument("--model", default="als")
    recommend.add_argument("-n", "--n", type=int, default=10)
    recommend.add_argument("--endpoint", default="", help="default: the configured IPC socket")
    recommend.set_defaults(func=cmd_recommend)

    rollout = add(sub, "rollout", help="move a model's workers to a stored version")
    rollout.add_argument("model", nargs="?", default="", help="default: [sync] model")
    rollout.add_argument("version", nargs="?", default="", help="default: the store's CURRENT")
    rollout.add_argument("--timeout", type=float, default=120.0, help="seconds to wait")
    rollout.set_defaults(func=cmd_rollout)

    rollback = add(sub, "rollback", help="move a model back to its previous version")
    rollback.add_argument("model")
    rollback.add_argument("--timeout", type=float, default=120.0, help="seconds to wait")
    rollback.set_defaults(func=cmd_rollback)

    install = add(
        sub, "install-systemd", help="lay out the user, directories, config and systemd units"
    )
    install.add_argument(
        "--root", type=Path, default=Path("/"), help="install into this file system root"
    )
    install.add_argument(
        "--exec",
        type=Path,
        default=None,
        help="the uro-recs executable the units run, as seen from the root "
        "(default: the one next to this Python)",
    )
    install.add_argument(
        "--member",
        action="append",
        default=[],
        help="a user that may connect to the client socket (joins the uro-recs group)",
    )
    install.add_argument(
        "--no-reload", action="store_true", help="do not run systemctl daemon-reload"
    )
    install.set_defaults(func=cmd_install_systemd)
    db = add(sub, "db", help="uro-recs' tables in uro's database")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    add(db_sub, "migrate", help="create or update the tables (idempotent)").set_defaults(
        func=cmd_db_migrate
    )

    sync = add(
        sub, "sync", help="export interactions, train, evaluate, publish into store and registry"
    )
    sync.add_argument("--model", default=None, help="default: [sync] model")
    sync.add_argument(
        "--kind", choices=families.KINDS, default=None, metavar="KIND", help="default: [sync] kind"
    )
    sync.add_argument(
        "--force", action="store_true", help="publish even if it scores below popularity"
    )
    sync.set_defaults(func=_timed_job("sync", cmd_sync))

    batch = add(
        sub, "batch-recommend", help="write top-N per item kind for every user, then flip to it"
    )
    batch.add_argument("--model", default=None, help="default: [sync] model")
    batch.add_argument("--version", default=None, help="default: the store's CURRENT version")
    batch.add_argument("-n", "--n", type=int, default=None, help="default: [sync] batch_n")
    batch.set_defaults(func=_timed_job("batch-recommend", cmd_batch_recommend))
    return parser


EXIT_FAILED = 1  # the operation ran and failed
EXIT_USAGE = 2  # the command line, the configuration or an input file is wrong
EXIT_UNREACHABLE = 4  # the broker or the database cannot be reached

# What a base install (`pip install uro-recs`) lacks, and the extra that brings it.
_EXTRA_MODULES = frozenset({"numpy", "pandas", "tensorflow", "libreco", "torch", "threadpoolctl"})
_PIPELINE_COMMANDS = frozenset({"demo", "train", "evaluate", "import", "sync", "batch-recommend"})


def _version() -> str:
    try:
        return importlib.metadata.version("uro-recs")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def explain(exc: BaseException, command: str) -> tuple[int, str]:
    """The exit status and the one line a failure becomes (the traceback only with --debug)."""
    import asyncpg

    from uro_recs.core.db import DatabaseError
    from uro_recs.core.model_store import StoreError
    from uro_recs.pipeline.interactions import InvalidInput
    from uro_recs.sdk import DeadlineExceeded, RequestRejected, TryAgainLater, UroRecsError

    if (
        isinstance(exc, ModuleNotFoundError)
        and (exc.name or "").partition(".")[0] in _EXTRA_MODULES
    ):
        extra = "pipeline" if command in _PIPELINE_COMMANDS else "server"
        return EXIT_USAGE, (
            f"needs {exc.name}, which this install lacks; install the '{extra}' extra: "
            f"pip install 'uro-recs[{extra}]'"
        )
    if isinstance(exc, ConfigError | InvalidInput):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, StoreError):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, TryAgainLater | DeadlineExceeded):
        return EXIT_UNREACHABLE, exc.message
    if isinstance(exc, RequestRejected):
        return EXIT_USAGE, f"the broker refused it: {exc.message}"
    if isinstance(exc, UroRecsError):
        return EXIT_FAILED, exc.message
    if isinstance(exc, DatabaseError):
        return EXIT_UNREACHABLE, f"database: {exc}"
    if isinstance(exc, asyncpg.UndefinedTableError):
        return EXIT_USAGE, (
            f"the database has no such table ({exc}): [database] url must name uro's database, "
            "and `uro-recs db migrate` must have created uro-recs' own tables there"
        )
    if isinstance(exc, asyncpg.UndefinedColumnError):
        return EXIT_USAGE, (
            f"uro-recs' tables are older than this version ({exc}): run `uro-recs db migrate`"
        )
    if isinstance(exc, asyncpg.PostgresError):
        return EXIT_FAILED, f"database: {type(exc).__name__}: {exc}"
    if isinstance(exc, OSError):
        return EXIT_FAILED, f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}"
    return (
        EXIT_FAILED,
        f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
        configure_logging(config.log_format, config.log_level)
        return int(args.func(config, args))
    except Exception as exc:
        if args.debug:
            raise
        status, line = explain(exc, args.command)
        print(f"uro-recs {args.command}: {line}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
