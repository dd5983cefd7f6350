"""Clients for the uro-recs broker: `Client` (blocking) and `AsyncClient` (asyncio).

Both speak protocol v1 over one ZeroMQ DEALER socket connected to the broker's ROUTER, with the
same methods and results. `_BaseClient` holds the configuration and everything that is not I/O:
building requests, the per-call deadline, parsing replies and deciding on retries.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import zmq
import zmq.asyncio

from uro_recs.core import protocol
from uro_recs.core.protocol import RETRYABLE_CODES, ErrorCode, Id, Op, Reply, RequestId

from .errors import DeadlineExceeded, ServerError, Unavailable, UroRecsError, error_from_reply
from .events import Event
from .results import (
    ModelInfo,
    Prediction,
    Recommendation,
    SimilarItems,
    parse_accepted,
    parse_model_infos,
    parse_prediction,
    parse_recommendation,
    parse_recommendations,
    parse_similar_items,
    parse_stats,
)

T = TypeVar("T")

DEFAULT_TIMEOUT = 1.0
MAX_TIMEOUT = protocol.MAX_TIMEOUT_MS / 1000
DEFAULT_HWM = 1000


class ClientState(Enum):
    UNOPENED = 1  # created; the socket is connected on entering the context or the first call
    OPEN = 2  # the socket is connected; calls go out on it
    CLOSED = 3  # closed for good; calls raise RuntimeError and the client cannot be reopened


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How overloaded / unavailable / worker_lost replies are retried.

    `attempts` counts the first try. Before retry k the client sleeps a random time between half
    and all of min(backoff * 2**(k-1), max_backoff); a retry whose sleep would reach the call's
    deadline is not made, and the last error is raised instead.
    """

    attempts: int = 3
    backoff: float = 0.005
    max_backoff: float = 0.25

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if not 0 <= self.backoff <= self.max_backoff:
            raise ValueError("expected 0 <= backoff <= max_backoff")

    def delay(self, retry: int) -> float:
        """Seconds to sleep before retry number `retry` (1 for the first retry)."""
        ceiling = min(self.backoff * 2 ** (retry - 1), self.max_backoff)
        return random.uniform(ceiling / 2, ceiling)


@dataclass(slots=True)
class _Call(Generic[T]):
    """One method call over all its attempts: the request as asked and its deadline."""

    op: str
    model: str | None
    args: dict[str, Any]
    parse: Callable[[dict[str, Any]], T]
    timeout: float
    deadline: float  # on the time.monotonic() clock
    attempts: int = 0

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


def _check_timeout(timeout: float) -> float:
    if not 0 < timeout <= MAX_TIMEOUT:  # also rejects NaN
        raise ValueError(f"timeout must be in (0, {MAX_TIMEOUT:g}] seconds, got {timeout!r}")
    return float(timeout)


def _id_list(ids: Iterable[Id], name: str) -> list[Id]:
    if isinstance(ids, str | bytes):  # a lone id where a list belongs would be split into chars
        raise TypeError(f"{name} must be a sequence of ids, not a single {type(ids).__name__}")
    return list(ids)


def _millis(seconds: float) -> int:
    return max(0, math.ceil(seconds * 1000))


def nobody_listening(endpoint: str) -> str | None:
    """Why no broker can be listening at `endpoint` (ipc:// or tcp://), or None when something
    accepts connections there or it cannot be told. One short connect, made only when a
    request cannot go out at once: it tells "not running" from "slow" without waiting."""
    try:
        if endpoint.startswith("ipc://"):
            path = endpoint.removeprefix("ipc://")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(0.5)
                probe.connect(path)
        elif endpoint.startswith("tcp://"):
            host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
            socket.create_connection((host.strip("[]"), int(port)), timeout=0.5).close()
    except FileNotFoundError:
        return f"no broker is listening at {endpoint}: there is no such socket file"
    except ConnectionRefusedError:
        return f"no broker is listening at {endpoint}: connection refused"
    except PermissionError:
        return (
            f"may not connect to {endpoint}: permission denied (this user must be in the "
            "socket's group, [broker] client_socket_group)"
        )
    except (OSError, ValueError):
        return None
    return None


class _BaseClient:
    def __init__(
        self,
        endpoint: str,
        *,
        model: str | None,
        timeout: float,
        retry: RetryPolicy | None,
        hwm: int,
    ) -> None:
        self.endpoint = endpoint
        self.model = model  # the default model for recommend / predict / similar_items
        self.timeout = _check_timeout(timeout)  # the default per-call budget, in seconds
        self.retry = retry if retry is not None else RetryPolicy()
        self.hwm = hwm
        self._state = ClientState.UNOPENED
        self._request_ids = itertools.count(1)
        self._dropped = 0

    @property
    def state(self) -> ClientState:
        return self._state

    @property
    def dropped_replies(self) -> int:
        """Replies that matched no waiting call, such as late replies of timed-out calls."""
        return self._dropped

    def _check_not_closed(self) -> None:
        if self._state is ClientState.CLOSED:
            raise RuntimeError("the client is closed; create a new one")

    def _connect(self, socket: zmq.Socket[Any]) -> None:
        socket.setsockopt(zmq.LINGER, 0)  # closing never waits to deliver requests
        socket.setsockopt(zmq.SNDHWM, self.hwm)
        socket.setsockopt(zmq.RCVHWM, self.hwm)
        # Queue requests only on a live connection: while the broker is down a call times out
        # instead of leaving a stale request to be delivered when it comes back.
        socket.setsockopt(zmq.IMMEDIATE, 1)
        socket.connect(self.endpoint)
        self._state = ClientState.OPEN

    # --- building calls ---------------------------------------------------------------------

    def _new_call(
        self,
        op: Op,
        model: str | None,
        args: dict[str, Any],
        parse: Callable[[dict[str, Any]], T],
        timeout: float | None,
    ) -> _Call[T]:
        budget = self.timeout if timeout is None else _check_timeout(timeout)
        return _Call(op.value, model, args, parse, budget, time.monotonic() + budget)

    def _model(self, model: str | None) -> str:
        name = model if model is not None else self.model
        if name is None:
            raise ValueError("no model given and the client has no default model")
        return name

    def _recommend_args(
        self, n: int, filter_consumed: bool, exclude: Iterable[Id]
    ) -> dict[str, Any]:
        args: dict[str, Any] = {"n": n, "filter_consumed": filter_consumed}
        excluded = _id_list(exclude, "exclude")
        if excluded:
            args["exclude"] = excluded
        return args

    def _recommend(
        self,
        user: Id,
        n: int,
        filter_consumed: bool,
        exclude: Iterable[Id],
        model: str | None,
        timeout: float | None,
        seq: Iterable[Id] | None = None,
    ) -> _Call[Recommendation]:
        args = {"user": user, **self._recommend_args(n, filter_consumed, exclude)}
        if seq is not None:
            args["seq"] = _id_list(seq, "seq")
        return self._new_call(Op.RECOMMEND, self._model(model), args, parse_recommendation, timeout)

    def _recommend_many(
        self,
        users: Sequence[Id],
        n: int,
        filter_consumed: bool,
        exclude: Iterable[Id],
        model: str | None,
        timeout: float | None,
    ) -> _Call[list[Recommendation]]:
        asked = _id_list(users, "users")

        def parse(result: dict[str, Any]) -> list[Recommendation]:
            recommendations = parse_recommendations(result)
            if len(recommendations) != len(asked):
                raise ServerError(
                    ErrorCode.INTERNAL,
                    f"asked for {len(asked)} users, got {len(recommendations)} results",
                )
            return recommendations

        args = {"users": asked, **self._recommend_args(n, filter_consumed, exclude)}
        return self._new_call(Op.RECOMMEND, self._model(model), args, parse, timeout)

    def _predict(
        self, user: Id, items: Sequence[Id], model: str | None, timeout: float | None
    ) -> _Call[Prediction]:
        asked = _id_list(items, "items")

        def parse(result: dict[str, Any]) -> Prediction:
            prediction = parse_prediction(result)
            if len(prediction.scores) != len(asked):
                raise ServerError(
                    ErrorCode.INTERNAL,
                    f"asked for {len(asked)} scores, got {len(prediction.scores)}",
                )
            return prediction

        args = {"user": user, "items": asked}
        return self._new_call(Op.PREDICT, self._model(model), args, parse, timeout)

    def _similar_items(
        self, item: Id, n: int, model: str | None, timeout: float | None
    ) -> _Call[SimilarItems]:
        args = {"item": item, "n": n}
        return self._new_call(
            Op.SIMILAR_ITEMS, self._model(model), args, parse_similar_items, timeout
        )

    def _info(self, timeout: float | None) -> _Call[list[ModelInfo]]:
        return self._new_call(Op.INFO, None, {}, parse_model_infos, timeout)

    def _stats(self, timeout: float | None) -> _Call[dict[str, Any]]:
        return self._new_call(Op.STATS, None, {}, parse_stats, timeout)

    def _rollout(self, model: str, version: str, timeout: float | None) -> _Call[dict[str, Any]]:
        return self._new_call(Op.ROLLOUT, model, {"version": version}, dict, timeout)

    def _ingest(self, events: Iterable[Event], timeout: float | None) -> list[_Call[int]]:
        """One call per MAX_EVENTS_PER_REQUEST events; every event validated before any."""
        wire = [event.wire() for event in events]
        step = protocol.MAX_EVENTS_PER_REQUEST
        return [
            self._new_call(Op.INGEST, None, {"events": wire[i : i + step]}, parse_accepted, timeout)
            for i in range(0, len(wire), step)
        ]

    # --- attempts and replies ---------------------------------------------------------------

    def _attempt(self, call: _Call[Any]) -> tuple[int, bytes]:
        """A fresh request id and the body of the next attempt, carrying the remaining budget."""
        remaining = call.remaining()
        if remaining <= 0:
            raise self._timed_out(call)
        call.attempts += 1
        request_id = next(self._request_ids)
        timeout_ms = max(1, _millis(remaining))
        body = protocol.encode_request(request_id, call.op, call.model, call.args, timeout_ms)
        return request_id, body

    def _timed_out(self, call: _Call[Any], request_id: int | None = None) -> UroRecsError:
        """DeadlineExceeded, or Unavailable when no broker listens at the endpoint (any more)."""
        unreachable = self._unreachable(request_id)
        if unreachable is not None:
            return unreachable
        message = f"no reply within the {call.timeout:g} s timeout"
        return DeadlineExceeded(ErrorCode.DEADLINE_EXCEEDED, message, request_id)

    def _unreachable(self, request_id: int | None) -> Unavailable | None:
        reason = nobody_listening(self.endpoint)
        return None if reason is None else Unavailable(ErrorCode.UNAVAILABLE, reason, request_id)

    def _check_reachable(self, socket: zmq.Socket[Any], request_id: int) -> None:
        """A socket that cannot send at once has no connection yet: if no broker listens at
        the endpoint, say so now rather than after the whole timeout."""
        if not int(socket.get(zmq.EVENTS)) & zmq.POLLOUT:
            unreachable = self._unreachable(request_id)
            if unreachable is not None:
                raise unreachable

    def _decode(self, frames: list[bytes]) -> Reply | None:
        """The reply in a message, or None when it cannot be told which request it answers."""
        try:
            return protocol.decode_reply(protocol.client_body(frames))
        except protocol.ProtocolError as exc:
            if exc.request_id is None:
                return None
            error = protocol.Error(ErrorCode.INTERNAL, exc.message, retry=False)
            return Reply(id=exc.request_id, result=None, error=error)

    def _outcome(self, call: _Call[T], request_id: int, reply: Reply) -> T:
        """The parsed result of a reply, or its error raised."""
        if reply.error is not None:
            raise error_from_reply(reply.error, request_id)
        assert reply.result is not None
        try:
            return call.parse(reply.result)
        except ServerError as exc:
            exc.request_id = request_id
            raise

    def _backoff(self, call: _Call[Any], error: UroRecsError) -> float | None:
        """Seconds to sleep before retrying after `error`, or None to give up."""
        if error.code not in RETRYABLE_CODES or call.attempts >= self.retry.attempts:
            return None
        delay = self.retry.delay(call.attempts)
        return delay if delay < call.remaining() else None


class Client(_BaseClient):
    """A blocking client.

    Safe to share between threads, but calls are serialized by a lock: one request at a time
    is on the socket, since ZeroMQ sockets are not thread-safe. For concurrent requests use
    `AsyncClient`, or one `Client` per thread. Time spent waiting for the lock counts against
    a call's timeout.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        model: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        hwm: int = DEFAULT_HWM,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        super().__init__(endpoint, model=model, timeout=timeout, retry=retry, hwm=hwm)
        self._context = context
        self._socket: zmq.Socket[bytes] | None = None
        self._lock = threading.Lock()

    def recommend(
        self,
        user: Id,
        *,
        n: int = protocol.DEFAULT_N,
        filter_consumed: bool = True,
        exclude: Iterable[Id] = (),
        seq: Iterable[Id] | None = None,
        model: str | None = None,
        timeout: float | None = None,
    ) -> Recommendation:
        """The top `n` items for `user`; `seq` (sequence models only): the user's most recent
        items, oldest first, in place of what the model and the recent events know."""
        return self._run(self._recommend(user, n, filter_consumed, exclude, model, timeout, seq))

    def recommend_many(
        self,
        users: Sequence[Id],
        *,
        n: int = protocol.DEFAULT_N,
        filter_consumed: bool = True,
        exclude: Iterable[Id] = (),
        model: str | None = None,
        timeout: float | None = None,
    ) -> list[Recommendation]:
        """The top `n` items for each user, in the order of `users`, in one request."""
        call = self._recommend_many(users, n, filter_consumed, exclude, model, timeout)
        return self._run(call)

    def predict(
        self,
        user: Id,
        items: Sequence[Id],
        *,
        model: str | None = None,
        timeout: float | None = None,
    ) -> Prediction:
        """Scores of `items` for `user`, in the order of `items`."""
        return self._run(self._predict(user, items, model, timeout))

    def similar_items(
        self,
        item: Id,
        *,
        n: int = protocol.DEFAULT_N,
        model: str | None = None,
        timeout: float | None = None,
    ) -> SimilarItems:
        """The `n` items most similar to `item`."""
        return self._run(self._similar_items(item, n, model, timeout))

    def info(self, timeout: float | None = None) -> list[ModelInfo]:
        """The models the broker serves."""
        return self._run(self._info(timeout))

    def stats(self, timeout: float | None = None) -> dict[str, Any]:
        """The broker's live statistics, as the map it sent."""
        return self._run(self._stats(timeout))

    def rollout(self, model: str, version: str, timeout: float | None = None) -> dict[str, Any]:
        """Move `model`'s workers to `version` (control endpoint only); returns at once."""
        return self._run(self._rollout(model, version, timeout))

    def ingest(self, events: Iterable[Event], timeout: float | None = None) -> int:
        """Append `events` to recs_events; returns how many are stored (new or replayed).

        Each request of up to 1000 events is stored whole or not at all, and answered only once
        committed. On an error, earlier requests of this call may be stored: calling again
        with the same events is safe, a stored event is never stored twice. `timeout` is per
        request. Raises InvalidEvent before sending anything if one event is invalid.
        """
        return sum(self._run(call) for call in self._ingest(events, timeout))

    def close(self) -> None:
        """Close the socket, after the call in progress (if any) ends."""
        with self._lock:
            if self._socket is not None:
                self._socket.close(linger=0)
                self._socket = None
            self._state = ClientState.CLOSED

    def __enter__(self) -> Self:
        with self._lock:
            self._open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _open(self) -> zmq.Socket[bytes]:
        self._check_not_closed()
        if self._socket is None:
            context = self._context if self._context is not None else zmq.Context.instance()
            socket: zmq.Socket[bytes] = context.socket(zmq.DEALER)
            self._connect(socket)
            self._socket = socket
        return self._socket

    def _run(self, call: _Call[T]) -> T:
        if not self._lock.acquire(timeout=max(0.0, call.remaining())):
            raise self._timed_out(call)
        try:
            socket = self._open()
            while True:
                request_id, body = self._attempt(call)
                reply = self._exchange(socket, call, request_id, body)
                try:
                    return self._outcome(call, request_id, reply)
                except UroRecsError as exc:
                    delay = self._backoff(call, exc)
                    if delay is None:
                        raise
                time.sleep(delay)
        finally:
            self._lock.release()

    def _exchange(
        self, socket: zmq.Socket[bytes], call: _Call[Any], request_id: int, body: bytes
    ) -> Reply:
        self._check_reachable(socket, request_id)
        if not socket.poll(_millis(call.remaining()), zmq.POLLOUT):
            raise self._timed_out(call, request_id)
        socket.send_multipart([b"", body], zmq.NOBLOCK)
        while True:
            remaining = call.remaining()
            if remaining <= 0 or not socket.poll(_millis(remaining), zmq.POLLIN):
                raise self._timed_out(call, request_id)
            reply = self._decode(socket.recv_multipart(zmq.NOBLOCK))
            if reply is not None and reply.id == request_id:
                return reply
            self._dropped += 1  # a late reply to an earlier call that timed out


class AsyncClient(_BaseClient):
    """An asyncio client: many calls in flight on one socket, their replies matched by id.

    Use it from one event loop. A single reader task, started with the first call, hands each
    reply to the call waiting for its id and drops (and counts) replies nobody waits for.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        model: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        hwm: int = DEFAULT_HWM,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        super().__init__(endpoint, model=model, timeout=timeout, retry=retry, hwm=hwm)
        self._context = context
        self._socket: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[RequestId, asyncio.Future[Reply]] = {}

    @property
    def in_flight(self) -> int:
        """Calls sent and waiting for their reply."""
        return len(self._pending)

    async def recommend(
        self,
        user: Id,
        *,
        n: int = protocol.DEFAULT_N,
        filter_consumed: bool = True,
        exclude: Iterable[Id] = (),
        seq: Iterable[Id] | None = None,
        model: str | None = None,
        timeout: float | None = None,
    ) -> Recommendation:
        """The top `n` items for `user`; `seq` (sequence models only): the user's most recent
        items, oldest first, in place of what the model and the recent events know."""
        return await self._run(
            self._recommend(user, n, filter_consumed, exclude, model, timeout, seq)
        )

    async def recommend_many(
        self,
        users: Sequence[Id],
        *,
        n: int = protocol.DEFAULT_N,
        filter_consumed: bool = True,
        exclude: Iterable[Id] = (),
        model: str | None = None,
        timeout: float | None = None,
    ) -> list[Recommendation]:
        """The top `n` items for each user, in the order of `users`, in one request."""
        call = self._recommend_many(users, n, filter_consumed, exclude, model, timeout)
        return await self._run(call)

    async def predict(
        self,
        user: Id,
        items: Sequence[Id],
        *,
        model: str | None = None,
        timeout: float | None = None,
    ) -> Prediction:
        """Scores of `items` for `user`, in the order of `items`."""
        return await self._run(self._predict(user, items, model, timeout))

    async def similar_items(
        self,
        item: Id,
        *,
        n: int = protocol.DEFAULT_N,
        model: str | None = None,
        timeout: float | None = None,
    ) -> SimilarItems:
        """The `n` items most similar to `item`."""
        return await self._run(self._similar_items(item, n, model, timeout))

    async def info(self, timeout: float | None = None) -> list[ModelInfo]:
        """The models the broker serves."""
        return await self._run(self._info(timeout))

    async def stats(self, timeout: float | None = None) -> dict[str, Any]:
        """The broker's live statistics, as the map it sent."""
        return await self._run(self._stats(timeout))

    async def rollout(
        self, model: str, version: str, timeout: float | None = None
    ) -> dict[str, Any]:
        """Move `model`'s workers to `version` (control endpoint only); returns at once."""
        return await self._run(self._rollout(model, version, timeout))

    async def ingest(self, events: Iterable[Event], timeout: float | None = None) -> int:
        """As `Client.ingest`; the requests of one call are in flight together."""
        calls = self._ingest(events, timeout)
        return sum(await asyncio.gather(*(self._run(call) for call in calls)))

    async def aclose(self) -> None:
        """Close the socket; calls still waiting raise RuntimeError."""
        if self._state is ClientState.CLOSED:
            return
        self._state = ClientState.CLOSED
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.wait([self._reader])
            self._reader = None
        for future in self._pending.values():
            if not future.done():
                future.set_exception(RuntimeError("the client was closed"))
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    async def __aenter__(self) -> Self:
        self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _open(self) -> zmq.asyncio.Socket:
        self._check_not_closed()
        if self._socket is None:
            context = self._context if self._context is not None else zmq.asyncio.Context.instance()
            socket = context.socket(zmq.DEALER)
            self._connect(socket)
            self._socket = socket
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read(self._socket))
        return self._socket

    async def _run(self, call: _Call[T]) -> T:
        while True:
            request_id, body = self._attempt(call)
            reply = await self._exchange(call, request_id, body)
            try:
                return self._outcome(call, request_id, reply)
            except UroRecsError as exc:
                delay = self._backoff(call, exc)
                if delay is None:
                    raise
            await asyncio.sleep(delay)

    async def _exchange(self, call: _Call[Any], request_id: int, body: bytes) -> Reply:
        socket = self._open()
        self._check_reachable(socket, request_id)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            async with asyncio.timeout(call.remaining()):
                await socket.send_multipart([b"", body])
                return await future
        except TimeoutError:
            raise self._timed_out(call, request_id) from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            # Closing the socket cancels its pending sends; that is not our caller cancelling.
            if self._state is ClientState.CLOSED and task is not None and not task.cancelling():
                raise RuntimeError("the client was closed") from None
            raise
        finally:
            del self._pending[request_id]

    async def _read(self, socket: zmq.asyncio.Socket) -> None:
        try:
            while True:
                reply = self._decode(await socket.recv_multipart())
                future = None
                if reply is not None and reply.id is not None:
                    future = self._pending.get(reply.id)
                if reply is None or future is None or future.done():
                    self._dropped += 1  # a late reply to a call that timed out or was cancelled
                else:
                    future.set_result(reply)
        except Exception as exc:  # the socket failed: fail the waiting calls instead of hanging
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(exc)
