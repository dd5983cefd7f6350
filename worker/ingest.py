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
import threading
import time
from collections import deque
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import structlog
import zmq

from uro_recs import protocol
from uro_recs.config import BrokerConfig, DatabaseConfig, WorkerConfig
from uro_recs.protocol import ErrorCode, IngestArgs, IngestEvent, Op, RequestId
from uro_recs.sdk.db import Database, DatabaseError
from uro_recs.sdk.ingest import EventWriter
from uro_recs.worker.loop import Job, WorkerLoop

log = structlog.get_logger("uro_recs.worker.ingest")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
T = TypeVar("T")


def event_row(event: IngestEvent) -> tuple[Any, ...]:
    """The `recs_events` row of a validated wire event (the column order of EventWriter)."""
    occurred_at = _EPOCH + timedelta(microseconds=event.occurred_at_us)
    return event.user_id, event.item_kind, event.item_id, event.event, occurred_at, event.weight


class IngestWorker(WorkerLoop):
    def __init__(
        self,
        database: DatabaseConfig,
        endpoint: str,
        config: WorkerConfig,
        broker: BrokerConfig,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        super().__init__(protocol.INGEST_WORKERS, endpoint, config, broker, context)
        self.database = database
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._db: Database | None = None
        self._writer: EventWriter | None = None
        self._answers: deque[tuple[Job, bytes]] = deque()  # filled by the asyncio thread
        self._wake_pending = False  # asyncio thread only

    def connect(self) -> None:
        """Connect to the database (retried, like every statement) before registering."""
        self._thread.start()
        self._db = self._call(Database.connect(self.database))
        # No flush timer: a batch goes as soon as a write slot is free.
        self._writer = EventWriter(self._db, flush_interval_s=0)

    def close(self) -> None:
        if self._db is not None:
            self._call(self._db.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        super().close()

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def hello(self) -> protocol.WorkerHello:
        info = {"class": "EventWriter", "ops": [Op.INGEST.value]}
        return protocol.WorkerHello(self.name, "recs_events", self.config.slots, info)

    def execute(self, jobs: list[Job]) -> None:
        accepted: list[tuple[Job, RequestId, list[tuple[Any, ...]]]] = []
        for job in jobs:
            request = self.decode(job)
            if request is None:
                continue
            if not isinstance(request.args, IngestArgs):
                message = f"ingest workers answer ingest, not {request.op}"
                self.reply_error(job, request.id, ErrorCode.UNSUPPORTED, message)
                continue
            accepted.append((job, request.id, [event_row(e) for e in request.args.events]))
        if accepted:  # one hand-over to the asyncio thread per batch, not per request
            asyncio.run_coroutine_threadsafe(self._store_all(accepted), self._loop)

    async def _store_all(self, work: list[tuple[Job, RequestId, list[tuple[Any, ...]]]]) -> None:
        await asyncio.gather(*(self._store(*item) for item in work))

    async def _store(self, job: Job, request_id: RequestId, rows: list[tuple[Any, ...]]) -> None:
        assert self._writer is not None
        try:
            if time.monotonic() >= job.deadline:
                body = protocol.encode_error(
                    request_id, ErrorCode.DEADLINE_EXCEEDED, "deadline passed before it ran"
                )
            else:
                await self._writer.submit(rows)
                body = protocol.encode_ok(request_id, {"accepted": len(rows)})
        except DatabaseError as exc:
            body = protocol.encode_error(request_id, ErrorCode.UNAVAILABLE, str(exc))
        except Exception as exc:
            log.exception("ingest_failed", events=len(rows))
            body = protocol.encode_error(request_id, ErrorCode.INTERNAL, f"ingest failed: {exc}")
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
