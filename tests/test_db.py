"""Migrations, and the database constraints that are the last line of defence."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
import pytest

from tests.harness import base_settings, with_database
from waitroom.core import db as db_module
from waitroom.core.db import create_pool, drop_database, ensure_database, migrate, migrations
from waitroom.core.settings import Settings

pytestmark = pytest.mark.anyio


@pytest.fixture
async def empty_dsn() -> AsyncIterator[str]:
    dsn = with_database(base_settings().database_url, f"waitroom_mig_{uuid.uuid4().hex[:8]}")
    await ensure_database(dsn)
    try:
        yield dsn
    finally:
        await drop_database(dsn)


async def test_migrating_twice_applies_each_migration_once(empty_dsn: str) -> None:
    first = await migrate(empty_dsn)
    second = await migrate(empty_dsn)
    assert first == [m.version for m in migrations()]
    assert second == []
    conn = await asyncpg.connect(empty_dsn)
    try:
        rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
    finally:
        await conn.close()
    assert [r["version"] for r in rows] == first


async def test_concurrent_migrations_are_safe(empty_dsn: str) -> None:
    results = await asyncio.gather(*(migrate(empty_dsn) for _ in range(4)))
    applied = sorted(v for result in results for v in result)
    assert applied == [m.version for m in migrations()]


async def test_ensure_database_is_idempotent(empty_dsn: str) -> None:
    assert await ensure_database(empty_dsn) is False


@dataclass
class Db:
    """A connection to the run's database and an event with 3 'ga' tickets."""

    conn: asyncpg.Connection[Any]
    event_id: str

    async def execute(self, sql: str, *args: Any) -> str:
        return await self.conn.execute(sql, *args)


@pytest.fixture
async def conn(settings: Settings) -> AsyncIterator[Db]:
    connection: asyncpg.Connection[Any] = await asyncpg.connect(settings.database_url)
    event_id = f"db-{uuid.uuid4().hex[:8]}"
    await connection.execute("INSERT INTO events (id, name) VALUES ($1, 'constraints')", event_id)
    await connection.execute(
        "INSERT INTO ticket_types (event_id, name, quantity, price_minor, currency, per_fan_limit)"
        " VALUES ($1, 'ga', 3, 100, 'EUR', 4)",
        event_id,
    )
    try:
        yield Db(connection, event_id)
    finally:
        await connection.close()


async def _insert_holds(conn: Db, count: int, status: str = "held") -> None:
    event_id = conn.event_id
    await conn.conn.executemany(
        "INSERT INTO holds (id, event_id, ticket_type, fan_id, quantity, status, expires_at)"
        " VALUES ($1, $2, 'ga', $3, 1, $4, now() + interval '5 minutes')",
        [(uuid.uuid4(), event_id, f"fan{i}", status) for i in range(count)],
    )


async def _counts(conn: Db) -> tuple[int, int]:
    row = await conn.conn.fetchrow(
        "SELECT held, sold FROM ticket_types WHERE event_id = $1",
        conn.event_id,
    )
    assert row is not None
    return row["held"], row["sold"]


async def test_held_and_sold_follow_the_holds(conn: Db) -> None:
    await _insert_holds(conn, 2)
    assert await _counts(conn) == (2, 0)
    await conn.execute(
        "UPDATE holds SET status = 'paid' WHERE fan_id = 'fan0' AND event_id = $1",
        conn.event_id,
    )
    assert await _counts(conn) == (1, 1)
    await conn.execute(
        "UPDATE holds SET status = 'expired' WHERE fan_id = 'fan1' AND event_id = $1",
        conn.event_id,
    )
    assert await _counts(conn) == (0, 1)


async def test_an_oversell_written_behind_the_actors_back_is_rejected(
    conn: Db,
) -> None:
    await _insert_holds(conn, 3)
    with pytest.raises(asyncpg.CheckViolationError, match="no_oversell"):
        await _insert_holds(conn, 1)
    with pytest.raises(asyncpg.CheckViolationError, match="no_oversell"):
        await _insert_holds(conn, 1, status="paid")
    assert await _counts(conn) == (3, 0)


async def test_a_hold_of_an_unknown_ticket_type_is_rejected_with_its_whole_statement(
    conn: Db,
) -> None:
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="unknown ticket type"):
        await _copy_holds(conn, ["ga", "ga", "vip"])
    assert await _counts(conn) == (0, 0)
    assert (
        await conn.conn.fetchval("SELECT count(*) FROM holds WHERE event_id = $1", conn.event_id)
        == 0
    )


async def test_a_group_commit_that_would_oversell_is_rejected_whole(conn: Db) -> None:
    with pytest.raises(asyncpg.CheckViolationError, match="no_oversell"):
        await _copy_holds(conn, ["ga"] * 4)
    assert await _counts(conn) == (0, 0)


async def _copy_holds(conn: Db, ticket_types: list[str]) -> None:
    """One held ticket per entry, all in one COPY: one statement, as a group commit writes."""
    soon = datetime.now(UTC) + timedelta(minutes=5)
    await conn.conn.copy_records_to_table(
        "holds",
        records=[
            (uuid.uuid4(), conn.event_id, ticket_type, f"fan{i}", 1, "held", soon)
            for i, ticket_type in enumerate(ticket_types)
        ],
        columns=("id", "event_id", "ticket_type", "fan_id", "quantity", "status", "expires_at"),
    )


async def test_a_final_hold_cannot_come_back(conn: Db) -> None:
    await _insert_holds(conn, 1, status="paid")
    with pytest.raises(asyncpg.CheckViolationError, match="cannot move from paid"):
        await conn.execute(
            "UPDATE holds SET status = 'held' WHERE event_id = $1",
            conn.event_id,
        )


@pytest.mark.parametrize(
    ("sql", "error"),
    [
        (
            "INSERT INTO ticket_types (event_id, name, quantity, price_minor, currency,"
            " per_fan_limit) VALUES ($1, 'neg', -1, 100, 'EUR', 1)",
            asyncpg.CheckViolationError,
        ),
        (
            "INSERT INTO ticket_types (event_id, name, quantity, price_minor, currency,"
            " per_fan_limit) VALUES ($1, 'cur', 1, 100, 'euro', 1)",
            asyncpg.StringDataRightTruncationError,
        ),
        (
            "INSERT INTO holds (id, event_id, ticket_type, fan_id, quantity, status, expires_at)"
            " VALUES (gen_random_uuid(), $1, 'ga', 'f', 0, 'held', now())",
            asyncpg.CheckViolationError,
        ),
        (
            "INSERT INTO holds (id, event_id, ticket_type, fan_id, quantity, status, expires_at)"
            " VALUES (gen_random_uuid(), $1, 'ga', 'f', 1, 'stolen', now())",
            asyncpg.CheckViolationError,
        ),
    ],
)
async def test_the_schema_rejects_impossible_rows(
    conn: Db, sql: str, error: type[Exception]
) -> None:
    with pytest.raises(error):
        await conn.execute(sql, conn.event_id)


async def test_ticket_codes_are_unique(conn: Db) -> None:
    event_id = conn.event_id
    hold_id, order_id = uuid.uuid4(), uuid.uuid4()
    await conn.execute(
        "INSERT INTO holds (id, event_id, ticket_type, fan_id, quantity, status, expires_at)"
        " VALUES ($1, $2, 'ga', 'f', 1, 'paid', now())",
        hold_id,
        event_id,
    )
    await conn.execute(
        "INSERT INTO orders (id, hold_id, event_id, fan_id, amount_minor, currency, status)"
        " VALUES ($1, $2, $3, 'f', 100, 'EUR', 'paid')",
        order_id,
        hold_id,
        event_id,
    )
    insert = (
        "INSERT INTO tickets (id, order_id, event_id, ticket_type, fan_id, code)"
        " VALUES (gen_random_uuid(), $1, $2, 'ga', 'f', 'SAMECODE-0123456789')"
    )
    await conn.execute(insert, order_id, event_id)
    with pytest.raises(asyncpg.UniqueViolationError):
        await conn.execute(insert, order_id, event_id)


async def test_a_pooled_connection_goes_back_without_a_reset_but_never_mid_transaction(
    empty_dsn: str,
) -> None:
    """The pool gives a connection back without asyncpg's reset statement (a round trip per
    checkout; waitroom keeps no session state), but a transaction left open is rolled back."""
    settings = msgspec.structs.replace(base_settings(), database_url=empty_dsn, db_pool_max=1)
    pool = await create_pool(settings)
    try:
        async with pool.acquire() as conn:
            await conn.execute("SET application_name = 'lean-release'")
            await conn.execute("CREATE TABLE probe (n int)")
            await conn.execute("BEGIN")
            await conn.execute("INSERT INTO probe VALUES (1)")
        async with pool.acquire() as conn:  # the same one: the pool holds one
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT count(*) FROM probe") == 0
            assert await conn.fetchval("SHOW application_name") == "lean-release"
    finally:
        await pool.close()


async def _backends(dsn: str, name: str) -> int:
    """PostgreSQL's sessions with ``application_name`` ``name`` (this one's is not)."""
    conn = await asyncpg.connect(dsn)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", name
        )
        return count
    finally:
        await conn.close()


async def _until(check: Any, seconds: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "not within the time"
        await asyncio.sleep(0.05)


async def test_the_pools_floor_is_opened_in_the_background_and_again_when_lost(
    empty_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``WAITROOM_DB_POOL_MIN`` connections open without a request (a sale's rush finds
    them ready), and open again after PostgreSQL lost them."""
    monkeypatch.setattr(db_module, "FLOOR_CHECK_S", 0.1)
    name = f"floor-{uuid.uuid4().hex[:8]}"
    dsn = f"{empty_dsn}?application_name={name}"
    settings = msgspec.structs.replace(
        base_settings(), database_url=dsn, db_pool_min=2, db_pool_max=5
    )
    pool = await create_pool(settings)
    try:
        await _until(lambda: _count_is(empty_dsn, name, 2))
        # Lost (an administrator, a restart): opened again.
        killer = await asyncpg.connect(empty_dsn)
        try:
            await killer.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = $1",
                name,
            )
        finally:
            await killer.close()
        await _until(lambda: _count_is(empty_dsn, name, 2))
    finally:
        await pool.close()
    await _until(lambda: _count_is(empty_dsn, name, 0))


async def test_idle_connections_close_down_to_the_floor_never_below(empty_dsn: str) -> None:
    name = f"floor-{uuid.uuid4().hex[:8]}"
    pool = await db_module.BoundedPool(
        f"{empty_dsn}?application_name={name}",
        acquire_timeout=5.0,
        floor=2,
        min_size=0,
        max_size=5,
        max_inactive_connection_lifetime=0.2,
        max_queries=50_000,
        connect=None,
        setup=None,
        init=None,
        reset=None,
        loop=None,
        connection_class=asyncpg.Connection,
        record_class=asyncpg.Record,
    )
    try:
        held = await asyncio.gather(*(pool.acquire() for _ in range(5)))
        for conn in held:
            await pool.release(conn)
        assert await _backends(empty_dsn, name) == 5
        await _until(lambda: _count_is(empty_dsn, name, 2))
        await asyncio.sleep(0.6)
        assert await _backends(empty_dsn, name) == 2
    finally:
        await pool.close()


async def _count_is(dsn: str, name: str, n: int) -> bool:
    return await _backends(dsn, name) == n


async def test_a_pool_with_a_floor_starts_while_postgresql_is_down() -> None:
    """Starting never waits for the floor: the pool is there at once, and its floor is
    tried again in the background (no request needed PostgreSQL yet)."""
    settings = msgspec.structs.replace(
        base_settings(),
        database_url="postgresql://nobody@127.0.0.1:1/none",
        db_pool_min=2,
        dependency_timeout_s=0.5,
    )
    started = asyncio.get_running_loop().time()
    pool = await create_pool(settings)
    try:
        assert asyncio.get_running_loop().time() - started < 0.5
        await asyncio.sleep(0.3)
        assert pool.get_size() == 0
    finally:
        await pool.close()


async def test_closing_a_pool_while_its_floor_opens_never_hangs(empty_dsn: str) -> None:
    """close() cancels the floor's opening at any moment, and no connection is left
    checked out for it to wait on for ever (asyncpg's close waits for every one)."""
    settings = msgspec.structs.replace(
        base_settings(), database_url=empty_dsn, db_pool_min=3, db_pool_max=5
    )
    for i in range(40):
        pool = await create_pool(settings)
        await asyncio.sleep((i % 10) * 0.002)
        await asyncio.wait_for(pool.close(), 10)
