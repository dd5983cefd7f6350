"""The broker's socket shell: ROUTER front ends for clients, a ROUTER back end for workers.

Everything the broker decides lives in `BrokerCore` (broker/core.py); this module reads
sockets, tells the core what happened and when, and carries out what the core says. Its own
duties are the ones a socket loop must keep whatever arrives:
- reading is bounded per turn (in messages and in time), so heartbeats, deadlines and replies
  are serviced at least every half heartbeat interval;
- a worker's process is watched with a pidfd, so a worker that dies is noticed at once rather
  than after `liveness` silent heartbeats (heartbeats still find a hung one);
- a send that fails (a client that went away or stopped reading, a worker whose connection is
  gone) is counted and never blocks the loop;
- large replies are tracked until libzmq has written them, so replies a client does not read
  count against its limits.
"""

from __future__ import annotations

import grp
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import structlog
import zmq

from uro_recs.broker.core import (
    BrokerCore,
    ClientKey,
    LogEvent,
    ToClient,
    ToWorker,
    UnwatchProcess,
    WatchProcess,
)
from uro_recs.core.config import BrokerConfig
from uro_recs.core.model_store import MANIFEST_NAME, version_dir
from uro_recs.core.wakeup import Wakeup

if TYPE_CHECKING:
    from uro_recs.broker.metrics import MetricsExporter

log = structlog.get_logger("uro_recs.broker")

RECV_BATCH = 256  # messages read from one socket before looking at the others
# Messages handled between two sends of what they caused: what is dispatched to one worker in
# between leaves as one packed REQUEST (PROTOCOL.md section 7); more would delay replies.
SEND_EVERY = 32
# Replies this large are tracked until libzmq has written them; smaller ones are bounded by
# send_hwm (messages per connection) alone.
TRACKED_REPLY_BYTES = 4 * 1024
# Plain ints: pyzmq's flag enums cost a Python-level __or__ per frame on the hot path.
_SNDMORE, _NOBLOCK = int(zmq.SNDMORE), int(zmq.NOBLOCK)
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


class Broker:
    def __init__(
        self,
        config: BrokerConfig,
        client_endpoints: Iterable[str],
        worker_endpoint: str,
        control_endpoint: str,
        known_models: Iterable[str] = (),
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        store: Path | None = None,
        worker_metrics_dir: Path | None = None,
    ) -> None:
        """`store` is the model store a rollout's version must exist in (None: not checked);
        `worker_metrics_dir` is where workers leave their figures for the metrics endpoint."""
        self.config = config
        self.context = context or zmq.Context.instance()
        self.store = store
        self.running = False
        client_endpoints = list(client_endpoints)
        hard_max = config.max_message_bytes * 4 + 1024
        # The front ends, the control endpoint last: the core knows them by index.
        self.frontends = [self._bind(zmq.ROUTER, e, max_bytes=hard_max) for e in client_endpoints]
        self.control = self._bind(zmq.ROUTER, control_endpoint, max_bytes=hard_max)
        self.frontends.append(self.control)
        self.backend = self._bind(zmq.ROUTER, worker_endpoint)
        # A worker that gave up on us reconnects with the same identity, and its old connection
        # may not be gone yet: the newest connection must own the identity, or its READY and
        # heartbeats sit unread while we route its requests to the dead one.
        self.backend.setsockopt(zmq.ROUTER_HANDOVER, 1)
        for endpoint in client_endpoints:
            _set_socket_access(endpoint, config.client_socket_mode_bits, config.client_socket_group)
        _set_socket_access(control_endpoint, 0o600)
        _set_socket_access(worker_endpoint, 0o600)
        self.core = BrokerCore(
            config,
            known_models,
            control_frontend=len(self.frontends) - 1,
            version_problem=self._version_problem if store is not None else None,
            now=time.monotonic(),
        )
        self._wakeup = Wakeup()
        self._poller = zmq.Poller()
        self._pidfds: dict[bytes, int] = {}  # worker identity -> pidfd
        self._pidfd_owners: dict[int, bytes] = {}
        self._tracked: list[tuple[zmq.MessageTracker, ClientKey, int]] = []
        self._drain_requested = False
        self._on_drain: Callable[[], None] | None = None
        self._handlers: dict[type[Any], Callable[[Any], None]] = {
            ToClient: self._send_client,
            ToWorker: self._send_worker,
            WatchProcess: lambda a: self._watch(a.identity, a.pid),
            UnwatchProcess: lambda a: self._unwatch(a.identity),
            LogEvent: self._log,
        }
        self.metrics: MetricsExporter | None = None
        if config.metrics_address:
            from uro_recs.broker.metrics import MetricsExporter

            self.metrics = MetricsExporter(config.metrics_address, worker_metrics_dir)
            self.metrics.update(self.core, time.monotonic(), force=True)

    def _bind(self, kind: int, endpoint: str, max_bytes: int = -1) -> zmq.Socket[bytes]:
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable sends raise, so we count them
        sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)  # memory guard; the documented limit is lower
        sock.setsockopt(zmq.SNDHWM, self.config.send_hwm)
        sock.setsockopt(zmq.RCVHWM, self.config.send_hwm)
        sock.bind(endpoint)
        return sock

    def _version_problem(self, model: str, version: str) -> str | None:
        assert self.store is not None
        try:
            path = version_dir(self.store, model, version)
        except ValueError as exc:
            return f"version: {exc}"
        if not (path / MANIFEST_NAME).is_file():
            return f"version {version!r} of model {model!r} is not in the store {self.store}"
        return None

    # --- lifecycle --------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        self._wakeup.on_stop_signals(self.begin_drain)

    def begin_drain(self) -> None:
        """From a signal handler: the loop starts the drain on its next turn."""
        self._drain_requested = True

    def run(
        self,
        on_ready: Callable[[], None] | None = None,
        on_tick: Callable[[], None] | None = None,
        on_drain: Callable[[], None] | None = None,
    ) -> None:
        """Mediate until drained. `on_ready` is called once the sockets are bound, `on_tick`
        once per loop iteration (at least every heartbeat), `on_drain` when a drain begins."""
        self._on_drain = on_drain
        for sock in (*self.frontends, self.backend):
            self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._wakeup.fileno(), zmq.POLLIN)
        self.running = True
        log.info("broker_started", models=sorted(self.core.models))
        if on_ready is not None:
            on_ready()
        turn_s = self.config.busy_slice_s  # reading yields to the duties this often
        while self.running:
            now = time.monotonic()
            timeout_s = min(self.core.next_wakeup() - now, turn_s)
            events = dict(self._poller.poll(max(0, int(timeout_s * 1000) + 1)))
            if on_tick is not None:
                on_tick()
            turn_ends = time.monotonic() + turn_s
            if self._wakeup.fileno() in events:
                self._wakeup.drain()
            if self._drain_requested and not self.core.draining:
                self._start_drain()
            for fd, owner in list(self._pidfd_owners.items()):
                if fd in events:
                    self.core.worker_gone(owner, "process exited", time.monotonic())
            self._carry_out()
            if self.backend in events:
                self._read(self.backend, -1, turn_ends)
            for index, frontend in enumerate(self.frontends):
                if frontend in events:
                    self._read(frontend, index, turn_ends)
            self.core.tick(time.monotonic())
            self._carry_out()
            self._check_tracked()
            if self.metrics is not None:
                self.metrics.update(self.core, time.monotonic())
            if self.core.finished:
                self.running = False
        log.info("broker_stopped", counters=dict(self.core.counters))

    def _start_drain(self) -> None:
        log.info("broker_draining", queued=self.core.queued(), in_flight=self.core.in_flight())
        self.core.begin_drain(time.monotonic())
        if self._on_drain is not None:
            self._on_drain()

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        for sock in (*self.frontends, self.backend):
            sock.close(linger=0)
        for fd in self._pidfd_owners:
            os.close(fd)
        self._pidfd_owners.clear()
        self._pidfds.clear()
        self._wakeup.close()

    def _read(self, sock: zmq.Socket[bytes], frontend: int, turn_ends: float) -> None:
        """Up to RECV_BATCH messages, and no longer than this turn allows."""
        core = self.core
        for count in range(1, RECV_BATCH + 1):
            # Asking first costs less than the zmq.Again a read of an empty socket raises.
            if not cast(int, sock.getsockopt(_EVENTS)) & _POLLIN:
                break
            frames = sock.recv_multipart(_NOBLOCK)
            now = time.monotonic()
            try:
                if frontend < 0:
                    core.worker_message(frames[0], frames[1:], now)
                else:
                    core.client_message(frontend, frames[0], frames[1:], now)
            except Exception:  # a bug must cost one message, never every caller's
                core.counters["messages_failed"] += 1
                log.exception("message_failed", frontend=frontend, frames=len(frames))
            if count % SEND_EVERY == 0:
                self._carry_out()
            if now >= turn_ends:
                break
        self._carry_out()

    # --- carrying out the core's actions ---------------------------------------------------

    def _carry_out(self) -> None:
        actions = self.core.take_actions()
        while actions:
            for action in actions:
                self._handlers[type(action)](action)
            actions = self.core.take_actions()  # a failed send may have produced more

    def _send_worker(self, action: ToWorker) -> None:
        try:
            _send_frames(self.backend, action.identity, *action.frames, flags=_NOBLOCK)
        except zmq.ZMQError:
            # Gone (EHOSTUNREACH) or not reading (EAGAIN): either way it will not answer.
            self.core.worker_gone(action.identity, "unreachable", time.monotonic())

    def _log(self, action: LogEvent) -> None:
        (log.warning if action.warning else log.info)(action.event, **action.fields)

    def _send_client(self, action: ToClient) -> None:
        sock = self.frontends[action.frontend]
        size = len(action.body)
        try:
            if size < TRACKED_REPLY_BYTES:
                _send_frames(sock, action.client, b"", action.body, flags=_NOBLOCK)
                return
            key = (action.frontend, action.client)
            if self.core.unread_reply_bytes(key) + size > self.config.client_max_bytes:
                # A slow consumer: its unread replies are at the limit. Dropping this one (as
                # libzmq drops at its HWM) bounds our memory; the caller's timeout tells it.
                self.core.reply_undeliverable("slow_consumer")
                return
            sock.send(action.client, _SNDMORE | _NOBLOCK)
            sock.send(b"", _SNDMORE | _NOBLOCK)
            tracker = sock.send(action.body, _NOBLOCK, copy=False, track=True)
        except zmq.ZMQError:
            # The client went away (EHOSTUNREACH) or stopped reading (EAGAIN at its HWM).
            self.core.reply_undeliverable()
            return
        self.core.add_unread_reply_bytes(key, size)
        self._tracked.append((tracker, key, size))

    def _check_tracked(self) -> None:
        if not self._tracked:
            return
        still: list[tuple[zmq.MessageTracker, ClientKey, int]] = []
        for tracker, key, size in self._tracked:
            if tracker.done:
                self.core.add_unread_reply_bytes(key, -size)
            else:
                still.append((tracker, key, size))
        self._tracked = still

    def _watch(self, identity: bytes, pid: int) -> None:
        self._unwatch(identity)
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.core.worker_gone(identity, "process exited", time.monotonic())
            return
        except OSError as exc:  # no pidfds here (another PID namespace, an old kernel)
            log.warning("worker_not_watched", pid=pid, reason=str(exc))
            return
        self._pidfds[identity] = fd
        self._pidfd_owners[fd] = identity
        self._poller.register(fd, zmq.POLLIN)

    def _unwatch(self, identity: bytes) -> None:
        fd = self._pidfds.pop(identity, None)
        if fd is not None:
            del self._pidfd_owners[fd]
            self._poller.unregister(fd)
            os.close(fd)


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
