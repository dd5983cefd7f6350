"""Configuration: a TOML file into typed sections, environment overrides over the file, and a
one-line error naming the setting for a bad value: a value of the wrong TOML type or out of its
range, an unknown key, a section that is not a table, a file that is missing or not TOML."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from datetime import date, datetime, time
from pathlib import Path
from typing import Any, get_type_hints

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uro_recs.core.config import (
    BrokerConfig,
    Config,
    ConfigError,
    DatabaseConfig,
    IngestConfig,
    ModelConfig,
    SyncConfig,
    WorkerConfig,
    load_config,
)
from uro_recs.core.protocol import MAX_TIMEOUT_MS


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("URO_RECS_"):
            monkeypatch.delenv(name)


def toml_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "uro-recs.toml"
    path.write_text(text)
    return path


def test_no_file_and_no_environment_give_the_defaults() -> None:
    assert load_config(None) == Config()


def test_a_toml_file_loads_into_the_typed_sections(tmp_path: Path) -> None:
    path = toml_file(
        tmp_path,
        """
run_dir = "/run/uro-recs"
log_format = "json"

[broker]
tcp_endpoint = "tcp://127.0.0.1:5555"
queue_limit = 200
drain_timeout_s = 3
client_socket_mode = "0660"

[worker]
slots = 8
max_batch_delay_ms = 2
recent_events = true

[ingest]
enabled = true

[database]
url = "postgresql://uro@db:26257/uro"
use_copy = true

[sync]
kind = "deepfm"
test_fraction = 0.1

[[models]]
name = "als"

[[models]]
name = "deepfm"
version = "2026-11-27T000000Z"
workers = 1
""",
    )

    config = load_config(path)

    assert config == Config(
        run_dir=Path("/run/uro-recs"),
        log_format="json",
        broker=BrokerConfig(
            tcp_endpoint="tcp://127.0.0.1:5555",
            queue_limit=200,
            drain_timeout_s=3.0,
            client_socket_mode="0660",
        ),
        worker=WorkerConfig(slots=8, max_batch_delay_ms=2.0, recent_events=True),
        ingest=IngestConfig(enabled=True),
        database=DatabaseConfig(url="postgresql://uro@db:26257/uro", use_copy=True),
        sync=SyncConfig(kind="deepfm", test_fraction=0.1),
        models=(
            ModelConfig("als"),
            ModelConfig("deepfm", version="2026-11-27T000000Z", workers=1),
        ),
    )
    # TOML integers given for float settings become floats
    assert type(config.broker.drain_timeout_s) is float
    assert type(config.worker.max_batch_delay_ms) is float
    assert config.model("deepfm").workers == 1
    assert config.model("unlisted") == ModelConfig("unlisted")


def test_the_environment_overrides_the_file_and_the_file_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = toml_file(tmp_path, "[broker]\nqueue_limit = 200\n[worker]\nslots = 8\nthreads = 2\n")
    monkeypatch.setenv("URO_RECS_BROKER_QUEUE_LIMIT", "50")  # over the file
    monkeypatch.setenv("URO_RECS_BROKER_HEARTBEAT_MS", "100")  # over the default
    monkeypatch.setenv("URO_RECS_WORKER_MAX_BATCH_DELAY_MS", "1.5")
    monkeypatch.setenv("URO_RECS_WORKER_RECENT_EVENTS", "yes")
    monkeypatch.setenv("URO_RECS_STORE", "/var/lib/uro-recs/models")  # top level
    monkeypatch.setenv("URO_RECS_DATABASE_URL", "postgresql://secret@db/uro")

    config = load_config(path)

    assert config.broker.queue_limit == 50
    assert config.broker.heartbeat_ms == 100
    assert config.worker == WorkerConfig(
        slots=8, threads=2, max_batch_delay_ms=1.5, recent_events=True
    )
    assert config.store == Path("/var/lib/uro-recs/models")
    assert config.database.url == "postgresql://secret@db/uro"
    assert config.run_dir == Config().run_dir


@pytest.mark.parametrize("spelling", ["1", "true", "Yes", "on", "0", "false", "NO", "off"])
def test_boolean_settings_take_the_usual_spellings_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, spelling: str
) -> None:
    monkeypatch.setenv("URO_RECS_DATABASE_USE_COPY", spelling)
    expected = spelling.lower() in ("1", "true", "yes", "on")
    assert load_config(None).database.use_copy is expected


@pytest.mark.parametrize(
    ("toml", "environment", "named"),
    [
        ('[broker]\nqueue_limit = "many"\n', {}, "broker.queue_limit"),
        ('[worker]\nmax_batch_delay_ms = "soon"\n', {}, "worker.max_batch_delay_ms"),
        ('[worker]\nrecent_events = "maybe"\n', {}, "worker.recent_events"),
        ('[broker]\nclient_socket_mode = "660x"\n', {}, "broker.client_socket_mode"),
        ("[broker]\nqueue_limt = 5\n", {}, "queue_limt"),
        ("[brokr]\nqueue_limit = 5\n", {}, "brokr"),
        ('[[models]]\nname = "als"\nworkers = "two"\n', {}, "models[0].workers"),
        ("[[models]]\nworkers = 2\n", {}, "models[0].name"),
        ("", {"URO_RECS_BROKER_QUEUE_LIMIT": "lots"}, "URO_RECS_BROKER_QUEUE_LIMIT"),
        ("", {"URO_RECS_INGEST_ENABLED": "sometimes"}, "URO_RECS_INGEST_ENABLED"),
    ],
)
def test_a_bad_value_is_a_one_line_error_naming_its_setting(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    toml: str,
    environment: dict[str, str],
    named: str,
) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as raised:
        load_config(toml_file(tmp_path, toml))
    message = str(raised.value)
    assert named in message
    assert "\n" not in message


# --- the settings, as the tests know them -------------------------------------------------

SECTIONS: dict[str, type[Any]] = {
    "": Config,
    "broker.": BrokerConfig,
    "worker.": WorkerConfig,
    "ingest.": IngestConfig,
    "database.": DatabaseConfig,
    "sync.": SyncConfig,
    "models[0].": ModelConfig,
}
SETTINGS: dict[str, Any] = {
    f"{prefix}{f.name}": get_type_hints(cls)[f.name]
    for prefix, cls in SECTIONS.items()
    for f in dataclasses.fields(cls)
    if f.name not in ("models", *(p.rstrip(".") for p in SECTIONS if p))
}
NUMBERS = [key for key, kind in SETTINGS.items() if kind in (int, float)]
# The ranges that are not the default one (integers >= 1, floats > 0).
AT_LEAST_ZERO = {
    "broker.in_flight_grace_ms",
    "broker.drain_timeout_s",
    "worker.max_batch_delay_ms",
    "worker.drain_timeout_s",
    "database.retry_base_delay_s",
    "database.retry_max_delay_s",
    "sync.test_fraction",
    "models[0].workers",
}
AT_MOST = {
    "broker.default_timeout_ms": MAX_TIMEOUT_MS,
    "broker.max_message_bytes": 1 << 32,
    "broker.send_hwm": 2**31 - 1,
    "worker.max_batch_delay_ms": MAX_TIMEOUT_MS,
    "database.lease_ttl_s": 86_400,
    "sync.test_fraction": 0.9,
    "models[0].candidates": 100_000,
}
ANY_FINITE = {"sync.save_weight"}
INT64_MAX = 2**63 - 1


def bounds(key: str) -> tuple[float, float]:
    """The lowest and the highest value a numeric setting takes (a float's default lower
    bound, > 0, as the smallest positive float)."""
    if key in ANY_FINITE:
        return -math.inf, math.inf
    if key in AT_LEAST_ZERO:
        low: float = 0
    else:
        low = 1 if SETTINGS[key] is int else math.ulp(0.0)
    return low, AT_MOST.get(key, INT64_MAX if SETTINGS[key] is int else math.inf)


def env_name(key: str) -> str:
    return "URO_RECS_" + key.replace(".", "_").upper()


def toml(value: Any) -> str:
    """A TOML value's spelling (tables inline)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    assert isinstance(value, dict), value
    return "{" + ", ".join(f"{toml(k)} = {toml(v)}" for k, v in value.items()) + "}"


def document(key: str, spelled: str) -> str:
    """A TOML file setting `key` (as a message names it) to the value spelled `spelled`."""
    section, _, name = key.rpartition(".")
    if section == "models[0]":
        named = "" if name == "name" else 'name = "m"\n'
        return f"[[models]]\n{named}{name} = {spelled}\n"
    return f"[{section}]\n{name} = {spelled}\n" if section else f"{name} = {spelled}\n"


def refused(path: Path, *names: str) -> str:
    """The one-line message `path` is refused with; it names each of `names`."""
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert len(message.splitlines()) == 1, message
    for name in names:
        assert name in message
    return message


def loaded(config: Config, key: str) -> Any:
    section, _, name = key.rpartition(".")
    holder: Any = config
    if section == "models[0]":
        holder = config.models[0]
    elif section:
        holder = getattr(config, section)
    return getattr(holder, name)


SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.text(max_size=12),
    st.datetimes(),
    st.dates(),
    st.times(),
)
TOML_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=6,
)


def takes(kind: Any, value: Any) -> bool:
    """Whether a setting of type `kind` takes `value`'s TOML type."""
    if kind is float:
        return type(value) in (int, float)
    if kind == dict[str, Any]:
        return type(value) is dict
    return type(value) is {int: int, bool: bool, str: str, Path: str}[kind]


# Every example rewrites the one file in tmp_path.
ONE_FILE = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# --- 1. types -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["2.5", "true", '"32"', "32.0", "[32]"])
def test_an_integer_setting_takes_only_a_toml_integer(tmp_path: Path, value: str) -> None:
    message = refused(toml_file(tmp_path, f"[broker]\nqueue_limit = {value}\n"))
    assert message.startswith("broker.queue_limit: expected an integer >= 1, got ")


@ONE_FILE
@given(data=st.data())
def test_any_value_of_another_toml_type_is_refused_naming_the_setting(
    tmp_path: Path, data: st.DataObject
) -> None:
    key = data.draw(st.sampled_from(sorted(SETTINGS)))
    value = data.draw(TOML_VALUES.filter(lambda v: not takes(SETTINGS[key], v)))
    message = refused(toml_file(tmp_path, document(key, toml(value))), f"{key}: expected ")
    assert " got " in message


@pytest.mark.parametrize(
    ("key", "spelled", "expected"),
    [
        ("worker.slots", "32.5", "worker.slots: expected an integer >= 1, got 32.5"),
        ("worker.slots", '"32"', "worker.slots: expected an integer >= 1, got '32'"),
        ("worker.slots", "true", "worker.slots: expected an integer >= 1, got true"),
        ("worker.max_batch_delay_ms", '"2"', "expected a number >= 0 and <= 3600000, got '2'"),
        ("worker.drain_timeout_s", "false", "expected a number >= 0, got false"),
        ("worker.recent_events", "1", "worker.recent_events: expected a boolean, got 1"),
        ("worker.recent_events", '"yes"', "expected a boolean, got 'yes'"),
        ("database.url", "5", "database.url: expected a string, got 5"),
        ("store", "5", "store: expected a path (a non-empty string), got 5"),
        ("store", '""', "store: expected a path (a non-empty string), got ''"),
        ("run_dir", '"a\\u0000b"', "run_dir: expected a path"),
        ("log_format", '"jsn"', "log_format: expected one of 'json', 'console', 'auto'"),
        ("sync.kind", '"word2vec"', "sync.kind: expected one of 'user_cf', 'item_cf', "),
        ("sync.kind", '"word2vec"', "'sim', 'din', got 'word2vec'"),
        ("sync.params", "5", "sync.params: expected a table, e.g. {n_epochs = 20}, got 5"),
        ("sync.save_weight", "nan", "sync.save_weight: expected a finite number, got nan"),
        ("worker.drain_timeout_s", "inf", "got inf (not finite)"),
        ("broker.queue_limit", str(2**64), f"got {2**64} (more than 64 bits)"),
        ("broker.drain_timeout_s", str(2**64), "(more than 64 bits)"),
        ("broker.queue_limit", "2000-01-01", "expected an integer >= 1, got 2000-01-01"),
        ("broker.queue_limit", "{ a = 1 }", "expected an integer >= 1, got a table"),
        ("models[0].version", "[]", "models[0].version: expected a string, got an array"),
    ],
)
def test_a_value_of_the_wrong_type_says_what_the_setting_takes(
    tmp_path: Path, key: str, spelled: str, expected: str
) -> None:
    assert expected in refused(toml_file(tmp_path, document(key, spelled)), key)


def test_an_integer_given_for_a_float_setting_becomes_a_float(tmp_path: Path) -> None:
    config = load_config(toml_file(tmp_path, "[database]\nlease_ttl_s = 60\n"))
    assert config.database.lease_ttl_s == 60.0
    assert type(config.database.lease_ttl_s) is float


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("URO_RECS_WORKER_SLOTS", " 32 ", 32),
        ("URO_RECS_WORKER_SLOTS", "+32", 32),
        ("URO_RECS_WORKER_SLOTS", "1_000", 1000),
        ("URO_RECS_WORKER_MAX_BATCH_DELAY_MS", "2", 2.0),
        ("URO_RECS_WORKER_MAX_BATCH_DELAY_MS", ".5", 0.5),
        ("URO_RECS_DATABASE_LEASE_TTL_S", "1e3", 1000.0),
        ("URO_RECS_SYNC_SAVE_WEIGHT", "-0.5", -0.5),
        ("URO_RECS_LOG_FORMAT", "json", "json"),
    ],
)
def test_the_environment_takes_literals(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: Any
) -> None:
    monkeypatch.setenv(variable, value)
    key = {
        "URO_RECS_WORKER_SLOTS": "worker.slots",
        "URO_RECS_WORKER_MAX_BATCH_DELAY_MS": "worker.max_batch_delay_ms",
        "URO_RECS_DATABASE_LEASE_TTL_S": "database.lease_ttl_s",
        "URO_RECS_SYNC_SAVE_WEIGHT": "sync.save_weight",
        "URO_RECS_LOG_FORMAT": "log_format",
    }[variable]
    value_loaded = loaded(load_config(None), key)
    assert value_loaded == expected
    assert type(value_loaded) is type(expected)


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("URO_RECS_WORKER_SLOTS", "32.5", "expected an integer >= 1, got '32.5'"),
        ("URO_RECS_WORKER_SLOTS", "32.0", "got '32.0'"),
        ("URO_RECS_WORKER_SLOTS", "1e3", "got '1e3'"),
        ("URO_RECS_WORKER_SLOTS", "0x20", "got '0x20'"),
        ("URO_RECS_WORKER_SLOTS", "", "got ''"),
        ("URO_RECS_WORKER_SLOTS", "3 2", "got '3 2'"),
        ("URO_RECS_WORKER_SLOTS", "٣", "expected an integer >= 1"),  # an Arabic-Indic 3
        ("URO_RECS_WORKER_SLOTS", "9" * 5000, "expected an integer >= 1"),
        ("URO_RECS_WORKER_MAX_BATCH_DELAY_MS", "nan", "got 'nan'"),
        ("URO_RECS_WORKER_MAX_BATCH_DELAY_MS", "inf", "got 'inf'"),
        ("URO_RECS_WORKER_MAX_BATCH_DELAY_MS", "1e999", "got '1e999' (not finite)"),
        ("URO_RECS_WORKER_MAX_BATCH_DELAY_MS", "soon", "expected a number >= 0"),
        ("URO_RECS_WORKER_RECENT_EVENTS", "maybe", "expected a boolean (true/false, yes/no"),
        ("URO_RECS_STORE", "", "expected a path (a non-empty string), got ''"),
        ("URO_RECS_SYNC_KIND", "svd++", "'sim', 'din', got 'svd++'"),
        ("URO_RECS_SYNC_PARAMS", "[1]", "expected a JSON object, got '[1]'"),
        ("URO_RECS_SYNC_PARAMS", "{n_epochs = 2}", "expected a JSON object"),
    ],
)
def test_the_environment_refuses_anything_but_a_literal_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as raised:
        load_config(None)
    message = str(raised.value)
    assert message.startswith(f"{variable}: expected ")
    assert expected in message
    assert len(message.splitlines()) == 1


@ONE_FILE  # monkeypatch: each example undoes its own variables
@given(data=st.data())
def test_an_integer_setting_from_the_environment_takes_integers_and_nothing_rounded(
    monkeypatch: pytest.MonkeyPatch, data: st.DataObject
) -> None:
    key = data.draw(st.sampled_from([k for k in NUMBERS if SETTINGS[k] is int and "[" not in k]))
    low, high = bounds(key)
    number = data.draw(st.integers(min_value=int(low), max_value=int(high)))
    fraction = data.draw(st.floats().filter(lambda x: not x.is_integer()))
    with monkeypatch.context() as patch:
        patch.setenv(env_name(key), str(number))
        assert loaded(load_config(None), key) == number
        patch.setenv(env_name(key), str(fraction))
        with pytest.raises(ConfigError, match=f"^{env_name(key)}: expected an integer"):
            load_config(None)


# --- 2. ranges ----------------------------------------------------------------------------


def test_the_range_message_of_the_issue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = toml_file(tmp_path, "[broker]\nheartbeat_ms = -5\n")
    assert refused(path) == "broker.heartbeat_ms: expected an integer >= 1, got -5"
    monkeypatch.setenv("URO_RECS_BROKER_HEARTBEAT_MS", "-5")
    assert refused(toml_file(tmp_path, "")) == (
        "URO_RECS_BROKER_HEARTBEAT_MS: expected an integer >= 1, got '-5'"
    )


@pytest.mark.parametrize("key", NUMBERS)
def test_every_number_takes_its_range_and_nothing_beyond_it(tmp_path: Path, key: str) -> None:
    low, high = bounds(key)
    kind = SETTINGS[key]
    if key in ANY_FINITE:
        inside, outside = [-1e300, 0.0, 1e300], []
    elif kind is int:
        inside, outside = [low, high], [low - 1, *([high + 1] if high < INT64_MAX else [])]
    else:  # and the next float past each end
        ends = [high] if math.isfinite(high) else []
        inside = [low, *ends]
        outside = [math.nextafter(low, -math.inf), *(math.nextafter(e, math.inf) for e in ends)]
    for value in inside:
        path = toml_file(tmp_path, document(key, toml(kind(value))))
        assert loaded(load_config(path), key) == value
    for value in outside:
        message = refused(toml_file(tmp_path, document(key, toml(kind(value)))))
        assert message.startswith(f"{key}: expected ")
        assert message.endswith(f"got {toml(kind(value))}")


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("broker.heartbeat_ms", "an integer >= 1"),
        ("broker.default_timeout_ms", f"an integer >= 1 and <= {MAX_TIMEOUT_MS}"),
        ("broker.in_flight_grace_ms", "an integer >= 0"),
        ("worker.max_batch_delay_ms", f"a number >= 0 and <= {MAX_TIMEOUT_MS}"),
        ("database.connect_timeout_s", "a number > 0"),
        ("sync.test_fraction", "a number >= 0 and <= 0.9"),
        ("models[0].workers", "an integer >= 0"),
    ],
)
def test_the_message_states_the_range(tmp_path: Path, key: str, expected: str) -> None:
    message = refused(toml_file(tmp_path, document(key, "-1")))
    assert message == f"{key}: expected {expected}, got -1"


@ONE_FILE
@given(data=st.data())
def test_a_number_in_range_loads_exactly_as_written(tmp_path: Path, data: st.DataObject) -> None:
    key = data.draw(st.sampled_from(NUMBERS))
    low, high = bounds(key)
    if SETTINGS[key] is int:
        value: float = data.draw(st.integers(min_value=int(low), max_value=int(high)))
    else:
        value = data.draw(st.floats(min_value=low, max_value=high, allow_nan=False))
        if not math.isfinite(value):
            value = 0.0 if low == 0 else 1.0
    assert loaded(load_config(toml_file(tmp_path, document(key, toml(value)))), key) == value


def test_the_defaults_are_in_range_and_load_back_unchanged(tmp_path: Path) -> None:
    defaults = dataclasses.asdict(Config(models=(ModelConfig("m"),)))
    lines = [f"{k} = {toml(str(v))}" for k, v in defaults.items() if isinstance(v, Path)]
    lines += [f"{k} = {toml(v)}" for k, v in defaults.items() if isinstance(v, str)]
    for name, values in defaults.items():
        if isinstance(values, dict):
            lines += [f"[{name}]"] + [f"{k} = {toml(v)}" for k, v in values.items()]
    lines += ["[[models]]"] + [f"{k} = {toml(v)}" for k, v in defaults["models"][0].items()]
    config = load_config(toml_file(tmp_path, "\n".join(lines) + "\n"))
    expected = Config(models=(ModelConfig("m"),))
    assert config == dataclasses.replace(
        expected, run_dir=tmp_path / expected.run_dir, store=tmp_path / expected.store
    )


def test_the_client_socket_mode_is_still_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("URO_RECS_BROKER_CLIENT_SOCKET_MODE", "0999")
    with pytest.raises(ConfigError, match=r"^broker\.client_socket_mode: expected octal"):
        load_config(None)


# --- 3. unknown keys ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[worker]\nslotz = 3\n", "worker.slotz: unknown setting; did you mean slots?"),
        ("[brokr]\nqueue_limit = 5\n", "brokr: unknown setting; did you mean broker?"),
        ("run_dri = 'x'\n", "run_dri: unknown setting; did you mean run_dir?"),
        ("[worker]\nturbo = true\n", "worker.turbo: unknown setting"),
        ('[[models]]\nname = "m"\nworker = 1\n', "models[0].worker: unknown setting; did you mean"),
        (
            "[worker]\nslotz = 3\nturbo = true\nthredas = 2\n",
            "worker: unknown settings slotz (did you mean slots?), thredas (did you mean"
            " threads?), turbo",
        ),
        ("[database.pool]\nsize = 2\n", "database.pool: unknown setting"),
        ('"queue limit" = 5\n', "'queue limit': unknown setting"),
        ('"\\u2028" = 5\n', "'\\u2028': unknown setting"),
    ],
)
def test_an_unknown_key_is_named_with_a_guess_when_one_is_close(
    tmp_path: Path, text: str, expected: str
) -> None:
    assert refused(toml_file(tmp_path, text)).startswith(expected)


# --- 4. sections that are not tables ------------------------------------------------------


@pytest.mark.parametrize("section", ["broker", "worker", "ingest", "database", "sync"])
@pytest.mark.parametrize("value", ["5", '"on"', "[1, 2]", "true"])
def test_a_section_that_is_not_a_table_is_refused(tmp_path: Path, section: str, value: str) -> None:
    message = refused(toml_file(tmp_path, f"{section} = {value}\n"))
    assert message.startswith(f"{section}: expected a table ([{section}]), got ")


def test_an_array_of_tables_for_a_section_is_refused(tmp_path: Path) -> None:
    message = refused(toml_file(tmp_path, "[[broker]]\nqueue_limit = 5\n"))
    assert message == "broker: expected a table ([broker]), got an array"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("models = 5\n", "models: expected an array of tables ([[models]]), got 5"),
        (
            '[models]\nname = "als"\n',
            "models: expected an array of tables ([[models]]), got a table",
        ),
        ('models = ["als"]\n', "models[0]: expected a table ([[models]]), got 'als'"),
        ('models = [{ name = "als" }, 3]\n', "models[1]: expected a table ([[models]]), got 3"),
        ("[[models]]\nworkers = 2\n", "models[0].name: every model needs a name"),
        ('[[models]]\nname = ""\n', "models[0].name: expected a non-empty string, got ''"),
        (
            '[[models]]\nname = "als"\n[[models]]\nname = "als"\n',
            "models[1].name: 'als' is already models[0]",
        ),
        (
            '[[models]]\nname = "deepfm"\nretrieve_from = "deepfm"\n',
            "models[0].retrieve_from: name another model than 'deepfm'",
        ),
        (
            '[[models]]\nname = "deepfm"\nretrieve_from = "../als"\n',
            "models[0].retrieve_from: invalid model name '../als': 1 to 128 letters, digits, '.',"
            " '_' or '-', starting with a letter or digit, or '@fm'",
        ),
        (
            '[[models]]\nname = "als"\nversion = "../v1"\n',
            "models[0].version: invalid version name '../v1': 1 to 128 letters, digits, '.', '_'"
            " or '-', starting with a letter or digit",
        ),
    ],
)
def test_models_must_be_an_array_of_named_tables(tmp_path: Path, text: str, expected: str) -> None:
    assert refused(toml_file(tmp_path, text)) == expected


def test_models_as_an_inline_array_of_tables_is_fine(tmp_path: Path) -> None:
    config = load_config(toml_file(tmp_path, 'models = [{ name = "als", workers = 0 }]\n'))
    assert config.models == (ModelConfig("als", workers=0),)
    assert load_config(toml_file(tmp_path, "models = []\n")).models == ()


# --- 5. the file --------------------------------------------------------------------------


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "uro-recs.toml"
    assert refused(missing) == f"config file {missing}: not found"


def test_a_directory_is_not_a_config_file(tmp_path: Path) -> None:
    assert refused(tmp_path) == f"config file {tmp_path}: is a directory"


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    path = toml_file(tmp_path, "")
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("this user reads files whatever their mode (root)")
        assert refused(path) == f"config file {path}: not readable (permission denied)"
    finally:
        path.chmod(0o600)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("[broker\n", "(at line 1, column 8)"),
        ("[broker]\nqueue_limit = \n", "(at line 2, column 15)"),
        ('log_format = "json"\nlog_format = "json"\n', "(at line 2, column 20)"),
    ],
)
def test_a_toml_syntax_error_names_the_file_line_and_column(
    tmp_path: Path, text: str, where: str
) -> None:
    path = toml_file(tmp_path, text)
    message = refused(path)
    assert message.startswith(f"config file {path}: ")
    assert message.endswith(where), message


def test_a_file_that_is_not_utf8_or_too_deep_is_named(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('log_format = "caf\xe9"\n'.encode("latin-1"))
    assert refused(path) == f"config file {path}: not UTF-8 text (byte 17)"
    path.write_text("a = " + "[" * 5_000 + "]" * 5_000 + "\n")
    assert refused(path) == f"config file {path}: nested too deeply"
    path.write_text("a = " + "9" * 5_000 + "\n")
    assert refused(path).startswith(f"config file {path}: ")


# --- 6. relative paths --------------------------------------------------------------------


def test_relative_paths_in_the_file_are_in_the_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "uro-recs.toml").write_text('run_dir = "run"\nstore = "../models"\n')

    config = load_config(Path("../etc/uro-recs.toml"))  # a relative file name too

    assert config.run_dir.is_absolute()
    assert config.run_dir.resolve() == (etc / "run").resolve()
    assert config.store.resolve() == (tmp_path / "models").resolve()


def test_absolute_paths_in_the_file_are_kept(tmp_path: Path) -> None:
    config = load_config(toml_file(tmp_path, 'run_dir = "/run/uro-recs"\n'))
    assert config.run_dir == Path("/run/uro-recs")


def test_relative_paths_from_the_environment_and_the_defaults_stay_relative(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("URO_RECS_STORE", "models")
    config = load_config(toml_file(tmp_path, 'store = "ignored"\n'))
    assert config.store == Path("models")  # the current directory's, when used
    assert config.run_dir == Path("var/run")


# --- 7. nothing but ConfigError -----------------------------------------------------------

NAMES = sorted({key.rpartition(".")[2] for key in SETTINGS} | {"broker", "models", "sync"})
FIELDS = st.dictionaries(st.sampled_from(NAMES) | st.text(max_size=6), TOML_VALUES, max_size=4)
DOCUMENTS = st.dictionaries(
    st.sampled_from(NAMES) | st.text(max_size=6),
    FIELDS | st.lists(FIELDS, max_size=2) | TOML_VALUES,
    max_size=4,
)


@ONE_FILE
@given(document=DOCUMENTS)
def test_any_toml_document_loads_or_is_refused_in_one_line(
    tmp_path: Path, document: dict[str, Any]
) -> None:
    text = "".join(f"{toml(key)} = {toml(value)}\n" for key, value in document.items())
    try:
        load_config(toml_file(tmp_path, text))
    except ConfigError as error:
        assert len(str(error).splitlines()) == 1, str(error)


# --- the shipped files --------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def test_the_shipped_systemd_config_loads() -> None:
    config = load_config(ROOT / "systemd" / "uro-recs.toml")
    assert config.run_dir == Path("/run/uro-recs")
    assert [m.name for m in config.models] == ["als"]


def test_the_readmes_configuration_block_is_the_defaults(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Configuration\n", 1)[1]
    block = re.search(r"```toml\n(.*?)```", section, re.DOTALL)
    assert block is not None
    config = load_config(toml_file(tmp_path, block.group(1)))
    expected = Config(models=(ModelConfig("als"),))
    assert config == dataclasses.replace(
        expected, run_dir=tmp_path / expected.run_dir, store=tmp_path / expected.store
    )
