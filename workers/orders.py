"""Orders and payment attempts in PostgreSQL: what the checkout writes and polls.

The checkout's confirm calls :func:`start_payment`, which turns a hold into an order (one per
hold) and queues one payment attempt for the payment workers, then answers the fan at once
(202); the fan's page polls :func:`get_order` until the order is ``paid`` (tickets listed) or
its latest payment ``failed`` (``last_error`` says why), in which case the fan may confirm
again while the hold lasts, which queues the next attempt.

Lifecycle of an order::

    awaiting_payment ──payment succeeded──▶ paid (final; tickets issued)
          ▲   └────────payment failed────▶ failed ──start_payment again──┐
          └──────────────────────────────────────────────────────────────┘

Each attempt is its own ``payments`` row with the charge key ``"{order_id}:{n}"``: the
provider charges a key at most once, so a retried *attempt* can never charge twice, while a
fan's new attempt (after a decline) is a new charge.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

import msgspec

from inventory.store import Conn
from waitroom.errors import Conflict, Gone, NotFound

OrderStatus = Literal["awaiting_payment", "paid", "failed", "cancelled"]


class PaymentRefused(Conflict):
    """A 409 from :func:`start_payment`; see its docstring for the codes."""


#: PostgreSQL channel a new pending payment is announced on, so idle workers wake at once.
PAYMENTS_CHANNEL = "waitroom_payments"


class PaymentView(msgspec.Struct, frozen=True):
    """One payment attempt of an order."""

    id: str
    state: Literal["pending", "processing", "succeeded", "failed"]
    method: str
    attempts: int
    last_error: str | None
    created_at: datetime
    updated_at: datetime


class TicketView(msgspec.Struct, frozen=True):
    """An issued ticket; ``code`` is what the fan shows at the door."""

    code: str
    ticket_type: str
    issued_at: datetime


class OrderView(msgspec.Struct, frozen=True):
    """An order with its latest payment attempt and its tickets (empty until paid)."""

    id: str
    hold_id: str
    event_id: str
    fan_id: str
    status: OrderStatus
    amount_minor: int
    currency: str
    created_at: datetime
    paid_at: datetime | None
    payment: PaymentView | None
    tickets: list[TicketView]


async def start_payment(conn: Conn, hold_id: str, fan_id: str, method: str) -> tuple[str, str]:
    """Queue a payment attempt for ``fan_id``'s hold; return ``(order_id, payment_id)``.

    Creates the hold's order on first use (amount = price x quantity, from PostgreSQL, never
    from the client) or reuses it, and inserts the order's next payment attempt (``pending``,
    due now, charge key ``"{order_id}:{n}"``); the order goes (back) to ``awaiting_payment``.
    Runs in its own transaction (or the caller's), locking the order row, so two concurrent
    confirms of one hold queue one attempt and the other is refused.

    Refusals (errors of waitroom.errors the checkout may render as they are):

    - 404 :class:`~waitroom.errors.NotFound` ``hold_not_found``: no such hold, or not this
      fan's (indistinguishable on purpose);
    - 409 :class:`PaymentRefused` ``payment_in_progress``: an attempt is pending or
      processing; ``details`` carry its ``order_id`` and ``payment_id``, so a repeated confirm
      can answer with the payment under way;
    - 409 :class:`PaymentRefused` ``hold_already_confirmed``: the order is paid;
      ``hold_cancelled``: the hold was cancelled;
    - 410 :class:`~waitroom.errors.Gone` ``hold_expired``: the hold is past its deadline.

    The hold is read from PostgreSQL, which can lag the actor by one group commit; the payment
    worker's confirm through the actor is the authority, so a hold that lapses meanwhile ends
    in a refund, never in a sale.
    """
    async with conn.transaction():
        hold = await conn.fetchrow(
            "SELECT h.id, h.event_id, h.fan_id, h.quantity, h.status,"
            " h.expires_at <= now() AS lapsed, t.price_minor, t.currency"
            " FROM holds h JOIN ticket_types t"
            "   ON t.event_id = h.event_id AND t.name = h.ticket_type"
            " WHERE h.id = $1::uuid",
            _uuid(hold_id),
        )
        if hold is None or hold["fan_id"] != fan_id:
            raise NotFound(
                "No such reservation.", code="hold_not_found", details={"hold_id": hold_id}
            )
        order_id = str(uuid.uuid4())
        await conn.execute(
            "INSERT INTO orders (id, hold_id, event_id, fan_id, amount_minor, currency, status)"
            " VALUES ($1, $2, $3, $4, $5, $6, 'awaiting_payment') ON CONFLICT (hold_id) DO NOTHING",
            order_id,
            hold["id"],
            hold["event_id"],
            fan_id,
            hold["price_minor"] * hold["quantity"],
            hold["currency"],
        )
        order = await conn.fetchrow(
            "SELECT id, status FROM orders WHERE hold_id = $1 FOR UPDATE", hold["id"]
        )
        assert order is not None
        order_id = str(order["id"])
        details = {"hold_id": hold_id, "order_id": order_id}
        if order["status"] == "paid" or hold["status"] == "paid":
            raise PaymentRefused(
                "This reservation is already paid.", code="hold_already_confirmed", details=details
            )
        busy = await conn.fetchval(
            "SELECT id FROM payments WHERE order_id = $1 AND state IN ('pending', 'processing')",
            order["id"],
        )
        if busy is not None:
            raise PaymentRefused(
                "A payment for this reservation is already in progress.",
                code="payment_in_progress",
                details={**details, "payment_id": str(busy)},
            )
        if hold["status"] == "cancelled":
            raise PaymentRefused(
                "This reservation was cancelled.", code="hold_cancelled", details=details
            )
        if hold["status"] == "expired" or hold["lapsed"]:
            raise Gone("This reservation expired.", code="hold_expired", details=details)
        attempt = await conn.fetchval(
            "SELECT count(*) + 1 FROM payments WHERE order_id = $1", order["id"]
        )
        payment_id = str(uuid.uuid4())
        await conn.execute(
            "INSERT INTO payments (id, order_id, state, method, charge_key, next_attempt_at)"
            " VALUES ($1, $2, 'pending', $3, $4, now())",
            payment_id,
            order["id"],
            method,
            f"{order_id}:{attempt}",
        )
        await conn.execute(
            "UPDATE orders SET status = 'awaiting_payment' WHERE id = $1 AND status <> 'awaiting_payment'",
            order["id"],
        )
        # Delivered at commit; workers that are idle claim the attempt at once instead of
        # at their next poll.
        await conn.execute("SELECT pg_notify($1, $2)", PAYMENTS_CHANNEL, payment_id)
    return order_id, payment_id


_ORDER_COLUMNS = (
    "o.id, o.hold_id, o.event_id, o.fan_id, o.status, o.amount_minor, o.currency,"
    " o.created_at, o.paid_at"
)


async def get_order(conn: Conn, order_id: str, fan_id: str) -> OrderView:
    """``fan_id``'s order with its latest payment attempt and tickets: what the checkout polls.

    Poll until ``status == "paid"`` (then ``tickets`` are all there, written in the same
    transaction) or ``payment.state == "failed"`` (``payment.last_error``: ``declined``,
    ``hold expired; refunded``...). 404 ``order_not_found`` for another fan's order.
    """
    row = await conn.fetchrow(
        f"SELECT {_ORDER_COLUMNS} FROM orders o WHERE o.id = $1::uuid", _uuid(order_id)
    )
    if row is None or row["fan_id"] != fan_id:
        raise NotFound("No such order.", code="order_not_found", details={"order_id": order_id})
    return (await _views(conn, [row]))[0]


async def get_order_for_hold(conn: Conn, hold_id: str, fan_id: str) -> OrderView | None:
    """The order of ``fan_id``'s hold, or None when the hold has none (or is not theirs)."""
    row = await conn.fetchrow(
        f"SELECT {_ORDER_COLUMNS} FROM orders o WHERE o.hold_id = $1::uuid AND o.fan_id = $2",
        _uuid(hold_id),
        fan_id,
    )
    return None if row is None else (await _views(conn, [row]))[0]


async def list_orders(
    conn: Conn, fan_id: str, event_id: str | None = None, *, limit: int = 100
) -> list[OrderView]:
    """``fan_id``'s orders, newest first (``GET /v1/orders``), optionally of one event."""
    rows = await conn.fetch(
        f"SELECT {_ORDER_COLUMNS} FROM orders o WHERE o.fan_id = $1"
        " AND ($2::text IS NULL OR o.event_id = $2) ORDER BY o.created_at DESC LIMIT $3",
        fan_id,
        event_id,
        limit,
    )
    return await _views(conn, rows)


async def _views(conn: Conn, rows: list[Any]) -> list[OrderView]:
    if not rows:
        return []
    ids = [r["id"] for r in rows]
    payments = await conn.fetch(
        "SELECT DISTINCT ON (order_id) order_id, id, state, method, attempts, last_error,"
        " created_at, updated_at FROM payments WHERE order_id = ANY($1::uuid[])"
        " ORDER BY order_id, created_at DESC, id",
        ids,
    )
    latest = {
        p["order_id"]: PaymentView(
            id=str(p["id"]),
            state=p["state"],
            method=p["method"],
            attempts=p["attempts"],
            last_error=p["last_error"],
            created_at=p["created_at"],
            updated_at=p["updated_at"],
        )
        for p in payments
    }
    tickets: dict[Any, list[TicketView]] = {}
    for t in await conn.fetch(
        "SELECT order_id, code, ticket_type, issued_at FROM tickets"
        " WHERE order_id = ANY($1::uuid[]) ORDER BY order_id, code",
        ids,
    ):
        tickets.setdefault(t["order_id"], []).append(
            TicketView(code=t["code"], ticket_type=t["ticket_type"], issued_at=t["issued_at"])
        )
    return [
        OrderView(
            id=str(r["id"]),
            hold_id=str(r["hold_id"]),
            event_id=r["event_id"],
            fan_id=r["fan_id"],
            status=r["status"],
            amount_minor=r["amount_minor"],
            currency=r["currency"].strip(),
            created_at=r["created_at"],
            paid_at=r["paid_at"],
            payment=latest.get(r["id"]),
            tickets=tickets.get(r["id"], []),
        )
        for r in rows
    ]


def _uuid(value: str) -> str:
    """``value`` if it is a UUID; a malformed id is unknown (404), not a database error."""
    try:
        return str(uuid.UUID(value))
    except (ValueError, TypeError):
        return "00000000-0000-0000-0000-000000000000"
