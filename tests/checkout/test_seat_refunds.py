"""Refunds of seated tickets over real HTTP and PostgreSQL: the refund worker gives exactly the
refunded tickets' seats back, the next fan buys them, and a rebuilt ledger agrees.

Over the checkout stack (server, ``waitroom workers`` with the refund worker, the mock payment
provider); the helpers are the refund and seat checkout tests'.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import httpx

from inventory import store
from tests.admission.support import wait_for
from tests.checkout.test_checkout import Fan
from tests.checkout.test_refunds import Order, ask, policy, sql, wait_refund
from tests.checkout.test_seat_checkout import live_seats, reserve, seated_event
from tests.inventory.seating import BACK, FRONT
from waitroom.core.settings import Settings


def buy_seats(client: httpx.Client, event_id: str, *seats: str) -> tuple[Order, dict[str, str]]:
    """A new fan picks ``seats`` and pays; the order and its ticket code of each seat."""
    fan = Fan(client, event_id)
    fan.wait_for_pass()
    picked = reserve(fan, {"seats": list(seats)})
    assert picked.status_code == 201, picked.text
    hold = picked.json()
    assert fan.confirm(hold["id"]).status_code == 202
    paid = fan.wait_until(hold["id"], lambda r: r["order_status"] == "paid")
    codes = {t["seat"]: t["code"] for t in paid["tickets"]}
    assert sorted(codes) == sorted(seats)
    return Order(event_id, fan, paid["order_id"], list(codes.values())), codes


def seat_states(client: httpx.Client, event_id: str) -> dict[str, str]:
    """Every seat's state letter from the public snapshot (``f`` free, ``s`` sold...)."""
    body = client.get(f"/v1/events/{event_id}/seats").json()
    return dict(zip(body["seats"], body["states"], strict=True))


def snapshot_shows(client: httpx.Client, event_id: str, expected: dict[str, str]) -> None:
    """Wait until the snapshot (cached for a moment) shows ``expected`` seat states."""

    def shown() -> bool:
        states = seat_states(client, event_id)
        return all(states[seat] == letter for seat, letter in expected.items())

    wait_for(shown, 10)


def refund(order: Order, *codes: str) -> dict[str, Any]:
    """Ask for ``codes`` back (all the order's tickets when none) and wait until it succeeded."""
    asked = ask(order, list(codes) if codes else None)
    assert asked.status_code == 202, asked.text
    done: dict[str, Any] = wait_refund(
        order, asked.json()["id"], lambda r: r["state"] == "succeeded"
    )
    assert done["stock_returned"], done
    return done


def rebuilt(settings: Settings, event_id: str) -> dict[str, str]:
    """Every seat's state in the ledger PostgreSQL rebuilds (what a new owner would load)."""

    async def load() -> dict[str, str]:
        conn = await asyncpg.connect(settings.database_url)
        try:
            ledger = await store.load_ledger(conn, event_id)
        finally:
            await conn.close()
        assert ledger.seats is not None
        return dict(zip(ledger.seats.seat_ids(), ledger.seats.states(), strict=True))

    return asyncio.run(load())


def sold(settings: Settings, event_id: str, ticket_type: str) -> int:
    (row,) = sql(
        settings,
        "SELECT held, sold, quantity FROM ticket_types WHERE event_id = $1 AND name = $2",
        event_id,
        ticket_type,
    )
    assert row["held"] + row["sold"] <= row["quantity"]
    return int(row["sold"])


def test_a_refunded_ticket_frees_exactly_its_seat_for_the_next_fan(
    client: httpx.Client, admin: httpx.Client, settings: Settings
) -> None:
    event_id = seated_event(admin)
    policy(admin, event_id, (0, 100))
    a1, a2 = FRONT[:2]
    order, codes = buy_seats(client, event_id, a1, a2)
    first = asyncio.run(live_seats(settings, event_id))
    assert set(first) == {a1, a2}
    assert sold(settings, event_id, "Front") == 2

    refund(order, codes[a2])
    # Exactly that seat is free again: the snapshot, seat_holds and the stock agree; the
    # other seat stays sold to the fan, and their ticket for it still admits.
    snapshot_shows(client, event_id, {a1: "s", a2: "f"})
    assert asyncio.run(live_seats(settings, event_id)) == {a1: first[a1]}
    assert sold(settings, event_id, "Front") == 1
    (row,) = sql(settings, "SELECT seats FROM stock_returns WHERE event_id = $1", event_id)
    assert row["seats"] == [a2]

    # Another fan picks that seat and buys it: a ticket for it again.
    _, resold = buy_seats(client, event_id, a2)
    snapshot_shows(client, event_id, {a1: "s", a2: "s"})
    live = asyncio.run(live_seats(settings, event_id))
    assert set(live) == {a1, a2} and live[a1] == first[a1] and live[a2] != first[a2]
    assert sold(settings, event_id, "Front") == 2
    valid = sql(
        settings,
        "SELECT code FROM tickets WHERE event_id = $1 AND seat_id = $2 AND voided_at IS NULL",
        event_id,
        a2,
    )
    assert [r["code"] for r in valid] == [resold[a2]]
    # A ledger rebuilt from PostgreSQL sees the same seats.
    states = rebuilt(settings, event_id)
    assert (states[a1], states[a2], states[FRONT[2]]) == ("sold", "sold", "free")


def test_a_full_refund_of_a_seated_order_frees_every_seat(
    client: httpx.Client, admin: httpx.Client, settings: Settings
) -> None:
    event_id = seated_event(admin)
    policy(admin, event_id, (0, 100))
    b1, b2 = BACK[:2]
    order, _ = buy_seats(client, event_id, b1, b2)
    assert sold(settings, event_id, "Back") == 2

    refund(order)  # no body: every ticket of the order
    snapshot_shows(client, event_id, {b1: "f", b2: "f"})
    assert asyncio.run(live_seats(settings, event_id)) == {}
    assert sold(settings, event_id, "Back") == 0
    rows = sql(settings, "SELECT status FROM seat_holds WHERE event_id = $1", event_id)
    assert [r["status"] for r in rows] == ["refunded", "refunded"]
    states = rebuilt(settings, event_id)
    assert (states[b1], states[b2]) == ("free", "free")
    # Both are on sale: a fan asking for the two best back seats may get them.
    again, _ = buy_seats(client, event_id, b1, b2)
    assert set(asyncio.run(live_seats(settings, event_id))) == {b1, b2}
    assert sold(settings, event_id, "Back") == 2 and again.order_id != order.order_id
