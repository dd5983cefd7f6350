"""The broker's state machine: no sockets, no clock, no filesystem.

Every input is an event with the time it happened (`now`, seconds on the host's
CLOCK_MONOTONIC); every output is an action in `take_actions()` for the socket shell
(broker/broker.py) to carry out. So the whole of queueing, deadlines, redelivery, worker
liveness and fairness is driven the same way by the live loop, by tests with a fake clock and
by property-based tests that interleave events at random.

The promise it keeps: every request it accepts gets exactly one reply. Queued requests expire
at their deadline; requests held by a worker expire at their deadline plus a grace period;
requests held by a worker that dies are redelivered once if their deadline allows; a model
with no live worker answers `unavailable` at once.

Fairness: each model queues per client connection and hands requests out deficit round robin
weighted by cost (users in a recommend), so one caller's large or many requests delay another
caller's by at most one round; a worker holds at most `heavy_per_worker` heavy requests, so
large requests never take every slot.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from uro_recs.broker.stats import RequestStats
from uro_recs.core import protocol
from uro_recs.core.config import BrokerConfig
from uro_recs.core.protocol import (
    ErrorCode,
    Op,
    ProtocolError,
    RecommendArgs,
    Request,
    RequestId,
    RolloutArgs,
)

ClientKey: TypeAlias = tuple[int, bytes]  # (front end index, ROUTER identity of the connection)
DRR_QUANTUM = 32  # cost credited to a client on each round-robin turn
MAX_LOAD_ERRORS = 10  # failed version loads kept per model for `stats`


@dataclass(frozen=True, slots=True)
class ToClient:
    frontend: int
    client: bytes
    body: bytes


@dataclass(frozen=True, slots=True)
class ToWorker:
    identity: bytes
    frames: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class WatchProcess:
    """Tell the shell to report (`worker_gone`) when this worker's process exits."""

    identity: bytes
    pid: int


@dataclass(frozen=True, slots=True)
class UnwatchProcess:
    identity: bytes


@dataclass(frozen=True, slots=True)
class LogEvent:
    """Something an operator should see in the log."""

    event: str
    fields: dict[str, Any]
    warning: bool = False


Action: TypeAlias = ToClient | ToWorker | WatchProcess | UnwatchProcess | LogEvent


class PendingState(enum.Enum):
    QUEUED = "queued"  # waiting in its model's queue
    IN_FLIGHT = "in_flight"  # handed to a worker
    DONE = "done"  # answered; its body is released


@dataclass(slots=True, eq=False)
class Pending:
    """A client request the broker has accepted and must answer exactly once."""

    client: ClientKey
    request_id: RequestId
    model: str
    body: bytes
    cost: int  # users in a recommend, else 1
    heavy: bool  # cost over heavy_request_users
    deadline: float
    expires_at: float  # deadline while queued; deadline + grace while in flight
    dispatches: int = 0
    state: PendingState = PendingState.QUEUED
    worker: bytes = b""  # while in flight
    seq: int = 0  # while in flight
    op: str = ""  # for the request statistics
    received: float = 0.0


@dataclass(slots=True, eq=False)
class WorkerRecord:
    identity: bytes
    model: str
    version: str
    slots: int
    info: dict[str, Any]
    pid: int
    expires_at: float
    in_flight: dict[int, Pending] = field(default_factory=dict)
    heavy: int = 0  # heavy requests among in_flight
    draining: bool = False
    batch: int = 1  # requests one REQUEST message may carry to it (PROTOCOL.md 7, "Packing")

    @property
    def free(self) -> int:
        return 0 if self.draining else self.slots - len(self.in_flight)


@dataclass(slots=True, eq=False)
class ModelState:
    name: str
    workers: dict[bytes, WorkerRecord] = field(default_factory=dict)
    redeliveries: deque[Pending] = field(default_factory=deque)  # served before any queue
    queues: dict[ClientKey, deque[Pending]] = field(default_factory=dict)
    turns: deque[ClientKey] = field(default_factory=deque)  # clients with queued requests
    deficits: dict[ClientKey, int] = field(default_factory=dict)
    queued: int = 0
    overloaded: bool = False  # for logging the change of state, not every rejection
    target_version: str | None = None  # set by a rollout; workers on another version move
    load_errors: deque[dict[str, str]] = field(
        default_factory=lambda: deque(maxlen=MAX_LOAD_ERRORS)
    )

    def live_workers(self) -> int:
        return sum(1 for w in self.workers.values() if not w.draining)


@dataclass(slots=True)
class ClientUsage:
    """What one client connection holds in the broker: bounded by the config's client limits."""

    requests: int = 0
    bytes: int = 0
    unread_reply_bytes: int = 0  # large replies libzmq has not yet written to the connection


class BrokerCore:
    def __init__(
        self,
        config: BrokerConfig,
        known_models: Iterable[str] = (),
        control_frontend: int = -1,
        version_problem: Callable[[str, str], str | None] | None = None,
        now: float = 0.0,
    ) -> None:
        """`control_frontend` is the index of the control endpoint among the front ends;
        `version_problem(model, version)` says why a rollout target is unusable (None: fine)."""
        self.config = config
        self.models: dict[str, ModelState] = {name: ModelState(name) for name in known_models}
        self.workers: dict[bytes, WorkerRecord] = {}
        self.clients: dict[ClientKey, ClientUsage] = {}
        self.counters: Counter[str] = Counter()
        self.control_frontend = control_frontend
        self.version_problem = version_problem
        self.started_at = now
        self.draining = False
        self.drain_deadline = 0.0
        self.finished = False  # drained: the shell may exit
        self.pending_bytes = 0  # bodies of every queued and in-flight request
        self.requests = RequestStats()
        self._now = now  # the time of the event being handled
        self.live = 0  # queued and in-flight requests
        self._actions: list[Action] = []
        # REQUEST (header, body) pairs dispatched this turn, per worker, not yet sent: packed
        # into one message when the shell takes the actions (or a pack is full).
        self._packs: dict[bytes, list[bytes]] = {}
        self._seq = itertools.count(1)
        self._tiebreak = itertools.count()
        self._expiries: list[tuple[float, int, Pending]] = []
        self._heartbeat_s = config.heartbeat_s
        self._liveness_s = config.liveness_s
        self._grace_s = config.in_flight_grace_ms / 1000
        self._next_heartbeat = now

    # --- the shell's side ---------------------------------------------------------------------

    def take_actions(self) -> list[Action]:
        if self._packs:
            for identity in list(self._packs):
                self._send_pack(identity)
        actions = self._actions
        if actions:
            self._actions = []
        return actions

    def next_wakeup(self) -> float:
        """The latest time the shell may call `tick` next."""
        wake = self._next_heartbeat
        if self._expiries:
            wake = min(wake, self._expiries[0][0])
        if self.draining:
            wake = min(wake, self.drain_deadline)
        return wake

    def tick(self, now: float) -> None:
        """Heartbeats, liveness, deadlines and the drain: call at least at `next_wakeup()`."""
        self._now = now
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self._heartbeat_s
            for worker in list(self.workers.values()):
                if now >= worker.expires_at:
                    self.worker_gone(worker.identity, "heartbeat expired", now)
                else:
                    self._to_worker(worker.identity, protocol.HEARTBEAT)
        self._expire(now)
        if self.draining:
            self._check_drained(now)

    def begin_drain(self, now: float) -> None:
        self._now = now
        if not self.draining:
            self.draining = True
            self.drain_deadline = now + self.config.drain_timeout_s
            self._check_drained(now)

    def reply_undeliverable(self, why: str = "") -> None:
        """The shell could not hand a reply to libzmq: the client is gone or never reads."""
        self.counters["replies_undeliverable"] += 1
        if why:
            self.counters[f"replies_dropped_{why}"] += 1

    def unread_reply_bytes(self, client: ClientKey) -> int:
        usage = self.clients.get(client)
        return 0 if usage is None else usage.unread_reply_bytes

    def add_unread_reply_bytes(self, client: ClientKey, delta: int) -> None:
        """The shell's account of large replies queued to `client` and not yet written."""
        usage = self.clients.get(client)
        if usage is None:
            if delta <= 0:
                return
            usage = self.clients[client] = ClientUsage()
        usage.unread_reply_bytes += delta
        self._forget_idle_client(client, usage)

    # --- clients ------------------------------------------------------------------------------

    def client_message(self, frontend: int, client: bytes, frames: list[bytes], now: float) -> None:
        """One message from a client connection, identity frame removed."""
        self._now = now
        self.counters["requests_received"] += 1
        try:
            body = protocol.client_body(frames)
            request = protocol.decode_request(body, self.config.max_message_bytes)
        except ProtocolError as error:
            self.counters[f"rejected_{error.code.value}"] += 1
            self._to_client(frontend, client, protocol.encode_protocol_error(error))
            return
        key = (frontend, client)
        if request.op is Op.STATS:
            self._to_client(frontend, client, protocol.encode_ok(request.id, self.stats(now)))
        elif request.op is Op.INFO:
            self._to_client(frontend, client, protocol.encode_ok(request.id, self.info()))
        elif request.op in protocol.CONTROL_OPS:
            self._on_control(key, request)
        else:
            self._admit(key, request, body, now)

    def _admit(self, key: ClientKey, request: Request, body: bytes, now: float) -> None:
        if self.draining:
            self._reject(key, request, ErrorCode.UNAVAILABLE, "broker is draining")
            return
        ingest = request.op is Op.INGEST
        name = protocol.INGEST_WORKERS if ingest else request.model
        assert name is not None  # decode_request checks this for model ops
        model = self.models.get(name)
        if model is None:
            message = "no ingest worker is configured" if ingest else f"no model named {name!r}"
            self._reject(key, request, ErrorCode.UNKNOWN_MODEL, message)
            return
        if model.live_workers() == 0:
            what = "ingest" if ingest else f"model {name!r}"
            message = f"{what} has no live worker; retry shortly"
            self._reject(key, request, ErrorCode.UNAVAILABLE, message)
            return
        usage = self.clients.get(key) or ClientUsage()
        refusal = self._over_limits(model, usage, len(body))
        if refusal is not None:
            self._reject(key, request, ErrorCode.OVERLOADED, refusal)
            return
        timeout_ms = request.timeout_ms or self.config.default_timeout_ms
        deadline = now + timeout_ms / 1000
        args = request.args
        cost = len(args.users) if isinstance(args, RecommendArgs) else 1
        heavy = cost > self.config.heavy_request_users
        pending = Pending(
            key, request.id, model.name, body, cost, heavy, deadline, deadline,
            op=request.op.value, received=now,
        )  # fmt: skip
        self.clients[key] = usage
        usage.requests += 1
        usage.bytes += len(body)
        self.pending_bytes += len(body)
        self.live += 1
        if not model.queued:  # nobody waits: straight to the least loaded worker, if any
            idle, heavy_idle = self._least_loaded(model)
            worker = heavy_idle if heavy else idle
            if worker is not None:
                self._dispatch(pending, worker, now)
                return
        self._enqueue(model, pending)
        self._pump(model, now)

    def _over_limits(self, model: ModelState, usage: ClientUsage, size: int) -> str | None:
        config = self.config
        if model.queued >= config.queue_limit:
            if not model.overloaded:
                model.overloaded = True
                self._log("model_overloaded", True, model=model.name, queued=model.queued)
            return f"model {model.name!r} has {model.queued} requests queued"
        if usage.requests >= config.client_max_requests:
            return (
                f"this connection has {usage.requests} requests unanswered (the limit is"
                f" {config.client_max_requests}); wait for replies before sending more"
            )
        if usage.bytes + size > config.client_max_bytes:
            return f"this connection's unanswered requests exceed {config.client_max_bytes} bytes"
        if usage.unread_reply_bytes > config.client_max_bytes:
            return "this connection is not reading its replies"
        if self.pending_bytes + size > config.max_pending_bytes:
            return f"the broker holds {self.pending_bytes} bytes of requests; retry shortly"
        return None

    def _on_control(self, key: ClientKey, request: Request) -> None:
        if key[0] != self.control_frontend:
            message = f"{request.op} is accepted on the control endpoint only"
            self._reject(key, request, ErrorCode.BAD_REQUEST, message)
            return
        assert isinstance(request.args, RolloutArgs) and request.model is not None
        model = self.models.get(request.model)
        if model is None:
            message = f"no model named {request.model!r}"
            self._reject(key, request, ErrorCode.UNKNOWN_MODEL, message)
            return
        version = request.args.version
        problem = self.version_problem(model.name, version) if self.version_problem else None
        if problem is not None:
            self._reject(key, request, ErrorCode.BAD_REQUEST, problem)
            return
        model.target_version = version
        model.load_errors.clear()
        told = [w for w in model.workers.values() if w.version != version]
        for worker in told:
            self._to_worker(worker.identity, protocol.LOAD, version.encode())
        self.counters["rollouts"] += 1
        self._log("rollout_started", model=model.name, version=version, moving=len(told))
        result = {"model": model.name, "version": version, "moving": len(told)}
        self._to_client(key[0], key[1], protocol.encode_ok(request.id, result))

    # --- queues and dispatch --------------------------------------------------------------------

    def _enqueue(self, model: ModelState, pending: Pending) -> None:
        queue = model.queues.get(pending.client)
        if queue is None:
            queue = model.queues[pending.client] = deque()
            model.turns.append(pending.client)
        queue.append(pending)
        model.queued += 1
        pending.state = PendingState.QUEUED
        pending.expires_at = pending.deadline
        self._schedule(pending)

    def _pump(self, model: ModelState, now: float) -> None:
        """Hand queued requests to workers with free slots: least loaded worker first,
        redeliveries first, then the clients' queues in deficit round robin."""
        while model.queued:
            worker, heavy_worker = self._least_loaded(model)
            if worker is None:
                break
            pending = self._next_queued(model, heavy_ok=heavy_worker is not None)
            if pending is None:
                break
            if pending.heavy:
                assert heavy_worker is not None
                worker = heavy_worker
            self._dispatch(pending, worker, now)
        if model.overloaded and model.queued < self.config.queue_limit:
            model.overloaded = False
            self._log("model_recovered", model=model.name)

    def _least_loaded(self, model: ModelState) -> tuple[WorkerRecord | None, WorkerRecord | None]:
        """The worker with the lowest in-flight/slots ratio and a free slot, and the same
        among those that may take one more heavy request."""
        best: WorkerRecord | None = None
        best_heavy: WorkerRecord | None = None
        heavy_limit = self.config.heavy_per_worker
        for worker in model.workers.values():
            if worker.free <= 0:
                continue
            load = len(worker.in_flight) / worker.slots
            if best is None or load < len(best.in_flight) / best.slots:
                best = worker
            if worker.heavy < heavy_limit and (
                best_heavy is None or load < len(best_heavy.in_flight) / best_heavy.slots
            ):
                best_heavy = worker
        return best, best_heavy

    def _next_queued(self, model: ModelState, heavy_ok: bool) -> Pending | None:
        for index, pending in enumerate(model.redeliveries):
            if heavy_ok or not pending.heavy:
                del model.redeliveries[index]
                model.queued -= 1
                return pending

        if len(model.turns) == 1:  # one client waiting: no turns to take
            key = model.turns[0]
            queue = model.queues[key]
            if not heavy_ok and queue[0].heavy:
                return None
            model.queued -= 1
            head = queue.popleft()
            if not queue:
                del model.queues[key]
                model.deficits.pop(key, None)
                model.turns.popleft()
            return head

        # Deficit round robin: each turn credits a client DRR_QUANTUM; it sends while its
        # head request's cost fits. A head too heavy for any worker now waits its turn.
        def eligible(key: ClientKey) -> bool:
            return heavy_ok or not model.queues[key][0].heavy

        if not any(eligible(key) for key in model.turns):
            return None
        while True:
            key = model.turns[0]
            queue = model.queues[key]
            head = queue[0]
            if not eligible(key):
                model.turns.rotate(-1)
                continue
            deficit = model.deficits.get(key, 0)
            if deficit < head.cost:
                model.deficits[key] = deficit + DRR_QUANTUM
                model.turns.rotate(-1)
                continue
            model.deficits[key] = deficit - head.cost
            queue.popleft()
            model.queued -= 1
            if not queue:
                del model.queues[key]
                model.deficits.pop(key, None)
                model.turns.popleft()
            return head

    def _unqueue(self, model: ModelState, pending: Pending) -> None:
        """Take a queued request out wherever it waits (it expired or is being answered)."""
        try:
            model.redeliveries.remove(pending)
        except ValueError:
            queue = model.queues[pending.client]
            queue.remove(pending)
            if not queue:
                del model.queues[pending.client]
                model.deficits.pop(pending.client, None)
                model.turns.remove(pending.client)
        model.queued -= 1

    def _dispatch(self, pending: Pending, worker: WorkerRecord, now: float) -> None:
        if pending.deadline <= now:
            self._answer_error(pending, ErrorCode.DEADLINE_EXCEEDED, "deadline passed while queued")
            return
        seq = next(self._seq)
        pending.state = PendingState.IN_FLIGHT
        pending.dispatches += 1
        pending.worker, pending.seq = worker.identity, seq
        pending.expires_at = pending.deadline + self._grace_s
        self._schedule(pending)
        worker.in_flight[seq] = pending
        if pending.heavy:
            worker.heavy += 1
        # Workers share this host's CLOCK_MONOTONIC, so the deadline travels as an instant.
        header = protocol.worker_header(protocol.REQUEST, seq, int(pending.deadline * 1_000_000))
        pack = self._packs.setdefault(worker.identity, [])
        pack += (header, pending.body)
        if len(pack) >= 2 * worker.batch:
            self._send_pack(worker.identity)

    def _send_pack(self, identity: bytes) -> None:
        pack = self._packs.pop(identity, None)
        if pack:
            self._actions.append(ToWorker(identity, tuple(pack)))

    # --- deadlines ----------------------------------------------------------------------------

    def _schedule(self, pending: Pending) -> None:
        heapq.heappush(self._expiries, (pending.expires_at, next(self._tiebreak), pending))
        # Entries of answered or rescheduled requests are skipped when popped; rebuild the heap
        # when they outnumber the live ones, so memory follows what is held, not rate x timeout.
        if len(self._expiries) > 2 * self.live + 64:
            self._expiries = [(p.expires_at, next(self._tiebreak), p) for p in self._held()]
            heapq.heapify(self._expiries)

    def _held(self) -> Iterable[Pending]:
        """Every queued and in-flight request."""
        for model in self.models.values():
            yield from self._waiting(model)
        for worker in self.workers.values():
            yield from worker.in_flight.values()

    def _waiting(self, model: ModelState) -> Iterable[Pending]:
        """A model's queued requests: redeliveries, then each client's queue."""
        yield from model.redeliveries
        for queue in model.queues.values():
            yield from queue

    def _expire(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            expires_at, _, pending = heapq.heappop(self._expiries)
            if pending.state is PendingState.DONE or pending.expires_at != expires_at:
                continue
            if pending.state is PendingState.QUEUED:
                self._unqueue(self.models[pending.model], pending)
                self._answer_error(
                    pending, ErrorCode.DEADLINE_EXCEEDED, "deadline passed while queued"
                )
            else:
                worker = self.workers.get(pending.worker)
                if worker is not None:
                    self._release(worker, pending)
                self.counters["in_flight_expired"] += 1
                self._answer_error(
                    pending, ErrorCode.DEADLINE_EXCEEDED, "the worker did not answer in time"
                )
                if worker is not None:
                    self._pump(self.models[worker.model], now)

    # --- answering ------------------------------------------------------------------------------

    def _reject(self, key: ClientKey, request: Request, code: ErrorCode, message: str) -> None:
        self.counters[f"rejected_{code.value}"] += 1
        name = protocol.INGEST_WORKERS if request.op is Op.INGEST else request.model
        # Only configured or announced models name a series: a caller's typo must not.
        label = name if name in self.models else "(unknown)"
        self.requests.record(label, request.op.value, code.value, self._now)
        self._to_client(key[0], key[1], protocol.encode_error(request.id, code, message))

    def _answer(self, pending: Pending, body: bytes, outcome: str) -> None:
        """The one reply of an accepted request; releases everything it held."""
        assert pending.state is not PendingState.DONE
        pending.state = PendingState.DONE
        seconds = self._now - pending.received
        self.requests.record(pending.model, pending.op, outcome, self._now, seconds)
        self.live -= 1
        self.pending_bytes -= len(pending.body)
        usage = self.clients.get(pending.client)
        if usage is not None:
            usage.requests -= 1
            usage.bytes -= len(pending.body)
            self._forget_idle_client(pending.client, usage)
        pending.body = b""
        self._to_client(pending.client[0], pending.client[1], body)

    def _answer_error(self, pending: Pending, code: ErrorCode, message: str) -> None:
        self.counters[f"answered_{code.value}"] += 1
        self._answer(pending, protocol.encode_error(pending.request_id, code, message), code.value)

    def _forget_idle_client(self, key: ClientKey, usage: ClientUsage) -> None:
        if usage.requests <= 0 and usage.unread_reply_bytes <= 0:
            self.clients.pop(key, None)

    def _log(self, event: str, warning: bool = False, **fields: Any) -> None:
        self._actions.append(LogEvent(event, fields, warning))

    def _to_client(self, frontend: int, client: bytes, body: bytes) -> None:
        self._actions.append(ToClient(frontend, client, body))

    def _to_worker(self, identity: bytes, command: int, *payload: bytes) -> None:
        self._send_pack(identity)  # what was dispatched to it goes first, in order
        self._actions.append(ToWorker(identity, (protocol.worker_header(command), *payload)))

    # --- workers --------------------------------------------------------------------------------

    def worker_message(self, identity: bytes, frames: list[bytes], now: float) -> None:
        """One message from a worker connection, identity frame removed."""
        self._now = now
        try:
            header = protocol.parse_worker_header(frames[0] if frames else b"")
        except ProtocolError:
            self.counters["worker_messages_malformed"] += 1
            return
        command, args = header.command, frames[1:]
        if command == protocol.READY:
            self._on_ready(identity, args, now)
            return
        worker = self.workers.get(identity)
        if worker is None:
            # A worker we do not know (we restarted, or declared it dead): make it re-register.
            self._to_worker(identity, protocol.DISCONNECT)
            return
        worker.expires_at = now + self._liveness_s
        if command == protocol.REPLY:
            self._on_replies(worker, frames, now)
        elif command == protocol.HEARTBEAT:
            pass
        elif command == protocol.UPDATE and len(args) == 1:
            self._on_update(worker, args[0], now)
        elif command == protocol.LOAD_FAILED and len(args) == 1:
            self._on_load_failed(worker, args[0])
        elif command == protocol.DISCONNECT:
            worker.draining = True
            self._forget_if_drained(worker, now)
        else:
            self.counters["worker_messages_malformed"] += 1

    def _on_ready(self, identity: bytes, args: list[bytes], now: float) -> None:
        if identity.startswith(b"\0"):
            # libzmq names connections that set no identity, and renames the old connection
            # of a worker that reconnected (ROUTER_HANDOVER) this way: messages still queued on
            # it are stale, and registering them would make a phantom worker.
            self.counters["worker_ready_rejected"] += 1
            return
        try:
            if len(args) != 1:
                raise ProtocolError(ErrorCode.BAD_REQUEST, "READY takes one frame")
            hello = protocol.decode_ready(args[0])
        except ProtocolError:
            self.counters["worker_ready_rejected"] += 1
            return
        if identity in self.workers:
            self.worker_gone(identity, "registered again", now)
        for other in list(self.workers.values()):
            if hello.pid and other.pid == hello.pid:  # the same process on a new identity
                self.worker_gone(other.identity, "registered again", now)
        worker = WorkerRecord(
            identity=identity,
            model=hello.model,
            version=hello.version,
            slots=hello.slots,
            info=hello.info,
            pid=hello.pid,
            expires_at=now + self._liveness_s,
            batch=hello.batch,
        )
        self.workers[identity] = worker
        model = self.models.setdefault(hello.model, ModelState(hello.model))
        model.workers[identity] = worker
        self.counters["workers_joined"] += 1
        self._log(
            "worker_joined",
            worker=_identity_text(identity),
            model=hello.model,
            version=hello.version,
            slots=hello.slots,
            pid=hello.pid,
            workers=len(model.workers),
        )
        if hello.pid > 0:
            self._actions.append(WatchProcess(identity, hello.pid))
        if model.target_version is not None and hello.version != model.target_version:
            self._to_worker(identity, protocol.LOAD, model.target_version.encode())
        self._pump(model, now)

    def _on_update(self, worker: WorkerRecord, frame: bytes, now: float) -> None:
        """The worker switched versions on the same connection; what it holds stays with it."""
        try:
            hello = protocol.decode_ready(frame)
        except ProtocolError:
            self.counters["worker_messages_malformed"] += 1
            return
        if hello.model != worker.model:
            self.counters["worker_messages_malformed"] += 1
            return
        worker.version, worker.slots, worker.info = hello.version, hello.slots, hello.info
        worker.batch = hello.batch
        self._pump(self.models[worker.model], now)

    def _on_load_failed(self, worker: WorkerRecord, frame: bytes) -> None:
        try:
            version, error = protocol.decode_load_failed(frame)
        except ProtocolError:
            self.counters["worker_messages_malformed"] += 1
            return
        model = self.models[worker.model]
        model.load_errors.append(
            {"worker": _identity_text(worker.identity), "version": version, "error": error[:500]}
        )
        self.counters["version_loads_failed"] += 1
        self._log(
            "version_load_failed",
            True,
            worker=_identity_text(worker.identity),
            model=model.name,
            version=version,
            error=error[:500],
        )
        if model.target_version == version:
            model.target_version = None  # workers that join later are not sent there again

    def _on_replies(self, worker: WorkerRecord, frames: list[bytes], now: float) -> None:
        try:
            replies = protocol.parse_packed(protocol.REPLY, frames)
        except ProtocolError:
            self.counters["worker_messages_malformed"] += 1
            return
        for seq, _, body in replies:
            pending = worker.in_flight.get(seq)
            if pending is None:
                self.counters["late_replies_dropped"] += 1
                continue
            self._release(worker, pending)
            self._answer(pending, body, _reply_outcome(body))
        self._forget_if_drained(worker, now)
        self._pump(self.models[worker.model], now)

    def _release(self, worker: WorkerRecord, pending: Pending) -> None:
        del worker.in_flight[pending.seq]
        if pending.heavy:
            worker.heavy -= 1

    def _forget_if_drained(self, worker: WorkerRecord, now: float) -> None:
        if worker.draining and not worker.in_flight:
            self._to_worker(worker.identity, protocol.DISCONNECT)  # the worker may exit now
            self._remove(worker)
            self.counters["workers_left"] += 1
            self._log("worker_left", worker=_identity_text(worker.identity), model=worker.model)
            self._answer_if_unservable(self.models[worker.model], now)

    def _remove(self, worker: WorkerRecord) -> None:
        self.workers.pop(worker.identity, None)
        self.models[worker.model].workers.pop(worker.identity, None)
        self._packs.pop(worker.identity, None)  # what it held is redelivered or answered
        if worker.pid > 0:
            self._actions.append(UnwatchProcess(worker.identity))

    def worker_gone(self, identity: bytes, reason: str, now: float) -> None:
        """The worker died (its process exited, its connection failed, or it went silent):
        redeliver once what it held if the deadline allows, else answer `worker_lost`."""
        self._now = now
        worker = self.workers.get(identity)
        if worker is None:
            return
        self._remove(worker)
        model = self.models[worker.model]
        held = sorted(worker.in_flight.values(), key=lambda p: p.seq)
        worker.in_flight.clear()
        worker.heavy = 0
        for pending in held:  # oldest first, ahead of every queue: accepted before them
            if pending.dispatches < 2 and pending.deadline > now:
                pending.state = PendingState.QUEUED
                pending.expires_at = pending.deadline
                model.redeliveries.append(pending)
                model.queued += 1
                self._schedule(pending)
                self.counters["requests_redelivered"] += 1
            else:
                self._answer_error(pending, ErrorCode.WORKER_LOST, "the worker holding it died")
        self.counters["workers_lost"] += 1
        self._log(
            "worker_lost",
            True,
            worker=_identity_text(identity),
            model=model.name,
            reason=reason,
            redelivered=sum(1 for p in held if p.state is PendingState.QUEUED),
            workers=len(model.workers),
        )
        self._pump(model, now)
        self._answer_if_unservable(model, now)

    def _answer_if_unservable(self, model: ModelState, now: float) -> None:
        """A model left with no live worker answers what waits for one: nobody will serve it."""
        if model.live_workers() > 0 or not model.queued:
            return
        for pending in list(self._waiting(model)):
            self._unqueue(model, pending)
            if pending.dispatches:
                self._answer_error(pending, ErrorCode.WORKER_LOST, "the worker holding it died")
            else:
                message = f"model {model.name!r} has no live worker; retry shortly"
                self._answer_error(pending, ErrorCode.UNAVAILABLE, message)

    # --- drain ------------------------------------------------------------------------------

    def _check_drained(self, now: float) -> None:
        if self.live == 0:
            self.finished = True
        elif now >= self.drain_deadline:
            self._log("drain_timeout", True, queued=self.queued(), in_flight=self.in_flight())
            for pending in list(self._held()):
                if pending.state is PendingState.QUEUED:
                    self._unqueue(self.models[pending.model], pending)
                else:
                    self._release(self.workers[pending.worker], pending)
                self._answer_error(pending, ErrorCode.UNAVAILABLE, "broker is shutting down")
            self.finished = True

    # --- introspection ------------------------------------------------------------------------

    def in_flight(self) -> int:
        return sum(len(w.in_flight) for w in self.workers.values())

    def queued(self) -> int:
        return sum(m.queued for m in self.models.values())

    def stats(self, now: float) -> dict[str, Any]:
        return {
            "uptime_s": round(now - self.started_at, 3),
            "draining": self.draining,
            "last_minute": self.requests.last_minute(now),
            "models": {
                m.name: {
                    "workers": len(m.workers),
                    "slots": sum(w.slots for w in m.workers.values()),
                    "in_flight": sum(len(w.in_flight) for w in m.workers.values()),
                    "queued": m.queued,
                    "versions": sorted({w.version for w in m.workers.values()}),
                    "target_version": m.target_version,
                    "load_errors": list(m.load_errors),
                }
                for m in self.models.values()
            },
            "pending_bytes": self.pending_bytes,
            "clients": len(self.clients),
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


def _identity_text(identity: bytes) -> str:
    text = identity.decode("utf-8", errors="replace")
    return text if text.isprintable() else identity.hex()


_OK_TRUE = b"\xa2ok\xc3"  # "ok": true, as every reply encodes it near its start


def _reply_outcome(body: bytes) -> str:
    """A worker's reply as a statistics outcome: "ok" or its error code. The success path
    looks at a few bytes; only an error reply is decoded."""
    if _OK_TRUE in body[:64]:
        return "ok"
    try:
        reply = protocol.decode_reply(body)
    except ProtocolError:
        return ErrorCode.INTERNAL.value
    return "ok" if reply.error is None else reply.error.code.value
