"""Pass-gated checkout: reserve, look, pay, cancel, and the fan's orders with ticket codes.

Every write goes through the pass gate (``X-Queue-Pass``: the pass must be for this event and
this fan, unexpired, unrevoked and not yet spent) and then through the event's inventory actor
(reserve, cancel) or the payment flow (confirm). Writes take an ``Idempotency-Key``: reserve and
cancel hand it to the actor, which stores the first result with the change; confirming a hold
whose payment is already under way answers with that payment instead of starting another.

Paying is asynchronous: confirm answers 202 with the payment ``pending``; the payment workers
charge the provider, mark the hold paid through the actor and issue the tickets. Clients poll
``GET /v1/reservations/{id}`` until the order is ``paid`` (tickets listed) or the payment
``failed`` (they may confirm again while the hold lasts).
"""

from __future__ import annotations

import re
import time
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

import asyncpg
import msgspec
from msgspec import Meta
from starlette.requests import Request
from starlette.responses import Response

from admission.operators import complete_pass
from admission.passes import PassClaims, require_pass
from inventory import catalogue
from inventory.hosting import InventoryHost
from inventory.ledger import (
    REFUSAL_STATUS,
    Cancel,
    Cancelled,
    Refused,
    Reserve,
    Reserved,
)
from waitroom.context import context
from waitroom.errors import (
    Conflict,
    Forbidden,
    Gone,
    NotFound,
    ValidationFailed,
    WaitroomError,
)
from waitroom.http import JSONResponse, read_json
from waitroom.identity import missing
from waitroom.openapi import Operation
from waitroom.queue_api import services
from workers.orders import PaymentRefused, start_payment

_KEY_RE = re.compile(r"^[\x21-\x7e]{1,200}$")
_UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$"
)


class ReserveRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/events/{event_id}/reservations``."""

    ticket_type: Annotated[str, Meta(min_length=1, max_length=64)]
    quantity: Annotated[int, Meta(ge=1, le=100)]


class ConfirmRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/reservations/{id}/confirm``."""

    payment_method: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]


class PaymentInfo(msgspec.Struct, frozen=True):
    """The latest payment attempt of an order."""

    id: str
    state: str
    method: str
    attempts: int
    last_error: str | None


class TicketInfo(msgspec.Struct, frozen=True):
    """An issued ticket."""

    code: str
    ticket_type: str


class Reservation(msgspec.Struct, frozen=True):
    """A hold and, once the fan pays, its order, payment and tickets."""

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


class CancelledReservation(msgspec.Struct, frozen=True):
    """Body of a successful cancel."""

    id: str
    status: str


# --- helpers ------------------------------------------------------------------------------


def _fan(request: Request) -> str:
    identity = services(request).identities.resolve(request, time.time())
    if identity is None:
        raise missing()
    return identity.fan_id


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not _KEY_RE.match(key):
        raise ValidationFailed(
            "Idempotency-Key must be 1 to 200 visible ASCII characters",
            field="Idempotency-Key",
        )
    return key


def _host(request: Request) -> InventoryHost:
    host: InventoryHost = context(request).services["inventory"]
    return host


def refusal_error(refused: Refused) -> WaitroomError:
    """The HTTP error a typed refusal of the inventory is answered with."""
    status = REFUSAL_STATUS.get(refused.code, 409)
    kind: type[WaitroomError] = {404: NotFound, 410: Gone, 422: ValidationFailed}.get(
        status, Conflict
    )
    if kind is ValidationFailed:
        error: WaitroomError = ValidationFailed(refused.message, code=refused.code)
        error.details = dict(refused.details)
        return error
    return kind(refused.message, code=refused.code, details=dict(refused.details))


async def _gate(request: Request, event_id: str, fan_id: str) -> PassClaims:
    claims = await require_pass(request, event_id, fan_id)
    ctx = context(request)
    if await ctx.redis.exists(ctx.keys.spent_pass(claims.jti)):
        raise Forbidden(
            "this queue pass was used for a paid order; it cannot reserve again",
            code="pass_spent",
        )
    return claims


async def _price(request: Request, event_id: str, ticket_type: str) -> tuple[int, str]:
    cache: dict[str, catalogue.EventDetail] = context(request).services.setdefault(
        "event_cache", {}
    )
    event = cache.get(event_id)
    if event is None:
        event = await catalogue.get_event(context(request).db, event_id)
        cache[event_id] = event  # prices and ticket types never change after creation
    for t in event.ticket_types:
        if t.name == ticket_type:
            return t.price_minor, t.currency
    return 0, ""


def _hold_id(raw: str) -> str:
    if not _UUID_RE.match(raw):
        raise NotFound("no such reservation", code="hold_not_found")
    return str(uuid.UUID(raw))


async def load_reservation(pool: asyncpg.Pool[Any], hold_id: str, fan_id: str) -> Reservation:
    """The fan's hold with its order, latest payment and tickets; 404 for anyone else's."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT h.id::text, h.event_id, h.ticket_type, h.quantity, h.status, h.expires_at,"
            " t.price_minor, t.currency, o.id::text AS order_id, o.status AS order_status"
            " FROM holds h JOIN ticket_types t ON t.event_id = h.event_id AND t.name = h.ticket_type"
            " LEFT JOIN orders o ON o.hold_id = h.id"
            " WHERE h.id = $1 AND h.fan_id = $2",
            hold_id,
            fan_id,
        )
        if row is None:
            raise NotFound("no such reservation", code="hold_not_found")
        payment = None
        tickets: list[TicketInfo] = []
        if row["order_id"] is not None:
            pay = await conn.fetchrow(
                "SELECT id::text, state, method, attempts, last_error FROM payments"
                " WHERE order_id = $1 ORDER BY created_at DESC, id LIMIT 1",
                row["order_id"],
            )
            if pay is not None:
                payment = PaymentInfo(
                    pay["id"], pay["state"], pay["method"], pay["attempts"], pay["last_error"]
                )
            tickets = [
                TicketInfo(t["code"], t["ticket_type"])
                for t in await conn.fetch(
                    "SELECT code, ticket_type FROM tickets WHERE order_id = $1 ORDER BY code",
                    row["order_id"],
                )
            ]
    status = row["status"]
    if status == "held" and row["expires_at"] <= datetime.now(UTC):
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
    )


# --- routes -------------------------------------------------------------------------------


async def reserve(request: Request) -> Response:
    """Hold tickets for the pass holder until the event's hold deadline."""
    event_id: str = request.path_params["event_id"]
    fan_id = _fan(request)
    key = _idempotency_key(request)
    claims = await _gate(request, event_id, fan_id)
    body = await read_json(request, ReserveRequest)
    result = await _host(request).ask(
        event_id, Reserve(fan_id, body.ticket_type, body.quantity, key, claims.jti)
    )
    if isinstance(result, Refused):
        raise refusal_error(result)
    assert isinstance(result, Reserved)
    hold = result.hold
    price, currency = await _price(request, event_id, hold.ticket_type)
    reservation = Reservation(
        id=hold.id,
        event_id=event_id,
        ticket_type=hold.ticket_type,
        quantity=hold.quantity,
        status=hold.status,
        expires_at=datetime.fromtimestamp(hold.expires_at, UTC),
        amount_minor=price * hold.quantity,
        currency=currency,
    )
    return JSONResponse(
        reservation, status_code=201, headers={"Location": f"/v1/reservations/{hold.id}"}
    )


async def get_reservation(request: Request) -> Response:
    """The fan's reservation, with its order, payment and tickets once paid."""
    fan_id = _fan(request)
    hold_id = _hold_id(request.path_params["reservation_id"])
    return JSONResponse(await load_reservation(context(request).db, hold_id, fan_id))


async def confirm(request: Request) -> Response:
    """Pay for a hold: starts a payment (202); poll the reservation for the outcome."""
    fan_id = _fan(request)
    hold_id = _hold_id(request.path_params["reservation_id"])
    _idempotency_key(request)  # validated; a repeated confirm answers the payment under way
    pool = context(request).db
    current = await load_reservation(pool, hold_id, fan_id)
    await require_pass(request, current.event_id, fan_id)
    body = await read_json(request, ConfirmRequest)
    if current.order_status == "paid":
        raise Conflict("this reservation is paid already", code="hold_already_confirmed")
    if current.status == "expired":
        raise Gone("the hold has expired; reserve again", code="hold_expired")
    if current.status == "cancelled":
        raise Conflict("the hold was cancelled", code="hold_cancelled")
    try:
        async with pool.acquire() as conn:
            await start_payment(conn, hold_id, fan_id, body.payment_method)
    except PaymentRefused as exc:
        # Confirming again while the payment runs answers with that payment: a retried
        # confirm never starts a second charge.
        if exc.code != "payment_in_progress":
            raise
    return JSONResponse(await load_reservation(pool, hold_id, fan_id), status_code=202)


async def cancel(request: Request) -> Response:
    """Release a hold before its deadline."""
    fan_id = _fan(request)
    hold_id = _hold_id(request.path_params["reservation_id"])
    key = _idempotency_key(request)
    ctx = context(request)
    current = await load_reservation(ctx.db, hold_id, fan_id)
    claims = await require_pass(request, current.event_id, fan_id)
    result = await _host(request).ask(current.event_id, Cancel(hold_id, fan_id, key))
    if isinstance(result, Refused):
        raise refusal_error(result)
    assert isinstance(result, Cancelled)
    live = await ctx.db.fetchval(
        "SELECT count(*) FROM holds WHERE event_id = $1 AND fan_id = $2 AND status = 'held'",
        current.event_id,
        fan_id,
    )
    if not live:
        # Nothing left on hold: the fan is done shopping, so the next fan may be admitted.
        await complete_pass(ctx.redis, ctx.keys, current.event_id, claims.jti)
    return JSONResponse(CancelledReservation(result.hold.id, result.hold.status))


async def list_orders(request: Request) -> Response:
    """The fan's orders, newest first, with their ticket codes."""
    fan_id = _fan(request)
    async with context(request).db.acquire() as conn:
        rows = await conn.fetch(
            "SELECT id::text, event_id, hold_id::text, status, amount_minor, currency,"
            " created_at, paid_at FROM orders WHERE fan_id = $1 ORDER BY created_at DESC LIMIT 100",
            fan_id,
        )
        tickets = await conn.fetch(
            "SELECT order_id::text, code, ticket_type FROM tickets WHERE fan_id = $1", fan_id
        )
    by_order: dict[str, list[TicketInfo]] = {}
    for t in tickets:
        by_order.setdefault(t["order_id"], []).append(TicketInfo(t["code"], t["ticket_type"]))
    return JSONResponse(
        [
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
            )
            for r in rows
        ]
    )


_PASS_ERRORS = (401, 403, 404, 409, 410, 503)
OPERATIONS = [
    Operation(
        "POST",
        "/v1/events/{event_id}/reservations",
        reserve,
        "Reserve tickets",
        request=ReserveRequest,
        response=Reservation,
        status=201,
        errors=_PASS_ERRORS,
        tags=("checkout",),
        auth="pass",
    ),
    Operation(
        "GET",
        "/v1/reservations/{reservation_id}",
        get_reservation,
        "A reservation with its order and tickets",
        response=Reservation,
        errors=(401, 404, 503),
        tags=("checkout",),
    ),
    Operation(
        "POST",
        "/v1/reservations/{reservation_id}/confirm",
        confirm,
        "Pay for a reservation",
        request=ConfirmRequest,
        response=Reservation,
        status=202,
        errors=_PASS_ERRORS,
        tags=("checkout",),
        auth="pass",
    ),
    Operation(
        "DELETE",
        "/v1/reservations/{reservation_id}",
        cancel,
        "Cancel a reservation",
        response=CancelledReservation,
        errors=_PASS_ERRORS,
        tags=("checkout",),
        auth="pass",
    ),
    Operation(
        "GET",
        "/v1/orders",
        list_orders,
        "The fan's orders and tickets",
        response=list[Order],
        errors=(401, 503),
        tags=("checkout",),
    ),
]
