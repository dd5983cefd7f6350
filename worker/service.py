"""The model worker: one loaded, warmed model version answering the broker's requests.

The broker link and lifecycle are `WorkerLoop`'s (worker/loop.py). This adds the model:
recommend requests waiting together share model calls, lightest first, each call at most
`engine.users_per_call` users and about half a heartbeat at the measured speed; a request
larger than one call (a heavy one) is answered over several turns of the loop, one call of it
per turn, so requests that arrive meanwhile are answered between its calls and the loop keeps
heartbeating. A rollout loads the next version in a background thread beside the one serving,
then switches when no request is half done; a load that fails is reported to the broker
(LOAD_FAILED).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
import zmq

from uro_recs.core import protocol
from uro_recs.core.config import BrokerConfig, WorkerConfig
from uro_recs.core.protocol import (
    ErrorCode,
    PredictArgs,
    RecommendArgs,
    Request,
    SimilarItemsArgs,
)
from uro_recs.worker.engine import (
    BadArgument,
    Engine,
    EngineError,
    Id,
    Recommendation,
    RecommendQuery,
    UnknownItem,
    Unsupported,
    return_free_memory,
)
from uro_recs.worker.loop import Job, WorkerLoop, one_line
from uro_recs.worker.metrics import WorkerMetrics
from uro_recs.worker.recent_events import RecentEvents, exported_at

log = structlog.get_logger("uro_recs.worker")
_LOGGED_IDS = 20  # request ids named in one log line about a batch

FIRST_CALL_USERS = 64  # users in a model call before the speed per user is measured


@dataclass(slots=True, eq=False)
class PendingRecommend:
    """A recommend request not yet answered: its users are scored in one or more calls."""

    job: Job
    request: Request
    args: RecommendArgs
    done: list[Recommendation] = field(default_factory=list)  # the first users' answers
    left: int = field(init=False)  # users not yet scored (kept, not recomputed, per call)

    def __post_init__(self) -> None:
        self.left = len(self.args.users)


class WorkerService(WorkerLoop):
    def __init__(
        self,
        engine: Engine,
        endpoint: str,
        config: WorkerConfig,
        broker: BrokerConfig,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        loader: Callable[[str], Engine] | None = None,
        recent: RecentEvents | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        """`loader(version)` loads and warms up another version of the model (for rollouts);
        `recent` holds what users did since the model's export, left out of recommend."""
        super().__init__(engine.name, endpoint, config, broker, context)
        self.engine = engine
        self.metrics = metrics or WorkerMetrics(None, engine.name)
        self.loader = loader
        self.recent = recent
        self._pending: list[PendingRecommend] = []  # in arrival order
        self._loading: str | None = None  # the version a background thread is loading
        # Written once by the load thread, then read and cleared by the loop: the new version,
        # loaded and warm, waiting for the swap; or why it could not be loaded.
        self._loaded: Engine | None = None
        self._load_error: str | None = None
        self._seconds_per_user = 0.0  # measured per model call; sizes the next calls

    def hello(self) -> protocol.WorkerHello:
        return protocol.WorkerHello(
            model=self.engine.name,
            version=self.engine.version,
            slots=self.config.slots,
            info=self.engine.info(),
            pid=os.getpid(),
            batch=self.config.slots,
        )

    def after_wake(self) -> None:
        if self._load_error is not None:
            self._report_load_failure()
        # A request half answered by the current version finishes on it.
        if self._loaded is not None and not any(p.done for p in self._pending):
            self._swap()

    # --- rollout: load the next version beside the current one, then switch -------------------

    def on_load(self, version: str) -> None:
        if version in (self.engine.version, self._loading):
            return  # served already, or on its way
        if self.loader is None:
            log.warning(
                "version_load_refused", worker=self.label, model=self.engine.name, version=version
            )
            self.load_failed(version, "this worker has no model store to load versions from")
            return
        if self._loading is not None:
            log.warning(
                "rollout_busy", worker=self.label, model=self.engine.name, loading=self._loading
            )
            self.load_failed(version, f"this worker is still loading version {self._loading!r}")
            return
        self._loading = version
        log.info("version_loading", worker=self.label, model=self.engine.name, version=version)
        threading.Thread(target=self._load, args=(version,), daemon=True).start()

    def _load(self, version: str) -> None:
        """In a background thread, while the loop keeps serving the current version. It never
        touches the socket: the loop switches, or reports the failure, when woken."""
        assert self.loader is not None
        try:
            self._loaded = self.loader(version)
        except BaseException as error:  # even SystemExit: the broker must hear of it
            log.exception(
                "version_load_failed", worker=self.label, model=self.engine.name, version=version
            )
            self._load_error = one_line(error)
        self.wake()  # the loop switches now, not at its next poll

    def _report_load_failure(self) -> None:
        assert self._load_error is not None and self._loading is not None
        version, error = self._loading, self._load_error
        self._loading = self._load_error = None
        self.load_failed(version, error)

    def _swap(self) -> None:
        """No request is half answered: every model call from now on uses the new version."""
        assert self._loaded is not None
        previous, self.engine, self._loaded = self.engine, self._loaded, None
        self._loading = None
        self._seconds_per_user = 0.0  # another model, another speed
        if self.recent is not None:
            self.recent.reset(exported_at(self.engine.manifest))
        self.register(protocol.UPDATE)
        log.info(
            "version_switched",
            worker=self.label,
            model=self.engine.name,
            previous=previous.version,
            version=self.engine.version,
        )
        del previous
        return_free_memory()  # what the previous version held

    # --- execution --------------------------------------------------------------------------

    def execute(self, jobs: list[Job]) -> None:
        """Answer predict and similar_items now; queue recommend requests for `step`, which
        runs in this same turn of the loop."""
        now = time.monotonic()
        for job in jobs:
            request = self.decode(job)
            if request is None:
                continue
            if now >= job.deadline:
                message = "deadline passed before it ran"
                self.reply_error(job, request.id, ErrorCode.DEADLINE_EXCEEDED, message)
                continue
            if request.model != self.engine.name:
                message = f"worker serves {self.engine.name!r}, not {request.model!r}"
                self.reply_error(job, request.id, ErrorCode.INTERNAL, message)
                continue
            args = request.args
            if (
                isinstance(args, RecommendArgs)
                and args.seq is not None
                and not self.engine.takes_seq
            ):
                message = f"model {self.engine.name!r} ({self.engine.libreco_class}) takes no seq"
                self.reply_error(job, request.id, ErrorCode.UNSUPPORTED, message)
            elif isinstance(args, RecommendArgs) and args.n <= self.engine.n_items:
                self._pending.append(PendingRecommend(job, request, args))
            else:
                self._run_one(job, request)

    # --- recommend: model calls sized by _call_users, one turn at a time ---------------------

    def has_pending_work(self) -> bool:
        return bool(self._pending)

    def step(self) -> None:
        """One turn's recommend work, at most two model calls: first the waiting requests that
        fit whole into one call, lightest first; then one call's worth of the next request:
        the heavy one in progress, continued where it stopped, or else the lightest left."""
        self._expire()
        light = self._fitting(sorted(self._pending, key=lambda p: p.left))
        if light:
            self._run_chunk([(p, p.left) for p in light])
            self.heartbeat_if_due()
            self._expire()
        if self._pending:
            started = [p for p in self._pending if p.done]
            heavy = started[0] if started else min(self._pending, key=lambda p: p.left)
            self._run_chunk([(heavy, min(heavy.left, self._call_users()))])

    def stop_pending_work(self, reason: str | None) -> None:
        pending, self._pending = self._pending, []
        log.warning(
            "recommend_abandoned",
            worker=self.label,
            requests=len(pending),
            request_ids=[p.request.id for p in pending[:_LOGGED_IDS]],
        )
        if reason is None:
            return
        for p in pending:
            message = f"{reason} ({len(p.done)} of {len(p.args.users)} users done)"
            self.reply_error(p.job, p.request.id, ErrorCode.UNAVAILABLE, message)

    def _fitting(self, candidates: list[PendingRecommend]) -> list[PendingRecommend]:
        """The first candidates whose users fit whole into one model call."""
        chosen: list[PendingRecommend] = []
        room = self._call_users()
        for p in candidates:
            if p.left > room:
                break
            chosen.append(p)
            room -= p.left
        return chosen

    def _call_users(self) -> int:
        """Users in one model call: the engine's memory cap, and no more than fit in the
        busy slice (half a heartbeat interval) at the speed measured so far."""
        if self._seconds_per_user <= 0:  # not measured yet: a small first call measures it
            return min(self.engine.users_per_call, FIRST_CALL_USERS)
        by_time = int(self.busy_slice_s / self._seconds_per_user)
        return max(1, min(self.engine.users_per_call, by_time))

    def _expire(self) -> None:
        """Answer the requests whose deadline passed; their remaining users are not scored."""
        now = time.monotonic()
        expired = [p for p in self._pending if now >= p.job.deadline]
        if not expired:
            return
        self._pending = [p for p in self._pending if now < p.job.deadline]
        for p in expired:
            if p.done:
                message = f"deadline passed after {len(p.done)} of {len(p.args.users)} users"
            else:
                message = "deadline passed before it ran"
            self.reply_error(p.job, p.request.id, ErrorCode.DEADLINE_EXCEEDED, message)

    def _run_chunk(self, chunk: list[tuple[PendingRecommend, int]]) -> None:
        """One model call: the next `count` users of each request; the finished are answered."""
        queries = [
            RecommendQuery(
                user,
                p.args.n,
                p.args.filter_consumed,
                self._excluded(user, p.args),
                self._sequence(user, p.args),
            )
            for p, count in chunk
            for user in p.args.users[len(p.done) : len(p.done) + count]
        ]
        started = time.perf_counter()
        try:
            recommendations = self.engine.recommend_batch(queries)
        except Exception as exc:
            log.exception(
                "recommend_failed",
                worker=self.label,
                users=len(queries),
                request_ids=[p.request.id for p, _ in chunk[:_LOGGED_IDS]],
            )
            failed = {id(p) for p, _ in chunk}
            self._pending = [p for p in self._pending if id(p) not in failed]
            for p, _ in chunk:
                self.reply_error(
                    p.job, p.request.id, ErrorCode.INTERNAL, f"recommend failed: {exc}"
                )
            return
        seconds = time.perf_counter() - started
        self.metrics.model_call(len(queries), seconds)
        per_user = seconds / max(1, len(queries))
        # A moving average: one slow call (a page fault, a noisy neighbour) only nudges it.
        self._seconds_per_user = (
            per_user
            if self._seconds_per_user <= 0
            else 0.8 * self._seconds_per_user + 0.2 * per_user
        )
        offset = 0
        for p, count in chunk:
            p.done.extend(recommendations[offset : offset + count])
            p.left -= count
            offset += count
        finished = [p for p, _ in chunk if not p.left]
        if finished:
            self._pending = [p for p in self._pending if p.left]
        for p in finished:
            answers = [
                {"user": user, "items": rec.items, "cold_start": rec.cold_start}
                for user, rec in zip(p.args.users, p.done, strict=True)
            ]
            result = {"results": answers} if p.args.many else answers[0]
            self.reply(p.job, protocol.encode_ok(p.request.id, result))

    def _excluded(self, user: Id, args: RecommendArgs) -> frozenset[Id]:
        """The request's exclusions, plus what the user consumed since the model's export."""
        if self.recent is None or not args.filter_consumed:
            return args.exclude
        recent = self.recent.items_of(user)
        return args.exclude | recent if recent else args.exclude

    def _sequence(self, user: Id, args: RecommendArgs) -> tuple[Id, ...] | None:
        """For sequence models: the request's `seq`, else (with recent events) the user's
        training items followed by what they did since the export; None: the model's own."""
        if args.seq is not None or self.recent is None or not self.engine.takes_seq:
            return args.seq
        recent = self.recent.sequence_of(user)
        return self.engine.training_sequence(user) + recent if recent else None

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
            self.reply_error(job, request.id, ErrorCode.UNSUPPORTED, str(exc))
        except BadArgument as exc:
            self.reply_error(job, request.id, ErrorCode.BAD_REQUEST, str(exc))
        except EngineError as exc:
            self.reply_error(job, request.id, ErrorCode.INTERNAL, str(exc))
        except Exception as exc:
            log.exception("request_failed", worker=self.label, op=request.op, request_id=request.id)
            self.reply_error(job, request.id, ErrorCode.INTERNAL, f"{request.op} failed: {exc}")
        else:
            self.reply(job, protocol.encode_ok(request.id, result))
