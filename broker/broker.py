"""The broker: a ROUTER front end for clients, a ROUTER back end for workers, one loop.

State is three small records (Pending, WorkerRecord, ModelState) and every message type has
one handler. Unlike the ZeroMQ Guide's Majordomo broker it answers every request it accepts:
queued requests expire with "deadline_exceeded", full queues answer "overloaded", requests
held by a dead worker are redelivered once or answered "worker_lost", and a draining broker
answers "unavailable".
"""

from __future__ import annotations

import enum
import grp
import heapq
import itertools
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog
import zmq

from uro_recs import protocol
from uro_recs.config import BrokerConfig
from uro_recs.protocol import ErrorCode, Op, ProtocolError, Request, RequestId, RolloutArgs
from uro_recs.wakeup import Wakeup

log = structlog.get_logger("uro_recs.broker")

RECV_BATCH = 256  # messages read from one socket before looking at the others
# Plain ints: pyzmq's flag enums cost a Python-level __or__ per frame on the hot path.
_SNDMORE, _NOBLOCK = int(zmq.SNDMORE), int(zmq.NOBLOCK)


class PendingState(enum.Enum):
    QUEUED = "queued"  # waiting in its model's queue
    IN_FLIGHT = "in_flight"  # handed to a worker
    DONE = "done"  # answered


@dataclass(slots=True, eq=False)
class Pending:
    """A client request the broker has accepted and must answer."""

    client: bytes  # ROUTER identity of the client (or of the front end socket's peer)
    frontend: zmq.Socket[bytes]  # the socket the request came in on
    request_id: RequestId
    model: str
    body: bytes
    deadline: float  # time.monotonic() seconds
    dispatches: int = 0
    state: PendingState = PendingState.QUEUED


@dataclass(slots=True, eq=False)
class WorkerRecord:
    identity: bytes
    model: str
    version: str
    slots: int
    info: dict[str, Any]
    expires_at: float
    in_flight: dict[int, Pending] = field(default_factory=dict)
    draining: bool = False

    @property
    def free(self) -> int:
        return 0 if self.draining else self.slots - len(self.in_flight)


@dataclass(slots=True, eq=False)
class ModelState:
    name: str
    queue: deque[Pending] = field(default_factory=deque)
    workers: dict[bytes, WorkerRecord] = field(default_factory=dict)
    overloaded: bool = False  # for logging the change of state, not every rejection
    target_version: str | None = None  # set by a rollout; workers on another version move

    def least_loaded(self) -> WorkerRecord | None:
        best: WorkerRecord | None = None
        for worker in self.workers.values():
            if worker.free > 0 and (
                best is None
                or len(worker.in_flight) * best.slots < len(best.in_flight) * worker.slots
            ):
                best = worker
        return best


class Broker:
    def __init__(
        self,
        config: BrokerConfig,
        client_endpoints: Iterable[str],
        worker_endpoint: str,
        control_endpoint: str,
        known_models: Iterable[str] = (),
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        self.config = config
        self.context = context or zmq.Context.instance()
        self.models: dict[str, ModelState] = {name: ModelState(name) for name in known_models}
        self.workers: dict[bytes, WorkerRecord] = {}
        self.counters: Counter[str] = Counter()
        self.started_at = time.monotonic()
        self.draining = False
        self.drain_deadline = 0.0
        self.running = False
        self._on_drain: Callable[[], None] | None = None
        self._seq = itertools.count(1)
        self._tiebreak = itertools.count()
        self._deadlines: list[tuple[float, int, Pending]] = []
        self._liveness_s = config.heartbeat_ms * config.liveness / 1000
        self._hard_max = config.max_message_bytes * 4 + 1024

        self.frontends: list[zmq.Socket[bytes]] = []
        for endpoint in client_endpoints:
            self.frontends.append(self._bind(zmq.ROUTER, endpoint, max_bytes=self._hard_max))
        self.control = self._bind(zmq.ROUTER, control_endpoint, max_bytes=self._hard_max)
        self.backend = self._bind(zmq.ROUTER, worker_endpoint)
        # A worker that gave up on us reconnects with the same identity, and its old connection
        # may not be gone yet: the newest connection must own the identity, or its READY and
        # heartbeats sit unread while we route its requests to the dead one.
        self.backend.setsockopt(zmq.ROUTER_HANDOVER, 1)
        for endpoint in client_endpoints:
            _set_socket_access(endpoint, config.client_socket_mode_bits, config.client_socket_group)
        _set_socket_access(control_endpoint, 0o600)
        _set_socket_access(worker_endpoint, 0o600)
        self._wakeup = Wakeup()

    def _bind(self, kind: int, endpoint: str, max_bytes: int = -1) -> zmq.Socket[bytes]:
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable replies raise, so we count them
        sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)  # memory guard; the documented limit is lower
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.bind(endpoint)
        return sock

    # --- lifecycle --------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        self._wakeup.on_stop_signals(self.begin_drain)

    def begin_drain(self) -> None:
        if not self.draining:
            self.draining = True
            self.drain_deadline = time.monotonic() + self.config.drain_timeout_s
            log.info("broker_draining", queued=self._queued(), in_flight=self._in_flight())
            if self._on_drain is not None:
                self._on_drain()

    def run(
        self,
        on_ready: Any = None,
        on_tick: Callable[[], None] | None = None,
        on_drain: Callable[[], None] | None = None,
    ) -> None:
        """Mediate until drained. `on_ready` is called once the sockets are bound, `on_tick`
        once per loop iteration (at least every heartbeat), `on_drain` when a drain begins."""
        self._on_drain = on_drain
        poller = zmq.Poller()
        for sock in (*self.frontends, self.control, self.backend):
            poller.register(sock, zmq.POLLIN)
        poller.register(self._wakeup.fileno(), zmq.POLLIN)
        self.running = True
        log.info("broker_started", models=sorted(self.models))
        if on_ready is not None:
            on_ready()
        next_heartbeat = time.monotonic()
        while self.running:
            now = time.monotonic()
            wake_at = min(
                next_heartbeat, self._deadlines[0][0] if self._deadlines else next_heartbeat
            )
            events = dict(poller.poll(max(0, int((wake_at - now) * 1000) + 1)))
            if on_tick is not None:
                on_tick()
            if self._wakeup.fileno() in events:
                self._wakeup.drain()
            if self.backend in events:
                self._read(self.backend, self._on_worker_message)
            for frontend in (*self.frontends, self.control):
                if frontend in events:
                    self._read(frontend, self._on_client_message)
            now = time.monotonic()
            if now >= next_heartbeat:
                self._heartbeat(now)
                next_heartbeat = now + self.config.heartbeat_ms / 1000
            self._expire_queued(now)
            if self.draining:
                self._check_drained(now)
        log.info("broker_stopped", counters=dict(self.counters))

    def close(self) -> None:
        for sock in (*self.frontends, self.control, self.backend):
            sock.close(linger=0)
        self._wakeup.close()

    def _read(self, sock: zmq.Socket[bytes], handler: Any) -> None:
        for _ in range(RECV_BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            handler(sock, frames)

    def _check_drained(self, now: float) -> None:
        if self._queued() == 0 and self._in_flight() == 0:
            self.running = False
        elif now >= self.drain_deadline:
            log.warning("drain_timeout", queued=self._queued(), in_flight=self._in_flight())
            for model in self.models.values():
                for pending in [*model.queue, *self._held_by(model)]:
                    self._answer_error(pending, ErrorCode.UNAVAILABLE, "broker is shutting down")
                model.queue.clear()
            self.running = False

    # --- clients ---------------------------------------------------------------------------

    def _on_client_message(self, sock: zmq.Socket[bytes], frames: list[bytes]) -> None:
        client, rest = frames[0], frames[1:]
        self.counters["requests_received"] += 1
        try:
            body = protocol.client_body(rest)
            request = protocol.decode_request(body, self.config.max_message_bytes)
        except ProtocolError as error:
            self.counters[f"rejected_{error.code.value}"] += 1
            self._reply(sock, client, protocol.encode_protocol_error(error))
            return
        if request.op is Op.STATS:
            self._reply(sock, client, protocol.encode_ok(request.id, self.stats()))
            return
        if request.op is Op.INFO:
            self._reply(sock, client, protocol.encode_ok(request.id, self.info()))
            return
        if request.op in protocol.CONTROL_OPS:
            self._on_control(sock, client, request)
            return
        if self.draining:
            self._reject(sock, client, request.id, ErrorCode.UNAVAILABLE, "broker is draining")
            return
        ingest = request.op is Op.INGEST
        name = protocol.INGEST_WORKERS if ingest else request.model
        assert name is not None  # decode_request checks this for model ops
        model = self.models.get(name)
        if model is None:
            message = "no ingest worker is configured" if ingest else f"no model named {name!r}"
            self._reject(sock, client, request.id, ErrorCode.UNKNOWN_MODEL, message)
            return
        timeout_ms = request.timeout_ms or self.config.default_timeout_ms
        pending = Pending(
            client=client,
            frontend=sock,
            request_id=request.id,
            model=model.name,
            body=body,
            deadline=time.monotonic() + timeout_ms / 1000,
        )
        worker = None if model.queue else model.least_loaded()
        if worker is not None:
            self._dispatch(pending, worker)
            return
        if len(model.queue) >= self.config.queue_limit:
            if not model.overloaded:
                model.overloaded = True
                log.warning("model_overloaded", model=model.name, queued=len(model.queue))
            message = f"model {model.name!r} has {len(model.queue)} requests queued"
            self._reject(sock, client, request.id, ErrorCode.OVERLOADED, message)
            return
        model.queue.append(pending)
        heapq.heappush(self._deadlines, (pending.deadline, next(self._tiebreak), pending))

    def _on_control(self, sock: zmq.Socket[bytes], client: bytes, request: Request) -> None:
        if sock is not self.control:
            message = f"{request.op} is accepted on the control endpoint only"
            self._reject(sock, client, request.id, ErrorCode.BAD_REQUEST, message)
            return
        assert isinstance(request.args, RolloutArgs) and request.model is not None
        model = self.models.get(request.model)
        if model is None:
            message = f"no model named {request.model!r}"
            self._reject(sock, client, request.id, ErrorCode.UNKNOWN_MODEL, message)
            return
        model.target_version = request.args.version
        told = [w for w in model.workers.values() if w.version != model.target_version]
        for worker in told:
            self._send_worker(worker.identity, protocol.LOAD, model.target_version.encode())
        log.info(
            "rollout_started",
            model=model.name,
            version=model.target_version,
            workers=len(model.workers),
            moving=len(told),
        )
        result = {"model": model.name, "version": model.target_version, "moving": len(told)}
        self._reply(sock, client, protocol.encode_ok(request.id, result))

    def _reject(
        self,
        sock: zmq.Socket[bytes],
        client: bytes,
        request_id: RequestId,
        code: ErrorCode,
        message: str,
    ) -> None:
        self.counters[f"rejected_{code.value}"] += 1
        self._reply(sock, client, protocol.encode_error(request_id, code, message))

    def _reply(self, sock: zmq.Socket[bytes], client: bytes, body: bytes) -> None:
        try:
            _send_frames(sock, client, b"", body, flags=_NOBLOCK)
            self.counters["replies_sent"] += 1
        except (zmq.Again, zmq.ZMQError):
            # The client went away (EHOSTUNREACH) or stopped reading: nothing to deliver to.
            self.counters["replies_undeliverable"] += 1

    def _answer_error(self, pending: Pending, code: ErrorCode, message: str) -> None:
        pending.state = PendingState.DONE
        self.counters[f"answered_{code.value}"] += 1
        body = protocol.encode_error(pending.request_id, code, message)
        self._reply(pending.frontend, pending.client, body)

    def _expire_queued(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, pending = heapq.heappop(self._deadlines)
            if pending.state is PendingState.QUEUED:
                self.models[pending.model].queue.remove(pending)
                self._answer_error(
                    pending, ErrorCode.DEADLINE_EXCEEDED, "deadline passed while queued"
                )

    # --- dispatch ---------------------------------------------------------------------------

    def _dispatch(self, pending: Pending, worker: WorkerRecord) -> None:
        if pending.deadline <= time.monotonic():
            self._answer_error(pending, ErrorCode.DEADLINE_EXCEEDED, "deadline passed while queued")
            return
        seq = next(self._seq)
        pending.state = PendingState.IN_FLIGHT
        pending.dispatches += 1
        worker.in_flight[seq] = pending
        # Workers share this host's CLOCK_MONOTONIC, so the deadline travels as an instant.
        header = protocol.worker_header(protocol.REQUEST, seq, int(pending.deadline * 1_000_000))
        self._send_worker_frames(worker.identity, header, pending.body)

    def _pump(self, model: ModelState) -> None:
        """Hand queued requests to workers with free slots, least loaded first."""
        while model.queue:
            worker = model.least_loaded()
            if worker is None:
                return
            pending = model.queue.popleft()
            self._dispatch(pending, worker)
        if model.overloaded:
            model.overloaded = False
            log.info("model_recovered", model=model.name)

    def _send_worker(self, identity: bytes, command: int, payload: bytes | None = None) -> None:
        header = protocol.worker_header(command)
        if payload is None:
            self._send_worker_frames(identity, header)
        else:
            self._send_worker_frames(identity, header, payload)

    def _send_worker_frames(self, identity: bytes, *frames: bytes) -> None:
        try:
            _send_frames(self.backend, identity, *frames)
        except zmq.ZMQError:
            # The worker's connection is gone; its heartbeat expiry redelivers what it held.
            self.counters["worker_sends_failed"] += 1

    # --- workers ----------------------------------------------------------------------------

    def _on_worker_message(self, _sock: zmq.Socket[bytes], frames: list[bytes]) -> None:
        try:
            header = protocol.parse_worker_header(frames[1] if len(frames) > 1 else b"")
        except ProtocolError:
            self.counters["worker_messages_malformed"] += 1
            return
        identity, command, args = frames[0], header.command, frames[2:]
        worker = self.workers.get(identity)
        if command == protocol.READY:
            self._on_ready(identity, args)
            return
        if worker is None:
            # A worker we do not know (we restarted, or declared it dead): make it re-register.
            self._send_worker(identity, protocol.DISCONNECT)
            return
        worker.expires_at = time.monotonic() + self._liveness_s
        if command == protocol.REPLY and len(args) == 1:
            self._on_reply(worker, header.seq, args[0])
        elif command == protocol.HEARTBEAT:
            pass
        elif command == protocol.UPDATE and len(args) == 1:
            self._on_update(worker, args[0])
        elif command == protocol.DISCONNECT:
            worker.draining = True
            log.info("worker_draining", worker=identity.hex(), in_flight=len(worker.in_flight))
            self._forget_if_drained(worker)
        else:
            self.counters["worker_messages_malformed"] += 1

    def _on_ready(self, identity: bytes, args: list[bytes]) -> None:
        try:
            if len(args) != 1:
                raise ProtocolError(ErrorCode.BAD_REQUEST, "READY takes one frame")
            hello = protocol.decode_ready(args[0])
        except ProtocolError as error:
            self.counters["worker_messages_malformed"] += 1
            log.warning("worker_ready_rejected", worker=identity.hex(), reason=error.message)
            return
        if identity in self.workers:
            self._worker_gone(self.workers[identity], "re-registered")
        worker = WorkerRecord(
            identity=identity,
            model=hello.model,
            version=hello.version,
            slots=hello.slots,
            info=hello.info,
            expires_at=time.monotonic() + self._liveness_s,
        )
        self.workers[identity] = worker
        model = self.models.setdefault(hello.model, ModelState(hello.model))
        model.workers[identity] = worker
        log.info(
            "worker_joined",
            worker=identity.hex(),
            model=hello.model,
            version=hello.version,
            slots=hello.slots,
            workers=len(model.workers),
        )
        if model.target_version is not None and hello.version != model.target_version:
            self._send_worker(identity, protocol.LOAD, model.target_version.encode())
        self._pump(model)

    def _on_update(self, worker: WorkerRecord, frame: bytes) -> None:
        """The worker switched versions on the same connection; what it holds stays with it."""
        try:
            hello = protocol.decode_ready(frame)
        except ProtocolError:
            self.counters["worker_messages_malformed"] += 1
            return
        if hello.model != worker.model:
            self.counters["worker_messages_malformed"] += 1
            return
        previous, worker.version = worker.version, hello.version
        worker.slots, worker.info = hello.slots, hello.info
        log.info(
            "worker_version_changed",
            worker=worker.identity.hex(),
            model=worker.model,
            previous=previous,
            version=worker.version,
        )
        self._pump(self.models[worker.model])

    def _on_reply(self, worker: WorkerRecord, seq: int, body: bytes) -> None:
        pending = worker.in_flight.pop(seq, None)
        if pending is None:
            self.counters["late_replies_dropped"] += 1
            return
        pending.state = PendingState.DONE
        self._reply(pending.frontend, pending.client, body)
        self._forget_if_drained(worker)
        self._pump(self.models[worker.model])

    def _forget_if_drained(self, worker: WorkerRecord) -> None:
        if worker.draining and not worker.in_flight:
            self._send_worker(worker.identity, protocol.DISCONNECT)  # the worker may exit now
            self._remove(worker)
            log.info("worker_left", worker=worker.identity.hex(), model=worker.model)

    def _remove(self, worker: WorkerRecord) -> None:
        self.workers.pop(worker.identity, None)
        self.models[worker.model].workers.pop(worker.identity, None)

    def _heartbeat(self, now: float) -> None:
        for worker in list(self.workers.values()):
            if now >= worker.expires_at:
                self._worker_gone(worker, "heartbeat expired")
            else:
                self._send_worker(worker.identity, protocol.HEARTBEAT)

    def _worker_gone(self, worker: WorkerRecord, reason: str) -> None:
        """Redeliver once what a dead worker held, if the deadline allows; else answer."""
        self._remove(worker)
        model = self.models[worker.model]
        now = time.monotonic()
        redelivered = lost = 0
        # Oldest first, and ahead of the queue: these were accepted before anything queued.
        for pending in reversed(list(worker.in_flight.values())):
            if pending.dispatches < 2 and pending.deadline > now:
                pending.state = PendingState.QUEUED
                model.queue.appendleft(pending)
                heapq.heappush(self._deadlines, (pending.deadline, next(self._tiebreak), pending))
                redelivered += 1
            else:
                self._answer_error(pending, ErrorCode.WORKER_LOST, "the worker holding it died")
                lost += 1
        worker.in_flight.clear()
        self.counters["workers_lost"] += 1
        self.counters["requests_redelivered"] += redelivered
        log.warning(
            "worker_lost",
            worker=worker.identity.hex(),
            model=worker.model,
            reason=reason,
            redelivered=redelivered,
            answered_worker_lost=lost,
            workers=len(model.workers),
        )
        self._pump(model)

    # --- introspection ------------------------------------------------------------------------

    def _held_by(self, model: ModelState) -> list[Pending]:
        return [p for w in model.workers.values() for p in w.in_flight.values()]

    def _queued(self) -> int:
        return sum(len(m.queue) for m in self.models.values())

    def _in_flight(self) -> int:
        return sum(len(w.in_flight) for w in self.workers.values())

    def stats(self) -> dict[str, Any]:
        return {
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "draining": self.draining,
            "models": {
                m.name: {
                    "workers": len(m.workers),
                    "slots": sum(w.slots for w in m.workers.values()),
                    "in_flight": sum(len(w.in_flight) for w in m.workers.values()),
                    "queued": len(m.queue),
                    "versions": sorted({w.version for w in m.workers.values()}),
                    "target_version": m.target_version,
                }
                for m in self.models.values()
            },
            "counters": dict(self.counters),
        }

    def info(self) -> dict[str, Any]:
        versions: dict[tuple[str, str], list[WorkerRecord]] = {}
        for worker in self.workers.values():
            versions.setdefault((worker.model, worker.version), []).append(worker)
        models = []
        for (name, version), workers in sorted(versions.items()):
            meta = workers[0].info
            models.append(
                {
                    "name": name,
                    "version": version,
                    "workers": len(workers),
                    "class": meta.get("class"),
                    "n_users": meta.get("n_users"),
                    "n_items": meta.get("n_items"),
                    "ops": meta.get("ops", []),
                }
            )
        return {"models": models}


def _set_socket_access(endpoint: str, mode: int | None, group: str = "") -> None:
    """Set who may connect to an IPC socket file (tcp:// and abstract ipc://@ have no file)."""
    if not endpoint.startswith("ipc://") or endpoint.startswith("ipc://@"):
        return
    path = endpoint.removeprefix("ipc://")
    gid = grp.getgrnam(group).gr_gid if group else -1
    if gid != -1 and os.stat(path).st_gid != gid:  # under systemd it already is: no chown call
        os.chown(path, -1, gid)
    if mode is not None:
        os.chmod(path, mode)
    log.info("socket_access_set", path=path, mode=None if mode is None else oct(mode), group=group)


def _send_frames(sock: zmq.Socket[bytes], *frames: bytes, flags: int = 0) -> None:
    """send_multipart without its per-frame overhead; the hot path sends three frames."""
    last = len(frames) - 1
    for index, frame in enumerate(frames):
        sock.send(frame, flags | _SNDMORE if index < last else flags)
