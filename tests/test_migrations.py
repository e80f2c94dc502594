"""Migrations cannot drift: checksums recorded and checked, an old schema refused, a database of
the previous release upgraded in place, and migrations that must run outside a transaction."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest

from tests.harness import base_settings, run_cli, with_database
from waitroom.core.db import (
    NO_TRANSACTION,
    Migration,
    create_pool,
    drop_database,
    ensure_database,
    migrate,
    migrations,
    require_current_schema,
)
from waitroom.core.errors import SchemaError
from waitroom.core.settings import Settings

pytestmark = pytest.mark.anyio

RELEASE_0_1_0 = Path(__file__).parent / "fixtures" / "release_0_1_0"


@pytest.fixture
async def dsn() -> AsyncIterator[str]:
    """A new, empty database of its own."""
    url = with_database(base_settings().database_url, f"waitroom_mig_{secrets.token_hex(4)}")
    await ensure_database(url)
    try:
        yield url
    finally:
        await drop_database(url)


async def fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def build_release_0_1_0(dsn: str) -> None:
    """The database as release 0.1.0's ``waitroom migrate`` left it, with a sale in it."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for path in sorted(RELEASE_0_1_0.glob("0*.sql")):
            version, _, name = path.stem.partition("_")
            async with conn.transaction():
                await conn.execute(path.read_text())
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    int(version),
                    name,
                )
        await conn.execute((RELEASE_0_1_0 / "seed.sql").read_text())
    finally:
        await conn.close()


def settings_for(dsn: str, tmp_path: Path) -> Settings:
    return msgspec.structs.replace(base_settings(), database_url=dsn, run_dir=str(tmp_path))


async def test_migrate_records_the_sha256_of_every_file_it_applies(dsn: str) -> None:
    applied = await migrate(dsn)
    assert applied == [m.version for m in migrations()]
    rows = await fetch(dsn, "SELECT version, checksum FROM schema_migrations ORDER BY version")
    assert [(r["version"], r["checksum"]) for r in rows] == [
        (m.version, m.checksum) for m in migrations()
    ]
    assert await migrate(dsn) == []  # nothing left to do


async def test_a_migration_edited_after_it_was_applied_stops_migrate_and_serve(
    dsn: str, tmp_path: Path
) -> None:
    await migrate(dsn)
    edited = [
        Migration(m.version, m.name, m.sql + "\n-- edited\n") if m.version == 2 else m
        for m in migrations()
    ]
    with pytest.raises(SchemaError, match="migration 2 was changed after it was applied"):
        await migrate(dsn, shipped=edited)
    # As the files on disk were edited: the database remembers another checksum.
    await fetch(dsn, "UPDATE schema_migrations SET checksum = repeat('0', 64) WHERE version = 2")
    settings = settings_for(dsn, tmp_path)
    for command in (("migrate",), ("serve", "--port", "0"), ("workers",)):
        result = run_cli(settings, *command, timeout=30)
        assert result.returncode == 1, (command, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("waitroom: migration 2 was changed after it was applied")
        assert "Traceback" not in result.stderr


async def test_a_version_this_release_does_not_ship_is_refused(dsn: str) -> None:
    await migrate(dsn)
    await fetch(
        dsn, "INSERT INTO schema_migrations (version, name, checksum) VALUES (999, 'x', 'y')"
    )
    with pytest.raises(SchemaError, match="has migration 999, which this release does not ship"):
        await migrate(dsn)
    pool = await create_pool(settings_for(dsn, Path(".")))
    try:
        with pytest.raises(SchemaError, match="999"):
            await require_current_schema(pool)
    finally:
        await pool.close()


async def test_serve_and_workers_refuse_a_database_that_is_behind(dsn: str, tmp_path: Path) -> None:
    *older, _last = migrations()
    await migrate(dsn, shipped=older)
    settings = settings_for(dsn, tmp_path)
    pool = await create_pool(settings)
    try:
        with pytest.raises(SchemaError, match="behind this release"):
            await require_current_schema(pool)
    finally:
        await pool.close()
    for command in (("serve", "--port", "0"), ("workers",)):
        result = run_cli(settings, *command, timeout=30)
        assert result.returncode == 1, (command, result.stderr)
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("waitroom: the database schema is behind this release")
        assert "run `waitroom migrate`" in last
    # The CLI's one-shot commands still work (an operator can look at a live sale).
    assert run_cli(settings, "event", "list").returncode == 0
    assert run_cli(settings, "migrate").returncode == 0
    pool = await create_pool(settings)
    try:
        await require_current_schema(pool)
    finally:
        await pool.close()


async def test_migrate_names_the_files_it_applied_and_why_a_number_is_missing(
    dsn: str, tmp_path: Path
) -> None:
    result = run_cli(settings_for(dsn, tmp_path), "migrate")
    assert result.returncode == 0, result.stderr
    names = [f"{m.version:04d}_{m.name}" for m in migrations()]
    assert f"applied migrations: {', '.join(names)}" in result.stdout
    # 3 is the one number between the first and the last that no file has: said so, not lost.
    assert "no 0003: 0003_inventory was retired before the first release" in result.stdout
    again = run_cli(settings_for(dsn, tmp_path), "migrate")
    assert again.stdout.strip() == "schema is up to date"


async def test_a_database_of_the_previous_release_is_upgraded_with_its_data(dsn: str) -> None:
    await build_release_0_1_0(dsn)
    applied = await migrate(dsn)
    shipped = {m.version: m for m in migrations()}
    assert applied == sorted(set(shipped) - {1, 2, 4, 5})
    rows = await fetch(dsn, "SELECT version, checksum FROM schema_migrations ORDER BY version")
    assert {r["version"]: r["checksum"] for r in rows} == {
        v: m.checksum for v, m in shipped.items()
    }
    sold = await fetch(dsn, "SELECT held, sold FROM ticket_types WHERE event_id = 'legacy-sale'")
    assert [(r["held"], r["sold"]) for r in sold] == [(0, 2)]


async def test_a_no_transaction_migration_runs_statement_by_statement(dsn: str) -> None:
    concurrently = (
        f"{NO_TRANSACTION}\n"
        "-- CREATE INDEX CONCURRENTLY refuses to run inside a transaction block.\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS holds_fan_probe ON holds (fan_id);\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS orders_fan_probe ON orders (fan_id);\n"
    )
    extra = Migration(9001, "concurrent_indexes", concurrently)
    assert not extra.transactional and len(extra.statements()) == 2
    assert await migrate(dsn, shipped=[*migrations(), extra]) == [
        *(m.version for m in migrations()),
        9001,
    ]
    indexes = await fetch(
        dsn, "SELECT indexname FROM pg_indexes WHERE indexname LIKE '%_fan_probe' ORDER BY 1"
    )
    assert [r["indexname"] for r in indexes] == ["holds_fan_probe", "orders_fan_probe"]

    # The same statement in an ordinary migration fails: the marker is what makes it work.
    inside = Migration(9002, "inside", concurrently.removeprefix(NO_TRANSACTION))
    assert inside.transactional
    with pytest.raises(asyncpg.ActiveSQLTransactionError):
        await migrate(dsn, shipped=[*migrations(), extra, inside])


async def test_migrating_from_several_processes_at_once_applies_each_file_once(
    dsn: str,
) -> None:
    results = await asyncio.gather(*(migrate(dsn) for _ in range(4)))
    applied = sorted(v for r in results for v in r)
    assert applied == [m.version for m in migrations()]


async def test_several_processes_at_once_with_a_concurrent_index_do_not_deadlock(
    dsn: str,
) -> None:
    # A process blocked in pg_advisory_lock would hold a snapshot that CREATE INDEX
    # CONCURRENTLY (in the process holding the lock) waits for: the lock is polled instead.
    concurrently = Migration(
        9003,
        "concurrent_probe",
        f"{NO_TRANSACTION}\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS holds_probe_cic ON holds (fan_id);\n",
    )
    shipped = [*migrations(), concurrently]
    results = await asyncio.wait_for(
        asyncio.gather(*(migrate(dsn, shipped=shipped) for _ in range(4))), 60
    )
    assert sorted(v for r in results for v in r) == [m.version for m in shipped]


def test_migration_files_are_named_and_numbered_once() -> None:
    shipped = migrations()
    assert [m.version for m in shipped] == sorted({m.version for m in shipped})
    assert all(m.transactional or m.sql.startswith(NO_TRANSACTION) for m in shipped)


async def test_lottery_rooms_of_the_previous_release_keep_their_draw_or_get_a_salt(
    dsn: str,
) -> None:
    await build_release_0_1_0(dsn)
    seed = "11" * 32
    await fetch(
        dsn, "INSERT INTO events (id, name) VALUES ('lot-drawn', 'Drawn'), ('lot-open', 'Open')"
    )
    await fetch(
        dsn,
        "INSERT INTO room_lottery (event_id, seed, commitment, drawn_at, entries) VALUES"
        f" ('lot-drawn', '{seed}', '{'22' * 32}', now(), ARRAY['{'33' * 32}']),"
        f" ('lot-open', '{seed}', '{'22' * 32}', NULL, NULL)",
    )
    await migrate(dsn)
    rows = await fetch(
        dsn, "SELECT event_id, scheme, entry_salt FROM room_lottery ORDER BY event_id"
    )
    drawn, still_open = rows
    assert (drawn["event_id"], drawn["scheme"], drawn["entry_salt"]) == ("lot-drawn", 1, None)
    assert still_open["scheme"] == 2 and len(still_open["entry_salt"]) == 64
