"""The `uro-recs` command line: demo, serve, broker, worker, train, recommend.

Heavy imports (numpy, TensorFlow, libreco) happen inside the commands that need them, after
the thread limits are in the environment, so `uro-recs recommend` starts in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from uro_recs.config import Config, load_config
from uro_recs.logs import configure_logging


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
    from uro_recs.broker.broker import Broker

    config.run_dir.mkdir(parents=True, exist_ok=True)
    endpoints = [config.client_endpoint]
    if config.broker.tcp_endpoint:
        endpoints.append(config.broker.tcp_endpoint)
    broker = Broker(
        config.broker,
        client_endpoints=endpoints,
        worker_endpoint=config.worker_endpoint,
        control_endpoint=config.control_endpoint,
        known_models=[m.name for m in config.models],
    )
    broker.install_signal_handlers()
    try:
        broker.run()
    finally:
        broker.close()
    return 0


def cmd_worker(config: Config, args: argparse.Namespace) -> int:
    apply_thread_limits(config.worker.threads)
    from uro_recs.worker.engine import load_engine
    from uro_recs.worker.service import WorkerService

    model = config.model(args.model)
    version = args.version or model.version or None
    engine = load_engine(config.store, model.name, version, threads=config.worker.threads)
    engine.warm_up()
    service = WorkerService(engine, config.worker_endpoint, config.worker, config.broker)
    service.install_signal_handlers()
    try:
        service.run()
    finally:
        service.close()
    return 0


def cmd_serve(config: Config, args: argparse.Namespace) -> int:
    from uro_recs.supervisor import Supervisor

    if not config.models:
        print("serve: the configuration names no [[models]] to serve", file=sys.stderr)
        return 2
    return Supervisor(config, args.config).run()


def cmd_train(config: Config, args: argparse.Namespace) -> int:
    apply_thread_limits(2)
    import pandas as pd

    from uro_recs.worker.demo_data import make_interactions
    from uro_recs.worker.training import train_and_save

    data = pd.read_csv(args.csv) if args.csv else make_interactions()
    path = train_and_save(config.store, args.model, data, args.kind, version=args.version)
    print(json.dumps({"model": args.model, "version": path.name, "path": str(path)}))
    return 0


def cmd_recommend(config: Config, args: argparse.Namespace) -> int:
    from uro_recs.sdk import Client

    endpoint = args.endpoint or config.client_endpoint
    with Client(endpoint, model=args.model) as client:
        rec = client.recommend(args.user, n=args.n)
    print(json.dumps({"user": rec.user, "items": rec.items, "cold_start": rec.cold_start}))
    return 0


def cmd_demo(_config: Config, args: argparse.Namespace) -> int:
    from uro_recs.demo import run_demo

    return run_demo(Path(args.dir), once=args.once, retrain=args.retrain)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uro-recs", description=__doc__)
    parser.add_argument("--config", type=Path, help="TOML configuration file")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train demo models, serve them over IPC, ask them")
    demo.add_argument(
        "--dir", default="var/demo", help="where the demo keeps its store and sockets"
    )
    demo.add_argument("--once", action="store_true", help="exit after the sample requests")
    demo.add_argument("--retrain", action="store_true", help="train even if models exist")
    demo.set_defaults(func=cmd_demo)

    sub.add_parser("serve", help="run the broker and the configured workers").set_defaults(
        func=cmd_serve
    )
    sub.add_parser("broker", help="run the broker alone").set_defaults(func=cmd_broker)

    worker = sub.add_parser("worker", help="run one worker for one model")
    worker.add_argument("--model", required=True)
    worker.add_argument("--version", default="", help="default: the store's CURRENT version")
    worker.set_defaults(func=cmd_worker)

    train = sub.add_parser("train", help="train a model into the store and make it CURRENT")
    train.add_argument("--model", required=True, help="the model's name in the store")
    train.add_argument("--kind", choices=["als", "deepfm"], default="als")
    train.add_argument("--csv", type=Path, help="interactions with columns user,item,label,time")
    train.add_argument("--version", default=None)
    train.set_defaults(func=cmd_train)

    recommend = sub.add_parser("recommend", help="ask the running broker for one user")
    recommend.add_argument("user")
    recommend.add_argument("--model", default="als")
    recommend.add_argument("-n", "--n", type=int, default=10)
    recommend.add_argument("--endpoint", default="", help="default: the configured IPC socket")
    recommend.set_defaults(func=cmd_recommend)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = load_config(args.config)
    configure_logging(config.log_format)
    return int(args.func(config, args))


if __name__ == "__main__":
    sys.exit(main())
