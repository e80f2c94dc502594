"""Orders and payment attempts in PostgreSQL: the one read model of checkout, and its writes.

The checkout's confirm calls :func:`start_payment`, which turns a hold into an order (one per
hold) and queues one payment attempt for the payment workers, then answers the fan at once
(202); the fan's page polls :func:`get_reservation` until the order is ``paid`` (tickets listed) or
its latest payment ``failed`` (``last_error`` says why), in which case the fan may confirm
again while the hold lasts, which queues the next attempt.

Lifecycle of an order::

    awaiting_payment ──payment succeeded──▶ paid (final; tickets issued)
          ▲   └────────payment failed────▶ failed ──start_payment again──┐
          └──────────────────────────────────────────────────────────────┘

Each attempt is its own ``payments`` row with the charge key ``"{order_id}:{n}"``: the
provider charges a key at most once, so a retried *attempt* can never charge twice, while a
fan's new attempt (after a decline) is a new charge.

An order's history is in ``order_events``, one row per step written in the transaction of
the step (:func:`record_event`; read with :func:`order_history`): ``payment.started`` here,
``payment.succeeded`` and ``payment.failed`` by the payment workers, ``payment.reconciled``
by the reconciler (``workers.reconcile``), which settles payments that ended without knowing
whether the provider charged, and says what it found and did.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

import msgspec

from inventory.store import Conn
from waitroom.core import tracing
from waitroom.core.db import hint
from waitroom.core.errors import Conflict, Gone, NotFound

OrderStatus = Literal["awaiting_payment", "paid", "failed", "cancelled"]


class PaymentRefused(Conflict):
    """A 409 from :func:`start_payment`; see its docstring for the codes."""


#: PostgreSQL channel a new pending payment is announced on, so idle workers wake at once.
PAYMENTS_CHANNEL = "waitroom_payments"
#: PostgreSQL channel an order's settled payment (paid, failed) is announced on, with the
#: hold's id: the long polls of the fans waiting for it answer at once.
RESERVATIONS_CHANNEL = "waitroom_reservations"

#: Kinds of ``order_events`` rows.
PAYMENT_STARTED = "payment.started"
PAYMENT_SUCCEEDED = "payment.succeeded"
PAYMENT_FAILED = "payment.failed"
PAYMENT_RECONCILED = "payment.reconciled"


def event_insert(first: int = 1) -> str:
    """The statement adding a step to an order's history, its parameters numbered from
    ``first``: the order's id, the payment's (or NULL), the kind and the detail (JSON, see
    :func:`event_detail`). Numbered so that a larger statement can carry it."""
    order, payment, kind, detail = (f"${first + i}" for i in range(4))
    return (
        "INSERT INTO order_events (order_id, payment_id, kind, detail)"
        f" VALUES ({order}::uuid, {payment}::uuid, {kind}, {detail}::jsonb)"
    )


def event_detail(**detail: Any) -> str:
    """A history step's detail, as :func:`event_insert` takes it."""
    return msgspec.json.encode(detail).decode()


async def record_event(
    conn: Conn, order_id: str, kind: str, *, payment_id: str | None = None, **detail: Any
) -> None:
    """Add a step to the order's history, on ``conn`` (inside the step's own transaction)."""
    await conn.execute(event_insert(), order_id, payment_id, kind, event_detail(**detail))


class OrderEvent(msgspec.Struct, frozen=True):
    """One step of an order's history."""

    at: datetime
    kind: str
    payment_id: str | None
    detail: dict[str, Any]


async def order_history(conn: Conn, order_id: str) -> list[OrderEvent]:
    """The order's history, oldest first."""
    rows = await conn.fetch(
        "SELECT at, kind, payment_id::text, detail::text FROM order_events"
        " WHERE order_id = $1::uuid ORDER BY id",
        _uuid(order_id),
    )
    return [
        OrderEvent(
            at=r["at"],
            kind=r["kind"],
            payment_id=r["payment_id"],
            detail=msgspec.json.decode(r["detail"]),
        )
        for r in rows
    ]


async def start_payment(
    conn: Conn,
    hold_id: str,
    fan_id: str,
    method: str,
    *,
    email: str | None = None,
    key: str | None = None,
) -> tuple[str, str]:
    """Queue a payment attempt for ``fan_id``'s hold; return ``(order_id, payment_id)``.

    Creates the hold's order on first use (amount = price x quantity, from PostgreSQL, never
    from the client) or reuses it, and inserts the order's next payment attempt (``pending``,
    due now, charge key ``"{order_id}:{n}"``); the order goes (back) to ``awaiting_payment``.
    ``email`` (validated by the caller), when given, becomes the order's e-mail address (its
    notifications go there; an order without one gets none). ``key``, the confirm's
    Idempotency-Key, is kept on the attempt: asked again with it, this answers with that
    attempt, whatever became of it (paid, failed, under way), and starts nothing.
    One statement, ``payment_start()`` (schema 24), in its own implicit transaction (or the
    caller's), locking the order row, so two concurrent confirms of one hold queue one
    attempt and the other is refused. A refusal writes nothing. A payment started is
    announced to the workers once committed (:func:`~waitroom.core.db.hint`).

    Refusals (errors of waitroom.core.errors the checkout may render as they are):

    - 404 :class:`~waitroom.core.errors.NotFound` ``hold_not_found``: no such hold, or not this
      fan's (indistinguishable on purpose);
    - 409 :class:`PaymentRefused` ``payment_in_progress``: an attempt is pending or
      processing; ``details`` carry its ``order_id`` and ``payment_id``, so a repeated confirm
      can answer with the payment under way;
    - 409 :class:`PaymentRefused` ``hold_already_confirmed``: the order is paid;
      ``hold_cancelled``: the hold was cancelled;
    - 410 :class:`~waitroom.core.errors.Gone` ``hold_expired``: the hold is past its deadline.

    The hold is read from PostgreSQL, which can lag the actor by one group commit; the payment
    worker's confirm through the actor is the authority, so a hold that lapses meanwhile ends
    in a refund, never in a sale.
    """
    # One statement (schema 24): the same checks and writes as a dozen round trips were,
    # while the pooled connection is held only for one (see the migration).
    row = await conn.fetchrow(
        "SELECT outcome, order_id::text, payment_id::text"
        " FROM payment_start($1::uuid, $2, $3, $4, $5, $6, $7::uuid, $8::uuid)",
        _uuid(hold_id),
        fan_id,
        method,
        email,
        key,
        # The payment worker links its attempt to the request that asked for it.
        tracing.traceparent() if tracing.recording() else None,
        str(uuid.uuid4()),
        str(uuid.uuid4()),
    )
    assert row is not None
    outcome, order_id, payment_id = row["outcome"], row["order_id"], row["payment_id"]
    details = {"hold_id": hold_id, "order_id": order_id}
    if outcome == "started":
        # Idle workers claim it at once instead of at their next poll. Sent after the
        # commit, not by payment_start() in it (schema 25: see waitroom.core.db.hint).
        await hint(conn, PAYMENTS_CHANNEL, payment_id)
    if outcome in ("started", "again"):
        return order_id, payment_id
    if outcome == "hold_not_found":
        raise NotFound("No such reservation.", code="hold_not_found", details={"hold_id": hold_id})
    if outcome == "payment_in_progress":
        raise PaymentRefused(
            "A payment for this reservation is already in progress.",
            code="payment_in_progress",
            details={**details, "payment_id": payment_id},
        )
    if outcome == "hold_expired":
        raise Gone("This reservation expired.", code="hold_expired", details=details)
    message = _REFUSALS.get(outcome)
    if message is None:
        raise RuntimeError(f"payment_start answered {outcome!r}")
    raise PaymentRefused(message, code=outcome, details=details)


#: The messages of start_payment's 409s, by code (payment_in_progress has its payment).
_REFUSALS = {
    "hold_already_confirmed": "This reservation is already paid.",
    "hold_cancelled": "This reservation was cancelled.",
}


class PaymentInfo(msgspec.Struct, frozen=True):
    """The latest payment attempt of an order."""

    id: str
    state: str
    method: str
    attempts: int
    last_error: str | None


class TicketInfo(msgspec.Struct, frozen=True):
    """An issued ticket; ``code`` is what the fan shows at the door, ``token`` its signed form
    (the QR code's content; the checkout signs it, see :mod:`inventory.tickets`)."""

    code: str
    ticket_type: str
    issued_at: datetime | None = None
    token: str | None = None
    #: The seat it admits to (``SECTION:ROW:SEAT``), for a seated ticket type.
    seat: str | None = None


class Reservation(msgspec.Struct, frozen=True):
    """A hold and, once the fan pays, its order, payment and tickets.

    ``status`` is the hold's: it turns ``paid`` when the event's actor confirms the hold, a
    moment before the payment worker commits the paid order and its tickets. The purchase is
    complete when ``order_status`` is ``paid``.
    """

    id: str
    event_id: str
    ticket_type: str
    quantity: int
    status: str
    expires_at: datetime
    amount_minor: int
    currency: str
    order_id: str | None = None
    order_status: str | None = None
    payment: PaymentInfo | None = None
    tickets: list[TicketInfo] = []
    #: The seats held (``SECTION:ROW:SEAT``), for a seated ticket type; empty otherwise.
    seats: list[str] = []


class Order(msgspec.Struct, frozen=True):
    """One of the fan's orders."""

    id: str
    event_id: str
    reservation_id: str
    status: str
    amount_minor: int
    currency: str
    created_at: datetime
    paid_at: datetime | None
    tickets: list[TicketInfo]
    #: The seats of the order's reservation, for a seated ticket type.
    seats: list[str] = []


#: The rest of a read of ``fan_id``'s (``$2``) hold ``h`` (``$1``): its order ``o`` and that
#: order's latest payment ``p``, as :func:`get_reservation` and :func:`payment_under_way` see them.
_ORDER_AND_LATEST_PAYMENT = (
    " LEFT JOIN orders o ON o.hold_id = h.id"
    " LEFT JOIN LATERAL (SELECT id, state, method, attempts, last_error FROM payments"
    "  WHERE order_id = o.id ORDER BY created_at DESC, id LIMIT 1) p ON true"
    " WHERE h.id = $1::uuid AND h.fan_id = $2"
)


async def _fans_hold(conn: Conn, select: str, hold_id: str, fan_id: str) -> Any:
    """The row of ``select`` (``... FROM holds h [joins]``) over ``fan_id``'s hold ``hold_id``
    with its order and latest payment (:data:`_ORDER_AND_LATEST_PAYMENT`); 404
    ``hold_not_found`` for anyone else's hold or an unknown one."""
    row = await conn.fetchrow(select + _ORDER_AND_LATEST_PAYMENT, _uuid(hold_id), fan_id)
    if row is None:
        raise NotFound("no such reservation", code="hold_not_found")
    return row


async def reservation_event(conn: Conn, hold_id: str, fan_id: str) -> str:
    """The event of ``fan_id``'s hold ``hold_id``: what a confirm needs before checking the
    fan's pass, in one small row instead of :func:`get_reservation`'s whole document.
    404 ``hold_not_found`` for anyone else's hold, as there."""
    event_id: str | None = await conn.fetchval(
        "SELECT event_id FROM holds WHERE id = $1::uuid AND fan_id = $2", _uuid(hold_id), fan_id
    )
    if event_id is None:
        raise NotFound("no such reservation", code="hold_not_found")
    return event_id


async def payment_under_way(conn: Conn, hold_id: str, fan_id: str) -> bool:
    """Whether ``fan_id``'s hold has a payment under way: its order is not paid and its
    latest payment is pending or processing (what a long poll waits for the end of).
    404 ``hold_not_found`` for anyone else's hold, as :func:`get_reservation`."""
    row = await _fans_hold(
        conn, "SELECT o.status AS order_status, p.state AS pay_state FROM holds h", hold_id, fan_id
    )
    return paying(row["order_status"], row["pay_state"])


def paying(order_status: str | None, payment_state: str | None) -> bool:
    """A payment under way: the order is not paid and its latest payment not settled."""
    return order_status != "paid" and payment_state in ("pending", "processing")


async def get_reservation(conn: Conn, hold_id: str, fan_id: str) -> Reservation:
    """``fan_id``'s hold with its order, latest payment and tickets: what checkout polls.

    Poll until ``order_status == "paid"`` (then ``tickets`` are all there, written in the
    same transaction) or ``payment.state == "failed"`` (``payment.last_error``: ``declined``,
    ``hold expired; refunded``...). 404 ``hold_not_found`` for anyone else's hold.
    """
    # One statement, one round trip: checkout pages poll this every half second while a
    # payment runs, and a pooled connection held across three statements is held three
    # turns of a busy event loop.
    row = await _fans_hold(
        conn,
        "SELECT h.id::text, h.event_id, h.ticket_type, h.quantity, h.status, h.expires_at,"
        " h.expires_at <= now() AS lapsed, t.price_minor, t.currency,"
        " o.id::text AS order_id, o.status AS order_status,"
        " p.id::text AS pay_id, p.state AS pay_state, p.method AS pay_method,"
        " p.attempts AS pay_attempts, p.last_error AS pay_error,"
        " ARRAY(SELECT k.code FROM tickets k WHERE k.order_id = o.id ORDER BY k.code)"
        "  AS codes,"
        " ARRAY(SELECT k.ticket_type FROM tickets k WHERE k.order_id = o.id ORDER BY k.code)"
        "  AS code_types,"
        " ARRAY(SELECT k.issued_at FROM tickets k WHERE k.order_id = o.id ORDER BY k.code)"
        "  AS code_times,"
        " ARRAY(SELECT k.seat_id FROM tickets k WHERE k.order_id = o.id ORDER BY k.code)"
        "  AS code_seats,"
        " ARRAY(SELECT s.seat_id FROM seat_holds s WHERE s.hold_id = h.id ORDER BY s.position)"
        "  AS seats"
        " FROM holds h JOIN ticket_types t ON t.event_id = h.event_id AND t.name = h.ticket_type",
        hold_id,
        fan_id,
    )
    payment = None
    if row["pay_id"] is not None:
        payment = PaymentInfo(
            row["pay_id"],
            row["pay_state"],
            row["pay_method"],
            row["pay_attempts"],
            row["pay_error"],
        )
    tickets = [
        TicketInfo(code, kind, at, seat=seat)
        for code, kind, at, seat in zip(
            row["codes"], row["code_types"], row["code_times"], row["code_seats"], strict=True
        )
    ]
    status = row["status"]
    if status == "held" and row["lapsed"]:
        status = "expired"  # past its deadline; the actor's timer settles the row shortly
    return Reservation(
        id=row["id"],
        event_id=row["event_id"],
        ticket_type=row["ticket_type"],
        quantity=row["quantity"],
        status=status,
        expires_at=row["expires_at"],
        amount_minor=row["price_minor"] * row["quantity"],
        currency=row["currency"].strip(),
        order_id=row["order_id"],
        order_status=row["order_status"],
        payment=payment,
        tickets=tickets,
        seats=list(row["seats"]),
    )


async def list_orders(
    conn: Conn, fan_id: str, event_id: str | None = None, *, limit: int = 100
) -> list[Order]:
    """``fan_id``'s orders, newest first (``GET /v1/orders``), optionally of one event."""
    rows = await conn.fetch(
        "SELECT id::text, event_id, hold_id::text, status, amount_minor, currency,"
        " created_at, paid_at FROM orders WHERE fan_id = $1"
        " AND ($2::text IS NULL OR event_id = $2) ORDER BY created_at DESC LIMIT $3",
        fan_id,
        event_id,
        limit,
    )
    if not rows:
        return []
    by_order: dict[str, list[TicketInfo]] = {}
    for t in await conn.fetch(
        "SELECT order_id::text, code, ticket_type, issued_at, seat_id FROM tickets"
        " WHERE order_id = ANY($1::uuid[]) ORDER BY order_id, code",
        [r["id"] for r in rows],
    ):
        by_order.setdefault(t["order_id"], []).append(
            TicketInfo(t["code"], t["ticket_type"], t["issued_at"], seat=t["seat_id"])
        )
    seats: dict[str, list[str]] = {}
    for s in await conn.fetch(
        "SELECT hold_id::text, seat_id FROM seat_holds"
        " WHERE hold_id = ANY($1::uuid[]) ORDER BY hold_id, position",
        [r["hold_id"] for r in rows],
    ):
        seats.setdefault(s["hold_id"], []).append(s["seat_id"])
    return [
        Order(
            id=r["id"],
            event_id=r["event_id"],
            reservation_id=r["hold_id"],
            status=r["status"],
            amount_minor=r["amount_minor"],
            currency=r["currency"].strip(),
            created_at=r["created_at"],
            paid_at=r["paid_at"],
            tickets=by_order.get(r["id"], []),
            seats=seats.get(r["hold_id"], []),
        )
        for r in rows
    ]


def _uuid(value: str) -> str:
    """``value`` if it is a UUID; a malformed id is unknown (404), not a database error."""
    try:
        return str(uuid.UUID(value))
    except (ValueError, TypeError):
        return "00000000-0000-0000-0000-000000000000"
