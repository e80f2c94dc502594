"""start_payment: one order per hold, one attempt at a time, and the refusals the checkout shows."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest

from inventory.hosting import InventoryHost
from inventory.ledger import Cancel, Cancelled
from inventory.orders import (
    PAYMENT_STARTED,
    PAYMENTS_CHANNEL,
    PaymentRefused,
    get_reservation,
    list_orders,
    order_history,
    payment_under_way,
    reservation_event,
    start_payment,
)
from tests.inventory.conftest import make_event
from tests.workers.conftest import reserve
from waitroom.core.errors import Gone, NotFound

pytestmark = pytest.mark.anyio


async def begin(pool: asyncpg.Pool[Any], hold_id: str, fan_id: str) -> tuple[str, str]:
    async with pool.acquire() as conn:
        return await start_payment(conn, hold_id, fan_id, "card_ok")


async def test_the_first_attempt_creates_the_order_and_a_pending_payment(
    pool: asyncpg.Pool[Any], host: InventoryHost
) -> None:
    event_id = await make_event(pool, per_fan=4)
    hold = await reserve(host, event_id, "fan-1", 3)
    order_id, payment_id = await begin(pool, hold.id, "fan-1")
    order = await pool.fetchrow("SELECT * FROM orders WHERE id = $1", order_id)
    assert order is not None
    assert (order["hold_id"], order["event_id"], order["fan_id"]) == (
        uuid.UUID(hold.id),
        event_id,
        "fan-1",
    )
    assert (order["amount_minor"], order["currency"], order["status"]) == (
        3000,
        "EUR",
        "awaiting_payment",
    )
    row = await pool.fetchrow("SELECT * FROM payments WHERE id = $1", payment_id)
    assert row is not None
    assert (row["state"], row["method"], row["charge_key"], row["attempts"]) == (
        "pending",
        "card_ok",
        f"{order_id}:1",
        0,
    )
    async with pool.acquire() as conn:
        view = await get_reservation(conn, hold.id, "fan-1")
        mine = await list_orders(conn, "fan-1", event_id)
        elsewhere = await list_orders(conn, "fan-1", "another-event")
    assert view.order_id == order_id and view.order_status == "awaiting_payment"
    assert view.tickets == [] and view.amount_minor == 3000 and view.currency == "EUR"
    assert view.payment is not None and view.payment.id == payment_id
    assert [(o.id, o.reservation_id, o.status) for o in mine] == [
        (order_id, hold.id, "awaiting_payment")
    ]
    assert elsewhere == []


async def test_a_second_attempt_while_one_is_pending_is_refused_with_its_ids(
    pool: asyncpg.Pool[Any], host: InventoryHost
) -> None:
    event_id = await make_event(pool)
    hold = await reserve(host, event_id, "fan-2", 1)
    order_id, payment_id = await begin(pool, hold.id, "fan-2")
    with pytest.raises(PaymentRefused) as refused:
        await begin(pool, hold.id, "fan-2")
    assert refused.value.code == "payment_in_progress"
    assert refused.value.details["order_id"] == order_id
    assert refused.value.details["payment_id"] == payment_id


async def test_concurrent_confirms_of_one_hold_queue_exactly_one_attempt(
    pool: asyncpg.Pool[Any], host: InventoryHost
) -> None:
    event_id = await make_event(pool)
    hold = await reserve(host, event_id, "fan-3", 1)
    results = await asyncio.gather(
        *(begin(pool, hold.id, "fan-3") for _ in range(6)), return_exceptions=True
    )
    started = [r for r in results if isinstance(r, tuple)]
    assert len(started) == 1
    assert all(isinstance(r, PaymentRefused) for r in results if not isinstance(r, tuple))
    count = await pool.fetchval(
        "SELECT count(*) FROM payments p JOIN orders o ON o.id = p.order_id WHERE o.hold_id = $1",
        hold.id,
    )
    assert count == 1


async def test_someone_elses_or_an_unknown_hold_is_not_found(
    pool: asyncpg.Pool[Any], host: InventoryHost
) -> None:
    event_id = await make_event(pool)
    hold = await reserve(host, event_id, "fan-4", 1)
    for hold_id, fan in (
        (hold.id, "intruder"),
        ("not-a-uuid", "fan-4"),
        (hold.id[:-4] + "0000", "fan-4"),
    ):
        with pytest.raises(NotFound) as missing:
            await begin(pool, hold_id, fan)
        assert missing.value.code == "hold_not_found"
    async with pool.acquire() as conn:
        await start_payment(conn, hold.id, "fan-4", "card_ok")
        with pytest.raises(NotFound):
            await get_reservation(conn, hold.id, "intruder")
        assert await list_orders(conn, "intruder") == []


async def test_the_light_reads_of_a_reservation_agree_with_the_whole_one(
    pool: asyncpg.Pool[Any], host: InventoryHost
) -> None:
    # What a confirm and a long poll read first, instead of the whole reservation.
    event_id = await make_event(pool)
    hold = await reserve(host, event_id, "fan-8", 1)
    async with pool.acquire() as conn:
        for hold_id, fan in (
            (hold.id, "intruder"),
            ("not-a-uuid", "fan-8"),
            (hold.id[:-4] + "0000", "fan-8"),
        ):
            for read in (reservation_event, payment_under_way, get_reservation):
                with pytest.raises(NotFound) as missing:
                    await read(conn, hold_id, fan)
                assert missing.value.code == "hold_not_found"
        assert await reservation_event(conn, hold.id, "fan-8") == event_id
        assert not await payment_under_way(conn, hold.id, "fan-8")  # no order yet
        order_id, payment_id = await start_payment(conn, hold.id, "fan-8", "card_ok")
        for state, order_status, under_way in (
            ("pending", "awaiting_payment", True),
            ("processing", "awaiting_payment", True),
            ("failed", "failed", False),
            ("succeeded", "paid", False),
        ):
            await conn.execute("UPDATE payments SET state = $2 WHERE id = $1", payment_id, state)
            await conn.execute(
                "UPDATE orders SET status = $2 WHERE id = $1", order_id, order_status
            )
            assert await payment_under_way(conn, hold.id, "fan-8") is under_way
            whole = await get_reservation(conn, hold.id, "fan-8")
            assert whole.payment is not None and whole.payment.state == state
            assert whole.event_id == event_id


async def test_a_cancelled_or_lapsed_hold_cannot_be_paid(
    pool: asyncpg.Pool[Any], host: InventoryHost
) -> None:
    event_id = await make_event(pool, hold_ttl_s=1)
    cancelled = await reserve(host, event_id, "fan-5", 1)
    assert isinstance(await host.ask(event_id, Cancel(cancelled.id, "fan-5", None)), Cancelled)
    with pytest.raises(PaymentRefused) as refused:
        await begin(pool, cancelled.id, "fan-5")
    assert refused.value.code == "hold_cancelled"
    lapsed = await reserve(host, event_id, "fan-6", 1)
    await asyncio.sleep(1.1)
    with pytest.raises(Gone) as gone:
        await begin(pool, lapsed.id, "fan-6")
    assert gone.value.code == "hold_expired" and gone.value.status == 410


async def test_a_paid_order_cannot_be_paid_again(
    pool: asyncpg.Pool[Any], host: InventoryHost
) -> None:
    event_id = await make_event(pool)
    hold = await reserve(host, event_id, "fan-7", 1)
    order_id, payment_id = await begin(pool, hold.id, "fan-7")
    await pool.execute("UPDATE payments SET state = 'succeeded' WHERE id = $1", payment_id)
    await pool.execute("UPDATE orders SET status = 'paid', paid_at = now() WHERE id = $1", order_id)
    with pytest.raises(PaymentRefused) as refused:
        await begin(pool, hold.id, "fan-7")
    assert refused.value.code == "hold_already_confirmed"
    assert refused.value.details["order_id"] == order_id


async def test_a_started_payment_is_announced_recorded_and_a_refusal_writes_nothing(
    pool: asyncpg.Pool[Any], host: InventoryHost
) -> None:
    event_id = await make_event(pool, per_fan=4)
    hold = await reserve(host, event_id, "fan-n", 1)
    heard: asyncio.Queue[str] = asyncio.Queue()

    def on_notify(*args: Any) -> None:
        heard.put_nowait(args[3])

    async with pool.acquire() as listener:
        await listener.add_listener(PAYMENTS_CHANNEL, on_notify)
        try:
            async with pool.acquire() as conn:
                order_id, payment_id = await start_payment(
                    conn, hold.id, "fan-n", "card_ok", email="fan@example.com", key="k-1"
                )
            assert await asyncio.wait_for(heard.get(), 5) == payment_id
        finally:
            await listener.remove_listener(PAYMENTS_CHANNEL, on_notify)
    async with pool.acquire() as conn:
        history = await order_history(conn, order_id)
        # The same confirm again (its key) is answered with its payment and writes nothing.
        assert await start_payment(conn, hold.id, "fan-n", "card_ok", key="k-1") == (
            order_id,
            payment_id,
        )
        assert await order_history(conn, order_id) == history
    assert [(e.kind, e.payment_id, e.detail) for e in history] == [
        (PAYMENT_STARTED, payment_id, {"attempt": 1, "method": "card_ok"})
    ]
    assert await pool.fetchval("SELECT email FROM orders WHERE id = $1", order_id) == (
        "fan@example.com"
    )
    # A hold refused before it had an order (cancelled) gets none.
    other = await reserve(host, event_id, "fan-m", 1)
    assert isinstance(await host.ask(event_id, Cancel(other.id, "fan-m", "c-1")), Cancelled)
    with pytest.raises(PaymentRefused) as refused:
        await begin(pool, other.id, "fan-m")
    assert refused.value.code == "hold_cancelled"
    assert await pool.fetchval("SELECT count(*) FROM orders WHERE hold_id = $1", other.id) == 0
