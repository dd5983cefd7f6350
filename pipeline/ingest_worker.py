"""The ingest worker: answers the broker's `ingest` requests by appending to `recs_events`.

It registers under `protocol.INGEST_WORKERS`, so the broker's queue, deadlines, heartbeats
and redelivery serve events exactly as they serve models. The writes are asyncpg's, on an
asyncio loop in a second thread: each request's events go into one transaction (shared with
the requests that arrived meanwhile: group commit), and the request is answered only after
that transaction committed. A replayed or redelivered request inserts nothing new: the table's
primary key is the event's identity and every insert is ON CONFLICT DO NOTHING.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from datetime import UTC, datetime
from typing import Any

import structlog
import zmq

from uro_recs.core import protocol
from uro_recs.core.config import BrokerConfig, DatabaseConfig, WorkerConfig
from uro_recs.core.db import Database, DatabaseError
from uro_recs.core.protocol import ErrorCode, IngestArgs, Op, RequestId
from uro_recs.pipeline.ingest import EventWriter
from uro_recs.worker.async_thread import AsyncThread
from uro_recs.worker.loop import Job, WorkerLoop, one_line
from uro_recs.worker.metrics import WorkerMetrics

log = structlog.get_logger("uro_recs.pipeline.ingest_worker")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
Ingest = tuple[Job, RequestId, list[tuple[Any, ...]]]  # a job, its request id, its rows


class IngestWorker(WorkerLoop):
    def __init__(
        self,
        database: DatabaseConfig,
        endpoint: str,
        config: WorkerConfig,
        broker: BrokerConfig,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        super().__init__(protocol.INGEST_WORKERS, endpoint, config, broker, context)
        self.database = database
        self.metrics = metrics or WorkerMetrics(None, protocol.INGEST_WORKERS)
        self._async = AsyncThread("ingest-database")
        self._db: Database | None = None
        self._writer: EventWriter | None = None
        self._answers: deque[tuple[Job, bytes]] = deque()  # filled by the asyncio thread
        self._wake_pending = False  # asyncio thread only

    def connect(self) -> None:
        """Connect to the database (retried, like every statement) before registering."""
        self._async.start()
        self._db = self._async.call(Database.connect(self.database))
        # No flush timer: a batch goes as soon as a write slot is free.
        self._writer = EventWriter(self._db, flush_interval_s=0)

    def close(self) -> None:
        if self._db is not None:
            self._async.call(self._db.close())
        self._async.stop()
        super().close()

    def hello(self) -> protocol.WorkerHello:
        info = {"class": "EventWriter", "ops": [Op.INGEST.value]}
        return protocol.WorkerHello(
            self.name, "recs_events", self.config.slots, info, os.getpid(), self.config.slots
        )

    def execute(self, jobs: list[Job]) -> None:
        accepted: list[Ingest] = []
        for job in jobs:
            request = self.decode(job)
            if request is None:
                continue
            if not isinstance(request.args, IngestArgs):
                message = f"ingest workers answer ingest, not {request.op}"
                self.reply_error(job, request.id, ErrorCode.UNSUPPORTED, message)
                continue
            accepted.append((job, request.id, [e.row() for e in request.args.events]))
        if not accepted:
            return
        # One hand-over to the asyncio thread per batch, not per request. If it cannot be
        # handed over, the batch is answered here: no job may wait for an answer never sent.
        try:
            self._async.submit(self._store_all(accepted))
        except Exception as exc:
            log.exception("ingest_not_scheduled", requests=len(accepted))
            for job, request_id, _ in accepted:
                self.reply_error(job, request_id, ErrorCode.INTERNAL, f"ingest failed: {exc}")

    async def _store_all(self, work: list[Ingest]) -> None:
        """Answer each job exactly once: when its write ends, or with an INTERNAL error if it
        ends in a way `_store` did not foresee (an exception it let through, cancellation)."""
        unanswered = set(range(len(work)))
        failures: dict[int, BaseException] = {}

        async def store(index: int) -> None:
            job, request_id, rows = work[index]
            body = await self._store(job, request_id, rows)
            unanswered.discard(index)
            self._answer(job, body)

        try:
            outcomes = await asyncio.gather(
                *(store(i) for i in range(len(work))), return_exceptions=True
            )
            failures = {i: o for i, o in enumerate(outcomes) if isinstance(o, BaseException)}
        finally:
            for index in sorted(unanswered):
                job, request_id, rows = work[index]
                failure = failures.get(index)
                reason = one_line(failure) if failure is not None else "cancelled"
                log.error("ingest_failed_unexpectedly", events=len(rows), reason=reason)
                message = f"ingest failed: {reason}"
                self._answer(job, protocol.encode_error(request_id, ErrorCode.INTERNAL, message))

    async def _store(self, job: Job, request_id: RequestId, rows: list[tuple[Any, ...]]) -> bytes:
        """The reply body: committed, deadline passed, or why the write failed."""
        try:
            if time.monotonic() >= job.deadline:
                return protocol.encode_error(
                    request_id, ErrorCode.DEADLINE_EXCEEDED, "deadline passed before it ran"
                )
            if self._writer is None:
                raise RuntimeError("not connected to the database")
            await self._writer.submit(rows)
            self.metrics.ingested(len(rows))
            return protocol.encode_ok(request_id, {"accepted": len(rows)})
        except DatabaseError as exc:
            self.metrics.database_error()
            return protocol.encode_error(request_id, ErrorCode.UNAVAILABLE, str(exc))
        except Exception as exc:
            log.exception("ingest_failed", events=len(rows))
            message = f"ingest failed: {exc}"
            return protocol.encode_error(request_id, ErrorCode.INTERNAL, message)

    def _answer(self, job: Job, body: bytes) -> None:
        """From the asyncio thread: the loop sends it (zmq sockets are not thread-safe)."""
        self._answers.append((job, body))
        if not self._wake_pending:  # answers of one commit arrive together: wake once for all
            self._wake_pending = True
            asyncio.get_running_loop().call_soon(self._wake_loop)

    def _wake_loop(self) -> None:
        self._wake_pending = False
        self.wake()

    def after_wake(self) -> None:
        while self._answers:
            self.reply(*self._answers.popleft())
