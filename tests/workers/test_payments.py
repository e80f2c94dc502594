"""The payment pool against real PostgreSQL, Redis, inventory actors and the mock provider."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest

from inventory.hosting import InventoryHost
from inventory.orders import get_reservation, order_history, start_payment
from tests.inventory.conftest import held_sold, make_event
from tests.workers.conftest import (
    Control,
    make_payments,
    payment,
    reserve,
    settle,
    stats,
)

pytestmark = pytest.mark.anyio


async def order_of(pool: asyncpg.Pool[Any], order_id: str) -> asyncpg.Record:
    row: asyncpg.Record | None = await pool.fetchrow("SELECT * FROM orders WHERE id = $1", order_id)
    assert row is not None
    return row


async def hold_status(pool: asyncpg.Pool[Any], hold_id: str) -> str:
    status: str = await pool.fetchval("SELECT status FROM holds WHERE id = $1", hold_id)
    return status


async def tickets_of(pool: asyncpg.Pool[Any], order_id: str) -> list[str]:
    rows = await pool.fetch("SELECT code FROM tickets WHERE order_id = $1", order_id)
    return [r["code"] for r in rows]


async def begin(
    pool: asyncpg.Pool[Any], hold_id: str, fan_id: str, method: str = "card_ok"
) -> tuple[str, str]:
    async with pool.acquire() as conn:
        return await start_payment(conn, hold_id, fan_id, method)


async def test_a_successful_payment_pays_the_order_once_and_issues_unique_tickets(
    pool: asyncpg.Pool[Any], host: InventoryHost, http: httpx.AsyncClient, control: Control
) -> None:
    event_id = await make_event(pool, quantity=10, per_fan=4)
    hold = await reserve(host, event_id, "fan-a", 3, jti="jti-a")
    order_id, payment_id = await begin(pool, hold.id, "fan-a")
    payments = make_payments(pool, host, http)
    row = await settle(payments, pool, payment_id)
    assert row["state"] == "succeeded" and row["attempts"] == 1 and row["last_error"] is None
    order = await order_of(pool, order_id)
    assert order["status"] == "paid" and order["paid_at"] is not None
    assert order["amount_minor"] == 3 * 1000
    codes = await tickets_of(pool, order_id)
    assert len(codes) == 3 and len(set(codes)) == 3 and all(len(c) >= 16 for c in codes)
    assert row["provider_ref"] == await pool.fetchval(
        "SELECT payment_ref FROM holds WHERE id = $1", hold.id
    )
    assert await hold_status(pool, hold.id) == "paid"
    assert await held_sold(pool, event_id) == (0, 3, 10)
    # The pass is spent by the outbox consumer, from a task written with the order paid.
    (task,) = await pool.fetch(
        "SELECT payload::text, handle_after, handled_at FROM outbox"
        " WHERE event_id = $1 AND topic = 'pass.spent'",
        event_id,
    )
    assert task["handle_after"] is not None and task["handled_at"] is None
    assert msgspec.json.decode(task["payload"]) == {
        "order_id": order_id,
        "fan_id": "fan-a",
        "jti": "jti-a",
    }
    # Nothing is due any more; running again changes nothing.
    assert payment_id not in await payments.run_once()
    assert len(await tickets_of(pool, order_id)) == 3
    assert (await stats(http))["captured_by_reference"][order_id] == 1
    async with pool.acquire() as conn:
        view = await get_reservation(conn, hold.id, "fan-a")
    assert view.order_status == "paid" and view.status == "paid"
    assert sorted(t.code for t in view.tickets) == sorted(codes)
    assert view.payment is not None and view.payment.state == "succeeded"
    topics = await pool.fetch(
        "SELECT topic FROM outbox WHERE event_id = $1 AND topic = 'tickets.issued'", event_id
    )
    assert len(topics) == 1
    async with pool.acquire() as conn:
        history = await order_history(conn, order_id)
    assert [e.kind for e in history] == ["payment.started", "payment.succeeded"]
    assert history[1].detail == {"charge_id": row["provider_ref"], "tickets": 3, "attempt": 1}


async def test_a_declined_payment_keeps_the_hold_and_a_new_attempt_succeeds(
    pool: asyncpg.Pool[Any], host: InventoryHost, http: httpx.AsyncClient, control: Control
) -> None:
    event_id = await make_event(pool)
    hold = await reserve(host, event_id, "fan-b", 2)
    order_id, first = await begin(pool, hold.id, "fan-b", "card_declined")
    payments = make_payments(pool, host, http)
    row = await settle(payments, pool, first)
    assert row["state"] == "failed" and row["last_error"] == "declined"
    assert (await order_of(pool, order_id))["status"] == "failed"
    assert await hold_status(pool, hold.id) == "held"  # the fan may try again
    async with pool.acquire() as conn:
        view = await get_reservation(conn, hold.id, "fan-b")
    assert view.payment is not None and view.payment.last_error == "declined"

    same_order, second = await begin(pool, hold.id, "fan-b", "card_ok")
    assert same_order == order_id and second != first
    assert (await payment(pool, second))["charge_key"] == f"{order_id}:2"
    assert (await order_of(pool, order_id))["status"] == "awaiting_payment"
    row = await settle(payments, pool, second)
    assert row["state"] == "succeeded"
    assert (await order_of(pool, order_id))["status"] == "paid"
    assert len(await tickets_of(pool, order_id)) == 2
    assert (await stats(http))["captured_by_reference"][order_id] == 1


async def test_a_hanging_provider_times_out_and_the_retry_charges_exactly_once(
    pool: asyncpg.Pool[Any], host: InventoryHost, http: httpx.AsyncClient, control: Control
) -> None:
    event_id = await make_event(pool)
    hold = await reserve(host, event_id, "fan-c", 1)
    order_id, payment_id = await begin(pool, hold.id, "fan-c", "card_hangs_once")
    payments = make_payments(pool, host, http, timeout_s=0.4)
    started = time.monotonic()
    first = await payments.run_once()
    assert first[payment_id] == "retry"
    assert time.monotonic() - started < 3  # bounded by the attempt's timeout, not the hang
    row = await payment(pool, payment_id)
    assert row["state"] == "pending" and "timed out" in row["last_error"]
    row = await settle(payments, pool, payment_id)
    assert row["state"] == "succeeded" and row["attempts"] == 2
    numbers = await stats(http)
    assert numbers["attempts"][f"{order_id}:1"] == 2
    assert numbers["captured_by_reference"][order_id] == 1
    assert await pool.fetchval("SELECT count(*) FROM orders WHERE hold_id = $1", hold.id) == 1
    assert len(await tickets_of(pool, order_id)) == 1


async def test_a_provider_error_is_retried_with_backoff(
    pool: asyncpg.Pool[Any], host: InventoryHost, http: httpx.AsyncClient, control: Control
) -> None:
    event_id = await make_event(pool)
    hold = await reserve(host, event_id, "fan-d", 1)
    _, payment_id = await begin(pool, hold.id, "fan-d", "card_errors_once")
    payments = make_payments(pool, host, http)
    assert (await payments.run_once())[payment_id] == "retry"
    row = await payment(pool, payment_id)
    assert row["last_error"] == "provider answered 503"
    assert row["next_attempt_at"] >= row["updated_at"]  # scheduled, with jitter, from then on
    row = await settle(payments, pool, payment_id)
    assert row["state"] == "succeeded" and row["attempts"] == 2


async def test_a_provider_that_keeps_failing_fails_the_payment_after_max_attempts(
    pool: asyncpg.Pool[Any], host: InventoryHost, http: httpx.AsyncClient, control: Control
) -> None:
    event_id = await make_event(pool)
    hold = await reserve(host, event_id, "fan-e", 1)
    order_id, payment_id = await begin(pool, hold.id, "fan-e")
    await control(error_rate=1.0)
    payments = make_payments(pool, host, http, max_attempts=4)
    row = await settle(payments, pool, payment_id)
    assert row["state"] == "failed" and row["attempts"] == 4
    assert row["last_error"] == "gave up after 4 attempts: provider answered 503"
    # Whether a provider that answered 503 charged anyway only the provider knows: the
    # reconciler asks it, once no request under the key can still be in flight.
    assert row["reconcile"] == "due" and row["provider_ref"] is None
    assert (row["reconcile_after"] - row["updated_at"]).total_seconds() == pytest.approx(60)
    assert (await order_of(pool, order_id))["status"] == "failed"
    assert await hold_status(pool, hold.id) == "held"
    assert (await stats(http))["attempts"][f"{order_id}:1"] == 4


async def test_two_attempts_of_one_order_at_once_sell_once_and_refund_the_other(
    pool: asyncpg.Pool[Any], host: InventoryHost, http: httpx.AsyncClient, control: Control
) -> None:
    event_id = await make_event(pool)
    hold = await reserve(host, event_id, "fan-f", 2)
    order_id, first = await begin(pool, hold.id, "fan-f")
    # start_payment refuses a second attempt while one is pending, so the race is built by
    # hand: a second row as a buggy or concurrent checkout could have left it.
    second = str(uuid.uuid4())
    await pool.execute(
        "INSERT INTO payments (id, order_id, state, method, charge_key) VALUES ($1, $2, 'pending', 'card_ok', $3)",
        second,
        order_id,
        f"{order_id}:2",
    )
    await control(latency_ms=50)
    payments = make_payments(pool, host, http)
    outcomes = await payments.run_once()
    assert sorted([outcomes[first], outcomes[second]]) == ["refunded", "succeeded"]
    rows = [await payment(pool, first), await payment(pool, second)]
    winner = next(r for r in rows if r["state"] == "succeeded")
    loser = next(r for r in rows if r["state"] == "failed")
    assert loser["last_error"] == "order already paid; refunded"
    assert (await order_of(pool, order_id))["status"] == "paid"
    assert len(await tickets_of(pool, order_id)) == 2
    assert (
        await pool.fetchval("SELECT payment_ref FROM holds WHERE id = $1", hold.id)
        == winner["provider_ref"]
    )
    numbers = await stats(http)
    assert numbers["captured_by_reference"][order_id] == 1
    assert await held_sold(pool, event_id) == (0, 2, 20)


async def test_a_hold_that_expires_during_payment_is_refunded_and_released(
    pool: asyncpg.Pool[Any], host: InventoryHost, http: httpx.AsyncClient, control: Control
) -> None:
    event_id = await make_event(pool, hold_ttl_s=1)
    hold = await reserve(host, event_id, "fan-g", 1)
    order_id, payment_id = await begin(pool, hold.id, "fan-g")
    await control(latency_ms=1500)  # the charge answers after the hold's deadline
    payments = make_payments(pool, host, http, timeout_s=5)
    outcome = await payments.run_once()
    assert outcome[payment_id] == "refunded"
    row = await payment(pool, payment_id)
    assert row["state"] == "failed" and row["last_error"] == "hold expired; refunded"
    assert (await order_of(pool, order_id))["status"] == "failed"
    assert await hold_status(pool, hold.id) == "expired"
    assert await tickets_of(pool, order_id) == []
    numbers = await stats(http)
    assert order_id not in numbers["captured_by_reference"]
    assert await held_sold(pool, event_id) == (0, 0, 20)


async def test_a_hold_already_past_its_deadline_fails_without_charging(
    pool: asyncpg.Pool[Any], host: InventoryHost, http: httpx.AsyncClient, control: Control
) -> None:
    event_id = await make_event(pool, hold_ttl_s=1)
    hold = await reserve(host, event_id, "fan-h", 1)
    order_id, payment_id = await begin(pool, hold.id, "fan-h")
    await asyncio.sleep(1.2)
    payments = make_payments(pool, host, http)
    assert (await payments.run_once())[payment_id] == "failed"
    row = await payment(pool, payment_id)
    assert row["last_error"] == "hold expired"
    assert f"{order_id}:1" not in (await stats(http))["attempts"]


async def test_a_dead_workers_payment_is_recovered_and_its_stale_claim_cannot_write(
    pool: asyncpg.Pool[Any], host: InventoryHost, http: httpx.AsyncClient, control: Control
) -> None:
    event_id = await make_event(pool)
    hold = await reserve(host, event_id, "fan-i", 2)
    order_id, payment_id = await begin(pool, hold.id, "fan-i")
    dead = make_payments(pool, host, http)
    (stale,) = [c for c in await dead.claim(100) if c.id == payment_id]
    # The worker died holding the claim: nobody heartbeats the row past the timeout.
    await pool.execute(
        "UPDATE payments SET updated_at = now() - interval '1 minute' WHERE id = $1", payment_id
    )
    payments = make_payments(pool, host, http, heartbeat_timeout_s=30)
    assert await payments.recover_stale() >= 1
    row = await payment(pool, payment_id)
    assert row["state"] == "pending" and row["last_error"] == "worker stopped heartbeating"
    row = await settle(payments, pool, payment_id)
    assert row["state"] == "succeeded" and row["attempts"] == 2
    # The stalled worker wakes up and carries on with its old claim: fenced off.
    assert await dead.process(stale) == "lost"
    assert len(await tickets_of(pool, order_id)) == 2
    assert (await stats(http))["captured_by_reference"][order_id] == 1


async def test_shutdown_lets_payments_in_flight_finish(
    pool: asyncpg.Pool[Any], host: InventoryHost, http: httpx.AsyncClient, control: Control
) -> None:
    event_id = await make_event(pool)
    hold = await reserve(host, event_id, "fan-j", 1)
    _, payment_id = await begin(pool, hold.id, "fan-j")
    await control(latency_ms=400)
    payments = make_payments(pool, host, http, timeout_s=5, drain_s=10)
    stop = asyncio.Event()
    runner = asyncio.create_task(payments.run(stop))
    await wait_for_state(pool, payment_id, "processing")
    stop.set()
    await asyncio.wait_for(runner, 15)
    assert (await payment(pool, payment_id))["state"] == "succeeded"


async def test_shutdown_hands_back_payments_that_do_not_finish_in_time(
    pool: asyncpg.Pool[Any], host: InventoryHost, http: httpx.AsyncClient, control: Control
) -> None:
    event_id = await make_event(pool)
    hold = await reserve(host, event_id, "fan-k", 1)
    order_id, payment_id = await begin(pool, hold.id, "fan-k")
    await control(latency_ms=1500)
    payments = make_payments(pool, host, http, timeout_s=10, drain_s=0.2)
    stop = asyncio.Event()
    runner = asyncio.create_task(payments.run(stop))
    await wait_for_state(pool, payment_id, "processing")
    stop.set()
    await asyncio.wait_for(runner, 5)
    row = await payment(pool, payment_id)
    assert row["state"] == "pending" and row["last_error"] == "handed back at shutdown"
    await control()
    row = await settle(make_payments(pool, host, http), pool, payment_id)
    assert row["state"] == "succeeded"
    await asyncio.sleep(1.5)  # the abandoned first request reaches the provider's charge step
    assert (await stats(http))["captured_by_reference"][order_id] == 1


async def test_a_new_payment_wakes_an_idle_pool_at_once(
    pool: asyncpg.Pool[Any], host: InventoryHost, http: httpx.AsyncClient, control: Control
) -> None:
    event_id = await make_event(pool)
    hold = await reserve(host, event_id, "fan-l", 1)
    payments = make_payments(pool, host, http, poll_s=60)
    stop = asyncio.Event()
    runner = asyncio.create_task(payments.run(stop))
    try:
        await asyncio.sleep(0.3)  # idle, waiting a minute for its next poll
        _, payment_id = await begin(pool, hold.id, "fan-l")
        await asyncio.wait_for(wait_for_state(pool, payment_id, "succeeded"), 5)
    finally:
        stop.set()
        await asyncio.wait_for(runner, 10)


async def wait_for_state(pool: asyncpg.Pool[Any], payment_id: str, state: str) -> None:
    deadline = time.monotonic() + 10
    while (await payment(pool, payment_id))["state"] != state:
        assert time.monotonic() < deadline, f"payment never reached {state}"
        await asyncio.sleep(0.01)
