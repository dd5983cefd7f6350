"""Typed results, parsed from the reply's result map; a malformed map raises ServerError."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from uro_recs.core.protocol import ErrorCode, Id

from .errors import ServerError


@dataclass(frozen=True, slots=True)
class Recommendation:
    user: Id
    items: tuple[Id, ...]
    cold_start: bool  # the user is unknown to the model; items are popularity-based


@dataclass(frozen=True, slots=True)
class Prediction:
    user: Id
    scores: tuple[float | None, ...]  # one per item asked, None where the item is unknown
    cold_start: bool


@dataclass(frozen=True, slots=True)
class SimilarItems:
    item: Id
    items: tuple[Id, ...]
    scores: tuple[float, ...]
    cold_start: bool = False  # the item is unknown to the model; the lists are empty


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    version: str
    workers: int
    libreco_class: str  # "class" on the wire
    n_users: int
    n_items: int
    ops: tuple[str, ...]


def _malformed(what: str) -> ServerError:
    return ServerError(ErrorCode.INTERNAL, f"malformed result: {what}")


def _field(result: Mapping[str, Any], key: str) -> Any:
    if key not in result:
        raise _malformed(f"missing {key!r}")
    return result[key]


def _require_id(value: object, what: str) -> Id:
    if isinstance(value, str | int) and not isinstance(value, bool):
        return value
    raise _malformed(f"{what} is not an id")


def _id(result: Mapping[str, Any], key: str) -> Id:
    return _require_id(_field(result, key), repr(key))


def _ids(result: Mapping[str, Any], key: str) -> tuple[Id, ...]:
    value = _field(result, key)
    if not isinstance(value, list):
        raise _malformed(f"{key!r} is not a list")
    return tuple(_require_id(v, f"an entry of {key!r}") for v in value)


def _score(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _malformed(f"score {value!r} is not a number")
    return float(value)


def _list(result: Mapping[str, Any], key: str) -> list[Any]:
    value = _field(result, key)
    if not isinstance(value, list):
        raise _malformed(f"{key!r} is not a list")
    return value


def _bool(result: Mapping[str, Any], key: str) -> bool:
    value = _field(result, key)
    if not isinstance(value, bool):
        raise _malformed(f"{key!r} is not a boolean")
    return value


def _int(result: Mapping[str, Any], key: str) -> int:
    value = _field(result, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _malformed(f"{key!r} is not an integer")
    return value


def _str(result: Mapping[str, Any], key: str) -> str:
    value = _field(result, key)
    if not isinstance(value, str):
        raise _malformed(f"{key!r} is not a string")
    return value


def _map(value: object, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _malformed(f"{what} is not a map")
    return value


def parse_recommendation(result: Mapping[str, Any]) -> Recommendation:
    return Recommendation(
        user=_id(result, "user"),
        items=_ids(result, "items"),
        cold_start=_bool(result, "cold_start"),
    )


def parse_recommendations(result: Mapping[str, Any]) -> list[Recommendation]:
    """The many-users form: {"results": [recommendation, ...]}."""
    results = _field(result, "results")
    if not isinstance(results, list):
        raise _malformed("'results' is not a list")
    return [parse_recommendation(_map(r, "a recommendation")) for r in results]


def parse_prediction(result: Mapping[str, Any]) -> Prediction:
    return Prediction(
        user=_id(result, "user"),
        scores=tuple(None if s is None else _score(s) for s in _list(result, "scores")),
        cold_start=_bool(result, "cold_start"),
    )


def parse_similar_items(result: Mapping[str, Any]) -> SimilarItems:
    items = _ids(result, "items")
    scores = tuple(_score(s) for s in _list(result, "scores"))
    if len(scores) != len(items):
        raise _malformed("'items' and 'scores' differ in length")
    # docs/PROTOCOL.md lists cold_start; tolerate its absence until every server sends it
    cold_start = _bool(result, "cold_start") if "cold_start" in result else False
    return SimilarItems(_id(result, "item"), items, scores, cold_start)


def parse_model_info(result: Mapping[str, Any]) -> ModelInfo:
    ops = _field(result, "ops")
    if not isinstance(ops, list) or not all(isinstance(op, str) for op in ops):
        raise _malformed("'ops' is not a list of strings")
    return ModelInfo(
        name=_str(result, "name"),
        version=_str(result, "version"),
        workers=_int(result, "workers"),
        libreco_class=_str(result, "class"),
        n_users=_int(result, "n_users"),
        n_items=_int(result, "n_items"),
        ops=tuple(ops),
    )


def parse_model_infos(result: Mapping[str, Any]) -> list[ModelInfo]:
    """The info op: {"models": [model info, ...]}."""
    models = _field(result, "models")
    if not isinstance(models, list):
        raise _malformed("'models' is not a list")
    return [parse_model_info(_map(m, "a model info")) for m in models]


def parse_stats(result: Mapping[str, Any]) -> dict[str, Any]:
    """The stats op, as the plain map the broker sent (its counters change between versions)."""
    for key in ("uptime_s", "draining", "models", "counters"):
        _field(result, key)
    return dict(result)


def parse_accepted(result: Mapping[str, Any]) -> int:
    """The `ingest` result: how many events are stored."""
    return _int(result, "accepted")
