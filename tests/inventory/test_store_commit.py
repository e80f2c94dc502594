"""The group commit of a batch without seats: one statement, all of it or nothing (schema 22)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import asyncpg
import pytest

from inventory import store
from inventory.ledger import Confirm, Ledger, Refused, Reserve, Reserved, Result
from tests.inventory.conftest import held_sold, make_event

pytestmark = pytest.mark.anyio


def _apply(ledger: Ledger, *commands: Reserve | Confirm) -> list[Result]:
    return ledger.apply_many(list(commands), time.time(), lambda: str(uuid.uuid4()))


async def _ledger(pool: asyncpg.Pool[Any], event_id: str) -> tuple[Ledger, int]:
    epoch = await store.take_ownership(pool, event_id, "test")
    async with pool.acquire() as conn:
        return await store.load_ledger(conn, event_id), epoch


async def _counts(pool: asyncpg.Pool[Any], event_id: str) -> tuple[int, int, int]:
    row = await pool.fetchrow(
        "SELECT (SELECT count(*) FROM holds WHERE event_id = $1) AS holds,"
        " (SELECT count(*) FROM idempotency_keys WHERE event_id = $1) AS keys,"
        " (SELECT count(*) FROM outbox WHERE event_id = $1) AS outbox",
        event_id,
    )
    assert row is not None
    return row["holds"], row["keys"], row["outbox"]


async def test_a_batch_of_holds_is_written_whole_and_reloads_exactly(
    pool: asyncpg.Pool[Any],
) -> None:
    event_id = await make_event(pool, quantity=10, per_fan=2)
    ledger, epoch = await _ledger(pool, event_id)
    first = _apply(ledger, Reserve("a", "ga", 2, "ka", "jti-a"))
    assert isinstance(first[0], Reserved)
    async with pool.acquire() as conn:
        await store.commit(conn, event_id, epoch, ledger.drain_changes())
    # Settled, new, keyed, unkeyed and refused in one batch.
    batch = _apply(
        ledger,
        Confirm(first[0].hold.id, "a", "pay-a", "ca"),
        Reserve("b", "ga", 1, "kb", "jti-b"),
        Reserve("c", "ga", 2, None, None),
        Reserve("d", "ga", 3, "kd", None),
    )
    assert isinstance(batch[3], Refused)
    async with pool.acquire() as conn:
        await store.commit(conn, event_id, epoch, ledger.drain_changes())
        reloaded = await store.load_ledger(conn, event_id)
    assert await held_sold(pool, event_id) == (3, 2, 10)
    assert reloaded.availability() == ledger.availability()
    assert sorted(reloaded.live_holds(), key=lambda h: h.id) == sorted(
        ledger.live_holds(), key=lambda h: h.id
    )
    row = await pool.fetchrow(
        "SELECT ticket_type, fan_id, quantity, status, pass_jti, idempotency_key,"
        " request_hash IS NOT NULL AS hashed, expires_at > now() AS later"
        " FROM holds WHERE fan_id = 'b' AND event_id = $1",
        event_id,
    )
    assert row is not None
    assert dict(row) == {
        "ticket_type": "ga",
        "fan_id": "b",
        "quantity": 1,
        "status": "held",
        "pass_jti": "jti-b",
        "idempotency_key": "kb",
        "hashed": True,
        "later": True,
    }
    # The refusal and the confirm are keyed records; each hold's creation is on its row.
    keys = await pool.fetch(
        "SELECT fan_id, key, status_code FROM idempotency_keys WHERE event_id = $1 ORDER BY 1",
        event_id,
    )
    assert [tuple(k) for k in keys] == [("a", "ca", 200), ("d", "kd", 409)]
    # Retried, each keyed request finds its first result again in the reloaded ledger.
    again = _apply(
        reloaded, Reserve("b", "ga", 1, "kb", "jti-b"), Reserve("d", "ga", 3, "kd", None)
    )
    assert again == [batch[1], batch[3]]


@pytest.mark.parametrize("more", [0, store.ONE_TRIP_MAX_HOLDS], ids=["one-trip", "copy"])
async def test_a_batch_that_would_oversell_writes_nothing(
    pool: asyncpg.Pool[Any], more: int
) -> None:
    """Atomic either way: one statement (a small batch) or a transaction with a COPY."""
    event_id = await make_event(pool, quantity=10 + more, per_fan=4)
    ledger, epoch = await _ledger(pool, event_id)
    first = _apply(ledger, Reserve("a", "ga", 2, "ka", None))
    assert isinstance(first[0], Reserved)
    async with pool.acquire() as conn:
        await store.commit(conn, event_id, epoch, ledger.drain_changes())
    before = await _counts(pool, event_id)
    # Behind the actor's back, the stock shrinks: the next batch no longer fits.
    await pool.execute(
        "UPDATE ticket_types SET quantity = $2 WHERE event_id = $1", event_id, 4 + more
    )
    _apply(
        ledger,
        Confirm(first[0].hold.id, "a", "pay-a", "ca"),
        Reserve("b", "ga", 3, "kb", None),
        *(Reserve(f"m{i}", "ga", 1, f"km{i}", None) for i in range(more)),
        Reserve("c", "ga", 4, "kc", None),
    )
    async with pool.acquire() as conn:
        with pytest.raises(asyncpg.PostgresError):
            await store.commit(conn, event_id, epoch, ledger.drain_changes())
        # The connection is usable at once: no transaction was left open on it.
        assert await conn.fetchval("SELECT 1") == 1
    # Not even the confirm of the first hold, nor its outbox message, nor a key.
    assert await _counts(pool, event_id) == before
    assert await held_sold(pool, event_id) == (2, 0, 4 + more)


async def test_a_large_batch_goes_in_whole(pool: asyncpg.Pool[Any]) -> None:
    """Past ONE_TRIP_MAX_HOLDS the holds go by COPY inside a transaction: all of them."""
    count = store.ONE_TRIP_MAX_HOLDS + 1
    event_id = await make_event(pool, quantity=count, per_fan=1)
    ledger, epoch = await _ledger(pool, event_id)
    results = _apply(ledger, *(Reserve(f"f{i}", "ga", 1, f"k{i}", f"j{i}") for i in range(count)))
    assert all(isinstance(r, Reserved) for r in results)
    async with pool.acquire() as conn:
        await store.commit(conn, event_id, epoch, ledger.drain_changes())
        reloaded = await store.load_ledger(conn, event_id)
    assert await held_sold(pool, event_id) == (count, 0, count)
    assert reloaded.availability() == ledger.availability()


async def test_a_stale_epoch_is_fenced_and_writes_nothing(pool: asyncpg.Pool[Any]) -> None:
    event_id = await make_event(pool, quantity=10)
    ledger, epoch = await _ledger(pool, event_id)
    await store.take_ownership(pool, event_id, "someone newer")
    _apply(ledger, Reserve("a", "ga", 1, "ka", None))
    async with pool.acquire() as conn:
        with pytest.raises(store.Fenced):
            await store.commit(conn, event_id, epoch, ledger.drain_changes())
    assert await _counts(pool, event_id) == (0, 0, 0)
