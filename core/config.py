"""Configuration: one TOML file plus environment overrides, typed, defaults written once.

Every setting can be overridden by `URO_RECS_<SECTION>_<FIELD>` (for example
`URO_RECS_BROKER_QUEUE_LIMIT=50`); top-level settings by `URO_RECS_<FIELD>`.

Loading is strict, and every problem is a `ConfigError` with a one-line message naming the
setting (or the environment variable, or the file): a value of the wrong TOML type or out of
its range, an unknown key, a section that is not a table, a file that is missing or not TOML.
A setting's range is declared next to it (`_setting`); numbers without one take the default
range: integers >= 1, floats > 0.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time
from pathlib import Path
from typing import Any, Final, TypeVar, get_type_hints

from uro_recs.core.families import KINDS
from uro_recs.core.model_store import check_model_name, check_version_name
from uro_recs.core.protocol import MAX_TIMEOUT_MS

_T = TypeVar("_T")


def _setting(
    default: _T,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    choices: tuple[str, ...] = (),
) -> _T:
    """A setting's default with the values it accepts: a number >= `ge` (or > `gt`) and
    <= `le`, or a string among `choices`. A number with neither `ge` nor `gt` gets the default
    lower bound (integers >= 1, floats > 0); `ge=-math.inf` lifts it (any finite number)."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le, "choices": choices})


@dataclass(frozen=True)
class BrokerConfig:
    tcp_endpoint: str = ""  # optional loopback TCP front end, e.g. "tcp://127.0.0.1:5555"
    # Both ways; a peer silent for `liveness` intervals is dead. A worker whose process exits
    # is noticed at once (pidfd); these find a hung one, in 750 ms: under the SDK's 1 s default
    # timeout, so its requests are redelivered while their callers still wait.
    heartbeat_ms: int = 250
    liveness: int = 3
    queue_limit: int = 1_000  # waiting requests per model; beyond it: "overloaded"
    # Budget of a request that names none; at most the protocol's longest timeout.
    default_timeout_ms: int = _setting(5_000, le=MAX_TIMEOUT_MS)
    # Larger client messages get "too_large". At most 4 GiB: ZeroMQ's limit on a whole message
    # (an int64) is set to 4x this plus 1 KiB.
    max_message_bytes: int = _setting(1 << 20, le=1 << 32)
    # A request held by a worker past its deadline is answered "deadline_exceeded" this much
    # later (the worker's own answer, if it comes, is dropped and counted).
    in_flight_grace_ms: int = _setting(250, ge=0)
    # What one client connection may hold in the broker at once; beyond it: "overloaded".
    client_max_requests: int = 1_024  # accepted and not yet answered
    client_max_bytes: int = 32 << 20  # their request bodies; also its unread large replies
    max_pending_bytes: int = 256 << 20  # request bodies held for all clients together
    # Messages libzmq queues per connection before a send fails (a C int in libzmq).
    send_hwm: int = _setting(1_000, le=2**31 - 1)
    # A recommend for more users than this is heavy: a worker holds at most heavy_per_worker
    # of them, so large requests never take every slot from small ones.
    heavy_request_users: int = 32
    heavy_per_worker: int = 1
    # On SIGTERM, time allowed to finish accepted requests; 0: stop at once.
    drain_timeout_s: float = _setting(10.0, ge=0)
    # Who may connect to the client IPC socket (connecting needs write permission). Empty: as
    # the umask leaves it. Under systemd: "0660" and the group uro's user belongs to. The
    # control and workers sockets are always owner-only (0600).
    client_socket_mode: str = ""  # octal, e.g. "0660"
    client_socket_group: str = ""  # e.g. "uro-recs"
    # Prometheus metrics over HTTP at "host:port" (e.g. "127.0.0.1:9464"); empty: off.
    # Keep it on loopback: the numbers are for the machine's own Prometheus.
    metrics_address: str = ""

    def __post_init__(self) -> None:
        mode = self.client_socket_mode
        if mode and (not all(c in "01234567" for c in mode) or int(mode, 8) > 0o777):
            raise ConfigError(f"broker.client_socket_mode: expected octal like 0660, got {mode!r}")
        if self.metrics_address:
            host, _, port = self.metrics_address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(
                    "broker.metrics_address: expected host:port like 127.0.0.1:9464, "
                    f"got {self.metrics_address!r}"
                )

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
    # Wait this long for more requests to batch together (0: never wait); at most the
    # protocol's longest timeout, past which every request waiting would have expired.
    max_batch_delay_ms: float = _setting(0.0, ge=0, le=MAX_TIMEOUT_MS)
    drain_timeout_s: float = _setting(10.0, ge=0)
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
    # 0 (either of them): retry at once.
    retry_base_delay_s: float = _setting(0.05, ge=0)
    retry_max_delay_s: float = _setting(2.0, ge=0)
    page_rows: int = 10_000  # export: rows per keyset page
    batch_rows: int = 1_000  # writes: rows per statement, one transaction each
    write_concurrency: int = 4  # write transactions in flight at once
    use_copy: bool = False  # binary COPY instead of multi-row INSERT (CockroachDB >= 23.1)
    # A sync or batch that stops renewing loses its lease (renewed every third of it). At most
    # a day: a crashed run's lease blocks the next one for that long.
    lease_ttl_s: float = _setting(120.0, le=86_400)


@dataclass(frozen=True)
class SyncConfig:
    """`uro-recs sync` (export, train, evaluate, publish) and `uro-recs batch-recommend`."""

    model: str = "als"  # the model's name in the store and the registry
    kind: str = _setting("als", choices=KINDS)  # the LibRecommender family (README, "Models")
    # Hyperparameters of that family's libreco class over uro-recs' defaults, e.g.
    # {n_epochs = 20, embed_size = 64}; checked against the class when training starts.
    params: dict[str, Any] = field(default_factory=dict)
    # Each user's latest interactions held out for evaluation; 0: none (no metrics).
    test_fraction: float = _setting(0.2, ge=0, le=0.9)
    refit: bool = True  # after evaluating, train again on everything before publishing
    # A published version becomes CURRENT at once (and the retrain unit's rollout step moves
    # the workers onto it); false: it waits in the store for `uro-recs rollout MODEL VERSION`.
    go_live: bool = True
    # An absolute directory for node_exporter's textfile collector: sync and batch-recommend
    # write their duration, outcome and last success time there (app/job_metrics.py). Empty: off.
    metrics_dir: str = ""
    threads: int = 2  # training threads
    # Label weight of a backpack save (any finite number); events carry their own.
    save_weight: float = _setting(1.0, ge=-math.inf)
    batch_n: int = 20  # batch recommendations per user and item kind
    keep_generations: int = 2  # batch generations kept: the live one and the one before


# `retrieve_from` naming a DeepFM's own linear and FM terms as its first stage (no model name
# starts with "@").
OWN_FM: Final = "@fm"


@dataclass(frozen=True)
class ModelConfig:
    name: str
    version: str = ""  # empty: the store's CURRENT version
    workers: int = _setting(2, ge=0)  # 0: the broker knows it, no worker is started
    # Two-stage serving (a DeepFM only): `candidates` items per user are retrieved, and this
    # model ranks only those instead of every item. By another model of the store (an
    # embedding model, say "als"), or, with OWN_FM, by the DeepFM's own linear and FM terms.
    # Empty: rank every item. README, "Two-stage serving", gives recall and speed.
    retrieve_from: str = ""
    candidates: int = _setting(500, le=100_000)


@dataclass(frozen=True)
class Config:
    run_dir: Path = Path("var/run")  # holds the IPC sockets
    store: Path = Path("var/store")  # the model store: <store>/<model>/<version>/
    # "auto": console on a terminal, JSON otherwise.
    log_format: str = _setting("auto", choices=("json", "console", "auto"))
    # uro-recs' own lines at this level and worse; other libraries' at warning and worse.
    log_level: str = _setting("info", choices=("debug", "info", "warning", "error"))
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
    def worker_metrics_dir(self) -> Path | None:
        """Where workers leave their Prometheus figures for the broker; None: metrics off."""
        return self.run_dir / "worker-metrics" if self.broker.metrics_address else None

    @property
    def control_endpoint(self) -> str:
        return f"ipc://{self.run_dir.absolute() / 'control.sock'}"

    def model(self, name: str) -> ModelConfig:
        for model in self.models:
            if model.name == name:
                return model
        return ModelConfig(name=name)


class ConfigError(ValueError):
    """A configuration problem, in one line that names the setting, the variable or the file."""


_SECTIONS: dict[str, type[Any]] = {
    "broker": BrokerConfig,
    "worker": WorkerConfig,
    "ingest": IngestConfig,
    "database": DatabaseConfig,
    "sync": SyncConfig,
}
_TABLE: Any = dict[str, Any]  # a setting that is a table of its own (`[sync] params`)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1  # TOML's integers (tomllib takes longer ones)
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_ENV_INT = re.compile(r"[+-]?[0-9]+(?:_[0-9]+)*")
_ENV_FLOAT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


@dataclass(frozen=True)
class _Rule:
    """What one setting accepts: its type, and its range or its choices."""

    kind: Any
    ge: float | None
    gt: float | None
    le: float | None
    choices: tuple[str, ...]

    @classmethod
    def of(cls, f: dataclasses.Field[Any], kind: Any) -> _Rule:
        ge, gt, le = f.metadata.get("ge"), f.metadata.get("gt"), f.metadata.get("le")
        if ge is None and gt is None:  # the default ranges
            if kind is int:
                ge = 1
            elif kind is float:
                gt = 0
        return cls(kind, ge, gt, le, f.metadata.get("choices", ()))

    def expected(self, from_env: bool) -> str:
        if self.kind == _TABLE:
            return "a JSON object" if from_env else "a table, e.g. {n_epochs = 20}"
        if self.kind is bool:
            return "a boolean (true/false, yes/no, on/off, 1/0)" if from_env else "a boolean"
        if self.kind is Path:
            return "a path (a non-empty string)"
        if self.kind is str:
            return f"one of {', '.join(map(repr, self.choices))}" if self.choices else "a string"
        bounds = [f"> {_number(self.gt)}"] if self.gt is not None else []
        if self.ge is not None and self.ge != -math.inf:
            bounds.append(f">= {_number(self.ge)}")
        if self.le is not None:
            bounds.append(f"<= {_number(self.le)}")
        noun = "an integer" if self.kind is int else "a number" if bounds else "a finite number"
        return " ".join([noun, " and ".join(bounds)]).strip()

    def in_range(self, value: float) -> bool:
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
        )


def _number(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def _show(value: Any) -> str:
    """A value as a message shows it: TOML's spelling, on one line, not too long."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, str) and len(value) > 60:
        return repr(value[:60]) + "..."
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def _parse(value: Any, rule: _Rule, where: str, base: Path | None, from_env: bool) -> Any:
    """One setting's value: from the file (`base`: the file's directory, which relative paths
    are in) or from the environment (a string; relative paths stay relative to the current
    directory)."""
    parsed = _from_env(value, rule.kind) if from_env else _from_toml(value, rule.kind)
    number = isinstance(parsed, int | float) and not isinstance(parsed, bool)
    note = ""
    if isinstance(parsed, int) and number and not _INT64_MIN <= parsed <= _INT64_MAX:
        note = " (more than 64 bits)"
    elif isinstance(parsed, float) and not math.isfinite(parsed):
        note = " (not finite)"
    if (
        note
        or parsed is None
        or (rule.choices and parsed not in rule.choices)
        or (number and not rule.in_range(parsed))
    ):
        raise ConfigError(f"{where}: expected {rule.expected(from_env)}, got {_show(value)}{note}")
    if isinstance(parsed, Path) and base is not None:
        return base / parsed
    return parsed


def _from_toml(value: Any, kind: Any) -> Any:
    """`value` as a `kind`, or None: TOML's types as they are, no rounding, no parsing; only
    an integer becomes a float where a float is expected."""
    if kind is bool:
        return value if isinstance(value, bool) else None
    if kind is int:
        return value if type(value) is int else None
    if kind is float:
        if type(value) is int:
            return float(value) if _INT64_MIN <= value <= _INT64_MAX else value
        return value if type(value) is float else None
    if kind is Path:
        return Path(value) if isinstance(value, str) and value and "\0" not in value else None
    if kind is str:
        return value if isinstance(value, str) else None
    if kind == _TABLE:
        return value if isinstance(value, dict) else None
    raise ConfigError(f"unsupported setting type {kind}")  # a new field's type: add it here


def _from_env(text: str, kind: Any) -> Any:
    """An environment variable's string as a `kind`, or None: literals only (an integer
    setting takes "32", not "32.5")."""
    if kind is bool:
        spelling = text.strip().lower()
        return True if spelling in _TRUE else False if spelling in _FALSE else None
    if kind is int:
        try:
            return int(text) if _ENV_INT.fullmatch(text.strip()) else None
        except ValueError:  # more digits than Python converts
            return None
    if kind is float:
        return float(text) if _ENV_FLOAT.fullmatch(text.strip()) else None
    if kind is Path:
        return Path(text) if text and "\0" not in text else None
    if kind == _TABLE:
        try:
            return _from_toml(json.loads(text), kind)
        except ValueError:
            return None
    return _from_toml(text, kind)


def _unknown(data: Mapping[str, Any], known: list[str], where: str) -> None:
    """Refuse keys that are no setting, naming each (a close one as a guess)."""
    unknown = sorted(set(data) - set(known))
    if not unknown:
        return

    def named(name: str) -> str:  # a key as TOML's bare key, or quoted when it is not one
        return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else _show(name)

    def guess(name: str) -> str:
        close = difflib.get_close_matches(name, known, n=1)
        return close[0] if close else ""

    if len(unknown) == 1:
        name = unknown[0]
        hint = f"; did you mean {guess(name)}?" if guess(name) else ""
        raise ConfigError(f"{where}{named(name)}: unknown setting{hint}")
    names = [named(n) + (f" (did you mean {guess(n)}?)" if guess(n) else "") for n in unknown]
    raise ConfigError(f"{where.rstrip('.') or 'top level'}: unknown settings {', '.join(names)}")


def _section(
    cls: type[Any],
    data: Mapping[str, Any],
    env_prefix: str | None,
    where: str,
    base: Path | None,
) -> dict[str, Any]:
    hints = get_type_hints(cls)
    fields = dataclasses.fields(cls)
    _unknown(data, [f.name for f in fields], where)
    values: dict[str, Any] = {}
    for f in fields:
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind) or f.name == "models":
            continue
        rule = _Rule.of(f, kind)
        env_name = f"{env_prefix}{f.name.upper()}" if env_prefix else ""
        env_value = os.environ.get(env_name) if env_name else None
        if env_value is not None:
            values[f.name] = _parse(env_value, rule, env_name, None, from_env=True)
        elif f.name in data:
            values[f.name] = _parse(data[f.name], rule, f"{where}{f.name}", base, from_env=False)
    return values


def _table(data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{name}: expected a table ([{name}]), got {_show(table)}")
    return table


def _models(entries: Any, base: Path | None) -> tuple[ModelConfig, ...]:
    if not isinstance(entries, list):
        raise ConfigError(f"models: expected an array of tables ([[models]]), got {_show(entries)}")
    models: list[ModelConfig] = []
    for i, entry in enumerate(entries):
        where = f"models[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a table ([[models]]), got {_show(entry)}")
        values = _section(ModelConfig, entry, None, f"{where}.", base)
        name = values.get("name")
        if name is None:
            raise ConfigError(f"{where}.name: every model needs a name")
        if not name:
            raise ConfigError(f"{where}.name: expected a non-empty string, got ''")
        if values.get("version"):
            try:
                check_version_name(values["version"])
            except ValueError as exc:
                raise ConfigError(f"{where}.version: {exc}") from None
        for j, earlier in enumerate(models):
            if earlier.name == name:
                raise ConfigError(f"{where}.name: {name!r} is already models[{j}]")
        if values.get("retrieve_from"):
            if values["retrieve_from"] == name:
                raise ConfigError(f"{where}.retrieve_from: name another model than {name!r}")
            try:
                if values["retrieve_from"] != OWN_FM:
                    check_model_name(values["retrieve_from"])
            except ValueError as exc:
                raise ConfigError(f"{where}.retrieve_from: {exc}, or {OWN_FM!r}") from None
        models.append(ModelConfig(**values))
    return tuple(models)


def _read(path: Path) -> dict[str, Any]:
    shown = str(path) if str(path).isprintable() else repr(str(path))
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        problem = "not found"
    except IsADirectoryError:
        problem = "is a directory"
    except PermissionError:
        problem = "not readable (permission denied)"
    except OSError as exc:
        problem = f"not readable ({exc.strerror or type(exc).__name__})"
    except tomllib.TOMLDecodeError as exc:
        problem = " ".join(str(exc).split())  # "Invalid value (at line 3, column 7)"
    except UnicodeDecodeError as exc:
        problem = f"not UTF-8 text (byte {exc.start})"
    except ValueError as exc:  # tomllib's own limits, e.g. an integer of 5,000 digits
        problem = " ".join(str(exc).split())
    except RecursionError:
        problem = "nested too deeply"
    raise ConfigError(f"config file {shown}: {problem}")


def load_config(path: Path | None = None) -> Config:
    """Read the TOML file (if any), then apply environment overrides. Relative paths in the
    file are relative to the file's directory; in the environment, to the current one."""
    data: dict[str, Any] = {}
    base: Path | None = None
    if path is not None:
        data = _read(path)
        base = path.absolute().parent
    top = _section(Config, data, "URO_RECS_", "", base)
    sections = {
        name: cls(
            **_section(cls, _table(data, name), f"URO_RECS_{name.upper()}_", f"{name}.", base)
        )
        for name, cls in _SECTIONS.items()
    }
    return Config(**top, **sections, models=_models(data.get("models", []), base))
