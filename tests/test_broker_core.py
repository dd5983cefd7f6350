"""The broker's state machine with a fake clock: no sockets, no processes.

Examples first, one per promise; then a property-based test (Hypothesis) that drives random
interleavings of requests, replies, worker joins, deaths, stalls and reconnects and checks the
invariants after every step.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from uro_recs.broker.core import BrokerCore, PendingState, ToClient, ToWorker, WatchProcess
from uro_recs.core import protocol
from uro_recs.core.config import BrokerConfig

CONTROL = 9


class Harness:
    """A core plus what it sent: replies by client and request id, requests by worker."""

    def __init__(self, config: BrokerConfig | None = None, models: tuple[str, ...] = ("als",)):
        self.now = 100.0
        self.core = BrokerCore(config or BrokerConfig(), models, control_frontend=CONTROL, now=0)
        self.replies: dict[tuple[bytes, Any], list[dict[str, Any]]] = {}
        self.requests: dict[bytes, list[int]] = {}  # worker -> seqs it was handed, in order
        self.watched: dict[bytes, int] = {}
        self.to_workers: list[ToWorker] = []

    def collect(self) -> None:
        for action in self.core.take_actions():
            if isinstance(action, ToClient):
                reply = msgpack.unpackb(action.body)
                self.replies.setdefault((action.client, reply["id"]), []).append(reply)
            elif isinstance(action, ToWorker):
                self.to_workers.append(action)
                header = protocol.parse_worker_header(action.frames[0])
                if header.command == protocol.REQUEST:
                    packed = protocol.parse_packed(protocol.REQUEST, list(action.frames))
                    assert len(packed) <= self.core.workers[action.identity].batch
                    seqs = self.requests.setdefault(action.identity, [])
                    seqs += (seq for seq, _, _ in packed)
            elif isinstance(action, WatchProcess):
                self.watched[action.identity] = action.pid

    def join(
        self, identity: bytes, model: str = "als", slots: int = 4, pid: int = 0, batch: int = 1
    ) -> None:
        hello = protocol.WorkerHello(model, "v1", slots, {}, pid, batch)
        self.core.worker_message(identity, protocol.encode_ready(hello), self.now)
        self.collect()

    def send(
        self, client: bytes, request_id: int, timeout_ms: int = 1000, users: int = 0, **args: Any
    ) -> None:
        if users:
            args["users"] = [f"u{i}" for i in range(users)]
        else:
            args.setdefault("user", "u")
        body = protocol.encode_request(request_id, "recommend", "als", args, timeout_ms)
        self.core.client_message(0, client, [b"", body], self.now)
        self.collect()

    def answer(self, worker: bytes, seq: int, request_id: Any = 0) -> None:
        self.answer_packed(worker, [(seq, request_id)])

    def answer_packed(self, worker: bytes, answers: list[tuple[int, Any]]) -> None:
        """One REPLY message carrying a reply per (seq, request id)."""
        frames: list[bytes] = []
        for seq, request_id in answers:
            body = protocol.encode_ok(request_id, {"items": []})
            frames += (protocol.worker_header(protocol.REPLY, seq), body)
        self.core.worker_message(worker, frames, self.now)
        self.collect()

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.core.tick(self.now)
        self.collect()

    def reply(self, client: bytes, request_id: Any) -> dict[str, Any]:
        replies = self.replies.get((client, request_id), [])
        assert len(replies) == 1, f"{len(replies)} replies to {request_id!r}"
        return replies[0]

    def code(self, client: bytes, request_id: Any) -> str | None:
        reply = self.reply(client, request_id)
        return None if reply["ok"] else str(reply["error"]["code"])


def test_a_body_nested_a_thousand_deep_is_answered_and_the_core_goes_on() -> None:
    h = Harness()
    h.join(b"w1")
    body = b"\x83\xa1v" + b"\x91" * 1000 + b"\x01" + b"\xa2id\x01\xa2op\xa5stats"
    h.core.client_message(0, b"c", [b"", body], h.now)
    h.collect()
    assert h.code(b"c", 1) == "unsupported_version"
    h.send(b"c", 2)
    assert h.requests[b"w1"], "a valid request after it is still dispatched"


def test_model_with_no_live_worker_answers_unavailable_at_once() -> None:
    h = Harness()
    h.send(b"c", 1)
    assert h.code(b"c", 1) == "unavailable"
    assert h.reply(b"c", 1)["error"]["retry"] is True


def test_last_worker_leaving_answers_what_waited_for_it() -> None:
    h = Harness()
    h.join(b"w1", slots=1)
    h.send(b"c", 1)
    h.send(b"c", 2)  # queued: the one slot is taken
    h.core.worker_gone(b"w1", "process exited", h.now)
    h.collect()
    assert h.code(b"c", 1) == "worker_lost"  # it was redelivered, but nobody is left
    assert h.code(b"c", 2) == "unavailable"
    assert h.core.live == 0 and h.core.pending_bytes == 0


def test_in_flight_request_expires_at_deadline_plus_grace_and_a_late_reply_is_dropped() -> None:
    h = Harness(BrokerConfig(in_flight_grace_ms=250, heartbeat_ms=10_000))
    h.join(b"w1")
    h.send(b"c", 1, timeout_ms=100)
    seq = h.requests[b"w1"][0]
    h.advance(0.2)
    assert (b"c", 1) not in h.replies, "in flight: the worker still has its grace"
    h.advance(0.2)
    assert h.code(b"c", 1) == "deadline_exceeded"
    h.answer(b"w1", seq, 1)
    assert len(h.replies[(b"c", 1)]) == 1
    assert h.core.counters["late_replies_dropped"] == 1
    assert h.core.workers[b"w1"].in_flight == {}, "the slot it held is free again"


def test_dead_workers_requests_are_redelivered_once_then_answered_worker_lost() -> None:
    h = Harness()
    h.join(b"w1", slots=1)
    h.join(b"w2", slots=1)
    h.send(b"c", 1, timeout_ms=5000)
    first = next(w for w, seqs in h.requests.items() if seqs)
    h.core.worker_gone(first, "process exited", h.now)
    h.collect()
    second = b"w2" if first == b"w1" else b"w1"
    assert h.requests[second], "redelivered to the other worker"
    assert (b"c", 1) not in h.replies
    h.join(b"w3", slots=1)
    h.core.worker_gone(second, "process exited", h.now)
    h.collect()
    assert h.code(b"c", 1) == "worker_lost"
    assert b"w3" not in h.requests, "a second death is not redelivered again"
    counters = h.core.counters
    assert (counters["requests_redelivered"], counters["answered_worker_lost"]) == (1, 1)
    assert h.core.live == 0 and h.core.pending_bytes == 0
    h.send(b"c", 2)
    assert h.requests[b"w3"], "the live worker left serves the next request"


def test_a_dead_workers_expired_request_is_answered_worker_lost_not_redelivered() -> None:
    h = Harness(BrokerConfig(in_flight_grace_ms=250, heartbeat_ms=10_000))
    h.join(b"w1", slots=1)
    h.send(b"c", 1, timeout_ms=100)
    h.join(b"w2", slots=1)
    h.now += 0.2  # past its deadline, within the grace: w1 still holds it
    h.core.worker_gone(b"w1", "process exited", h.now)
    h.collect()
    assert h.code(b"c", 1) == "worker_lost"
    assert b"w2" not in h.requests
    assert "requests_redelivered" not in h.core.counters


def test_silent_worker_is_declared_dead_after_liveness_and_its_requests_move() -> None:
    h = Harness(BrokerConfig(heartbeat_ms=100, liveness=3))
    h.join(b"w1", slots=1)
    h.send(b"c", 1, timeout_ms=5000)
    h.join(b"w2", slots=1)  # joins after: w1 holds the request
    for _ in range(3):
        h.core.worker_message(b"w2", [protocol.worker_header(protocol.HEARTBEAT)], h.now)
        h.advance(0.11)
    assert b"w1" not in h.core.workers
    assert h.requests[b"w2"], "the silent worker's request went to the live one"


def test_stale_ready_from_a_renamed_connection_makes_no_phantom_worker() -> None:
    h = Harness()
    hello = protocol.WorkerHello("als", "v1", 4, {}, 0)
    h.core.worker_message(b"\x00\x8b\x45\x67\x01", protocol.encode_ready(hello), h.now)
    h.collect()
    assert h.core.workers == {}
    assert h.core.counters["worker_ready_rejected"] == 1


def test_same_process_on_a_new_identity_replaces_its_old_registration() -> None:
    h = Harness()
    h.join(b"als-1", pid=4242)
    h.join(b"als-1b", pid=4242)
    assert list(h.core.workers) == [b"als-1b"]
    assert h.watched == {b"als-1": 4242, b"als-1b": 4242}


def test_answered_requests_release_their_bodies_and_deadline_entries() -> None:
    h = Harness()
    h.join(b"w1", slots=8)
    padding = "x" * 100_000
    for i in range(2_000):
        h.send(b"c", i, timeout_ms=3_600_000, pad=padding)
        h.answer(b"w1", h.requests[b"w1"][-1], i)
    assert all(h.reply(b"c", i)["ok"] for i in range(2_000))
    assert h.core.live == 0 and h.core.pending_bytes == 0
    assert len(h.core._expiries) <= 64 + 1


def test_one_clients_heavy_requests_leave_slots_for_another_clients_light_ones() -> None:
    h = Harness(BrokerConfig(heavy_request_users=32, heavy_per_worker=1))
    h.join(b"w1", slots=8)
    for i in range(20):
        h.send(b"heavy", i, users=1000, n=10)
    assert len(h.requests[b"w1"]) == 1, "one heavy request at a time per worker"
    h.send(b"light", 1)
    assert len(h.requests[b"w1"]) == 2, "the light request went straight to a free slot"


def test_queued_requests_of_many_clients_are_served_in_turns() -> None:
    h = Harness()
    h.join(b"w1", slots=1)
    h.send(b"a", 0)  # takes the slot
    for i in range(1, 50):
        h.send(b"a", i)
    h.send(b"b", 1)
    served: list[bytes] = []
    seq_owner = {}
    for _ in range(50):
        seq = h.requests[b"w1"][-1]
        pending = h.core.workers[b"w1"].in_flight[seq]
        seq_owner[seq] = pending.client[1]
        served.append(pending.client[1])
        h.answer(b"w1", seq, pending.request_id)
    assert served.index(b"b") <= protocol_quantum() + 1, served


def protocol_quantum() -> int:
    from uro_recs.broker.core import DRR_QUANTUM

    return DRR_QUANTUM


def test_a_client_over_its_limit_is_told_overloaded_and_others_are_not() -> None:
    h = Harness(BrokerConfig(client_max_requests=3))
    h.join(b"w1", slots=1)
    for i in range(4):
        h.send(b"greedy", i)
    assert h.code(b"greedy", 3) == "overloaded"
    h.send(b"other", 1)
    assert (b"other", 1) not in h.replies, "accepted and queued"


def test_rollout_to_an_unusable_version_is_refused_and_a_failed_load_is_reported() -> None:
    h = Harness()
    h.core.version_problem = lambda model, v: None if v == "v2" else f"no version {v!r}"
    h.join(b"w1")
    bad = protocol.encode_request(1, "rollout", "als", {"version": "../etc"})
    h.core.client_message(CONTROL, b"op", [b"", bad], h.now)
    h.collect()
    assert h.code(b"op", 1) == "bad_request"
    good = protocol.encode_request(2, "rollout", "als", {"version": "v2"})
    h.core.client_message(CONTROL, b"op", [b"", good], h.now)
    h.collect()
    assert h.reply(b"op", 2)["result"]["moving"] == 1
    h.core.worker_message(b"w1", protocol.encode_load_failed("v2", "StoreCorrupt: x"), h.now)
    h.collect()
    state = h.core.stats(h.now)["models"]["als"]
    assert state["load_errors"] == [{"worker": "w1", "version": "v2", "error": "StoreCorrupt: x"}]
    assert state["target_version"] is None


def test_drain_refuses_new_requests_and_finishes_when_nothing_is_held() -> None:
    h = Harness()
    h.join(b"w1")
    h.send(b"c", 1)
    h.core.begin_drain(h.now)
    h.send(b"c", 2)
    assert h.code(b"c", 2) == "unavailable"
    assert not h.core.finished
    h.answer(b"w1", h.requests[b"w1"][0], 1)
    h.advance(0.01)
    assert h.core.finished and h.reply(b"c", 1)["ok"]


# --- random interleavings ---------------------------------------------------------------------

WORKERS = [b"w1", b"w2", b"w3"]


def test_requests_dispatched_to_one_worker_in_one_turn_leave_as_one_packed_message() -> None:
    h = Harness()
    h.core.worker_message(
        b"w1", protocol.encode_ready(protocol.WorkerHello("als", "v1", 8, {}, 0, 3)), h.now
    )
    for request_id in range(1, 6):  # one turn: the shell takes the actions once, at its end
        body = protocol.encode_request(request_id, "recommend", "als", {"user": "u"})
        h.core.client_message(0, b"c", [b"", body], h.now)
    h.collect()
    packs = [a for a in h.to_workers if a.frames[0][4] == protocol.REQUEST]
    assert [len(a.frames) // 2 for a in packs] == [3, 2]  # at most the worker's batch of 3
    assert h.requests[b"w1"] == sorted(h.requests[b"w1"]) and len(h.requests[b"w1"]) == 5
    h.answer_packed(b"w1", [(seq, i + 1) for i, seq in enumerate(h.requests[b"w1"])])
    assert all(h.code(b"c", request_id) is None for request_id in range(1, 6))


def test_a_worker_that_announced_no_batch_gets_one_request_per_message() -> None:
    h = Harness()
    h.join(b"w1", slots=8)  # READY without "batch": 1
    for request_id in range(1, 4):
        body = protocol.encode_request(request_id, "recommend", "als", {"user": "u"})
        h.core.client_message(0, b"c", [b"", body], h.now)
    h.collect()
    assert [len(a.frames) for a in h.to_workers] == [2, 2, 2]


def test_a_pack_waiting_for_a_worker_goes_before_a_command_to_it() -> None:
    h = Harness()
    h.join(b"w1", slots=8, batch=8)
    body = protocol.encode_request(1, "recommend", "als", {"user": "u"})
    h.core.client_message(0, b"c", [b"", body], h.now)
    h.core.tick(h.now + 0.3)  # a heartbeat to w1 in the same turn (it is alive for 0.75 s)
    h.collect()
    commands = [a.frames[0][4] for a in h.to_workers if a.identity == b"w1"]
    assert commands == [protocol.REQUEST, protocol.HEARTBEAT]


def test_a_pack_for_a_worker_that_dies_before_it_is_sent_is_redelivered_not_sent() -> None:
    h = Harness()
    h.join(b"w1", slots=8, batch=8)
    h.join(b"w2", slots=8, batch=8)
    h.collect()
    h.to_workers.clear()
    body = protocol.encode_request(1, "recommend", "als", {"user": "u"})
    h.core.client_message(0, b"c", [b"", body], h.now)
    held_by = next(w for w in h.core.workers.values() if w.in_flight).identity
    h.core.worker_gone(held_by, "process exited", h.now)
    h.collect()
    assert [a.identity for a in h.to_workers] == [b"w2" if held_by == b"w1" else b"w1"]
    (seq,) = h.requests[h.to_workers[0].identity]
    h.answer(h.to_workers[0].identity, seq, 1)
    assert h.code(b"c", 1) is None


@pytest.mark.parametrize(
    "frames",
    [
        [protocol.worker_header(protocol.REPLY, 1)],
        [protocol.worker_header(protocol.REPLY, 1), b"x", b"y"],
        [protocol.worker_header(protocol.REPLY, 1), b"x", protocol.worker_header(4), b"y"],
    ],
    ids=["no-body", "odd-frames", "second-header-not-a-reply"],
)
def test_a_malformed_packed_reply_is_counted_and_answers_nothing(frames: list[bytes]) -> None:
    h = Harness()
    h.join(b"w1")
    h.send(b"c", 1)
    h.core.worker_message(b"w1", frames, h.now)
    h.collect()
    assert h.core.counters["worker_messages_malformed"] == 1
    assert h.replies == {}
    (seq,) = h.requests[b"w1"]
    h.answer(b"w1", seq, 1)
    assert h.code(b"c", 1) is None


CLIENTS = [b"a", b"b", b"c"]


class BrokerMachine(RuleBasedStateMachine):
    """Random events against one core; every step checks what must always hold."""

    def __init__(self) -> None:
        super().__init__()
        config = BrokerConfig(
            queue_limit=5,
            client_max_requests=6,
            heartbeat_ms=100,
            heavy_request_users=3,
            in_flight_grace_ms=50,
        )
        self.h = Harness(config)
        self.sent: set[tuple[bytes, int]] = set()
        self.next_id = 0
        self.dead: set[bytes] = set()  # identities we killed and that have not joined again
        self.garbage = 0

    @rule(worker=st.sampled_from(WORKERS), slots=st.integers(1, 3), batch=st.integers(1, 3))
    def join(self, worker: bytes, slots: int, batch: int) -> None:
        self.h.join(worker, slots=slots, pid=WORKERS.index(worker) + 1, batch=batch)
        self.dead.discard(worker)

    @rule(worker=st.sampled_from(WORKERS))
    def die(self, worker: bytes) -> None:
        self.h.core.worker_gone(worker, "process exited", self.h.now)
        self.h.collect()
        self.dead.add(worker)

    @rule(
        client=st.sampled_from(CLIENTS),
        timeout_ms=st.integers(1, 400),
        users=st.integers(0, 6),
    )
    def request(self, client: bytes, timeout_ms: int, users: int) -> None:
        self.next_id += 1
        self.sent.add((client, self.next_id))
        self.h.send(client, self.next_id, timeout_ms=timeout_ms, users=users)

    @rule(client=st.sampled_from(CLIENTS), data=st.binary(max_size=40))
    def garbage_from_client(self, client: bytes, data: bytes) -> None:
        before = len(self.h.replies)
        self.h.core.client_message(0, client, [b"", data], self.h.now)
        self.h.collect()
        self.garbage += 1
        assert len(self.h.replies) >= before  # answered (id None, or a real id if it had one)

    @rule(worker=st.sampled_from(WORKERS), data=st.lists(st.binary(max_size=30), max_size=3))
    def garbage_from_worker(self, worker: bytes, data: list[bytes]) -> None:
        self.h.core.worker_message(worker, data, self.h.now)
        self.h.collect()

    @precondition(lambda self: any(w.in_flight for w in self.h.core.workers.values()))
    @rule(data=st.data())
    def reply(self, data: st.DataObject) -> None:
        busy = [w for w in self.h.core.workers.values() if w.in_flight]
        worker = data.draw(st.sampled_from(busy))
        seq = data.draw(st.sampled_from(sorted(worker.in_flight)))
        pending = worker.in_flight[seq]
        self.h.answer(worker.identity, seq, pending.request_id)

    @precondition(lambda self: any(w.in_flight for w in self.h.core.workers.values()))
    @rule(data=st.data())
    def packed_replies(self, data: st.DataObject) -> None:
        busy = [w for w in self.h.core.workers.values() if w.in_flight]
        worker = data.draw(st.sampled_from(busy))
        seqs = data.draw(st.lists(st.sampled_from(sorted(worker.in_flight)), min_size=1))
        answers = [(seq, worker.in_flight[seq].request_id) for seq in dict.fromkeys(seqs)]
        self.h.answer_packed(worker.identity, answers)

    @rule(worker=st.sampled_from(WORKERS), seq=st.integers(0, 50))
    def late_or_unknown_reply(self, worker: bytes, seq: int) -> None:
        record = self.h.core.workers.get(worker)
        assume(record is None or seq not in record.in_flight)  # that is `reply`'s case
        self.h.answer(worker, seq, -1)

    @rule(worker=st.sampled_from(WORKERS))
    def heartbeat(self, worker: bytes) -> None:
        self.h.core.worker_message(worker, [protocol.worker_header(protocol.HEARTBEAT)], self.h.now)
        self.h.collect()

    @rule(seconds=st.floats(0.0, 0.5))
    def time_passes(self, seconds: float) -> None:
        self.h.advance(seconds)

    @invariant()
    def every_request_has_at_most_one_reply(self) -> None:
        for key, replies in self.h.replies.items():
            if key[1] is not None and key[1] != -1:
                assert len(replies) == 1, (key, replies)

    @invariant()
    def nothing_is_sent_to_a_worker_known_dead(self) -> None:
        for action in self.h.to_workers:
            header = protocol.parse_worker_header(action.frames[0])
            assert len(action.frames) == 1 or header.command in (protocol.REQUEST, protocol.LOAD)
            if header.command == protocol.REQUEST:
                assert action.identity not in self.dead
        self.h.to_workers.clear()

    @invariant()
    def registrations_are_unique_and_consistent(self) -> None:
        core = self.h.core
        by_model = [i for m in core.models.values() for i in m.workers]
        assert sorted(by_model) == sorted(core.workers)
        assert not (set(core.workers) & self.dead)

    @invariant()
    def memory_held_is_bounded_by_the_limits(self) -> None:
        core = self.h.core
        held = list(core._held())
        assert core.live == len(held)
        assert core.pending_bytes == sum(len(p.body) for p in held)
        assert all(p.state is not PendingState.DONE for p in held)
        assert len(core._expiries) <= 2 * core.live + 65
        slots = sum(w.slots for w in core.workers.values()) + 3 * 3
        for model in core.models.values():
            assert model.queued <= core.config.queue_limit + slots
        for usage in core.clients.values():
            assert usage.requests <= core.config.client_max_requests

    def teardown(self) -> None:
        # Whatever happened, once every deadline and grace period has passed, every accepted
        # request has been answered exactly once.
        self.h.advance(10.0)
        for key in self.sent:
            assert len(self.h.replies.get(key, [])) == 1, key
        assert self.h.core.live == 0


BrokerMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_random_interleavings_keep_every_promise = BrokerMachine.TestCase


def test_config_defaults_keep_hung_worker_detection_under_the_sdk_timeout() -> None:
    from uro_recs.sdk.client import DEFAULT_TIMEOUT

    config = BrokerConfig()
    detect_s = config.heartbeat_ms * config.liveness / 1000
    assert detect_s < DEFAULT_TIMEOUT
