"""Wire protocol v1: frame layout, msgpack bodies, validation and error codes.

Bytes in, typed values out; typed values in, bytes out. No socket code lives here, so the
broker, the workers, the SDK and the test vectors all share one implementation of the
contract written down in docs/PROTOCOL.md. Malformed input raises `ProtocolError`, which
the caller turns into an error reply.
"""

from __future__ import annotations

import math
import struct
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, NoReturn, TypeAlias

import msgpack

PROTOCOL_VERSION = 1
MAX_ID_CHARS = 256
MAX_REQUEST_ID_CHARS = 128
MAX_USERS_PER_REQUEST = 1_000
MAX_ITEMS_PER_REQUEST = 10_000
MAX_SEQ_ITEMS = 1_000  # a sequence model reads its own last few (`recent_num`) of them
MAX_N = 1_000
MAX_TIMEOUT_MS = 3_600_000
MAX_EVENTS_PER_REQUEST = 1_000
MAX_EVENT_NAME_CHARS = 64
# Cost bounds on any body, checked while it is decoded (docs/PROTOCOL.md, "Limits"): whatever
# a body holds, decoding it allocates at most this many arrays and maps, none longer than the
# element limits, and nothing is ever walked recursively.
MAX_CONTAINERS = 2_048  # arrays and maps in one body, the body itself included
MAX_ARRAY_ELEMENTS = 10_000  # in any array, known field or not
MAX_MAP_ENTRIES = 256  # in any map
MAX_NESTING = 1_024  # levels (msgpack-c's own stack depth; deeper is bad_request)
# A recommend answers users x n items: cap the product so one reply stays ~1 MB.
MAX_RESULT_ITEMS = 20_000
MAX_OCCURRED_AT_US = 253_402_300_799_999_999  # 9999-12-31T23:59:59.999999Z
ITEM_KINDS = ("avatar", "map", "prop")  # what uro recommends; recs_events checks it too
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DEFAULT_N = 10
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

Id: TypeAlias = str | int
RequestId: TypeAlias = str | int


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"  # the request is malformed: fix it
    TOO_LARGE = "too_large"  # the message is over the size limit
    UNSUPPORTED_VERSION = "unsupported_version"  # "v" is not a version this server speaks
    UNKNOWN_OP = "unknown_op"  # "op" names no operation
    UNKNOWN_MODEL = "unknown_model"  # no model of that name is configured or announced
    UNSUPPORTED = "unsupported"  # the model cannot do this op (similar_items without embeddings)
    DEADLINE_EXCEEDED = "deadline_exceeded"  # the timeout passed before an answer was ready
    OVERLOADED = "overloaded"  # the model's queue is full
    UNAVAILABLE = "unavailable"  # the broker is draining or the model has no live worker
    WORKER_LOST = "worker_lost"  # its worker died and it could not be redelivered
    INTERNAL = "internal"  # a bug or unexpected failure on the server side


RETRYABLE_CODES = frozenset({ErrorCode.OVERLOADED, ErrorCode.UNAVAILABLE, ErrorCode.WORKER_LOST})


class Op(StrEnum):
    RECOMMEND = "recommend"
    PREDICT = "predict"
    SIMILAR_ITEMS = "similar_items"
    INFO = "info"
    STATS = "stats"
    ROLLOUT = "rollout"
    INGEST = "ingest"


MODEL_OPS = frozenset({Op.RECOMMEND, Op.PREDICT, Op.SIMILAR_ITEMS})
# Ingest workers register under this name; `ingest` requests (which name no model) go to them.
# Model names never start with "@".
INGEST_WORKERS = "@ingest"
CONTROL_OPS = frozenset({Op.ROLLOUT})  # accepted on the control endpoint only
MAX_VERSION_CHARS = 128


class ProtocolError(Exception):
    """Malformed or unacceptable input; becomes an error reply with `code`."""

    def __init__(self, code: ErrorCode, message: str, request_id: RequestId | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


# --- request arguments -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecommendArgs:
    users: tuple[Id, ...]
    many: bool  # asked with "users" (reply lists results) rather than "user"
    n: int
    filter_consumed: bool
    exclude: frozenset[Id]
    # The user's most recent items, oldest first, for sequence models (with `user` only).
    seq: tuple[Id, ...] | None = None


@dataclass(frozen=True, slots=True)
class PredictArgs:
    user: Id
    items: tuple[Id, ...]


@dataclass(frozen=True, slots=True)
class SimilarItemsArgs:
    item: Id
    n: int


@dataclass(frozen=True, slots=True)
class RolloutArgs:
    version: str


@dataclass(frozen=True, slots=True)
class IngestEvent:
    """One interaction, as a row of `recs_events`; all fields but weight are its identity."""

    user_id: uuid.UUID
    item_kind: str  # one of ITEM_KINDS
    item_id: uuid.UUID
    event: str  # "play", "view", "save", ...: 1..MAX_EVENT_NAME_CHARS characters
    occurred_at_us: int  # microseconds since the Unix epoch, UTC
    weight: float  # finite; its label weight in training (negative cancels)

    def row(self) -> tuple[uuid.UUID, str, uuid.UUID, str, datetime, float]:
        """The `recs_events` row: user_id, item_kind, item_id, event, occurred_at, weight."""
        occurred_at = _EPOCH + timedelta(microseconds=self.occurred_at_us)
        return self.user_id, self.item_kind, self.item_id, self.event, occurred_at, self.weight

    def wire(self) -> dict[str, Any]:
        """The event as the `ingest` op carries it."""
        return {
            "user_id": str(self.user_id),
            "item_kind": self.item_kind,
            "item_id": str(self.item_id),
            "event": self.event,
            "occurred_at_us": self.occurred_at_us,
            "weight": self.weight,
        }


@dataclass(frozen=True, slots=True)
class IngestArgs:
    events: tuple[IngestEvent, ...]


@dataclass(frozen=True, slots=True)
class NoArgs:
    pass


OpArgs: TypeAlias = (
    RecommendArgs | PredictArgs | SimilarItemsArgs | RolloutArgs | IngestArgs | NoArgs
)


@dataclass(frozen=True, slots=True)
class Request:
    id: RequestId
    op: Op
    model: str | None
    args: OpArgs
    timeout_ms: int | None


@dataclass(frozen=True, slots=True)
class Error:
    code: ErrorCode
    message: str
    retry: bool


@dataclass(frozen=True, slots=True)
class Reply:
    id: RequestId | None
    result: dict[str, Any] | None  # set when ok
    error: Error | None  # set when not ok

    @property
    def ok(self) -> bool:
        return self.error is None


# --- msgpack ------------------------------------------------------------------------------


def _reject_ext(code: int, data: bytes) -> NoReturn:
    raise ValueError(f"msgpack ext type {code} is not allowed")


class _ContainerBudget:
    """msgpack calls this once per array or map it completes: past the budget, decoding stops,
    so a body of a million tiny containers costs no more than one of MAX_CONTAINERS."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = MAX_CONTAINERS

    def __call__(self, value: Any) -> Any:
        self.left -= 1
        if self.left < 0:
            raise _OverBudget
        return value


class _OverBudget(Exception):
    pass


def _unpack(body: bytes) -> Any:
    """Decode untrusted msgpack with bounded work; any failure raises ProtocolError."""
    # Every container takes at least one byte: a body this short cannot break the budget, so
    # the common small request skips the per-container hook.
    budget = _ContainerBudget() if len(body) > MAX_CONTAINERS else None
    try:
        return msgpack.unpackb(
            body,
            raw=False,
            ext_hook=_reject_ext,
            timestamp=0,
            list_hook=budget,
            object_hook=budget,
            max_array_len=MAX_ARRAY_ELEMENTS,
            max_map_len=MAX_MAP_ENTRIES,
            max_ext_len=0,
        )
    except _OverBudget:
        message = f"body has more than {MAX_CONTAINERS} arrays and maps"
    except msgpack.StackError:
        message = f"body is nested more than {MAX_NESTING} levels deep"
    except msgpack.ExtraData:
        message = "body is not valid msgpack: extra bytes after the map"
    except (ValueError, TypeError) as exc:  # msgpack's own errors, and over-long containers
        message = f"body is not valid msgpack: {str(exc) or type(exc).__name__}"
    except Exception as exc:  # anything else msgpack raises for hostile bytes
        message = f"body is not valid msgpack: {type(exc).__name__}"
    raise ProtocolError(ErrorCode.BAD_REQUEST, message)


def _unpack_trusted(body: bytes) -> Any:
    """Decode msgpack from our own side (replies, READY) without the request budget."""
    return msgpack.unpackb(body, raw=False, ext_hook=_reject_ext, timestamp=0)


def _kind(value: object) -> str:
    """A value's msgpack type name, for messages: never repr() an untrusted value."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, bytes):
        return "bin"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "map"
    return type(value).__name__


def _pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# --- field validation ------------------------------------------------------------------


def _fail(message: str, request_id: RequestId | None = None) -> NoReturn:
    raise ProtocolError(ErrorCode.BAD_REQUEST, message, request_id)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_int64(value: object) -> bool:
    return _is_int(value) and INT64_MIN <= value <= INT64_MAX  # type: ignore[operator]


def _entity_id(value: object, field: str, rid: RequestId) -> Id:
    if isinstance(value, str):
        if not 0 < len(value) <= MAX_ID_CHARS:
            _fail(f"{field}: ids are 1..{MAX_ID_CHARS} characters", rid)
        return value
    if _is_int64(value):
        assert isinstance(value, int)
        return value
    if _is_int(value):
        _fail(f"{field}: integer ids are signed 64-bit", rid)
    _fail(f"{field}: an id is a string or an integer, got {_kind(value)}", rid)


def _id_list(value: object, field: str, limit: int, rid: RequestId) -> tuple[Id, ...]:
    if not isinstance(value, list):
        _fail(f"{field}: expected an array of ids", rid)
    if len(value) > limit:
        _fail(f"{field}: at most {limit} ids", rid)
    return tuple(_entity_id(v, field, rid) for v in value)


def _count(args: Mapping[str, Any], rid: RequestId) -> int:
    n = args.get("n", DEFAULT_N)
    if not _is_int(n) or not 1 <= n <= MAX_N:
        _fail(f"n: expected an integer in 1..{MAX_N}", rid)
    return int(n)


def _bool(args: Mapping[str, Any], field: str, default: bool, rid: RequestId) -> bool:
    value = args.get(field, default)
    if not isinstance(value, bool):
        _fail(f"{field}: expected a boolean", rid)
    return value


def _recommend_args(args: Mapping[str, Any], rid: RequestId) -> RecommendArgs:
    if ("user" in args) == ("users" in args):
        _fail("recommend takes exactly one of 'user' or 'users'", rid)
    many = "users" in args
    if many:
        users = _id_list(args["users"], "users", MAX_USERS_PER_REQUEST, rid)
        if not users:
            _fail("users: expected at least one id", rid)
    else:
        users = (_entity_id(args["user"], "user", rid),)
    exclude = _id_list(args.get("exclude", []), "exclude", MAX_ITEMS_PER_REQUEST, rid)
    seq = None
    if "seq" in args:
        if many:
            _fail("seq goes with one user: ask with 'user', not 'users'", rid)
        seq = _id_list(args["seq"], "seq", MAX_SEQ_ITEMS, rid)
    n = _count(args, rid)
    if len(users) * n > MAX_RESULT_ITEMS:
        raise ProtocolError(
            ErrorCode.TOO_LARGE,
            f"{len(users)} users x n {n} is over the {MAX_RESULT_ITEMS} items one reply may"
            " hold; split the users",
            rid,
        )
    return RecommendArgs(
        users=users,
        many=many,
        n=n,
        filter_consumed=_bool(args, "filter_consumed", True, rid),
        exclude=frozenset(exclude),
        seq=seq,
    )


def _predict_args(args: Mapping[str, Any], rid: RequestId) -> PredictArgs:
    if "user" not in args or "items" not in args:
        _fail("predict takes 'user' and 'items'", rid)
    items = _id_list(args["items"], "items", MAX_ITEMS_PER_REQUEST, rid)
    if not items:
        _fail("items: expected at least one id", rid)
    return PredictArgs(user=_entity_id(args["user"], "user", rid), items=items)


def _similar_items_args(args: Mapping[str, Any], rid: RequestId) -> SimilarItemsArgs:
    if "item" not in args:
        _fail("similar_items takes 'item'", rid)
    return SimilarItemsArgs(item=_entity_id(args["item"], "item", rid), n=_count(args, rid))


def _rollout_args(args: Mapping[str, Any], rid: RequestId) -> RolloutArgs:
    version = args.get("version")
    if not isinstance(version, str) or not 0 < len(version) <= MAX_VERSION_CHARS:
        _fail(f"version: expected a string of 1..{MAX_VERSION_CHARS} chars", rid)
    return RolloutArgs(version=version)


def _uuid(value: object, field: str, rid: RequestId | None) -> uuid.UUID:
    # Only the 36-character 8-4-4-4-12 form: one spelling per id keeps replays idempotent.
    if isinstance(value, str) and len(value) == 36 and value[8:24:5] == "----":
        try:
            return uuid.UUID(value)
        except ValueError:
            pass
    _fail(f"{field}: expected a UUID like 6f1c1b9a-4c1e-4a8e-9d59-1f0b8d2b7a31", rid)


def _ingest_event(raw: object, at: str, rid: RequestId | None) -> IngestEvent:
    if not isinstance(raw, dict):
        _fail(f"{at}: expected a map", rid)
    kind = raw.get("item_kind")
    if kind not in ITEM_KINDS:
        _fail(f"{at}.item_kind: expected one of {', '.join(ITEM_KINDS)}", rid)
    event = raw.get("event")
    if not isinstance(event, str) or not 0 < len(event) <= MAX_EVENT_NAME_CHARS:
        _fail(f"{at}.event: expected a string of 1..{MAX_EVENT_NAME_CHARS} chars", rid)
    occurred = raw.get("occurred_at_us")
    if (
        not isinstance(occurred, int)
        or isinstance(occurred, bool)
        or not 0 <= occurred <= MAX_OCCURRED_AT_US
    ):
        _fail(f"{at}.occurred_at_us: expected µs since the Unix epoch (an integer >= 0)", rid)
    weight = raw.get("weight", 1.0)
    if not isinstance(weight, int | float) or isinstance(weight, bool) or not math.isfinite(weight):
        _fail(f"{at}.weight: expected a finite number", rid)
    return IngestEvent(
        user_id=_uuid(raw.get("user_id"), f"{at}.user_id", rid),
        item_kind=str(kind),
        item_id=_uuid(raw.get("item_id"), f"{at}.item_id", rid),
        event=event,
        occurred_at_us=occurred,
        weight=float(weight),
    )


def parse_event(raw: object, at: str = "event") -> IngestEvent:
    """One event of an `ingest` request, validated (ProtocolError says what is wrong, with
    the field named as `at`.field). The one place the rules of an event live."""
    return _ingest_event(raw, at, None)


def _ingest_args(args: Mapping[str, Any], rid: RequestId) -> IngestArgs:
    events = args.get("events")
    if not isinstance(events, list) or not 0 < len(events) <= MAX_EVENTS_PER_REQUEST:
        _fail(f"events: expected an array of 1..{MAX_EVENTS_PER_REQUEST} events", rid)
    return IngestArgs(tuple(_ingest_event(e, f"events[{i}]", rid) for i, e in enumerate(events)))


def _op_args(op: Op, args: Mapping[str, Any], rid: RequestId) -> OpArgs:
    if op is Op.RECOMMEND:
        return _recommend_args(args, rid)
    if op is Op.PREDICT:
        return _predict_args(args, rid)
    if op is Op.SIMILAR_ITEMS:
        return _similar_items_args(args, rid)
    if op is Op.ROLLOUT:
        return _rollout_args(args, rid)
    if op is Op.INGEST:
        return _ingest_args(args, rid)
    return NoArgs()


def _request_id(body: Mapping[Any, Any]) -> RequestId | None:
    """The request id if the body carries a valid one, so even bad requests can be answered."""
    rid = body.get("id")
    if isinstance(rid, str) and len(rid) <= MAX_REQUEST_ID_CHARS:
        return rid
    if _is_int64(rid):
        assert isinstance(rid, int)
        return rid
    return None


# --- requests -----------------------------------------------------------------------------


def decode_request(body: bytes, max_bytes: int) -> Request:
    """Decode and validate one request body (the msgpack frame)."""
    if len(body) > max_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"message is over the {max_bytes} byte limit")
    obj = _unpack(body)
    if not isinstance(obj, dict):
        _fail(f"body must be a msgpack map, got {_kind(obj)}")
    if not all(isinstance(key, str) for key in obj):
        _fail("body: every key must be a msgpack str (not bin, not a number)")
    rid = _request_id(obj)
    if rid is None:
        _fail(
            "id: expected a signed 64-bit integer or a string of at most"
            f" {MAX_REQUEST_ID_CHARS} chars"
        )
    version = obj.get("v")
    if version != PROTOCOL_VERSION or not _is_int(version):
        shown = version if _is_int64(version) else _kind(version)
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {shown} is not supported; this server speaks v1",
            rid,
        )
    op_name = obj.get("op")
    if not isinstance(op_name, str):
        _fail("op: expected a string", rid)
    try:
        op = Op(op_name)
    except ValueError:
        shown = op_name if len(op_name) <= 64 else op_name[:64] + "..."
        raise ProtocolError(ErrorCode.UNKNOWN_OP, f"unknown op {shown!r}", rid) from None
    model = obj.get("model")
    needs_model = op in MODEL_OPS or op in CONTROL_OPS
    if needs_model and not isinstance(model, str):
        _fail("model: expected a string naming the model", rid)
    if not needs_model:
        model = None  # ingest, info and stats ignore it, whatever it is
    timeout_ms = obj.get("timeout_ms")
    if timeout_ms is not None and (not _is_int(timeout_ms) or not 0 < timeout_ms <= MAX_TIMEOUT_MS):
        _fail(f"timeout_ms: expected an integer in 1..{MAX_TIMEOUT_MS}", rid)
    args = obj.get("args", {})
    if not isinstance(args, dict):
        _fail("args: expected a map", rid)
    return Request(id=rid, op=op, model=model, args=_op_args(op, args, rid), timeout_ms=timeout_ms)


def encode_request(
    request_id: RequestId,
    op: str,
    model: str | None = None,
    args: Mapping[str, Any] | None = None,
    timeout_ms: int | None = None,
) -> bytes:
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": request_id, "op": op}
    if model is not None:
        body["model"] = model
    body["args"] = dict(args or {})
    if timeout_ms is not None:
        body["timeout_ms"] = timeout_ms
    return _pack(body)


# --- replies ------------------------------------------------------------------------------


def encode_ok(request_id: RequestId, result: Mapping[str, Any]) -> bytes:
    return _pack({"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "result": result})


def encode_error(request_id: RequestId | None, code: ErrorCode, message: str) -> bytes:
    error = {"code": code.value, "message": message, "retry": code in RETRYABLE_CODES}
    return _pack({"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "error": error})


def encode_protocol_error(error: ProtocolError) -> bytes:
    return encode_error(error.request_id, error.code, error.message)


def decode_reply(body: bytes) -> Reply:
    """Decode a reply body; a reply that breaks the contract raises ProtocolError(INTERNAL)."""
    try:
        obj = _unpack_trusted(body)
    except Exception as exc:
        raise ProtocolError(ErrorCode.INTERNAL, f"reply is not valid msgpack: {exc}") from None
    if not isinstance(obj, dict) or obj.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.INTERNAL, "reply is not a v1 reply map")
    rid = _request_id(obj)
    if obj.get("ok") is True and isinstance(obj.get("result"), dict):
        return Reply(id=rid, result=obj["result"], error=None)
    err = obj.get("error")
    if obj.get("ok") is False and isinstance(err, dict):
        try:
            code = ErrorCode(str(err.get("code")))
        except ValueError:
            code = ErrorCode.INTERNAL
        message = err.get("message")
        text = message if isinstance(message, str) else ""
        return Reply(id=rid, result=None, error=Error(code, text, err.get("retry") is True))
    raise ProtocolError(ErrorCode.INTERNAL, "reply has neither a result nor an error", rid)


# --- client frames ------------------------------------------------------------------------
# After the ROUTER's identity frame a client message is exactly [b"", body]: the empty
# delimiter that a REQ socket adds by itself, then one msgpack frame.


def client_body(frames: Sequence[bytes]) -> bytes:
    """The body of a client message (identity frame already removed)."""
    if len(frames) != 2:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f"expected 2 frames (empty delimiter, msgpack body), got {len(frames)}",
        )
    if frames[0] != b"":
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f"the first frame must be the empty delimiter, got {len(frames[0])} bytes",
        )
    return frames[1]


# --- broker <-> worker --------------------------------------------------------------------
# Every worker-side message starts with one 21-byte header frame: b"URW1", a command byte,
# a sequence number and a deadline (u64 big-endian, 0 where unused), then the command's
# payload frames. One header frame instead of four keeps the per-request cost down.

WORKER_PROTOCOL = b"URW1"
READY = 1  # worker -> broker; payload: msgpack{model, version, slots, info}
REQUEST = 2  # broker -> worker; seq, deadline (µs of the host's CLOCK_MONOTONIC); payload: body
REPLY = 3  # worker -> broker; seq; payload: the reply body
HEARTBEAT = 4  # both ways; no payload
DISCONNECT = 5  # both ways; no payload. Worker: draining. Broker: released / register again
LOAD = 6  # broker -> worker; payload: version (UTF-8): load it, warm it up, switch to it
UPDATE = 7  # worker -> broker; payload as READY: this connection now serves that version
LOAD_FAILED = 8  # worker -> broker; payload: msgpack{version, error}: a LOAD it could not do

_HEADER = struct.Struct(">4sBQQ")


@dataclass(frozen=True, slots=True)
class WorkerHeader:
    command: int
    seq: int = 0
    deadline_us: int = 0


def worker_header(command: int, seq: int = 0, deadline_us: int = 0) -> bytes:
    return _HEADER.pack(WORKER_PROTOCOL, command, seq, deadline_us)


def parse_worker_header(frame: bytes) -> WorkerHeader:
    if len(frame) != _HEADER.size or not frame.startswith(WORKER_PROTOCOL):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "not a URW1 worker-protocol header")
    _, command, seq, deadline_us = _HEADER.unpack(frame)
    return WorkerHeader(command, seq, deadline_us)


def parse_packed(command: int, frames: list[bytes]) -> list[tuple[int, int, bytes]]:
    """A REQUEST or REPLY message's (seq, deadline_us, body) triples, the first header included
    (PROTOCOL.md section 7, "Packing"); the whole message is malformed if any pair is."""
    if len(frames) % 2:
        message = f"{len(frames)} frames, not (header, body) pairs"
        raise ProtocolError(ErrorCode.BAD_REQUEST, message)
    packed = []
    for index in range(0, len(frames), 2):
        header = parse_worker_header(frames[index])
        if header.command != command:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "a packed header of another command")
        packed.append((header.seq, header.deadline_us, frames[index + 1]))
    return packed


@dataclass(frozen=True, slots=True)
class WorkerHello:
    model: str
    version: str
    slots: int
    info: dict[str, Any]
    pid: int = 0  # the worker's process id on the broker's host (0: unknown); see section 7
    batch: int = 1  # requests it takes in one REQUEST message (section 7, "Packing")


def encode_ready(hello: WorkerHello, command: int = READY) -> list[bytes]:
    """READY (registering) or UPDATE (same connection, now serving another version)."""
    meta = {"model": hello.model, "version": hello.version, "slots": hello.slots}
    meta |= {"info": hello.info, "pid": hello.pid, "batch": hello.batch}
    return [worker_header(command), _pack(meta)]


def encode_load_failed(version: str, error: str) -> list[bytes]:
    return [worker_header(LOAD_FAILED), _pack({"version": version, "error": error})]


def decode_load_failed(frame: bytes) -> tuple[str, str]:
    try:
        meta = _unpack(frame)
    except ProtocolError:
        meta = None
    if not (
        isinstance(meta, dict)
        and isinstance(meta.get("version"), str)
        and isinstance(meta.get("error"), str)
    ):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "LOAD_FAILED needs version and error")
    return meta["version"], meta["error"]


def decode_ready(frame: bytes) -> WorkerHello:
    try:
        meta = _unpack_trusted(frame)
    except Exception as exc:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"READY is not msgpack: {exc}") from None
    if not (
        isinstance(meta, dict)
        and isinstance(meta.get("model"), str)
        and isinstance(meta.get("version"), str)
        and _is_int(meta.get("slots"))
        and meta["slots"] > 0
        and isinstance(meta.get("info"), dict)
    ):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "READY needs model, version, slots > 0, info")
    pid, batch = meta.get("pid", 0), meta.get("batch", 1)
    return WorkerHello(
        meta["model"],
        meta["version"],
        meta["slots"],
        meta["info"],
        pid if _is_int(pid) else 0,
        batch if _is_int(batch) and batch > 0 else 1,
    )
