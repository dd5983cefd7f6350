"""uro's database for the sync path: asyncpg, SERIALIZABLE, whole-transaction retries.

The same code runs against CockroachDB and PostgreSQL (one wire protocol); `Database.flavor`
says which one answered. Transaction functions passed to `Database.transaction` must be
idempotent: they run again after a serialization failure (SQLSTATE 40001) or a lost
connection, including one lost while COMMIT was in flight, when nobody knows whether the
first attempt committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from importlib import resources
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias, TypeVar

import asyncpg
import structlog

from uro_recs.core.config import DatabaseConfig

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Connection: TypeAlias = PoolConnectionProxy[asyncpg.Record]

log = structlog.get_logger(__name__)

T = TypeVar("T")
Flavor: TypeAlias = Literal["cockroachdb", "postgresql"]

# Serialization failure, deadlock (PostgreSQL only), statement completion unknown (CockroachDB).
CONFLICT_SQLSTATES: Final = frozenset({"40001", "40P01", "40003"})
# Admin, crash and startup shutdown; class 08 is "connection exception".
CONNECTION_SQLSTATES: Final = frozenset({"57P01", "57P02", "57P03"})
SCHEMA_MIGRATIONS_DDL: Final = """
CREATE TABLE IF NOT EXISTS recs_schema_migrations (
    version INT8 NOT NULL,
    name TEXT NOT NULL,
    checksum TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT recs_schema_migrations_pkey PRIMARY KEY (version)
)"""


class DatabaseError(Exception):
    """The database could not do what was asked, retries included."""


class MigrationError(DatabaseError):
    pass


def retry_reason(exc: BaseException) -> str | None:
    """'conflict' or 'connection' when running the whole transaction again may succeed."""
    if isinstance(exc, asyncpg.PostgresError):
        state = str(exc.sqlstate or "")
        if state in CONFLICT_SQLSTATES:
            return "conflict"
        if state.startswith("08") or state in CONNECTION_SQLSTATES:
            return "connection"
        return None
    if isinstance(exc, OSError | TimeoutError):  # refused, reset, connect timeout
        return "connection"
    return None


@dataclass
class RetryStats:
    conflicts: int = 0
    connection_losses: int = 0
    by_transaction: dict[str, int] = field(default_factory=dict)


class Database:
    """A connection pool with retries. Create it with `await Database.connect(config)`."""

    def __init__(
        self, pool: asyncpg.Pool[asyncpg.Record], config: DatabaseConfig, flavor: Flavor
    ) -> None:
        self.pool = pool
        self.config = config
        self.flavor: Flavor = flavor
        self.retries = RetryStats()

    @classmethod
    async def connect(cls, config: DatabaseConfig) -> Database:
        pool = await asyncpg.create_pool(
            config.url,
            min_size=0,  # connect lazily, so a database still starting is retried below
            max_size=config.pool_size,
            timeout=config.connect_timeout_s,
            server_settings={
                "application_name": "uro-recs",
                "default_transaction_isolation": "serializable",
            },
        )
        database = cls(pool, config, "postgresql")
        try:
            version = await database.fetchval("SELECT version()")
        except BaseException:
            await pool.close()
            raise
        database.flavor = "cockroachdb" if "cockroachdb" in str(version).lower() else "postgresql"
        log.info("database_connected", flavor=database.flavor, server=str(version)[:80])
        return database

    async def close(self) -> None:
        await self.pool.close()

    async def __aenter__(self) -> Database:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def transaction(self, fn: Callable[[Connection], Awaitable[T]], name: str) -> T:
        """Run `fn` in a SERIALIZABLE transaction; run all of it again on a conflict or a
        lost connection, with capped exponential backoff, up to `retry_attempts` times."""

        async def attempt() -> T:
            async with self.pool.acquire() as conn, conn.transaction(isolation="serializable"):
                return await fn(conn)

        return await self._with_retries(attempt, name)

    async def fetch(self, query: str, *args: object) -> list[asyncpg.Record]:
        """One read-only statement on its own (an implicit transaction), retried."""

        async def attempt() -> list[asyncpg.Record]:
            async with self.pool.acquire() as conn:
                return await conn.fetch(query, *args)

        return await self._with_retries(attempt, "fetch")

    async def fetchval(self, query: str, *args: object) -> Any:
        rows = await self.fetch(query, *args)
        return rows[0][0] if rows else None

    async def execute(self, statement: str, *args: object) -> str:
        """One idempotent statement on its own (an implicit transaction), retried."""

        async def attempt() -> str:
            async with self.pool.acquire() as conn:
                return await conn.execute(statement, *args)

        return await self._with_retries(attempt, "execute")

    async def _with_retries(self, attempt: Callable[[], Awaitable[T]], name: str) -> T:
        for number in range(1, self.config.retry_attempts + 1):
            try:
                return await attempt()
            except Exception as exc:
                reason = retry_reason(exc)
                if reason is None:
                    raise
                if number == self.config.retry_attempts:
                    raise DatabaseError(
                        f"{name}: gave up after {number} attempts: {type(exc).__name__}: {exc}"
                    ) from exc
                if reason == "conflict":
                    self.retries.conflicts += 1
                else:
                    self.retries.connection_losses += 1
                self.retries.by_transaction[name] = self.retries.by_transaction.get(name, 0) + 1
                delay = self._backoff(number)
                log.info(
                    "transaction_retried",
                    transaction=name,
                    attempt=number,
                    reason=reason,
                    sqlstate=getattr(exc, "sqlstate", None),
                    delay_s=round(delay, 3),
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int) -> float:
        """Half fixed, half random, so retrying writers spread out but never spin."""
        growing = self.config.retry_base_delay_s * (1 << attempt)
        ceiling = min(self.config.retry_max_delay_s, growing)
        return ceiling / 2 + random.uniform(0, ceiling / 2)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    def statements(self) -> list[str]:
        return split_statements(self.sql)


def load_migrations() -> list[Migration]:
    """The SQL migrations shipped in the package, oldest first (`NNNN_name.sql`)."""
    found = []
    for entry in resources.files("uro_recs.core.migrations").iterdir():
        if not entry.name.endswith(".sql"):
            continue
        number, _, rest = entry.name.partition("_")
        if not number.isdigit() or not rest:
            raise MigrationError(f"migration file {entry.name!r} is not named NNNN_name.sql")
        found.append(Migration(int(number), rest.removesuffix(".sql"), entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    if len({m.version for m in found}) != len(found):
        raise MigrationError("two migration files share a number")
    return found


def split_statements(sql: str) -> list[str]:
    """Statements of a migration file: `--` comments dropped, split at a `;` ending a line.

    Migrations keep semicolons out of string literals, so this needs no SQL parser.
    """
    lines = [line.split("--", 1)[0].rstrip() for line in sql.splitlines()]
    statements, current = [], []
    for line in lines:
        if not line:
            continue
        current.append(line)
        if line.endswith(";"):
            statements.append("\n".join(current).removesuffix(";").strip())
            current = []
    if current:
        raise MigrationError(f"statement without a closing ';': {current[0]!r}")
    return statements


@dataclass(frozen=True)
class MigrationReport:
    applied: list[str]
    already: list[str]
    seconds: float


async def migrate(
    database: Database, migrations: Sequence[Migration] | None = None
) -> MigrationReport:
    """Apply the migrations not yet recorded in `recs_schema_migrations`.

    Each statement is idempotent and runs on its own; a migration is recorded once all of its
    statements have run, so an interrupted run is finished by the next one. A recorded
    migration whose file has changed since is an error, not something to paper over.
    """
    started = time.perf_counter()
    chosen = list(migrations) if migrations is not None else load_migrations()
    await database.execute(SCHEMA_MIGRATIONS_DDL)
    rows = await database.fetch("SELECT version, name, checksum FROM recs_schema_migrations")
    recorded = {int(row["version"]): (str(row["name"]), str(row["checksum"])) for row in rows}
    applied, already = [], []
    for migration in chosen:
        label = f"{migration.version:04d}_{migration.name}"
        if migration.version in recorded:
            if recorded[migration.version][1] != migration.checksum:
                raise MigrationError(f"migration {label} changed after it was applied")
            already.append(label)
            continue
        for statement in migration.statements():
            await database.execute(statement)

        async def record(conn: Connection, migration: Migration = migration) -> None:
            await conn.execute(
                "INSERT INTO recs_schema_migrations (version, name, checksum) VALUES ($1, $2, $3)"
                " ON CONFLICT (version) DO NOTHING",
                migration.version,
                migration.name,
                migration.checksum,
            )

        await database.transaction(record, "record_migration")
        applied.append(label)
        log.info("migration_applied", migration=label)
    return MigrationReport(applied, already, time.perf_counter() - started)


class LeaseHeld(DatabaseError):
    """Someone else holds the lease (another sync is running)."""

    def __init__(self, name: str, holder: str) -> None:
        super().__init__(f"lease {name!r} is held by {holder}")
        self.holder = holder


class LeaseLost(DatabaseError):
    """This process no longer holds its lease: it expired or was taken over."""


_ACTIVE_HOLDERS: set[str] = set()  # leases held by Lease objects of this process


class Lease:
    """ "Only one at a time" without advisory locks: a row in `recs_leases` with an expiry.

    The holder renews it every third of `ttl_s` while it works. A lease whose holder stopped
    renewing is free once it expires; one held by a dead process on this host is taken over
    at once. Writes that must come from the holder check it in their own transaction
    (`verify`), so a holder that lost its lease cannot publish.
    """

    def __init__(self, db: Database, name: str, ttl_s: float) -> None:
        self.db = db
        self.name = name
        self.ttl = timedelta(seconds=ttl_s)
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._renewer: asyncio.Task[None] | None = None
        self._lost: BaseException | None = None

    async def acquire(self) -> None:
        current = await self._try_acquire(steal="")
        if current != self.holder and _is_stale(current):
            log.info("lease_taken_over", lease=self.name, stale_holder=current)
            current = await self._try_acquire(steal=current)
        if current != self.holder:
            raise LeaseHeld(self.name, current)
        _ACTIVE_HOLDERS.add(self.holder)
        self._renewer = asyncio.create_task(self._renew_forever())
        log.info("lease_acquired", lease=self.name, holder=self.holder)

    async def verify(self, conn: Connection) -> None:
        """Inside a write transaction: fail it unless this process still holds the lease."""
        holder = await conn.fetchval(
            "SELECT holder FROM recs_leases WHERE name = $1 AND expires_at > now()", self.name
        )
        if holder != self.holder:
            raise LeaseLost(f"lease {self.name!r} is no longer held by {self.holder}")

    def check(self) -> None:
        if self._lost is not None:
            raise LeaseLost(f"lease {self.name!r} could not be renewed") from self._lost

    async def release(self) -> None:
        _ACTIVE_HOLDERS.discard(self.holder)
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        await self.db.execute(
            "DELETE FROM recs_leases WHERE name = $1 AND holder = $2", self.name, self.holder
        )
        log.info("lease_released", lease=self.name)

    async def __aenter__(self) -> Lease:
        await self.acquire()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        try:
            await self.release()
        except (DatabaseError, OSError) as exc:  # it expires on its own
            log.warning("lease_release_failed", lease=self.name, error=str(exc))

    async def _try_acquire(self, steal: str) -> str:
        async def attempt(conn: Connection) -> str:
            await conn.execute(
                """
                INSERT INTO recs_leases (name, holder, acquired_at, expires_at)
                VALUES ($1, $2, now(), now() + $3::INTERVAL)
                ON CONFLICT (name) DO UPDATE
                SET holder = excluded.holder, acquired_at = excluded.acquired_at,
                    expires_at = excluded.expires_at
                WHERE recs_leases.expires_at <= now() OR recs_leases.holder = $4
                """,
                self.name,
                self.holder,
                self.ttl,
                steal or self.holder,
            )
            holder = await conn.fetchval(
                "SELECT holder FROM recs_leases WHERE name = $1", self.name
            )
            return str(holder)

        return await self.db.transaction(attempt, "acquire_lease")

    async def _renew_forever(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.ttl.total_seconds() / 3)

                async def renew(conn: Connection) -> str:
                    return await conn.execute(
                        "UPDATE recs_leases SET expires_at = now() + $3::INTERVAL"
                        " WHERE name = $1 AND holder = $2",
                        self.name,
                        self.holder,
                        self.ttl,
                    )

                if await self.db.transaction(renew, "renew_lease") != "UPDATE 1":
                    raise LeaseLost(f"lease {self.name!r} was taken over")
        except (DatabaseError, LeaseLost, OSError) as exc:
            self._lost = exc
            log.error("lease_lost", lease=self.name, error=str(exc))


def _is_stale(holder: str) -> bool:
    """A holder on this host whose process is gone, or a Lease of ours no longer active."""
    host, _, rest = holder.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return holder not in _ACTIVE_HOLDERS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
