"""The group commit of a batch without seats: one statement, all of it or nothing (schema 22),
its rows as one JSON document (schema 23)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from inventory import store
from inventory.ledger import (
    Cancel,
    Cancelled,
    Confirm,
    Confirmed,
    Ledger,
    Refused,
    Reserve,
    Reserved,
    Result,
)
from tests.inventory.conftest import held_sold, make_event

pytestmark = pytest.mark.anyio

#: The one statement of a batch without seats or returns.
ONE_TRIP = "SELECT inventory_commit_json($1, $2, $3)"


def _apply(
    ledger: Ledger,
    *commands: Reserve | Confirm | Cancel,
    now: float | None = None,
    ids: Iterator[str] | None = None,
) -> list[Result]:
    new_id = (lambda: str(uuid.uuid4())) if ids is None else ids.__next__
    return ledger.apply_many(list(commands), time.time() if now is None else now, new_id)


@contextlib.asynccontextmanager
async def _statements(conn: store.Conn) -> AsyncIterator[list[str]]:
    """The statements sent on ``conn`` within the block (COPY aside), in order."""
    sent: list[str] = []

    def log(record: Any) -> None:
        sent.append(record.query)

    with conn.query_logger(log):
        try:
            yield sent
        finally:
            await asyncio.sleep(0)  # the logger's callbacks run on the loop's next turn


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
        async with _statements(conn) as sent:
            await store.commit(conn, event_id, epoch, ledger.drain_changes())
        assert sent == [ONE_TRIP]
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
        async with _statements(conn) as sent:
            with pytest.raises(asyncpg.PostgresError):
                await store.commit(conn, event_id, epoch, ledger.drain_changes())
        assert (sent == [ONE_TRIP]) == (more == 0)
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
    async with pool.acquire() as conn, _statements(conn) as sent:
        with pytest.raises(store.Fenced):
            await store.commit(conn, event_id, epoch, ledger.drain_changes())
    assert sent == [ONE_TRIP]
    assert await _counts(pool, event_id) == (0, 0, 0)


#: Every character JSON must escape or that a careless encoding would mangle: quotes,
#: backslashes, control characters (NUL aside: PostgreSQL's text has none), non-ASCII and
#: characters beyond the BMP, and what looks like an escape already.
ODD = 'q"u\'o\\te\\n \\u0041 \t\n\r\x01\x1f\x7f é 東京 🎟 \u2028 {"x": [1]} $1 %s'


async def test_odd_texts_nulls_and_microseconds_go_in_and_reload_exactly(
    pool: asyncpg.Pool[Any],
) -> None:
    """Through the JSON document, every value comes back as it was: texts, NULLs, instants."""
    event_id = await make_event(pool, quantity=20, per_fan=2)
    ledger, epoch = await _ledger(pool, event_id)
    # Whole seconds plus microseconds that a float of seconds holds only approximately.
    start = math.floor(time.time()) + 0.654321
    ids = [str(uuid.uuid4()) for _ in range(4)]
    first = _apply(
        ledger,
        Reserve(f"a{ODD}", "ga", 2, f"ka{ODD}", f"jti-a{ODD}"),
        Reserve(f"b{ODD}", "ga", 1, None, None),  # every nullable column NULL
        now=start,
        ids=iter(ids[:2]),
    )
    assert [type(r) for r in first] == [Reserved, Reserved]
    changes = [ledger.drain_changes()]
    later = start + 1.000007
    batch = _apply(
        ledger,
        Confirm(ids[0], f"a{ODD}", f"pay{ODD}", f"ca{ODD}"),  # settled, with a payment
        Cancel(ids[1], f"b{ODD}", None),  # settled, payment_ref NULL, no key
        Reserve(f"c{ODD}", "ga", 2, f"kc{ODD}", None),  # new, pass_jti NULL
        Reserve(f"d{ODD}", "ga", 3, f"kd{ODD}", f"jti-d{ODD}"),  # refused: a key's record
        Reserve(f"e{ODD}", "ga", 1, f"ke{ODD}", f"jti-e{ODD}"),  # new and paid in one batch
        Confirm(ids[3], f"e{ODD}", f"pay-e{ODD}", None),
        now=later,
        ids=iter(ids[2:]),
    )
    assert [type(r) for r in batch] == [
        Confirmed,
        Cancelled,
        Reserved,
        Refused,
        Reserved,
        Confirmed,
    ]
    changes.append(ledger.drain_changes())
    async with pool.acquire() as conn:
        for change in changes:
            async with _statements(conn) as sent:
                await store.commit(conn, event_id, epoch, change)
            assert sent == [ONE_TRIP]
        reloaded = await store.load_ledger(conn, event_id)
    assert await held_sold(pool, event_id) == (2, 3, 20)
    assert reloaded.availability() == ledger.availability()
    assert sorted(reloaded.live_holds(), key=lambda h: h.id) == sorted(
        ledger.live_holds(), key=lambda h: h.id
    )
    # Row by row, every column, the cancelled hold's too.
    rows = await pool.fetch(
        "SELECT id::text, fan_id, ticket_type, quantity, status, pass_jti, payment_ref,"
        " expires_at, idempotency_key, request_hash IS NOT NULL AS hashed"
        " FROM holds WHERE event_id = $1 ORDER BY fan_id",
        event_id,
    )
    # The deadlines to the microsecond, as the ledger has them (round(now + ttl, 6)).
    at = [datetime.fromtimestamp(round(now + 600, 6), UTC) for now in (start, later)]
    assert [a.microsecond for a in at] == [654321, 654328]
    assert [tuple(r) for r in rows] == [
        (ids[0], f"a{ODD}", "ga", 2, "paid", f"jti-a{ODD}", f"pay{ODD}", at[0], f"ka{ODD}", True),
        (ids[1], f"b{ODD}", "ga", 1, "cancelled", None, None, at[0], None, False),
        (ids[2], f"c{ODD}", "ga", 2, "held", None, None, at[1], f"kc{ODD}", True),
        (ids[3], f"e{ODD}", "ga", 1, "paid", f"jti-e{ODD}", f"pay-e{ODD}", at[1], f"ke{ODD}",
         True),
    ]  # fmt: skip
    # The outbox messages as sent, in order, text for text.
    outbox = await pool.fetch(
        "SELECT topic, payload::text FROM outbox WHERE event_id = $1 ORDER BY id", event_id
    )
    assert [(r["topic"], r["payload"]) for r in outbox] == [
        (topic, payload)
        for change in changes
        for _, topic, payload in store.outbox_rows(event_id, change)
    ]
    keys = await pool.fetch(
        "SELECT fan_id, key, status_code FROM idempotency_keys WHERE event_id = $1 ORDER BY 1",
        event_id,
    )
    assert [tuple(k) for k in keys] == [(f"a{ODD}", f"ca{ODD}", 200), (f"d{ODD}", f"kd{ODD}", 409)]
    # Retried, each keyed request finds its first result again, odd texts and all.
    again = _apply(
        reloaded,
        Reserve(f"a{ODD}", "ga", 2, f"ka{ODD}", f"jti-a{ODD}"),
        Confirm(ids[0], f"a{ODD}", f"pay{ODD}", f"ca{ODD}"),
        Reserve(f"c{ODD}", "ga", 2, f"kc{ODD}", None),
        Reserve(f"d{ODD}", "ga", 3, f"kd{ODD}", f"jti-d{ODD}"),
        Reserve(f"e{ODD}", "ga", 1, f"ke{ODD}", f"jti-e{ODD}"),
        now=later,
    )
    assert again == [first[0], batch[0], batch[2], batch[3], batch[4]]
