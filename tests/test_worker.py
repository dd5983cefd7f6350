"""The worker's side of the broker link: a real worker in a thread, the broker a ROUTER socket
in the test speaking the URW1 worker protocol (docs/PROTOCOL.md, section 7)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any

import msgpack
import pandas as pd
import pytest
import zmq

from uro_recs.core import protocol
from uro_recs.core.config import BrokerConfig, DatabaseConfig, WorkerConfig
from uro_recs.pipeline import ingest_worker as ingest
from uro_recs.pipeline.ingest_worker import IngestWorker
from uro_recs.worker.engine import Engine, Recommendation, RecommendQuery, load_engine
from uro_recs.worker.loop import WorkerLoop
from uro_recs.worker.service import WorkerService

HEARTBEAT_MS = 200
LIVENESS = 3  # the broker's: a worker silent this many heartbeats is dead
# The worker must not think the broker lost while the test is quiet: the fake broker sends no
# heartbeats of its own.
QUIET_BROKER = BrokerConfig(heartbeat_ms=HEARTBEAT_MS, liveness=100)


class FakeBroker:
    """The broker's end of the worker protocol, one worker, driven by the test."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> None:
        self.context = context
        self.endpoint = endpoint
        self.sock = context.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.worker = b""  # the worker's identity, from its first message
        self.heartbeats: list[float] = []  # when each HEARTBEAT arrived (time.monotonic())
        self.packed_replies = 0  # REPLY messages that carried more than one reply
        self._unread: list[tuple[int, bytes]] = []  # the rest of a packed REPLY
        self._seq = 0

    def receive(self, timeout_s: float = 10) -> tuple[protocol.WorkerHeader, list[bytes]]:
        """The worker's next message other than a heartbeat (those are only recorded)."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not self.sock.poll(remaining_ms):
                raise AssertionError(f"the worker sent nothing in {timeout_s} s")
            identity, header_frame, *payload = self.sock.recv_multipart()
            self.worker = identity
            header = protocol.parse_worker_header(header_frame)
            if header.command == protocol.HEARTBEAT:
                self.heartbeats.append(time.monotonic())
                continue
            return header, payload

    def expect(self, command: int, timeout_s: float = 10) -> list[bytes]:
        header, payload = self.receive(timeout_s)
        assert header.command == command, f"expected command {command}, got {header}"
        return payload

    def reply(self, timeout_s: float = 10) -> tuple[int, bytes]:
        """The next reply (a REPLY message may carry several): its seq and its body."""
        if not self._unread:
            header, payload = self.receive(timeout_s)
            assert header.command == protocol.REPLY, f"expected a REPLY, got {header}"
            frames = [protocol.worker_header(protocol.REPLY, header.seq), *payload]
            self._unread = [(seq, body) for seq, _, body in protocol.parse_packed(3, frames)]
            self.packed_replies += len(self._unread) > 1
        return self._unread.pop(0)

    def replies(self, count: int, timeout_s: float = 20) -> list[tuple[int, dict[str, Any]]]:
        """The next `count` replies in the order they arrived, bodies decoded."""
        deadline = time.monotonic() + timeout_s
        answers = []
        for _ in range(count):
            seq, body = self.reply(max(0.01, deadline - time.monotonic()))
            answers.append((seq, msgpack.unpackb(body)))
        return answers

    def send(self, command: int, *payload: bytes, seq: int = 0, deadline_us: int = 0) -> None:
        assert self.worker, "no worker has said READY"
        header = protocol.worker_header(command, seq, deadline_us)
        self.sock.send_multipart([self.worker, header, *payload])

    def request(
        self,
        request_id: int,
        op: str,
        args: dict[str, Any],
        model: str | None = "als",
        timeout_s: float = 30,
    ) -> int:
        """Hand the worker one request, as the broker does; returns its seq."""
        self._seq += 1
        deadline_us = int((time.monotonic() + timeout_s) * 1_000_000)
        body = protocol.encode_request(request_id, op, model, args)
        self.send(protocol.REQUEST, body, seq=self._seq, deadline_us=deadline_us)
        return self._seq

    def nothing_more(self, wait_s: float) -> None:
        """Nothing but heartbeats arrives for `wait_s`."""
        deadline = time.monotonic() + wait_s
        while (remaining_ms := int((deadline - time.monotonic()) * 1000)) > 0:
            if not self.sock.poll(remaining_ms):
                return
            _, header_frame, *_ = self.sock.recv_multipart()
            header = protocol.parse_worker_header(header_frame)
            assert header.command == protocol.HEARTBEAT, f"unexpected {header}"


@pytest.fixture
def broker() -> Iterator[FakeBroker]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    fake = FakeBroker(context, f"inproc://workers-{uuid.uuid4().hex}")
    yield fake
    context.destroy(linger=0)


@contextmanager
def running(worker: WorkerLoop, broker: FakeBroker) -> Iterator[protocol.WorkerHello]:
    """The worker's loop in a thread, registered with the fake broker: yields its READY."""
    failures: list[BaseException] = []

    def serve() -> None:
        try:
            worker.run()
        except BaseException as error:  # shown by the test, not lost in the thread
            failures.append(error)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield protocol.decode_ready(broker.expect(protocol.READY)[0])
    finally:
        worker.stop()
        thread.join(timeout=10)
        worker.close()
    assert not thread.is_alive(), "the worker's loop did not stop"
    assert not failures, failures


def worker_config(**overrides: Any) -> WorkerConfig:
    return WorkerConfig(**{"slots": 8, **overrides})


def als_service(engine: Engine, broker: FakeBroker, **config: Any) -> WorkerService:
    loader = config.pop("loader", None)
    broker_config = config.pop("broker_config", QUIET_BROKER)
    return WorkerService(
        engine,
        broker.endpoint,
        worker_config(**config),
        broker_config,
        broker.context,
        loader=loader,
    )


def ingest_worker(broker: FakeBroker) -> IngestWorker:
    config = worker_config()
    return IngestWorker(DatabaseConfig(), broker.endpoint, config, QUIET_BROKER, broker.context)


@pytest.fixture
def engine(trained_store: Path) -> Engine:
    return load_engine(trained_store, "als")


@pytest.fixture
def all_users(demo_interactions: pd.DataFrame) -> list[str]:
    """Every user the trained models know (800)."""
    users: list[str] = demo_interactions["user"].drop_duplicates().tolist()
    return users


class SlowModel:
    """The engine's recommend_batch, made as slow per user as a large catalogue would make it
    (the demo models answer 1,000 users in a tenth of a second), and every call recorded."""

    def __init__(self, engine: Engine, seconds_per_user: float) -> None:
        self.calls: list[int] = []  # users per call
        self._recommend = engine.recommend_batch
        self._seconds_per_user = seconds_per_user

    def __call__(self, queries: Sequence[RecommendQuery]) -> list[Recommendation]:
        self.calls.append(len(queries))
        time.sleep(self._seconds_per_user * len(queries))
        return self._recommend(queries)


def slowed(engine: Engine, monkeypatch: pytest.MonkeyPatch, seconds_per_user: float) -> SlowModel:
    model = SlowModel(engine, seconds_per_user)
    monkeypatch.setattr(engine, "recommend_batch", model)
    return model


def heavy_users(all_users: list[str]) -> list[str]:
    """1,000 users: every known one, then 200 the model never saw (cold start)."""
    return [*all_users, *(f"new-user-{i}" for i in range(1000 - len(all_users)))]


# --- registration ---------------------------------------------------------------------------


def test_ready_carries_the_model_workers_pid(broker: FakeBroker, engine: Engine) -> None:
    with running(als_service(engine, broker), broker) as hello:
        assert (hello.model, hello.version) == ("als", engine.version)
        assert hello.pid == os.getpid()


def test_ready_carries_the_ingest_workers_pid(broker: FakeBroker) -> None:
    worker = ingest_worker(broker)
    with running(worker, broker) as hello:
        assert hello.model == protocol.INGEST_WORKERS
        assert hello.pid == os.getpid()


# --- malformed messages from the broker -----------------------------------------------------


@pytest.mark.parametrize(
    "rest",
    [[], [b"body", b"body"], [b"body", b"not a header", b"body"]],
    ids=["header-only", "two-bodies", "second-pair-without-header"],
)
def test_request_with_a_wrong_frame_count_is_answered_not_dropped(
    broker: FakeBroker, engine: Engine, all_users: list[str], rest: list[bytes]
) -> None:
    service = als_service(engine, broker)
    with running(service, broker):
        body = protocol.encode_request(1, "recommend", "als", {"user": all_users[0]})
        frames = [body if frame == b"body" else frame for frame in rest]
        broker.send(protocol.REQUEST, *frames, seq=41, deadline_us=2**62)
        seq, reply = broker.replies(1)[0]
        assert seq == 41
        assert reply["ok"] is False and reply["id"] is None
        assert reply["error"]["code"] == "internal"
        assert "worker got a malformed REQUEST" in reply["error"]["message"]
        broker.request(2, "recommend", {"user": all_users[0]})  # and the worker serves on
        assert broker.replies(1)[0][1]["ok"] is True
        assert service.malformed == 1


def test_message_with_a_broken_header_is_counted_and_the_worker_serves_on(
    broker: FakeBroker, engine: Engine, all_users: list[str]
) -> None:
    service = als_service(engine, broker)
    with running(service, broker):
        broker.sock.send_multipart([broker.worker, b"URW2" + bytes(17), b"body"])
        broker.sock.send_multipart([broker.worker, b"short"])
        broker.send(protocol.LOAD)  # a LOAD without its version
        broker.request(1, "recommend", {"user": all_users[0]})
        ((_, reply),) = broker.replies(1)
        assert reply["ok"] is True and reply["id"] == 1
        assert service.malformed == 3


# --- rollouts: a LOAD that cannot be done is answered LOAD_FAILED ----------------------------


def load_failed(broker: FakeBroker) -> tuple[str, str]:
    (payload,) = broker.expect(protocol.LOAD_FAILED)
    return protocol.decode_load_failed(payload)


def test_load_of_a_missing_version_is_answered_load_failed_with_the_reason(
    broker: FakeBroker, engine: Engine, trained_store: Path, all_users: list[str]
) -> None:
    def load(version: str) -> Engine:
        return load_engine(trained_store, "als", version)

    with running(als_service(engine, broker, loader=load), broker):
        broker.send(protocol.LOAD, b"2099-01-01T000000Z")
        version, error = load_failed(broker)
        assert version == "2099-01-01T000000Z"
        assert error.startswith("VersionNotFound: ") and "2099-01-01T000000Z" in error
        assert "\n" not in error and "Traceback" not in error
        broker.request(1, "recommend", {"user": all_users[0]})  # still serving the old one
        assert broker.replies(1)[0][1]["ok"] is True
        broker.send(protocol.LOAD, b"../escape")  # not a version name at all
        version, error = load_failed(broker)
        assert version == "../escape" and error.startswith("ValueError: invalid version")


def test_load_on_a_worker_without_a_model_store_is_answered_load_failed(
    broker: FakeBroker, engine: Engine
) -> None:
    with running(als_service(engine, broker), broker):
        broker.send(protocol.LOAD, b"2026-12-01T000000Z")
        version, error = load_failed(broker)
        assert version == "2026-12-01T000000Z"
        assert "no model store" in error


def test_load_of_another_version_while_one_loads_is_answered_load_failed(
    broker: FakeBroker, engine: Engine, trained_store: Path
) -> None:
    release = threading.Event()

    def load(version: str) -> Engine:
        assert release.wait(10)
        return load_engine(trained_store, "als")

    with running(als_service(engine, broker, loader=load), broker):
        broker.send(protocol.LOAD, b"v-next")
        broker.send(protocol.LOAD, b"v-next")  # the same again: it is on its way
        broker.send(protocol.LOAD, b"v-other")
        version, error = load_failed(broker)
        assert version == "v-other" and "still loading version 'v-next'" in error
        release.set()
        update = protocol.decode_ready(broker.expect(protocol.UPDATE)[0])
        assert update.pid == os.getpid()


def test_load_on_a_worker_that_has_no_versions_is_answered_load_failed(
    broker: FakeBroker,
) -> None:
    worker = ingest_worker(broker)
    with running(worker, broker):
        broker.send(protocol.LOAD, b"2026-12-01T000000Z")
        assert load_failed(broker) == ("2026-12-01T000000Z", "this worker cannot load versions")


def test_new_version_is_switched_to_only_after_the_heavy_request_in_progress(
    broker: FakeBroker,
    engine: Engine,
    trained_store: Path,
    all_users: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine.users_per_call = 100
    old_model = slowed(engine, monkeypatch, seconds_per_user=0.0005)
    new_engine = load_engine(trained_store, "als")
    new_model = slowed(new_engine, monkeypatch, seconds_per_user=0)
    with running(als_service(engine, broker, loader=lambda _: new_engine), broker):
        broker.request(1, "recommend", {"users": heavy_users(all_users), "n": 10})
        while not old_model.calls:
            time.sleep(0.005)
        broker.send(protocol.LOAD, b"v-next")  # loads at once; the heavy one is not done
        header, payload = broker.receive()
        assert header.command == protocol.REPLY, "switched before the heavy request was done"
        assert msgpack.unpackb(payload[0])["ok"] is True
        broker.expect(protocol.UPDATE)
        assert sum(old_model.calls) == 1000 and new_model.calls == []


# --- heavy requests: bounded model calls, light requests first, heartbeats throughout --------


def test_heavy_request_is_answered_as_if_computed_in_one_call_in_chunks_of_users_per_call(
    broker: FakeBroker,
    engine: Engine,
    trained_store: Path,
    all_users: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    users = heavy_users(all_users)
    exclude = [all_users[0], "some-item"]
    args = {"users": users, "n": 20, "exclude": exclude}
    reference = load_engine(trained_store, "als")  # a second engine: this one is the worker's
    in_one_call = reference.recommend_batch(
        [RecommendQuery(user, 20, True, frozenset(exclude)) for user in users]
    )
    answers = [
        {"user": user, "items": rec.items, "cold_start": rec.cold_start}
        for user, rec in zip(users, in_one_call, strict=True)
    ]
    expected = protocol.encode_ok(7, {"results": answers})
    engine.users_per_call = 64
    model = slowed(engine, monkeypatch, seconds_per_user=0)
    with running(als_service(engine, broker), broker):
        broker.request(7, "recommend", args)
        _, body = broker.reply()
    assert body == expected
    assert max(model.calls) <= 64 and sum(model.calls) == 1000


def test_lighter_requests_received_together_are_answered_first(
    broker: FakeBroker, engine: Engine, all_users: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine.users_per_call = 50
    model = slowed(engine, monkeypatch, seconds_per_user=0.0002)
    # The worker waits for more before it starts: all four arrive in one batch.
    service = als_service(engine, broker, max_batch_delay_ms=300)
    with running(service, broker):
        heavy = broker.request(1, "recommend", {"users": heavy_users(all_users)})
        middle = broker.request(2, "recommend", {"users": all_users[:45]})
        single = broker.request(3, "recommend", {"user": all_users[0]})
        small = broker.request(4, "recommend", {"users": all_users[:30]})
        order = [seq for seq, reply in broker.replies(4) if reply["ok"]]
    assert order == [single, small, middle, heavy]
    assert max(model.calls) <= 50
    assert model.calls[:2] == [31, 45]  # the two lightest share one call


def test_while_a_heavy_request_runs_heartbeats_go_on_and_light_requests_are_answered_first(
    broker: FakeBroker, engine: Engine, all_users: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine.users_per_call = 50
    model = slowed(engine, monkeypatch, seconds_per_user=0.0015)  # 1.5 s for 1,000 users
    with running(als_service(engine, broker), broker):
        started = time.monotonic()
        heavy = broker.request(1, "recommend", {"users": heavy_users(all_users), "n": 20})
        while not model.calls:
            time.sleep(0.005)
        single = broker.request(2, "recommend", {"user": all_users[3], "n": 5})
        predict = broker.request(3, "predict", {"user": all_users[3], "items": ["a", "b"]})
        replies = broker.replies(3)
        answered = time.monotonic()
    assert {seq for seq, _ in replies[:2]} == {single, predict}  # sent later, answered first
    assert replies[2][0] == heavy
    assert all(reply["ok"] for _, reply in replies), replies
    assert len(replies[2][1]["result"]["results"]) == 1000
    beats = [started, *(t for t in broker.heartbeats if started < t < answered), answered]
    longest = max(b - a for a, b in pairwise(beats))
    assert longest < LIVENESS * HEARTBEAT_MS / 1000, f"silent for {longest:.3f} s"


def test_heavy_request_past_its_deadline_is_answered_at_once_and_the_rest_not_scored(
    broker: FakeBroker, engine: Engine, all_users: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine.users_per_call = 50
    model = slowed(engine, monkeypatch, seconds_per_user=0.0015)  # 1.5 s for 1,000 users
    with running(als_service(engine, broker), broker):
        sent = time.monotonic()
        broker.request(1, "recommend", {"users": heavy_users(all_users)}, timeout_s=0.4)
        ((_, reply),) = broker.replies(1)
        answered = time.monotonic()
        broker.request(2, "recommend", {"user": all_users[0]})
        assert broker.replies(1)[0][1]["ok"] is True
    assert reply["error"]["code"] == "deadline_exceeded"
    assert reply["error"]["message"].startswith("deadline passed after ")
    assert answered - sent < 0.4 + 0.3  # within a turn or two of the deadline
    assert sum(model.calls) < 1000


def test_draining_worker_finishes_its_heavy_request_before_it_leaves(
    broker: FakeBroker, engine: Engine, all_users: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine.users_per_call = 50
    model = slowed(engine, monkeypatch, seconds_per_user=0.0005)
    service = als_service(engine, broker)
    with running(service, broker):
        broker.request(1, "recommend", {"users": heavy_users(all_users)})
        while not model.calls:
            time.sleep(0.005)
        service.begin_drain()
        broker.expect(protocol.DISCONNECT)
        broker.send(protocol.DISCONNECT)  # released, too early: the worker still holds one
        ((_, reply),) = broker.replies(1)
        assert reply["ok"] is True and len(reply["result"]["results"]) == 1000
        deadline = time.monotonic() + 5
        while service.running:
            assert time.monotonic() < deadline, "the released worker did not leave"
            time.sleep(0.01)


def test_draining_worker_answers_what_it_could_not_finish_when_the_drain_time_is_up(
    broker: FakeBroker, engine: Engine, all_users: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine.users_per_call = 50
    model = slowed(engine, monkeypatch, seconds_per_user=0.0015)  # 1.5 s for 1,000 users
    service = als_service(engine, broker, drain_timeout_s=0.3)
    with running(service, broker):
        broker.request(1, "recommend", {"users": heavy_users(all_users)})
        while not model.calls:
            time.sleep(0.005)
        service.begin_drain()
        broker.expect(protocol.DISCONNECT)
        ((_, reply),) = broker.replies(1)
        assert reply["error"]["code"] == "unavailable" and reply["error"]["retry"] is True
        assert "stopped before it could finish" in reply["error"]["message"]
        assert sum(model.calls) < 1000


# --- [worker] max_batch_delay_ms: requests arriving together share one model call -----------


def test_requests_arriving_within_the_batch_delay_share_one_model_call(
    broker: FakeBroker, engine: Engine, all_users: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = slowed(engine, monkeypatch, seconds_per_user=0)
    with running(als_service(engine, broker, max_batch_delay_ms=500), broker):
        sent = time.monotonic()
        first = broker.request(1, "recommend", {"user": all_users[0]})
        time.sleep(0.05)
        second = broker.request(2, "recommend", {"user": all_users[1]})
        replies = broker.replies(2)
        answered = time.monotonic()
    assert {seq for seq, reply in replies if reply["ok"]} == {first, second}
    assert model.calls == [2]
    assert answered - sent >= 0.5  # it waited out the delay for a third


def test_a_packed_request_is_one_model_call_and_its_replies_leave_packed(
    broker: FakeBroker, engine: Engine, all_users: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    users = all_users[:3]
    expected = [r.items for r in engine.recommend(users, 5, filter_consumed=True)]
    model = slowed(engine, monkeypatch, seconds_per_user=0)
    with running(als_service(engine, broker, max_batch_delay_ms=0), broker) as hello:
        assert hello.batch == 8  # its slots: it takes as many in one message as it may hold
        deadline_us = int((time.monotonic() + 30) * 1_000_000)
        frames: list[bytes] = []
        for seq, user in enumerate(users, start=7):
            frames += (
                protocol.worker_header(protocol.REQUEST, seq, deadline_us),
                protocol.encode_request(seq, "recommend", "als", {"user": user, "n": 5}),
            )
        broker.sock.send_multipart([broker.worker, *frames])
        replies = broker.replies(3)
    assert [seq for seq, _ in replies] == [7, 8, 9]
    assert [reply["result"]["user"] for _, reply in replies] == users
    assert [reply["id"] for _, reply in replies] == [7, 8, 9]
    assert [reply["result"]["items"] for _, reply in replies] == expected
    assert model.calls == [3]
    assert broker.packed_replies == 1


def test_a_batch_that_fills_the_slots_does_not_wait_out_the_delay(
    broker: FakeBroker, engine: Engine, all_users: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = slowed(engine, monkeypatch, seconds_per_user=0)
    with running(als_service(engine, broker, max_batch_delay_ms=5000, slots=2), broker):
        sent = time.monotonic()
        broker.request(1, "recommend", {"user": all_users[0]})
        broker.request(2, "recommend", {"user": all_users[1]})
        replies = broker.replies(2, timeout_s=4)
        answered = time.monotonic()
    assert all(reply["ok"] for _, reply in replies)
    assert model.calls == [2]
    assert answered - sent < 2.5


def test_a_worker_with_no_batch_delay_answers_a_lone_request_at_once(
    broker: FakeBroker, engine: Engine, all_users: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = slowed(engine, monkeypatch, seconds_per_user=0)
    with running(als_service(engine, broker, max_batch_delay_ms=0), broker):
        sent = time.monotonic()
        broker.request(1, "recommend", {"user": all_users[0]})
        ((_, reply),) = broker.replies(1)
        waited = time.monotonic() - sent
        broker.request(2, "recommend", {"user": all_users[1]})
        broker.replies(1)
    assert reply["ok"] is True
    assert model.calls == [1, 1]
    assert waited < 0.25


# --- the ingest worker answers every job it hands to its asyncio thread exactly once ---------


def ingest_args() -> dict[str, Any]:
    event = {
        "user_id": str(uuid.uuid4()),
        "item_kind": "avatar",
        "item_id": str(uuid.uuid4()),
        "event": "favorite",
        "occurred_at_us": 1_764_547_200_000_000,
    }
    return {"events": [event, {**event, "event": "view"}]}


class FakeDatabase:
    @classmethod
    async def connect(cls, config: DatabaseConfig) -> FakeDatabase:
        return cls()

    async def close(self) -> None:
        pass


def fake_writer(submit: Callable[[list[tuple[Any, ...]]], None]) -> type[Any]:
    class FakeWriter:
        def __init__(self, db: FakeDatabase, flush_interval_s: float) -> None:
            pass

        async def submit(self, rows: list[tuple[Any, ...]]) -> None:
            await asyncio.sleep(0.01)
            submit(rows)

    return FakeWriter


def committed(rows: list[tuple[Any, ...]]) -> None:
    pass


def fails_unexpectedly(rows: list[tuple[Any, ...]]) -> None:
    raise RuntimeError("the writer broke")


def is_cancelled(rows: list[tuple[Any, ...]]) -> None:
    raise asyncio.CancelledError


@pytest.mark.parametrize(
    ("submit", "code"),
    [(committed, None), (fails_unexpectedly, "internal"), (is_cancelled, "internal")],
)
def test_ingest_job_is_answered_exactly_once_however_its_write_ends(
    broker: FakeBroker,
    monkeypatch: pytest.MonkeyPatch,
    submit: Callable[[list[tuple[Any, ...]]], None],
    code: str | None,
) -> None:
    monkeypatch.setattr(ingest, "Database", FakeDatabase)
    monkeypatch.setattr(ingest, "EventWriter", fake_writer(submit))
    worker = ingest_worker(broker)
    worker.connect()
    with running(worker, broker):
        seqs = {broker.request(i, "ingest", ingest_args(), model=None) for i in range(3)}
        replies = broker.replies(3)
        broker.nothing_more(0.3)
    assert {seq for seq, _ in replies} == seqs
    if code is None:
        assert all(r["ok"] and r["result"] == {"accepted": 2} for _, r in replies), replies
    else:
        assert {r["error"]["code"] for _, r in replies} == {code}, replies


def test_ingest_job_is_answered_when_the_database_thread_is_not_running(
    broker: FakeBroker,
) -> None:
    # Never connected: no thread to hand the job to.
    worker = ingest_worker(broker)
    with running(worker, broker):
        seq = broker.request(1, "ingest", ingest_args(), model=None)
        ((answered, reply),) = broker.replies(1, timeout_s=5)
        broker.nothing_more(0.3)
    assert answered == seq
    assert reply["error"]["code"] == "internal"
    assert "not running" in reply["error"]["message"]
