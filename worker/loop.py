"""What every worker process shares: the broker link and its lifecycle.

A worker registers with the broker only once it can answer, heartbeats from its own loop (a
stuck loop stops the heartbeats, and the broker then redelivers what it held), reconnects
when the broker goes silent, and on SIGTERM tells the broker it is draining, answers what it
holds and exits when the broker has let it go. Subclasses say what they serve (`hello`) and
how they answer (`execute`): `WorkerService` a model, `IngestWorker` the event log.

Every REQUEST is answered, a malformed one too (its seq is in the header). Work that takes
longer than one turn of the loop is cut into bounded steps (`has_pending_work` / `step`):
between two steps the loop reads new messages and heartbeats, so a busy worker never looks
dead and a small request does not wait behind a large one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import structlog
import zmq

from uro_recs.core import protocol
from uro_recs.core.config import BrokerConfig, WorkerConfig
from uro_recs.core.protocol import ErrorCode, ProtocolError, RequestId
from uro_recs.core.wakeup import Wakeup

log = structlog.get_logger("uro_recs.worker")

_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)


def one_line(error: BaseException) -> str:
    """An exception as the broker and operators see it: type and message, no traceback."""
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


@dataclass(slots=True)
class Job:
    seq: int  # the broker's sequence number, echoed in the reply
    deadline: float  # time.monotonic() seconds
    body: bytes


class WorkerLoop:
    def __init__(
        self,
        name: str,
        endpoint: str,
        config: WorkerConfig,
        broker: BrokerConfig,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        self.name = name
        self.endpoint = endpoint
        self.config = config
        self.heartbeat_s = broker.heartbeat_s
        self.liveness_s = broker.liveness_s
        self.busy_slice_s = broker.busy_slice_s
        self.max_message_bytes = broker.max_message_bytes
        self.context = context or zmq.Context.instance()
        self.identity = f"{name}-{os.getpid()}".encode()
        self.label = self.identity.decode()  # how the broker's logs name this worker too
        self.draining = False
        self.drain_deadline = 0.0
        self.running = False
        self.served = 0
        self.malformed = 0  # broker messages that could not be understood
        self._drain_announced = False  # the broker was told (DISCONNECT)
        self._released = False  # draining, and the broker has let us go
        self._stopping = False  # stop() was called
        self._sock: zmq.Socket[bytes] | None = None
        # Replies not yet sent: (header, body) pairs, sent packed as one REPLY message at the
        # next flush (PROTOCOL.md section 7, "Packing"), which comes before the loop waits.
        self._replies: list[bytes] = []
        self._next_heartbeat = 0.0
        self._wakeup = Wakeup()

    # --- what subclasses provide ------------------------------------------------------------

    def hello(self) -> protocol.WorkerHello:
        """What this worker serves, for READY and UPDATE."""
        raise NotImplementedError

    def execute(self, jobs: list[Job]) -> None:
        """Answer each job exactly once, now or later (from `after_wake`)."""
        raise NotImplementedError

    def on_load(self, version: str) -> None:
        """The broker asked for another version (a rollout); by default there is none."""
        log.warning("load_refused", worker=self.label, version=version)
        self.load_failed(version, "this worker cannot load versions")

    def after_wake(self) -> None:
        """Called on every turn of the loop, after `wake()` from another thread too."""

    def has_pending_work(self) -> bool:
        """Whether `step` has work left: the loop then polls without waiting."""
        return False

    def step(self) -> None:
        """Run one bounded piece of the pending work (called once per turn while there is some).

        Between two steps the loop reads new messages and heartbeats."""

    def stop_pending_work(self, reason: str | None) -> None:
        """Give up the pending work: answer each request with `unavailable` and `reason`, or,
        with None, forget it (the broker that sent it is gone and has redelivered it)."""

    # --- lifecycle --------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        self._wakeup.on_stop_signals(self.begin_drain)

    def wake(self) -> None:
        """From any thread: make the loop turn now (it then calls `after_wake`)."""
        self._wakeup.wake()

    def stop(self) -> None:
        """From any thread: leave the loop at its next turn, without draining or answering
        what it holds (for an embedding program or a test; SIGTERM drains)."""
        self._stopping = True
        self.wake()

    def begin_drain(self) -> None:
        """From a signal handler or any thread: take nothing new, answer what is held, exit.
        The loop tells the broker (DISCONNECT) on its next turn, from its own thread."""
        if not self.draining:
            self.drain_deadline = time.monotonic() + self.config.drain_timeout_s
            self.draining = True
            self.wake()

    def _connect(self) -> zmq.Socket[bytes]:
        if self._sock is not None:
            self._sock.close(linger=0)
        self._replies.clear()  # their seqs mean nothing to the broker we connect to next
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.identity)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        self._sock = sock
        self.register()
        return sock

    def register(self, command: int = protocol.READY) -> None:
        """READY, or UPDATE after switching versions on the same connection."""
        assert self._sock is not None
        self._sock.send_multipart(protocol.encode_ready(self.hello(), command))

    def _send(self, command: int, *payload: bytes, seq: int = 0) -> None:
        if self._sock is not None:
            self._sock.send_multipart([protocol.worker_header(command, seq), *payload])

    def load_failed(self, version: str, error: str) -> None:
        """LOAD_FAILED: the rollout to `version` cannot happen here, and why (one line)."""
        if self._sock is not None:
            self._sock.send_multipart(protocol.encode_load_failed(version, error))

    def run(
        self,
        on_ready: Callable[[], None] | None = None,
        on_tick: Callable[[], None] | None = None,
        on_drain: Callable[[], None] | None = None,
    ) -> None:
        """Serve until drained. `on_ready` is called once READY is sent to the broker, `on_tick`
        once per loop iteration (at least every heartbeat), `on_drain` when a drain begins."""
        sock = self._connect()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wakeup.fileno(), zmq.POLLIN)
        self.running = True
        hello = self.hello()
        log.info(
            "worker_ready",
            worker=self.label,
            version=hello.version,
            slots=hello.slots,
            endpoint=self.endpoint,
        )
        if on_ready is not None:
            on_ready()
        broker_expires = time.monotonic() + self.liveness_s
        self._next_heartbeat = time.monotonic() + self.heartbeat_s
        while self.running and not self._stopping:
            if self.has_pending_work():
                timeout_ms = 0  # only look for new messages: the pending work goes on
            else:
                timeout_ms = max(0, int((self._next_heartbeat - time.monotonic()) * 1000) + 1)
            events = dict(poller.poll(timeout_ms))
            if on_tick is not None:
                on_tick()
            if self._wakeup.fileno() in events:
                self._wakeup.drain()
            if self.draining and not self._drain_announced:
                self._drain_announced = True
                self._send(protocol.DISCONNECT)
                log.info("worker_draining", worker=self.label)
                if on_drain is not None:
                    on_drain()
            if sock in events:
                jobs = self._receive(sock)
                broker_expires = time.monotonic() + self.liveness_s
                if jobs:
                    self.execute(jobs)
            self.after_wake()
            self.flush_replies()
            if self.has_pending_work():
                self.step()
                self.flush_replies()
            self.heartbeat_if_due()
            now = time.monotonic()
            if self.draining:
                if self._released and not self.has_pending_work():
                    self.running = False
                elif now >= self.drain_deadline or now >= broker_expires:
                    if self.has_pending_work():
                        self.stop_pending_work("the worker stopped before it could finish")
                    log.info("worker_drained_without_broker", worker=self.label)
                    self.flush_replies()
                    self.running = False
            elif now >= broker_expires:
                log.warning("broker_lost", worker=self.label, endpoint=self.endpoint)
                if self.has_pending_work():
                    self.stop_pending_work(None)  # its seqs mean nothing to the next broker
                poller.unregister(sock)
                sock = self._connect()
                poller.register(sock, zmq.POLLIN)
                broker_expires = now + self.liveness_s
        log.info("worker_stopped", worker=self.label, served=self.served, malformed=self.malformed)

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
            # Asking first costs less than the zmq.Again a read of an empty socket raises.
            if not cast(int, sock.getsockopt(_EVENTS)) & _POLLIN:
                if not jobs or self.config.max_batch_delay_ms <= 0:
                    break
                if not wait_until:
                    wait_until = time.monotonic() + self.config.max_batch_delay_ms / 1000
                remaining_ms = (wait_until - time.monotonic()) * 1000
                if remaining_ms <= 0 or not sock.poll(max(1, int(remaining_ms))):
                    break
                continue
            jobs += self._on_message(sock.recv_multipart(_NOBLOCK))
        return jobs

    def _on_message(self, frames: list[bytes]) -> list[Job]:
        try:
            header = protocol.parse_worker_header(frames[0])
        except ProtocolError:  # no seq to answer: all we can do is say so
            self.malformed += 1
            log.warning("broker_message_malformed", worker=self.label, frames=len(frames))
            return []
        command = header.command
        if command == protocol.REQUEST:
            try:
                packed = protocol.parse_packed(protocol.REQUEST, frames)
            except ProtocolError as error:  # answer the one seq we can read
                self.malformed += 1
                log.warning("broker_request_malformed", worker=self.label, frames=len(frames))
                message = f"worker got a malformed REQUEST: {error.message}"
                body = protocol.encode_error(None, ErrorCode.INTERNAL, message)
                self._send(protocol.REPLY, body, seq=header.seq)
                return []
            # Deadlines are instants of the host's CLOCK_MONOTONIC, in µs.
            return [Job(seq, deadline_us / 1_000_000, body) for seq, deadline_us, body in packed]
        if command == protocol.LOAD:
            if len(frames) != 2:
                self.malformed += 1
                log.warning("broker_load_malformed", worker=self.label, frames=len(frames))
                return []
            self.on_load(frames[1].decode(errors="replace"))
            return []
        if command == protocol.DISCONNECT:
            if self._drain_announced:
                self._released = True  # the broker has let us go
            else:
                log.info("worker_reregistering", worker=self.label)
                self.register()
        elif command != protocol.HEARTBEAT:
            self.malformed += 1
            log.warning("broker_command_unknown", worker=self.label, command=command)
        return []

    def heartbeat_if_due(self) -> None:
        now = time.monotonic()
        if now >= self._next_heartbeat:
            self._send(protocol.HEARTBEAT)
            self._next_heartbeat = now + self.heartbeat_s

    def decode(self, job: Job) -> protocol.Request | None:
        """The job's request; a malformed one is answered here (typed error) and gives None."""
        try:
            return protocol.decode_request(job.body, self.max_message_bytes)
        except ProtocolError as error:
            self.reply(job, protocol.encode_protocol_error(error))
            return None

    def reply(self, job: Job, body: bytes) -> None:
        """Answer a job; the reply leaves at the next `flush_replies`, before the loop waits."""
        self.served += 1
        self._replies += (protocol.worker_header(protocol.REPLY, job.seq), body)

    def flush_replies(self) -> None:
        """Send the replies made since the last flush, packed into one REPLY message."""
        if self._replies:
            if self._sock is not None:
                self._sock.send_multipart(self._replies)
            self._replies = []

    def reply_error(
        self, job: Job, request_id: RequestId | None, code: ErrorCode, message: str
    ) -> None:
        self.reply(job, protocol.encode_error(request_id, code, message))
