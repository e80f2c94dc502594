"""Reconciliation: a charge whose answer was lost ends as tickets or as a refund, once.

Real PostgreSQL, Redis, inventory actors and the mock provider over HTTP. A payment whose
only attempt timed out after the provider charged (``card_hangs_once``: the charge is made,
then its answer hangs past the client's timeout) fails as "gave up", marked for
reconciliation; the reconciler asks the provider by the charge key and settles it.
"""

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
from inventory.orders import order_history, start_payment
from tests.harness import ServerThread, run_cli
from tests.inventory.conftest import held_sold, make_event
from tests.workers.conftest import Control, make_payments, payment, reserve, settle, stats
from waitroom.core.settings import Settings
from workers.reconcile import Reconciler

pytestmark = pytest.mark.anyio


async def ambiguous_payment(
    pool: asyncpg.Pool[Any],
    host: InventoryHost,
    http: httpx.AsyncClient,
    *,
    method: str = "card_hangs_once",
    quantity: int = 2,
    hold_ttl_s: int = 600,
    jti: str | None = None,
) -> tuple[str, str, str, str]:
    """``(event_id, hold_id, order_id, payment_id)`` of a payment that gave up in doubt."""
    event_id = await make_event(pool, hold_ttl_s=hold_ttl_s)
    fan = f"fan-{uuid.uuid4().hex[:8]}"
    hold = await reserve(host, event_id, fan, quantity, jti=jti)
    async with pool.acquire() as conn:
        order_id, payment_id = await start_payment(conn, hold.id, fan, method)
    # The timeout must be long enough for the charge to reach the provider on a loaded machine
    # (0.3 s once gave up before the request was handled, so nothing was charged); a hanging
    # answer hangs for minutes, so any timeout ends in doubt.
    payments = make_payments(pool, host, http, timeout_s=2.0, max_attempts=1, reconcile_delay_s=0)
    row = await settle(payments, pool, payment_id)
    assert row["state"] == "failed" and row["last_error"].startswith("gave up after 1 attempts")
    assert row["reconcile"] == "due" and row["provider_ref"] is None
    if method == "card_hangs_once":
        charged = (await stats(http))["captured_by_reference"].get(order_id)
        assert charged == 1, "the provider never received the charge before the client gave up"
    return event_id, hold.id, order_id, payment_id


def reconciler(pool: asyncpg.Pool[Any], host: InventoryHost, http: httpx.AsyncClient) -> Reconciler:
    return Reconciler(pool, host, http, timeout_s=2.0, base_backoff_s=0.05, max_backoff_s=0.2)


async def history(pool: asyncpg.Pool[Any], order_id: str) -> list[tuple[str, dict[str, Any]]]:
    async with pool.acquire() as conn:
        return [(e.kind, e.detail) for e in await order_history(conn, order_id)]


async def tickets(pool: asyncpg.Pool[Any], order_id: str) -> int:
    count: int = await pool.fetchval("SELECT count(*) FROM tickets WHERE order_id = $1", order_id)
    return count


async def test_a_charge_whose_answer_was_lost_is_completed_while_the_hold_lasts(
    pool: asyncpg.Pool[Any], host: InventoryHost, http: httpx.AsyncClient, control: Control
) -> None:
    jti = f"jti-{uuid.uuid4().hex}"
    event_id, hold_id, order_id, payment_id = await ambiguous_payment(pool, host, http, jti=jti)
    # The provider did charge: the money is taken, the fan has no tickets.
    assert (await stats(http))["captured_by_reference"][order_id] == 1
    assert await tickets(pool, order_id) == 0

    report = await reconciler(pool, host, http).run_once()
    assert report.outcomes[payment_id] == "completed"
    row = await payment(pool, payment_id)
    assert row["state"] == "succeeded" and row["reconcile"] == "completed"
    assert row["reconciled_at"] is not None and row["last_error"] is None
    assert row["provider_ref"] == await pool.fetchval(
        "SELECT payment_ref FROM holds WHERE id = $1", hold_id
    )
    order = await pool.fetchrow("SELECT status, paid_at FROM orders WHERE id = $1", order_id)
    assert order is not None and order["status"] == "paid" and order["paid_at"] is not None
    assert await tickets(pool, order_id) == 2
    assert await held_sold(pool, event_id) == (0, 2, 20)
    # The pass is spent through the outbox, as for any paid order.
    spent = await pool.fetchval(
        "SELECT payload::text FROM outbox WHERE event_id = $1 AND topic = 'pass.spent'", event_id
    )
    assert msgspec.json.decode(spent)["jti"] == jti
    steps = await history(pool, order_id)
    assert [kind for kind, _ in steps] == [
        "payment.started",
        "payment.failed",
        "payment.reconciled",
    ]
    assert steps[1][1]["reconcile"] is True
    assert steps[2][1]["outcome"] == "completed" and steps[2][1]["tickets"] == 2
    assert steps[2][1]["charge_id"] == row["provider_ref"]
    numbers = await stats(http)
    assert numbers["captured_by_reference"][order_id] == 1
    assert order_id not in numbers["refunds_by_reference"]

    # Nothing is due any more: running again changes nothing.
    again = await reconciler(pool, host, http).run_once()
    assert payment_id not in again.outcomes
    assert await tickets(pool, order_id) == 2 and len(await history(pool, order_id)) == 3


async def test_a_charge_whose_hold_is_gone_is_refunded_once_by_two_reconcilers_at_once(
    pool: asyncpg.Pool[Any], host: InventoryHost, http: httpx.AsyncClient, control: Control
) -> None:
    event_id, _, order_id, payment_id = await ambiguous_payment(pool, host, http, hold_ttl_s=1)
    await asyncio.sleep(1.3)  # the hold lapses; the actor expires it
    assert (await stats(http))["captured_by_reference"][order_id] == 1

    await control(latency_ms=200)  # both passes are in flight together
    first, second = await asyncio.gather(
        reconciler(pool, host, http).run_once(), reconciler(pool, host, http).run_once()
    )
    outcomes = [r.outcomes[payment_id] for r in (first, second) if payment_id in r.outcomes]
    assert outcomes == ["refunded"]  # claimed by one of them only
    row = await payment(pool, payment_id)
    assert row["state"] == "failed" and row["reconcile"] == "refunded"
    assert row["provider_ref"] is not None
    assert await pool.fetchval("SELECT status FROM orders WHERE id = $1", order_id) == "failed"
    assert await tickets(pool, order_id) == 0
    assert await held_sold(pool, event_id) == (0, 0, 20)
    steps = await history(pool, order_id)
    assert [kind for kind, _ in steps][-1] == "payment.reconciled"
    assert steps[-1][1] == {
        "outcome": "refunded",
        "charge_id": row["provider_ref"],
        "detail": "hold expired",
    }
    numbers = await stats(http)
    assert order_id not in numbers["captured_by_reference"]
    assert numbers["refunds_by_reference"][order_id] == 1


async def test_a_reconciler_whose_claim_lapsed_cannot_complete_the_order_twice(
    pool: asyncpg.Pool[Any], host: InventoryHost, http: httpx.AsyncClient, control: Control
) -> None:
    _, _, order_id, payment_id = await ambiguous_payment(pool, host, http, quantity=3)
    slow, fast = reconciler(pool, host, http), reconciler(pool, host, http)
    (stale,) = [s for s in await slow.claim(100) if s.id == payment_id]
    # The slow one stalls past its lease; another claims the payment again.
    await pool.execute("UPDATE payments SET reconcile_after = now() WHERE id = $1", payment_id)
    (fresh,) = [s for s in await fast.claim(100) if s.id == payment_id]
    assert fresh.token == stale.token + 1
    results = await asyncio.gather(slow.reconcile(stale), fast.reconcile(fresh))
    assert sorted(results) == ["completed", "lost"]
    assert await tickets(pool, order_id) == 3
    kinds = [kind for kind, _ in await history(pool, order_id)]
    assert kinds.count("payment.reconciled") == 1
    numbers = await stats(http)
    assert numbers["captured_by_reference"][order_id] == 1
    assert order_id not in numbers["refunds_by_reference"]


async def test_a_payment_the_provider_never_charged_is_closed_without_money_moving(
    pool: asyncpg.Pool[Any], host: InventoryHost, http: httpx.AsyncClient, control: Control
) -> None:
    # card_errors_once: the only attempt gets a 503 and nothing is charged.
    _, _, order_id, payment_id = await ambiguous_payment(
        pool, host, http, method="card_errors_once"
    )
    report = await reconciler(pool, host, http).run_once()
    assert report.outcomes[payment_id] == "no_charge"
    row = await payment(pool, payment_id)
    assert row["state"] == "failed" and row["reconcile"] == "no_charge"
    assert row["provider_ref"] is None
    assert (await history(pool, order_id))[-1][1]["outcome"] == "no_charge"


async def test_a_provider_that_cannot_answer_leaves_the_payment_due_with_backoff(
    pool: asyncpg.Pool[Any], host: InventoryHost, http: httpx.AsyncClient, control: Control
) -> None:
    _, _, order_id, payment_id = await ambiguous_payment(pool, host, http)
    await control(error_rate=1.0)
    report = await reconciler(pool, host, http).run_once()
    assert report.outcomes[payment_id] == "retry"
    row = await payment(pool, payment_id)
    assert row["reconcile"] == "due" and "503" in row["reconcile_error"]
    assert row["reconcile_after"] is not None and row["reconcile_attempts"] == 1
    await control()
    deadline = time.monotonic() + 10
    while (await payment(pool, payment_id))["reconcile"] == "due":
        assert time.monotonic() < deadline, "never reconciled once the provider answered"
        await reconciler(pool, host, http).run_once()
        await asyncio.sleep(0.05)
    assert (await payment(pool, payment_id))["reconcile"] == "completed"
    assert await tickets(pool, order_id) == 2


async def test_waitroom_payments_reconcile_runs_one_pass(
    pool: asyncpg.Pool[Any],
    host: InventoryHost,
    http: httpx.AsyncClient,
    control: Control,
    settings: Settings,
    provider: ServerThread,
) -> None:
    _, _, order_id, payment_id = await ambiguous_payment(pool, host, http, quantity=1)
    # The hold's actor lives in this test's host: the CLI forwards its confirm to it.
    result = await asyncio.to_thread(
        run_cli,
        settings,
        "payments",
        "reconcile",
        "--json",
        env={"WAITROOM_PAYMENT_URL": provider.url},
    )
    assert result.returncode == 0, result.stderr
    report = msgspec.json.decode(result.stdout)
    assert report["outcomes"][payment_id] == "completed"
    assert (await payment(pool, payment_id))["state"] == "succeeded"
    assert await tickets(pool, order_id) == 1
