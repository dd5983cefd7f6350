"""Migrations, the CockroachDB compatibility rules, transaction retries and the lease row."""

from __future__ import annotations

import ast
import asyncio
import re
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.db_fixtures import empty_database, with_database  # noqa: F401
from uro_recs.core.db import (
    SCHEMA_MIGRATIONS_DDL,
    Database,
    Lease,
    LeaseHeld,
    LeaseLost,
    Migration,
    MigrationError,
    load_migrations,
    migrate,
    split_statements,
)

if TYPE_CHECKING:
    from uro_recs.core.db import Connection

ROOT = Path(__file__).resolve().parent.parent
SQL_FOLDERS = (ROOT / "core", ROOT / "pipeline", ROOT / "worker")  # all that talks to the database
# What CockroachDB does not run (docs/COCKROACHDB.md), as patterns over upper-cased SQL.
FORBIDDEN = {
    "SERIAL types": r"\b(SMALL|BIG)?SERIAL\b",
    "sequences": r"\bSEQUENCE\b|\bNEXTVAL\b",
    "enum types": r"\bCREATE\s+TYPE\b|\bENUM\b",
    "LISTEN/NOTIFY": r"\b(UN)?LISTEN\b|\bNOTIFY\b|PG_NOTIFY",
    "advisory locks": r"PG_(TRY_)?ADVISORY",
    "cursors": r"\bDECLARE\b|\bCURSOR\b|\bFETCH\s+(NEXT|FORWARD|ALL|\d)",
    "triggers": r"\bTRIGGER\b",
    "PL/pgSQL and functions": (
        r"PLPGSQL|\bLANGUAGE\b|\bCREATE\s+(OR\s+REPLACE\s+)?FUNCTION\b|\bDO\s+\$"
    ),
    "OFFSET pagination": r"\bOFFSET\b",
}
ALLOWED_COLUMN_TYPES = {"INT8", "INT4", "UUID", "FLOAT8", "TEXT", "TIMESTAMPTZ", "JSONB", "BOOL"}


def sdk_sql_literals() -> list[str]:
    """The SQL in the Python of core, the pipeline and the workers: every string literal
    (f-string parts joined) that starts like a statement."""
    found = []
    for path in sorted(p for folder in SQL_FOLDERS for p in folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = node.value
            elif isinstance(node, ast.JoinedStr):
                text = "".join(
                    str(part.value) if isinstance(part, ast.Constant) else " X "
                    for part in node.values
                )
            else:
                continue
            head = text.strip().split(" ", 1)[0].upper()
            if head in {"SELECT", "INSERT", "UPDATE", "DELETE", "CREATE", "WITH", "UPSERT"}:
                found.append(text)
    return found


def all_sql() -> list[tuple[str, str]]:
    named = [
        (f"migration {m.version}: {s[:40]}", s) for m in load_migrations() for s in m.statements()
    ]
    named.append(("schema_migrations DDL", SCHEMA_MIGRATIONS_DDL))
    named += [(f"sdk: {s.strip()[:60]}", s) for s in sdk_sql_literals()]
    return named


def test_sdk_sql_is_found_by_the_scan() -> None:
    literals = sdk_sql_literals()
    assert any("recs_recommendation_pointer" in s for s in literals)
    assert any("backpack_join" in s for s in literals)
    assert any("inserted_at" in s for s in literals)  # worker/recent_events.py
    assert len(literals) > 20


@pytest.mark.parametrize("construct", sorted(FORBIDDEN))
def test_no_sql_uses_what_cockroachdb_lacks(construct: str) -> None:
    pattern = re.compile(FORBIDDEN[construct])
    offenders = [name for name, sql in all_sql() if pattern.search(sql.upper())]
    assert offenders == []


def test_migrations_name_explicit_types_for_every_column() -> None:
    for migration in load_migrations():
        for statement in migration.statements():
            if not statement.upper().startswith("CREATE TABLE"):
                continue
            body = statement[statement.index("(") + 1 : statement.rindex(")")]
            for line in body.splitlines():
                words = line.strip().rstrip(",").split()
                if not words or words[0].upper() in {"CONSTRAINT", "PRIMARY", "CHECK", "STATUS"}:
                    continue
                if words[0].startswith("'") or words[0].startswith(")"):
                    continue
                assert words[1] in ALLOWED_COLUMN_TYPES, f"{migration.name}: {line.strip()}"


def test_migration_statements_are_idempotent_and_split_at_line_ends() -> None:
    for migration in load_migrations():
        for statement in migration.statements():
            upper = statement.upper()
            assert "IF NOT EXISTS" in upper or upper.startswith("CREATE OR REPLACE VIEW"), statement
    assert split_statements("-- c\nSELECT 1;\nSELECT\n  2; -- x\n") == ["SELECT 1", "SELECT\n  2"]


def test_migrate_applies_everything_once_then_nothing(empty_database: str) -> None:  # noqa: F811
    async def twice(db: Database) -> tuple[list[str], list[str], set[str]]:
        first = await migrate(db)
        second = await migrate(db)
        rows = await db.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_name LIKE 'recs_%'"
        )
        return first.applied, second.applied, {r["table_name"] for r in rows}

    first, second, tables = with_database(empty_database, twice)
    assert first == ["0001_recs_tables", "0002_recs_events_inserted_at", "0003_recs_cold_start"]
    assert second == []
    assert {
        "recs_events",
        "recs_model_versions",
        "recs_user_recommendations",
        "recs_recommendation_generations",
        "recs_recommendation_pointer",
        "recs_live_user_recommendations",
        "recs_leases",
        "recs_schema_migrations",
    } <= tables


def test_a_migration_edited_after_it_was_applied_is_refused(empty_database: str) -> None:  # noqa: F811
    async def edited(db: Database) -> None:
        await migrate(db)
        original = load_migrations()[0]
        await migrate(db, [Migration(original.version, original.name, original.sql + "\n")])

    with pytest.raises(MigrationError, match="changed after it was applied"):
        with_database(empty_database, edited)


def test_conflicting_transactions_are_retried_until_every_one_commits(
    empty_database: str,  # noqa: F811
) -> None:
    async def contend(db: Database) -> tuple[int, int]:
        await db.execute("CREATE TABLE counter (id INT4 PRIMARY KEY, n INT8 NOT NULL)")
        await db.execute("INSERT INTO counter (id, n) VALUES (1, 0)")

        async def bump(conn: Connection) -> None:
            n = await conn.fetchval("SELECT n FROM counter WHERE id = 1")
            await asyncio.sleep(0.01)  # the others read the same n meanwhile
            await conn.execute("UPDATE counter SET n = $1 WHERE id = 1", n + 1)

        await asyncio.gather(*(db.transaction(bump, "bump") for _ in range(8)))
        return int(await db.fetchval("SELECT n FROM counter WHERE id = 1")), db.retries.conflicts

    total, conflicts = with_database(empty_database, contend)
    assert total == 8
    assert conflicts > 0


def test_a_lease_admits_one_holder_and_fences_a_holder_that_lost_it(
    empty_database: str,  # noqa: F811
) -> None:
    async def leases(db: Database) -> None:
        await migrate(db)
        first = Lease(db, "sync:x", ttl_s=30)
        await first.acquire()
        with pytest.raises(LeaseHeld):
            await Lease(db, "sync:x", ttl_s=30).acquire()
        await Lease(db, "sync:other", ttl_s=30).release()  # releasing nothing is harmless
        # An expired lease is free for the taking; its old holder can no longer write.
        await db.execute("UPDATE recs_leases SET expires_at = now() - INTERVAL '1 second'")
        second = Lease(db, "sync:x", ttl_s=30)
        await second.acquire()

        async def write(conn: Connection) -> None:
            await first.verify(conn)

        with pytest.raises(LeaseLost):
            await db.transaction(write, "fenced")
        await second.release()
        await first.release()

    with_database(empty_database, leases)


def test_a_lease_left_by_a_dead_process_on_this_host_is_taken_over_at_once(
    empty_database: str,  # noqa: F811
) -> None:
    async def takeover(db: Database) -> str:
        await migrate(db)
        dead = f"{socket.gethostname()}:{2**22 + 12345}:deadbeef"  # above pid_max: never alive
        await db.execute(
            "INSERT INTO recs_leases (name, holder, expires_at)"
            " VALUES ('sync:y', $1, now() + INTERVAL '1 hour')",
            dead,
        )
        elsewhere = "another-host:1:cafe"
        await db.execute(
            "INSERT INTO recs_leases (name, holder, expires_at)"
            " VALUES ('sync:z', $1, now() + INTERVAL '1 hour')",
            elsewhere,
        )
        async with Lease(db, "sync:y", ttl_s=30) as lease:
            holder = lease.holder
        with pytest.raises(LeaseHeld, match="another-host"):
            await Lease(db, "sync:z", ttl_s=30).acquire()
        return holder

    assert with_database(empty_database, takeover).startswith(socket.gethostname())


FORBIDDEN_EXAMPLES = {
    "SERIAL types": "CREATE TABLE t (id BIGSERIAL PRIMARY KEY)",
    "sequences": "SELECT nextval('s')",
    "enum types": "CREATE TYPE mood AS ENUM ('ok')",
    "LISTEN/NOTIFY": "NOTIFY recs, 'new'",
    "advisory locks": "SELECT pg_advisory_lock(1)",
    "cursors": "DECLARE c CURSOR FOR SELECT 1",
    "triggers": "CREATE TRIGGER t AFTER INSERT ON x EXECUTE FUNCTION f()",
    "PL/pgSQL and functions": "CREATE FUNCTION f() RETURNS INT8 LANGUAGE plpgsql AS $$ $$",
    "OFFSET pagination": "SELECT id FROM avatars ORDER BY id LIMIT 10 OFFSET 20",
}


@pytest.mark.parametrize("construct", sorted(FORBIDDEN))
def test_the_scan_catches_each_forbidden_construct(construct: str) -> None:
    assert re.search(FORBIDDEN[construct], FORBIDDEN_EXAMPLES[construct].upper())
