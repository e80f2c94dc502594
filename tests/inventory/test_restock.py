"""Tickets given back to stock by refunds: the ledger's Restock, and through the actor into
PostgreSQL (group commit, fencing, recovery)."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from inventory import store
from inventory.actor import ActorStopped
from inventory.ledger import (
    BAD_QUANTITY,
    IDEMPOTENCY_MISMATCH,
    RETURN_EXCEEDS_SALE,
    UNKNOWN_HOLD,
    Confirm,
    Confirmed,
    EventRules,
    Ledger,
    Refused,
    Reserve,
    Reserved,
    Restock,
    Restocked,
    TicketTypeRules,
)
from tests.inventory.conftest import held_sold, make_event
from tests.inventory.test_actor import start_actor, stop_actor

RULES = EventRules("e", 6, 600, (TicketTypeRules("ga", 10, 6, 1000, "EUR"),))


def sold_ledger(quantity: int = 4) -> tuple[Ledger, str]:
    ids = (f"h{i}" for i in itertools.count())
    ledger = Ledger(RULES)
    reserved = ledger.apply(Reserve("fan", "ga", quantity, None, None), 0.0, lambda: next(ids))
    assert isinstance(reserved, Reserved)
    paid = ledger.apply(Confirm(reserved.hold.id, "fan", "ch_1", None), 1.0, lambda: "x")
    assert isinstance(paid, Confirmed)
    ledger.drain_changes()
    return ledger, reserved.hold.id


def test_a_restock_gives_tickets_back_once_per_refund() -> None:
    ledger, hold = sold_ledger(4)
    assert ledger.available("ga") == 6
    first = ledger.apply(Restock("r1", hold, "fan", "ga", 2), 2.0, lambda: "x")
    assert first == Restocked("r1", hold, "ga", 2, 8)
    assert ledger.fan_count("fan") == 2  # the fan no longer has those two
    # A retry of the same refund changes nothing and answers the same.
    assert ledger.apply(Restock("r1", hold, "fan", "ga", 2), 3.0, lambda: "x") == first
    assert ledger.available("ga") == 8
    changes = ledger.drain_changes()
    assert changes.restocks == [Restock("r1", hold, "fan", "ga", 2)]
    # The same refund id asking for something else is refused.
    other = ledger.apply(Restock("r1", hold, "fan", "ga", 1), 3.0, lambda: "x")
    assert isinstance(other, Refused) and other.code == IDEMPOTENCY_MISMATCH


def test_a_restock_never_returns_more_than_the_hold_sold() -> None:
    ledger, hold = sold_ledger(4)
    assert isinstance(ledger.apply(Restock("r1", hold, "fan", "ga", 3), 2.0, str), Restocked)
    too_many = ledger.apply(Restock("r2", hold, "fan", "ga", 2), 2.0, str)
    assert isinstance(too_many, Refused) and too_many.code == RETURN_EXCEEDS_SALE
    for bad, code in (
        (Restock("r3", "nope", "fan", "ga", 1), UNKNOWN_HOLD),
        (Restock("r3", hold, "someone-else", "ga", 1), UNKNOWN_HOLD),
        (Restock("r3", hold, "fan", "ga", 0), BAD_QUANTITY),
    ):
        refused = ledger.apply(bad, 2.0, str)
        assert isinstance(refused, Refused) and refused.code == code
    assert ledger.available("ga") == 9


def test_a_hold_not_paid_cannot_be_restocked() -> None:
    ledger = Ledger(RULES)
    reserved = ledger.apply(Reserve("fan", "ga", 2, None, None), 0.0, lambda: "h")
    assert isinstance(reserved, Reserved)
    refused = ledger.apply(Restock("r", "h", "fan", "ga", 1), 1.0, str)
    assert isinstance(refused, Refused) and refused.code == RETURN_EXCEEDS_SALE


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5)), max_size=30))
def test_restocks_keep_held_plus_sold_within_the_quantity(asks: list[tuple[int, int]]) -> None:
    # Holds of fans 0-3 paid, then refunds of any size in any order: stock never exceeds
    # the quantity nor goes below zero, and what came back is what was accepted.
    ids = (f"h{i}" for i in itertools.count())
    ledger = Ledger(RULES)
    holds = []
    for fan in range(4):
        r = ledger.apply(Reserve(f"f{fan}", "ga", 2, None, None), 0.0, lambda: next(ids))
        assert isinstance(r, Reserved)
        assert isinstance(
            ledger.apply(Confirm(r.hold.id, f"f{fan}", "c", None), 0.0, str), Confirmed
        )
        holds.append(r.hold.id)
    returned = 0
    for n, (fan, quantity) in enumerate(asks):
        result = ledger.apply(Restock(f"r{n}", holds[fan], f"f{fan}", "ga", quantity), 1.0, str)
        if isinstance(result, Restocked):
            returned += quantity
        assert 0 <= ledger.available("ga") <= 10
    assert ledger.available("ga") == 2 + returned
    assert sum(ledger.returned(h) for h in holds) == returned


async def paid_hold(actor: Any, fan: str, quantity: int) -> str:
    reserved = await actor.ask(Reserve(fan, "ga", quantity, f"k-{fan}", None))
    assert isinstance(reserved, Reserved)
    paid = await actor.ask(Confirm(reserved.hold.id, fan, f"ch-{fan}", f"c-{fan}"))
    assert isinstance(paid, Confirmed)
    return str(reserved.hold.id)


@pytest.mark.anyio
async def test_a_restock_through_the_actor_lowers_sold_in_postgresql_once(
    pool: asyncpg.Pool[Any],
) -> None:
    event_id = await make_event(pool, quantity=5, per_fan=4)
    actor, task = await start_actor(pool, event_id)
    try:
        hold = await paid_hold(actor, "fan", 4)
        assert await held_sold(pool, event_id) == (0, 4, 5)
        # Retries of one refund, concurrently: the stock comes back once.
        results = await asyncio.gather(
            *(actor.ask(Restock("refund-1", hold, "fan", "ga", 3)) for _ in range(5))
        )
        assert all(isinstance(r, Restocked) and r.quantity == 3 for r in results)
        assert await held_sold(pool, event_id) == (0, 1, 5)
        assert actor.ledger.available("ga") == 4
        # The returned tickets are on sale to the next fans: all four of them.
        assert isinstance(await actor.ask(Reserve("next", "ga", 4, "k-next", None)), Reserved)
        held, sold, quantity = await held_sold(pool, event_id)
        assert (held, sold) == (4, 1) and held + sold <= quantity
    finally:
        await stop_actor(actor, task)
    assert (
        await pool.fetchval("SELECT count(*) FROM stock_returns WHERE event_id = $1", event_id) == 1
    )
    # A new owner rebuilds the ledger from PostgreSQL with the return in it.
    actor, task = await start_actor(pool, event_id)
    try:
        assert actor.ledger.available("ga") == 0
        again = await actor.ask(Restock("refund-1", hold, "fan", "ga", 3))
        assert isinstance(again, Restocked)
        more = await actor.ask(Restock("refund-2", hold, "fan", "ga", 2))
        assert isinstance(more, Refused) and more.code == RETURN_EXCEEDS_SALE
        assert actor.ledger.fan_count("fan") == 1
    finally:
        await stop_actor(actor, task)
    assert await held_sold(pool, event_id) == (4, 1, 5)


@pytest.mark.anyio
async def test_postgresql_refuses_a_return_of_more_than_was_sold(
    pool: asyncpg.Pool[Any],
) -> None:
    event_id = await make_event(pool, quantity=5, per_fan=4)
    actor, task = await start_actor(pool, event_id)
    try:
        hold = await paid_hold(actor, "fan", 2)
    finally:
        await stop_actor(actor, task)
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute(
            "INSERT INTO stock_returns (refund_id, event_id, hold_id, ticket_type, fan_id,"
            " quantity) VALUES ('x', $1, $2, 'ga', 'fan', 3)",
            event_id,
            hold,
        )
    assert await held_sold(pool, event_id) == (0, 2, 5)


@pytest.mark.anyio
async def test_a_stale_owner_cannot_return_stock(pool: asyncpg.Pool[Any]) -> None:
    event_id = await make_event(pool, quantity=5, per_fan=4)
    actor, task = await start_actor(pool, event_id)
    try:
        hold = await paid_hold(actor, "fan", 2)
        await store.take_ownership(pool, event_id, "usurper")
        with pytest.raises(ActorStopped):
            await actor.ask(Restock("r", hold, "fan", "ga", 1))
    finally:
        await stop_actor(actor, task)
    assert await held_sold(pool, event_id) == (0, 2, 5)
    assert not await pool.fetchval(
        "SELECT count(*) FROM stock_returns WHERE event_id = $1", event_id
    )


@pytest.mark.anyio
async def test_an_event_with_returned_stock_can_still_be_purged(pool: asyncpg.Pool[Any]) -> None:
    # Its returns go before its holds (a row trigger), so sold never dips below zero on the way.
    event_id = await make_event(pool, quantity=5, per_fan=4)
    actor, task = await start_actor(pool, event_id)
    try:
        hold = await paid_hold(actor, "fan", 3)
        assert isinstance(await actor.ask(Restock("r", hold, "fan", "ga", 2)), Restocked)
    finally:
        await stop_actor(actor, task)
    assert await held_sold(pool, event_id) == (0, 1, 5)
    await pool.execute("DELETE FROM holds WHERE event_id = $1", event_id)
    assert await held_sold(pool, event_id) == (0, 0, 5)
    assert not await pool.fetchval(
        "SELECT count(*) FROM stock_returns WHERE event_id = $1", event_id
    )
