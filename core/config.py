"""Configuration: one TOML file plus environment overrides, typed, defaults written once.

Every setting can be overridden by `URO_RECS_<SECTION>_<FIELD>` (for example
`URO_RECS_BROKER_QUEUE_LIMIT=50`); top-level settings by `URO_RECS_<FIELD>`.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints


@dataclass(frozen=True)
class BrokerConfig:
    tcp_endpoint: str = ""  # optional loopback TCP front end, e.g. "tcp://127.0.0.1:5555"
    # Both ways; a peer silent for `liveness` intervals is dead. A worker whose process exits
    # is noticed at once (pidfd); these find a hung one, in 750 ms: under the SDK's 1 s default
    # timeout, so its requests are redelivered while their callers still wait.
    heartbeat_ms: int = 250
    liveness: int = 3
    queue_limit: int = 1_000  # waiting requests per model; beyond it: "overloaded"
    default_timeout_ms: int = 5_000  # budget of a request that names none
    max_message_bytes: int = 1 << 20  # larger client messages get "too_large"
    # A request held by a worker past its deadline is answered "deadline_exceeded" this much
    # later (the worker's own answer, if it comes, is dropped and counted).
    in_flight_grace_ms: int = 250
    # What one client connection may hold in the broker at once; beyond it: "overloaded".
    client_max_requests: int = 1_024  # accepted and not yet answered
    client_max_bytes: int = 32 << 20  # their request bodies; also its unread large replies
    max_pending_bytes: int = 256 << 20  # request bodies held for all clients together
    send_hwm: int = 1_000  # messages libzmq queues per connection before a send fails
    # A recommend for more users than this is heavy: a worker holds at most heavy_per_worker
    # of them, so large requests never take every slot from small ones.
    heavy_request_users: int = 32
    heavy_per_worker: int = 1
    drain_timeout_s: float = 10.0  # on SIGTERM, time allowed to finish accepted requests
    # Who may connect to the client IPC socket (connecting needs write permission). Empty: as
    # the umask leaves it. Under systemd: "0660" and the group uro's user belongs to. The
    # control and workers sockets are always owner-only (0600).
    client_socket_mode: str = ""  # octal, e.g. "0660"
    client_socket_group: str = ""  # e.g. "uro-recs"

    def __post_init__(self) -> None:
        mode = self.client_socket_mode
        if mode and (not all(c in "01234567" for c in mode) or int(mode, 8) > 0o777):
            raise ConfigError(f"broker.client_socket_mode: expected octal like 0660, got {mode!r}")

    @property
    def client_socket_mode_bits(self) -> int | None:
        return int(self.client_socket_mode, 8) if self.client_socket_mode else None

    # The heartbeat timing, for the broker and the workers alike.
    @property
    def heartbeat_s(self) -> float:
        return self.heartbeat_ms / 1000

    @property
    def liveness_s(self) -> float:
        """The silence after which a peer is dead: `liveness` heartbeat intervals."""
        return self.heartbeat_s * self.liveness

    @property
    def busy_slice_s(self) -> float:
        """The longest a broker or worker loop spends on one thing (reading, one model call)
        before it services heartbeats again: half an interval, so busy never looks dead."""
        return self.heartbeat_s / 2


@dataclass(frozen=True)
class WorkerConfig:
    slots: int = 32  # requests the broker may hand this worker at once (its credits)
    threads: int = 1  # TF / torch / BLAS threads per worker
    max_batch_delay_ms: float = 0.0  # wait this long for more requests to batch together
    drain_timeout_s: float = 10.0
    # recommend also leaves out items a user had events with (recs_events) since the model's
    # data was exported, until the next retrain knows them. Needs [database].
    recent_events: bool = False
    recent_events_refresh_ms: int = 1_000


@dataclass(frozen=True)
class IngestConfig:
    """Ingest workers: the broker's `ingest` op, appending events to `recs_events`."""

    enabled: bool = False  # needs [database]
    workers: int = 1
    slots: int = 256  # requests one ingest worker holds at once; they share transactions


@dataclass(frozen=True)
class DatabaseConfig:
    """uro's CockroachDB (or PostgreSQL) and how the sync path talks to it."""

    url: str = "postgresql://postgres@127.0.0.1:5432/uro"
    pool_size: int = 4
    connect_timeout_s: float = 10.0
    # Whole-transaction attempts on SQLSTATE 40001 and lost connections, with capped
    # exponential backoff: about 10 s in all with these values, enough for a restart.
    retry_attempts: int = 10
    retry_base_delay_s: float = 0.05
    retry_max_delay_s: float = 2.0
    page_rows: int = 10_000  # export: rows per keyset page
    batch_rows: int = 1_000  # writes: rows per statement, one transaction each
    write_concurrency: int = 4  # write transactions in flight at once
    use_copy: bool = False  # binary COPY instead of multi-row INSERT (CockroachDB >= 23.1)
    lease_ttl_s: float = 120.0  # a sync or batch that stops renewing loses its lease


@dataclass(frozen=True)
class SyncConfig:
    """`uro-recs sync` (export, train, evaluate, publish) and `uro-recs batch-recommend`."""

    model: str = "als"  # the model's name in the store and the registry
    kind: str = "als"  # the libreco model trained for it: "als" or "deepfm"
    test_fraction: float = 0.2  # each user's latest interactions held out for evaluation
    refit: bool = True  # after evaluating, train again on everything before publishing
    threads: int = 2  # training threads
    save_weight: float = 1.0  # label weight of a backpack save; events carry their own
    batch_n: int = 20  # batch recommendations per user and item kind
    keep_generations: int = 2  # batch generations kept: the live one and the one before


@dataclass(frozen=True)
class ModelConfig:
    name: str
    version: str = ""  # empty: the store's CURRENT version
    workers: int = 2


@dataclass(frozen=True)
class Config:
    run_dir: Path = Path("var/run")  # holds the IPC sockets
    store: Path = Path("var/store")  # the model store: <store>/<model>/<version>/
    log_format: str = "auto"  # "json", "console" or "auto" (console on a terminal)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    models: tuple[ModelConfig, ...] = ()

    @property
    def client_endpoint(self) -> str:
        return f"ipc://{self.run_dir.absolute() / 'client.sock'}"

    @property
    def worker_endpoint(self) -> str:
        return f"ipc://{self.run_dir.absolute() / 'workers.sock'}"

    @property
    def control_endpoint(self) -> str:
        return f"ipc://{self.run_dir.absolute() / 'control.sock'}"

    def model(self, name: str) -> ModelConfig:
        for model in self.models:
            if model.name == name:
                return model
        return ModelConfig(name=name)


class ConfigError(ValueError):
    pass


def _coerce(value: Any, kind: Any, where: str) -> Any:
    if kind is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected a boolean, got {value!r}")
    try:
        if kind is Path:
            return Path(value)
        if kind in (int, float, str):
            return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}") from None
    raise ConfigError(f"{where}: unsupported setting type {kind}")


def _section(
    cls: type[Any], data: Mapping[str, Any], env_prefix: str | None, where: str
) -> dict[str, Any]:
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind) or f.name == "models":
            continue
        env_name = f"{env_prefix}{f.name.upper()}" if env_prefix else ""
        env_value = os.environ.get(env_name) if env_name else None
        if env_value is not None:
            values[f.name] = _coerce(env_value, kind, env_name)
        elif f.name in data:
            values[f.name] = _coerce(data[f.name], kind, f"{where}{f.name}")
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if cls is ModelConfig and "name" not in data:
        raise ConfigError(f"{where}name: every model needs a name")
    if unknown:
        raise ConfigError(f"{where or 'top level'}: unknown settings {sorted(unknown)}")
    return values


def load_config(path: Path | None = None) -> Config:
    """Read the TOML file (if any), then apply environment overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    top = _section(Config, data, "URO_RECS_", "")
    broker = BrokerConfig(
        **_section(BrokerConfig, data.get("broker", {}), "URO_RECS_BROKER_", "broker.")
    )
    worker = WorkerConfig(
        **_section(WorkerConfig, data.get("worker", {}), "URO_RECS_WORKER_", "worker.")
    )
    ingest = IngestConfig(
        **_section(IngestConfig, data.get("ingest", {}), "URO_RECS_INGEST_", "ingest.")
    )
    database = DatabaseConfig(
        **_section(DatabaseConfig, data.get("database", {}), "URO_RECS_DATABASE_", "database.")
    )
    sync = SyncConfig(**_section(SyncConfig, data.get("sync", {}), "URO_RECS_SYNC_", "sync."))
    models = tuple(
        ModelConfig(**_section(ModelConfig, entry, None, f"models[{i}]."))
        for i, entry in enumerate(data.get("models", []))
    )
    return Config(
        **top,
        broker=broker,
        worker=worker,
        ingest=ingest,
        database=database,
        sync=sync,
        models=models,
    )
