"""Migration 0010 on a database that already took payments: the doubtful ones become due."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from tests.harness import base_settings, with_database
from waitroom.core.db import drop_database, ensure_database, migrate, migrations

pytestmark = pytest.mark.anyio

SEED = Path(__file__).parent.parent / "fixtures" / "release_0_1_0" / "seed.sql"
ORDER = "6f0a3c9e-0000-4000-8000-000000000002"


@pytest.fixture
async def dsn() -> AsyncIterator[str]:
    url = with_database(base_settings().database_url, f"waitroom_mig_{secrets.token_hex(4)}")
    await ensure_database(url)
    try:
        yield url
    finally:
        await drop_database(url)


async def test_failed_payments_that_gave_up_are_due_for_reconciliation_after_the_upgrade(
    dsn: str,
) -> None:
    before = [m for m in migrations() if m.version < 10]
    await migrate(dsn, shipped=before)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SEED.read_text())
        await conn.execute(
            "INSERT INTO payments (id, order_id, state, method, attempts, charge_key, last_error)"
            " VALUES (gen_random_uuid(), $1::uuid, 'failed', 'card', 5, $1::text || ':2',"
            "         'gave up after 5 attempts: provider timed out after 2s'),"
            "        (gen_random_uuid(), $1::uuid, 'failed', 'card', 1, $1::text || ':3', 'declined')",
            ORDER,
        )
        applied = await migrate(dsn)
        assert applied == [m.version for m in migrations() if m.version >= 10]
        rows = await conn.fetch(
            "SELECT charge_key, reconcile, reconcile_after IS NOT NULL AS scheduled"
            " FROM payments ORDER BY charge_key"
        )
        assert [(r["charge_key"][-2:], r["reconcile"], r["scheduled"]) for r in rows] == [
            (":1", None, False),  # succeeded
            (":2", "due", True),  # gave up: the provider may have charged
            (":3", None, False),  # declined: the provider said so
        ]
        checks = await conn.fetch(
            "SELECT conname, convalidated FROM pg_constraint"
            " WHERE conname IN ('payments_reconcile', 'payments_reconcile_attempts')"
        )
        assert sorted((r["conname"], r["convalidated"]) for r in checks) == [
            ("payments_reconcile", True),
            ("payments_reconcile_attempts", True),
        ]
        indexes = await conn.fetch(
            "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " WHERE c.relname IN ('outbox_handle_due', 'payments_reconcile_due')"
        )
        assert sorted((r["relname"], r["indisvalid"]) for r in indexes) == [
            ("outbox_handle_due", True),
            ("payments_reconcile_due", True),
        ]
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("UPDATE payments SET reconcile = 'maybe'")
    finally:
        await conn.close()
