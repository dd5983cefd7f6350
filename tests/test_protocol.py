"""The protocol core against the published test vectors in docs/vectors/v1.json."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from uro_recs.core import protocol
from uro_recs.core.protocol import ErrorCode, ProtocolError

VECTORS = json.loads((Path(__file__).parent.parent / "docs/vectors/v1.json").read_text())
MAX_BYTES = 1 << 20


def _by_name(section: str) -> list[Any]:
    return [pytest.param(v, id=v["name"]) for v in VECTORS[section]]


# The args each op takes (docs/PROTOCOL.md, section 3): a vector arg outside these would be
# ignored by the decoder and by `_typed_args` alike, so it is refused here.
OP_ARGS = {
    "recommend": {"user", "users", "n", "filter_consumed", "exclude", "seq"},
    "predict": {"user", "items"},
    "similar_items": {"item", "n"},
    "rollout": {"version"},
    "ingest": {"events"},
}


def _typed_args(op: str, args: dict[str, Any]) -> protocol.OpArgs:
    """The vector's args as the decoder must type them, with PROTOCOL.md's defaults."""
    assert set(args) <= OP_ARGS.get(op, set()), f"{op} does not take {sorted(args)}"
    if op == "recommend":
        many = "users" in args
        return protocol.RecommendArgs(
            users=tuple(args["users"]) if many else (args["user"],),
            many=many,
            n=args.get("n", 10),
            filter_consumed=args.get("filter_consumed", True),
            exclude=frozenset(args.get("exclude", [])),
            seq=tuple(args["seq"]) if "seq" in args else None,
        )
    if op == "predict":
        return protocol.PredictArgs(user=args["user"], items=tuple(args["items"]))
    if op == "similar_items":
        return protocol.SimilarItemsArgs(item=args["item"], n=args.get("n", 10))
    if op == "rollout":
        return protocol.RolloutArgs(version=args["version"])
    if op == "ingest":
        events = (
            protocol.IngestEvent(
                user_id=uuid.UUID(e["user_id"]),
                item_kind=e["item_kind"],
                item_id=uuid.UUID(e["item_id"]),
                event=e["event"],
                occurred_at_us=e["occurred_at_us"],
                weight=float(e.get("weight", 1.0)),
            )
            for e in args["events"]
        )
        return protocol.IngestArgs(tuple(events))
    return protocol.NoArgs()


@pytest.mark.parametrize("vector", _by_name("requests"))
def test_request_vector_decodes_to_its_value(vector: dict[str, Any]) -> None:
    body = bytes.fromhex(vector["body_hex"])
    value = vector["value"]
    request = protocol.decode_request(body, MAX_BYTES)
    assert request.id == value["id"]
    assert request.op == value["op"]
    assert request.model == value.get("model")
    assert request.timeout_ms == value.get("timeout_ms")
    assert request.args == _typed_args(value["op"], value.get("args", {}))


@pytest.mark.parametrize("vector", _by_name("requests"))
def test_reference_encoder_produces_the_vector_bytes(vector: dict[str, Any]) -> None:
    value = vector["value"]
    body = protocol.encode_request(
        value["id"], value["op"], value.get("model"), value.get("args"), value.get("timeout_ms")
    )
    assert body.hex() == vector["body_hex"]


@pytest.mark.parametrize("vector", _by_name("replies"))
def test_reply_vector_round_trips(vector: dict[str, Any]) -> None:
    body = bytes.fromhex(vector["body_hex"])
    value = vector["value"]
    reply = protocol.decode_reply(body)
    assert reply.id == value["id"]
    assert reply.ok is value["ok"]
    if reply.ok:
        assert reply.result == value["result"]
        assert protocol.encode_ok(value["id"], value["result"]) == body
    else:
        assert reply.error is not None
        assert reply.error.code.value == value["error"]["code"]
        assert reply.error.retry is value["error"]["retry"]
        code = ErrorCode(value["error"]["code"])
        assert protocol.encode_error(value["id"], code, value["error"]["message"]) == body


@pytest.mark.parametrize("vector", _by_name("malformed"))
def test_malformed_vector_gets_its_documented_error(vector: dict[str, Any]) -> None:
    frames = [bytes.fromhex(f) for f in vector["frames_hex"]]
    with pytest.raises(ProtocolError) as caught:
        protocol.decode_request(protocol.client_body(frames), MAX_BYTES)
    assert caught.value.code.value == vector["code"]
    assert caught.value.request_id == vector["id"]


def test_oversize_body_is_too_large() -> None:
    body = msgpack.packb({"v": 1, "id": 1, "op": "stats", "pad": "x" * MAX_BYTES})
    with pytest.raises(ProtocolError) as caught:
        protocol.decode_request(body, MAX_BYTES)
    assert caught.value.code is ErrorCode.TOO_LARGE


def test_recommend_args_are_typed_with_defaults() -> None:
    body = protocol.encode_request(1, "recommend", "als", {"users": ["a", 7], "exclude": ["x"]})
    args = protocol.decode_request(body, MAX_BYTES).args
    assert args == protocol.RecommendArgs(
        users=("a", 7), many=True, n=10, filter_consumed=True, exclude=frozenset({"x"})
    )


def test_retry_flag_follows_the_error_table() -> None:
    for code in ErrorCode:
        reply = protocol.decode_reply(protocol.encode_error(1, code, "m"))
        assert reply.error is not None
        assert reply.error.retry is (code in {"overloaded", "unavailable", "worker_lost"})


def test_worker_ready_round_trips_and_rejects_zero_slots() -> None:
    hello = protocol.WorkerHello("als", "v1", 8, {"n_items": 3})
    frames = protocol.encode_ready(hello)
    assert protocol.parse_worker_header(frames[0]) == protocol.WorkerHeader(protocol.READY)
    assert protocol.decode_ready(frames[1]) == hello
    bad = msgpack.packb({"model": "als", "version": "v1", "slots": 0, "info": {}})
    with pytest.raises(ProtocolError):
        protocol.decode_ready(bad)


def test_reply_that_breaks_the_contract_is_internal() -> None:
    with pytest.raises(ProtocolError) as caught:
        protocol.decode_reply(msgpack.packb({"v": 1, "id": 1}))
    assert caught.value.code is ErrorCode.INTERNAL


def test_worker_header_carries_command_seq_and_deadline() -> None:
    frame = protocol.worker_header(protocol.REQUEST, seq=7, deadline_us=123_456)
    assert len(frame) == 21 and frame.startswith(b"URW1")
    assert protocol.parse_worker_header(frame) == protocol.WorkerHeader(
        protocol.REQUEST, 7, 123_456
    )
    for bad in (b"", b"URW1", b"XXXX" + frame[4:], frame + b"\0"):
        with pytest.raises(ProtocolError):
            protocol.parse_worker_header(bad)


@given(
    st.lists(
        st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.binary(max_size=20)),
        min_size=1,
        max_size=8,
    )
)
def test_packed_requests_read_back_as_sent(triples: list[tuple[int, int, bytes]]) -> None:
    frames: list[bytes] = []
    for seq, deadline_us, body in triples:
        frames += (protocol.worker_header(protocol.REQUEST, seq, deadline_us), body)
    assert protocol.parse_packed(protocol.REQUEST, frames) == triples


@given(st.lists(st.binary(max_size=30), max_size=6), st.sampled_from([2, 3]))
def test_any_frames_read_as_packed_give_triples_or_a_protocol_error(
    frames: list[bytes], command: int
) -> None:
    try:
        packed = protocol.parse_packed(command, frames)
    except ProtocolError as error:
        assert error.code is ErrorCode.BAD_REQUEST
    else:
        assert len(packed) == len(frames) // 2


def test_a_pack_mixing_commands_is_malformed() -> None:
    frames = [protocol.worker_header(protocol.REPLY, 1), b"a", protocol.worker_header(2, 2), b"b"]
    with pytest.raises(ProtocolError, match="another command"):
        protocol.parse_packed(protocol.REPLY, frames)
