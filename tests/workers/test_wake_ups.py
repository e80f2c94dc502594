"""Wake-ups sent after the commit (schema 25): the hot writers' transactions carry no NOTIFY,
so they never wait for each other's WAL flushes at the notification lock, and the listeners
(idle payment workers, the fans' long polls) still hear of each change once it is committed."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from inventory.hosting import InventoryHost
from inventory.orders import PAYMENTS_CHANNEL, RESERVATIONS_CHANNEL, start_payment
from tests.inventory.conftest import make_event
from tests.workers.conftest import make_payments, reserve, settle
from waitroom.core.db import HINT_AFTER_COMMIT, hint

pytestmark = pytest.mark.anyio

#: Long enough for a notification sent at a commit to have arrived on a local connection.
QUIET_S = 0.4


class Heard:
    """The payloads a dedicated connection hears on one channel, and what it read then."""

    def __init__(self, conn: Any, channel: str) -> None:
        self.conn, self.channel = conn, channel
        self.payloads: asyncio.Queue[str] = asyncio.Queue()

    def __call__(self, _conn: Any, _pid: int, _channel: str, payload: object, /) -> None:
        self.payloads.put_nowait(str(payload))

    async def next(self) -> str:
        return await asyncio.wait_for(self.payloads.get(), 5)

    async def nothing(self) -> None:
        await asyncio.sleep(QUIET_S)
        assert self.payloads.empty(), f"heard {self.payloads.get_nowait()!r}"


@pytest.fixture
async def listen(pool: asyncpg.Pool[Any]) -> AsyncIterator[Any]:
    """``await listen(channel)``: a :class:`Heard` on a connection of its own."""
    opened: list[Heard] = []

    async def start(channel: str) -> Heard:
        conn = await pool.acquire()
        heard = Heard(conn, channel)
        await conn.add_listener(channel, heard)
        opened.append(heard)
        return heard

    try:
        yield start
    finally:
        for heard in opened:
            await heard.conn.remove_listener(heard.channel, heard)
            await pool.release(heard.conn)


async def test_a_confirm_announces_its_payment_after_the_commit_not_in_it(
    pool: asyncpg.Pool[Any], host: InventoryHost, listen: Any
) -> None:
    workers = await listen(PAYMENTS_CHANNEL)
    event_id = await make_event(pool, quantity=10, per_fan=4)
    # payment_start() itself, the confirm's one durable statement, notifies nothing...
    hold = await reserve(host, event_id, "fan-a", 1)
    row = await pool.fetchrow(
        "SELECT outcome, payment_id::text FROM payment_start($1::uuid, $2, $3, NULL, NULL,"
        " NULL, $4::uuid, $5::uuid)",
        uuid.UUID(hold.id),
        "fan-a",
        "card_ok",
        uuid.uuid4(),
        uuid.uuid4(),
    )
    assert row is not None and row["outcome"] == "started"
    await workers.nothing()
    # ...start_payment() announces the payment once it is committed: a worker woken by it
    # finds the row.
    other = await reserve(host, event_id, "fan-b", 1)
    async with pool.acquire() as conn:
        _, payment_id = await start_payment(conn, other.id, "fan-b", "card_ok")
    assert await workers.next() == payment_id
    # Inside a transaction of the caller's, the announcement is that transaction's own.
    third = await reserve(host, event_id, "fan-c", 1)
    async with pool.acquire() as conn, conn.transaction():
        _, payment_id = await start_payment(conn, third.id, "fan-c", "card_ok")
        await workers.nothing()
    assert await workers.next() == payment_id


async def test_a_hint_commits_asynchronously_alone_and_refuses_a_transaction_that_wrote(
    pool: asyncpg.Pool[Any], listen: Any
) -> None:
    heard = await listen("waitroom_test_hints")
    async with pool.acquire() as conn:
        await hint(conn, "waitroom_test_hints", "one")
        assert await heard.next() == "one"
        # Its asynchronous commit is its own transaction's: nothing of it stays on the
        # pooled connection for the next durable write.
        assert await conn.fetchval("SHOW synchronous_commit") == "on"
        async with conn.transaction():
            await conn.execute("SELECT waitroom_hint('waitroom_test_hints', 'two')")
            assert await conn.fetchval("SHOW synchronous_commit") == "off"
        assert await conn.fetchval("SHOW synchronous_commit") == "on"
        assert await heard.next() == "two"
        # A transaction that wrote would lose its writes' durability with it: refused.
        with pytest.raises(asyncpg.RaiseError, match="transaction of its own"):
            async with conn.transaction():
                await conn.execute("SELECT txid_current()")  # an XID, as any write takes
                await conn.execute("SELECT waitroom_hint('waitroom_test_hints', 'three')")
    await heard.nothing()


async def test_the_triggers_stay_silent_only_for_a_writer_that_hints_after_its_commit(
    pool: asyncpg.Pool[Any], host: InventoryHost, listen: Any
) -> None:
    polls = await listen(RESERVATIONS_CHANNEL)
    event_id = await make_event(pool, quantity=10, per_fan=4)
    hold = await reserve(host, event_id, "fan-a", 1)
    async with pool.acquire() as conn:
        order_id, _ = await start_payment(conn, hold.id, "fan-a", "card_ok")
        async with conn.transaction():
            await conn.execute(HINT_AFTER_COMMIT)
            await conn.execute("UPDATE orders SET status = 'failed' WHERE id = $1", order_id)
        await polls.nothing()
        # Any other writer (an operator, the reconciler, a refund) is announced at its commit.
        async with conn.transaction():
            await conn.execute(
                "UPDATE orders SET status = 'awaiting_payment' WHERE id = $1", order_id
            )
        assert await polls.next() == hold.id


async def test_a_paid_order_wakes_the_long_polls_once_it_is_committed(
    pool: asyncpg.Pool[Any], host: InventoryHost, http: httpx.AsyncClient, listen: Any
) -> None:
    polls = await listen(RESERVATIONS_CHANNEL)
    event_id = await make_event(pool, quantity=10, per_fan=4)
    hold = await reserve(host, event_id, "fan-a", 2)
    async with pool.acquire() as conn:
        order_id, payment_id = await start_payment(conn, hold.id, "fan-a", "card_ok")
    row = await settle(make_payments(pool, host, http), pool, payment_id)
    assert row["state"] == "succeeded"
    # (The pool also pays what the module's other tests left pending: their holds are heard too.)
    while await polls.next() != hold.id:
        pass
    # What a woken long poll reads: the order paid, its tickets issued.
    assert await pool.fetchval("SELECT status FROM orders WHERE id = $1", order_id) == "paid"
    assert await pool.fetchval("SELECT count(*) FROM tickets WHERE order_id = $1", order_id) == 2
    await asyncio.sleep(QUIET_S)
    assert hold.id not in [polls.payloads.get_nowait() for _ in range(polls.payloads.qsize())]
