"""The model worker: one loaded, warmed model version answering the broker's requests.

The broker link and lifecycle are `WorkerLoop`'s (worker/loop.py). This adds the model: all
recommend requests received together share model calls, and a rollout loads the next version
in a background thread beside the one serving, then switches between two batches.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import structlog
import zmq

from uro_recs import protocol
from uro_recs.config import BrokerConfig, WorkerConfig
from uro_recs.protocol import (
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
    RecommendQuery,
    UnknownItem,
    Unsupported,
)
from uro_recs.worker.loop import Job, WorkerLoop
from uro_recs.worker.recent_events import RecentEvents, exported_at

log = structlog.get_logger("uro_recs.worker")


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
    ) -> None:
        """`loader(version)` loads and warms up another version of the model (for rollouts);
        `recent` holds what users did since the model's export, left out of recommend."""
        super().__init__(engine.name, endpoint, config, broker, context)
        self.engine = engine
        self.loader = loader
        self.recent = recent
        self._loading: str | None = None  # the version a background thread is loading
        self._loaded: Engine | None = None  # loaded and warm, waiting for the swap

    def hello(self) -> protocol.WorkerHello:
        return protocol.WorkerHello(
            model=self.engine.name,
            version=self.engine.version,
            slots=self.config.slots,
            info=self.engine.info(),
        )

    def after_wake(self) -> None:
        if self._loaded is not None:
            self._swap()

    # --- rollout: load the next version beside the current one, then switch -------------------

    def on_load(self, version: str) -> None:
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
        self.wake()  # the loop switches now, not at its next poll

    def _swap(self) -> None:
        """Between batches: nothing is running, so every later request sees the new version."""
        assert self._loaded is not None
        previous, self.engine, self._loaded = self.engine, self._loaded, None
        self._loading = None
        if self.recent is not None:
            self.recent.reset(exported_at(self.engine.manifest))
        self.register(protocol.UPDATE)
        log.info(
            "version_switched",
            model=self.engine.name,
            previous=previous.version,
            version=self.engine.version,
        )

    # --- execution --------------------------------------------------------------------------

    def execute(self, jobs: list[Job]) -> None:
        """Answer every job exactly once; all recommend requests share one model call."""
        now = time.monotonic()
        batch: list[tuple[Job, Request, RecommendArgs]] = []
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
            if isinstance(args, RecommendArgs) and args.n <= self.engine.n_items:
                batch.append((job, request, args))
            else:
                self._run_one(job, request)
        if batch:
            self._run_recommend_batches(batch)

    def _run_recommend_batches(self, batch: list[tuple[Job, Request, RecommendArgs]]) -> None:
        """In model calls of at most `engine.users_per_call` users (one request at least), with
        a heartbeat between calls when one is due: a large batch of a slow model must not look
        like a hung worker, and early answers leave before the last call finishes."""
        chunk: list[tuple[Job, Request, RecommendArgs]] = []
        users = 0
        for item in batch:
            if chunk and users + len(item[2].users) > self.engine.users_per_call:
                self._run_recommend_batch(chunk)
                self.heartbeat_if_due()
                chunk, users = [], 0
            chunk.append(item)
            users += len(item[2].users)
        if chunk:
            self._run_recommend_batch(chunk)

    def _run_recommend_batch(self, batch: list[tuple[Job, Request, RecommendArgs]]) -> None:
        queries = [
            RecommendQuery(user, args.n, args.filter_consumed, self._excluded(user, args))
            for _, _, args in batch
            for user in args.users
        ]
        try:
            recommendations = self.engine.recommend_batch(queries)
        except Exception as exc:
            log.exception("recommend_failed", model=self.engine.name, users=len(queries))
            for job, request, _ in batch:
                self.reply_error(job, request.id, ErrorCode.INTERNAL, f"recommend failed: {exc}")
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
            self.reply(job, protocol.encode_ok(request.id, result))

    def _excluded(self, user: Id, args: RecommendArgs) -> frozenset[Id]:
        """The request's exclusions, plus what the user consumed since the model's export."""
        if self.recent is None or not args.filter_consumed:
            return args.exclude
        recent = self.recent.items_of(user)
        return args.exclude | recent if recent else args.exclude

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
            log.exception("request_failed", model=self.engine.name, op=request.op)
            self.reply_error(job, request.id, ErrorCode.INTERNAL, f"{request.op} failed: {exc}")
        else:
            self.reply(job, protocol.encode_ok(request.id, result))
