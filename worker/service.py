"""The worker process loop: register with the broker, answer requests in batches, drain.

A worker is its engine (one loaded, warmed model version) plus this lifecycle: it announces
itself only once the model is warm, heartbeats from its own loop (a stuck loop stops the
heartbeats, and the broker then redelivers what it held), and on SIGTERM tells the broker it
is draining, answers what it holds and exits when the broker has let it go.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
import zmq

from uro_recs import protocol
from uro_recs.config import BrokerConfig, WorkerConfig
from uro_recs.protocol import (
    ErrorCode,
    PredictArgs,
    ProtocolError,
    RecommendArgs,
    Request,
    SimilarItemsArgs,
)
from uro_recs.wakeup import Wakeup
from uro_recs.worker.engine import (
    BadArgument,
    Engine,
    EngineError,
    RecommendQuery,
    UnknownItem,
    Unsupported,
)

log = structlog.get_logger("uro_recs.worker")


@dataclass(slots=True)
class Job:
    seq: int  # the broker's sequence number, echoed in the reply
    deadline: float  # time.monotonic() seconds
    body: bytes


class WorkerService:
    def __init__(
        self,
        engine: Engine,
        endpoint: str,
        config: WorkerConfig,
        broker: BrokerConfig,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        loader: Callable[[str], Engine] | None = None,
    ) -> None:
        """`loader(version)` loads and warms up another version of the model (for rollouts)."""
        self.engine = engine
        self.loader = loader
        self.endpoint = endpoint
        self.config = config
        self.heartbeat_s = broker.heartbeat_ms / 1000
        self.liveness_s = self.heartbeat_s * broker.liveness
        self.max_message_bytes = broker.max_message_bytes
        self.context = context or zmq.Context.instance()
        self.identity = f"{engine.name}-{os.getpid()}".encode()
        self.draining = False
        self.drain_deadline = 0.0
        self.running = False
        self.served = 0
        self._on_drain: Callable[[], None] | None = None
        self._sock: zmq.Socket[bytes] | None = None
        self._next_heartbeat = 0.0
        self._loading: str | None = None  # the version a background thread is loading
        self._loaded: Engine | None = None  # loaded and warm, waiting for the swap
        self._wakeup = Wakeup()

    # --- lifecycle --------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        self._wakeup.on_stop_signals(self.begin_drain)

    def begin_drain(self) -> None:
        if not self.draining:
            self.draining = True
            self.drain_deadline = time.monotonic() + self.config.drain_timeout_s
            self._send(protocol.DISCONNECT)
            log.info("worker_draining", model=self.engine.name)
            if self._on_drain is not None:
                self._on_drain()

    def _connect(self) -> zmq.Socket[bytes]:
        if self._sock is not None:
            self._sock.close(linger=0)
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.identity)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        self._sock = sock
        self._register()
        return sock

    def _register(self, command: int = protocol.READY) -> None:
        assert self._sock is not None
        hello = protocol.WorkerHello(
            model=self.engine.name,
            version=self.engine.version,
            slots=self.config.slots,
            info=self.engine.info(),
        )
        self._sock.send_multipart(protocol.encode_ready(hello, command))

    def _send(self, command: int, *payload: bytes, seq: int = 0) -> None:
        if self._sock is not None:
            self._sock.send_multipart([protocol.worker_header(command, seq), *payload])

    def run(
        self,
        on_ready: Callable[[], None] | None = None,
        on_tick: Callable[[], None] | None = None,
        on_drain: Callable[[], None] | None = None,
    ) -> None:
        """Serve until drained. `on_ready` is called once READY is sent to the broker, `on_tick`
        once per loop iteration (at least every heartbeat), `on_drain` when a drain begins."""
        self._on_drain = on_drain
        sock = self._connect()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wakeup.fileno(), zmq.POLLIN)
        self.running = True
        log.info(
            "worker_ready",
            model=self.engine.name,
            version=self.engine.version,
            slots=self.config.slots,
            endpoint=self.endpoint,
        )
        if on_ready is not None:
            on_ready()
        broker_expires = time.monotonic() + self.liveness_s
        self._next_heartbeat = time.monotonic() + self.heartbeat_s
        while self.running:
            timeout_ms = max(0, int((self._next_heartbeat - time.monotonic()) * 1000) + 1)
            events = dict(poller.poll(timeout_ms))
            if on_tick is not None:
                on_tick()
            if self._wakeup.fileno() in events:
                self._wakeup.drain()
            if sock in events:
                jobs = self._receive(sock)
                broker_expires = time.monotonic() + self.liveness_s
                if jobs:
                    self._execute(jobs)
            if self._loaded is not None:
                self._swap()
            self._heartbeat_if_due()
            now = time.monotonic()
            if self.draining and (now >= self.drain_deadline or now >= broker_expires):
                # Nothing is held here between batches: with the broker gone or silent there is
                # nothing left to finish.
                log.info("worker_drained_without_broker", model=self.engine.name)
                self.running = False
            elif now >= broker_expires:
                log.warning("broker_lost", model=self.engine.name, endpoint=self.endpoint)
                poller.unregister(sock)
                sock = self._connect()
                poller.register(sock, zmq.POLLIN)
                broker_expires = now + self.liveness_s
        log.info("worker_stopped", model=self.engine.name, served=self.served)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        self._wakeup.close()

    # --- messages ---------------------------------------------------------------------------

    def _receive(self, sock: zmq.Socket[bytes]) -> list[Job]:
        """Read everything queued (up to our slots), waiting up to max_batch_delay for more."""
        jobs: list[Job] = []
        wait_until = 0.0
        while len(jobs) < self.config.slots:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                if not jobs or self.config.max_batch_delay_ms <= 0:
                    break
                if not wait_until:
                    wait_until = time.monotonic() + self.config.max_batch_delay_ms / 1000
                remaining_ms = (wait_until - time.monotonic()) * 1000
                if remaining_ms <= 0 or not sock.poll(max(1, int(remaining_ms))):
                    break
                continue
            job = self._on_message(frames)
            if job is not None:
                jobs.append(job)
        return jobs

    def _on_message(self, frames: list[bytes]) -> Job | None:
        try:
            header = protocol.parse_worker_header(frames[0])
        except ProtocolError:
            log.warning("broker_message_malformed", frames=len(frames))
            return None
        command = header.command
        if command == protocol.REQUEST and len(frames) == 2:
            deadline = header.deadline_us / 1_000_000  # the host's CLOCK_MONOTONIC
            return Job(seq=header.seq, deadline=deadline, body=frames[1])
        if command == protocol.LOAD and len(frames) == 2:
            self._start_loading(frames[1].decode(errors="replace"))
            return None
        if command == protocol.DISCONNECT:
            if self.draining:
                self.running = False  # the broker has let us go
            else:
                log.info("worker_reregistering", model=self.engine.name)
                self._register()
        return None

    # --- rollout: load the next version beside the current one, then switch -------------------

    def _start_loading(self, version: str) -> None:
        if self.loader is None or version in (self.engine.version, self._loading):
            return
        if self._loading is not None:
            log.warning("rollout_busy", model=self.engine.name, loading=self._loading)
            return
        self._loading = version
        log.info("version_loading", model=self.engine.name, version=version)
        threading.Thread(target=self._load, args=(version,), daemon=True).start()

    def _load(self, version: str) -> None:
        """In a background thread, while the loop keeps serving the current version."""
        assert self.loader is not None
        try:
            self._loaded = self.loader(version)
        except Exception:
            log.exception("version_load_failed", model=self.engine.name, version=version)
            self._loading = None
        self._wakeup.wake()  # the loop switches now, not at its next poll

    def _swap(self) -> None:
        """Between batches: nothing is running, so every later request sees the new version."""
        assert self._loaded is not None
        previous, self.engine, self._loaded = self.engine, self._loaded, None
        self._loading = None
        self._register(protocol.UPDATE)
        log.info(
            "version_switched",
            model=self.engine.name,
            previous=previous.version,
            version=self.engine.version,
        )

    def _reply(self, job: Job, body: bytes) -> None:
        self.served += 1
        self._send(protocol.REPLY, body, seq=job.seq)

    def _reply_error(self, job: Job, request_id: Any, code: ErrorCode, message: str) -> None:
        self._reply(job, protocol.encode_error(request_id, code, message))

    # --- execution --------------------------------------------------------------------------

    def _execute(self, jobs: list[Job]) -> None:
        """Answer every job exactly once; all recommend requests share one model call."""
        now = time.monotonic()
        batch: list[tuple[Job, Request, RecommendArgs]] = []
        for job in jobs:
            try:
                request = protocol.decode_request(job.body, self.max_message_bytes)
            except ProtocolError as error:
                self._reply(job, protocol.encode_protocol_error(error))
                continue
            if now >= job.deadline:
                message = "deadline passed before it ran"
                self._reply_error(job, request.id, ErrorCode.DEADLINE_EXCEEDED, message)
                continue
            if request.model != self.engine.name:
                message = f"worker serves {self.engine.name!r}, not {request.model!r}"
                self._reply_error(job, request.id, ErrorCode.INTERNAL, message)
                continue
            args = request.args
            if isinstance(args, RecommendArgs) and args.n <= self.engine.n_items:
                batch.append((job, request, args))
            else:
                self._run_one(job, request)
        if batch:
            self._run_recommend_batches(batch)

    def _heartbeat_if_due(self) -> None:
        now = time.monotonic()
        if now >= self._next_heartbeat:
            self._send(protocol.HEARTBEAT)
            self._next_heartbeat = now + self.heartbeat_s

    def _run_recommend_batches(self, batch: list[tuple[Job, Request, RecommendArgs]]) -> None:
        """In model calls of at most `engine.users_per_call` users (one request at least), with
        a heartbeat between calls when one is due: a large batch of a slow model must not look
        like a hung worker, and early answers leave before the last call finishes."""
        chunk: list[tuple[Job, Request, RecommendArgs]] = []
        users = 0
        for item in batch:
            if chunk and users + len(item[2].users) > self.engine.users_per_call:
                self._run_recommend_batch(chunk)
                self._heartbeat_if_due()
                chunk, users = [], 0
            chunk.append(item)
            users += len(item[2].users)
        if chunk:
            self._run_recommend_batch(chunk)

    def _run_recommend_batch(self, batch: list[tuple[Job, Request, RecommendArgs]]) -> None:
        queries = [
            RecommendQuery(user, args.n, args.filter_consumed, args.exclude)
            for _, _, args in batch
            for user in args.users
        ]
        try:
            recommendations = self.engine.recommend_batch(queries)
        except Exception as exc:
            log.exception("recommend_failed", model=self.engine.name, users=len(queries))
            for job, request, _ in batch:
                self._reply_error(job, request.id, ErrorCode.INTERNAL, f"recommend failed: {exc}")
            return
        offset = 0
        for job, request, args in batch:
            answers = [
                {"user": user, "items": rec.items, "cold_start": rec.cold_start}
                for user, rec in zip(
                    args.users, recommendations[offset : offset + len(args.users)], strict=True
                )
            ]
            offset += len(args.users)
            result = {"results": answers} if args.many else answers[0]
            self._reply(job, protocol.encode_ok(request.id, result))

    def _run_one(self, job: Job, request: Request) -> None:
        args = request.args
        try:
            if request.op not in self.engine.ops:
                raise Unsupported(f"model {self.engine.name!r} does not support {request.op}")
            if isinstance(args, RecommendArgs):
                raise BadArgument(
                    f"n={args.n} is more than the {self.engine.n_items} items in the catalogue"
                )
            if isinstance(args, PredictArgs):
                scores, cold_start = self.engine.predict(args.user, args.items)
                result: dict[str, Any] = {
                    "user": args.user,
                    "scores": scores,
                    "cold_start": cold_start,
                }
            elif isinstance(args, SimilarItemsArgs):
                if args.n > self.engine.n_items:
                    raise BadArgument(
                        f"n={args.n} is more than the {self.engine.n_items} items in the catalogue"
                    )
                try:
                    items, sims = self.engine.similar_items(args.item, args.n)
                    cold_start = False
                except UnknownItem:  # a new item: an empty answer, the caller picks a fallback
                    items, sims, cold_start = [], [], True
                result = {
                    "item": args.item,
                    "items": items,
                    "scores": sims,
                    "cold_start": cold_start,
                }
            else:
                raise Unsupported(f"op {request.op} is not answered by workers")
        except Unsupported as exc:
            self._reply_error(job, request.id, ErrorCode.UNSUPPORTED, str(exc))
        except BadArgument as exc:
            self._reply_error(job, request.id, ErrorCode.BAD_REQUEST, str(exc))
        except EngineError as exc:
            self._reply_error(job, request.id, ErrorCode.INTERNAL, str(exc))
        except Exception as exc:
            log.exception("request_failed", model=self.engine.name, op=request.op)
            self._reply_error(job, request.id, ErrorCode.INTERNAL, f"{request.op} failed: {exc}")
        else:
            self._reply(job, protocol.encode_ok(request.id, result))
