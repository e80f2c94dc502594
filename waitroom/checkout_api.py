"""Pass-gated checkout: reserve, look, pay, cancel, and the fan's orders with ticket codes.

Every write goes through the pass gate (``X-Queue-Pass``: the pass must be for this event and
this fan, unexpired, unrevoked and not yet spent) and then through the event's inventory actor
(reserve, cancel) or the payment flow (confirm). Writes take an ``Idempotency-Key``: reserve and
cancel hand it to the actor, which stores the first result with the change; confirming a hold
whose payment is already under way answers with that payment instead of starting another.

Against abuse (a pass is a scarce slot of the sale, not a licence to hold tickets hostage):

- one hold cycle per pass: once every hold made with a pass is cancelled, expired or paid,
  that pass reserves no more (403 ``pass_used``: the pass's turn is over). A cancel
  that leaves nothing on hold frees the pass's admission slot at once
  (:func:`~admission.operators.complete_pass`), and so does the expiry of its last hold
  (the inventory host, told by the actor); since the pass cannot shop again, the next
  fan's admission never takes the shoppers above ``max_active``. The rule lives in the
  pure ledger (:mod:`inventory.ledger`);
- every write (reserve, confirm, cancel) is charged to a token bucket of its pass
  (:func:`require_pass` with ``write``): 429 ``checkout_rate_limited`` with
  ``Retry-After`` past it;
- idempotency records are bounded: refusals per fan in the ledger, and by age in
  PostgreSQL (:mod:`workers.safety`).

Paying is asynchronous: confirm answers 202 with the payment ``pending``; the payment workers
charge the provider, mark the hold paid through the actor and issue the tickets. Clients poll
``GET /v1/reservations/{id}`` until the order is ``paid`` (tickets listed) or the payment
``failed`` (they may confirm again while the hold lasts).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Annotated

import msgspec
from msgspec import Meta
from starlette.requests import Request
from starlette.responses import Response

from admission.operators import complete_pass
from admission.passes import HEADER, PassClaims
from inventory.ledger import (
    REFUSAL_STATUS,
    TICKETS_HELD,
    Cancel,
    Cancelled,
    Refused,
    Reserve,
    Reserved,
)
from inventory.orders import (
    Order,
    PaymentRefused,
    Reservation,
    TicketInfo,
    get_reservation,
    list_orders,
    payment_under_way,
    reservation_event,
    start_payment,
)
from inventory.tickets import claims_of, sign_ticket
from waitroom.core import deadline, ids
from waitroom.core.affinity import add_owner_cookie
from waitroom.core.errors import (
    Conflict,
    Forbidden,
    Gone,
    NotFound,
    ValidationFailed,
    WaitroomError,
)
from waitroom.core.http import JSONResponse, read_json
from waitroom.core.openapi import Operation
from waitroom.line.identity import missing
from waitroom.line.ratelimit import Limit
from waitroom.reservation_changes import MAX_WAIT_S
from waitroom.services import services

_KEY_RE = re.compile(r"^[\x21-\x7e]{1,200}$")
_DOMAIN_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
#: A fan's e-mail address: a dot-atom local part and a dotted domain (no quoted local parts,
#: no comments, no spaces or line breaks: nothing that could become a second header).
EMAIL_PATTERN = (
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@" + _DOMAIN_LABEL + r"(?:\." + _DOMAIN_LABEL + r")+"
) + ids.END


SeatId = Annotated[
    str,
    Meta(
        pattern=r"^[a-z0-9][a-z0-9_-]{0,31}:[A-Za-z0-9][A-Za-z0-9._-]{0,15}"
        r":[A-Za-z0-9][A-Za-z0-9._-]{0,15}" + ids.END,
        description="a seat of the event's seat map: SECTION:ROW:SEAT (docs/seatmap.md)",
        examples=["stalls:A:1"],
    ),
]


class BestAvailable(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``count`` best free seats of price level ``level``: side by side in one row where
    possible, nearest the section's focal point, leaving no single seat stranded."""

    level: Annotated[str, Meta(min_length=1, max_length=32)]
    count: Annotated[int, Meta(ge=1, le=100)]


class ReserveRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/events/{event_id}/reservations``: exactly one of

    - ``ticket_type`` and ``quantity`` (general admission, sold by quantity);
    - ``seats``: exactly these seats (pick your seat), all of one ticket type;
    - ``best_available``: the best free seats of a price level.
    """

    ticket_type: Annotated[str, Meta(min_length=1, max_length=64)] | None = None
    quantity: Annotated[int, Meta(ge=1, le=100)] | None = None
    seats: Annotated[list[SeatId], Meta(min_length=1, max_length=100)] | None = None
    best_available: BestAvailable | None = None

    def command(self, fan_id: str, key: str | None, pass_jti: str) -> Reserve:
        """The inventory command this body asks for; 422 unless exactly one form is used."""
        forms = [
            name
            for name, given in (
                ("ticket_type", self.ticket_type is not None or self.quantity is not None),
                ("seats", self.seats is not None),
                ("best_available", self.best_available is not None),
            )
            if given
        ]
        if len(forms) != 1:
            raise ValidationFailed(
                "give exactly one of ticket_type with quantity, seats, or best_available"
                + (f" (got {', '.join(forms)})" if forms else ""),
                field=forms[-1] if forms else "ticket_type",
                code="reservation_form",
            )
        if self.seats is not None:
            return Reserve(fan_id, "", len(self.seats), key, pass_jti, seats=tuple(self.seats))
        if self.best_available is not None:
            best = self.best_available
            return Reserve(fan_id, "", best.count, key, pass_jti, level=best.level)
        if self.ticket_type is None or self.quantity is None:
            raise ValidationFailed(
                "ticket_type and quantity go together",
                field="quantity" if self.quantity is None else "ticket_type",
            )
        return Reserve(fan_id, self.ticket_type, self.quantity, key, pass_jti)


class ConfirmRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/reservations/{id}/confirm``."""

    payment_method: Annotated[
        str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+" + ids.END)
    ]
    #: Where the order's e-mails go (the tickets, a failed payment, a refund, a reminder);
    #: without one the order gets no e-mail.
    email: Annotated[str, Meta(min_length=6, max_length=254, pattern=EMAIL_PATTERN)] | None = None


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


async def require_pass(
    request: Request,
    event_id: str,
    fan_id: str,
    *,
    unspent: bool = False,
    write: bool = False,
) -> PassClaims:
    """The claims of the pass in ``X-Queue-Pass``, checked for ``event_id`` and ``fan_id``.

    The one call checkout routes make before anything else (see
    :meth:`~admission.passes.PassGate.check` for what is refused, and how). With ``write``,
    the request counts as one checkout write of the pass: a token bucket per pass
    (``WAITROOM_CHECKOUT_RATE_PER_S``, ``_BURST``: 0.5/s, 20 at once by default) in Redis,
    shared by every process, 429 with ``Retry-After`` past it. An honest fan makes a handful
    of writes (reserve, maybe a retry or a declined card, confirm, perhaps a cancel); the
    limit is there for a script hammering reserve or spraying idempotency keys, each of
    which would cost the actor a command and PostgreSQL a row. Charged only once the pass
    is known good, so requests without a good pass cannot empty anyone's bucket.
    """
    svc = services(request)
    limit = None
    if write:
        shape = (svc.settings.checkout_rate_per_s, svc.settings.checkout_burst)
        limit = _limits.get(shape)
        if limit is None:
            limit = _limits[shape] = Limit(*shape)
    return await svc.passes.check(
        request.headers.get(HEADER),
        event_id=event_id,
        fan_id=fan_id,
        now=time.time(),
        unspent=unspent,
        charge=limit,
    )


_limits: dict[tuple[float, int], Limit] = {}


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not _KEY_RE.fullmatch(key):
        raise ValidationFailed(
            "Idempotency-Key must be 1 to 200 visible ASCII characters",
            field="Idempotency-Key",
        )
    return key


def refusal_error(refused: Refused) -> WaitroomError:
    """The HTTP error a typed refusal of the inventory is answered with."""
    status = REFUSAL_STATUS.get(refused.code, 409)
    kind: type[WaitroomError] = {
        403: Forbidden,
        404: NotFound,
        410: Gone,
        422: ValidationFailed,
    }.get(status, Conflict)
    if kind is ValidationFailed:
        error: WaitroomError = ValidationFailed(refused.message, code=refused.code)
        error.details = dict(refused.details)
        return error
    error = kind(refused.message, code=refused.code, details=dict(refused.details))
    if refused.code == TICKETS_HELD:
        # Holds lapse within minutes and buyers pay within seconds: worth asking again soon.
        error.headers["Retry-After"] = str(TICKETS_HELD_RETRY_S)
    return error


def _hold_id(raw: str) -> str:
    # The route's guard checked the form already; checked again because uuid.UUID must not
    # see anything else ("<uuid>\n" passed a `$`-anchored check here and raised: a 500).
    return str(uuid.UUID(ids.RESERVATION_ID.check(raw)))


def _signed(
    request: Request, event_id: str, order_id: str | None, tickets: list[TicketInfo]
) -> list[TicketInfo]:
    """``tickets`` with their signed form (what their QR codes hold; ``inventory.tickets``)."""
    if not tickets or order_id is None:
        return tickets
    svc = services(request)
    return [
        msgspec.structs.replace(
            t,
            token=sign_ticket(
                svc.passes.pass_keys,
                claims_of(
                    issuer=svc.settings.pass_issuer,
                    code=t.code,
                    event_id=event_id,
                    ticket_type=t.ticket_type,
                    order_id=order_id,
                    issued_at=t.issued_at,
                    seat=t.seat,
                ),
            ),
        )
        if t.issued_at is not None
        else t
        for t in tickets
    ]


def _with_tokens(request: Request, reservation: Reservation) -> Reservation:
    if not reservation.tickets:
        return reservation
    tickets = _signed(request, reservation.event_id, reservation.order_id, reservation.tickets)
    return msgspec.structs.replace(reservation, tickets=tickets)


#: Retry-After of a ``tickets_held`` refusal: when trying again may find tickets returned.
TICKETS_HELD_RETRY_S = 5


# --- routes -------------------------------------------------------------------------------


async def reserve(request: Request) -> Response:
    """Hold tickets for the pass holder until the event's hold deadline."""
    event_id: str = request.path_params["event_id"]
    fan_id = _fan(request)
    key = _idempotency_key(request)
    claims = await require_pass(request, event_id, fan_id, unspent=True, write=True)
    body = await read_json(request, ReserveRequest)
    command = body.command(fan_id, key, claims.jti)
    result = await services(request).inventory.ask(event_id, command)
    if isinstance(result, Refused):
        # A refused fan tries again (tickets held now may come back): at the owner, then.
        refusal = refusal_error(result)
        await _route_to_owner(request, event_id, refusal.headers)
        raise refusal
    assert isinstance(result, Reserved)
    hold = result.hold
    price, currency = await services(request).prices.price(event_id, hold.ticket_type)
    reservation = Reservation(
        id=hold.id,
        event_id=event_id,
        ticket_type=hold.ticket_type,
        quantity=hold.quantity,
        status=hold.status,
        expires_at=datetime.fromtimestamp(hold.expires_at, UTC),
        amount_minor=price * hold.quantity,
        currency=currency,
        seats=list(hold.seats),
    )
    headers = {"Location": f"/v1/reservations/{hold.id}"}
    await _route_to_owner(request, event_id, headers)
    return JSONResponse(reservation, status_code=201, headers=headers)


async def _route_to_owner(request: Request, event_id: str, headers: dict[str, str]) -> None:
    """The cookie that sends the fan's next checkout requests to the actor's node."""
    svc = services(request)
    await add_owner_cookie(
        request, svc.inventory, event_id, headers, secure=svc.settings.secure_cookies
    )


async def show_reservation(request: Request) -> Response:
    """The fan's reservation, with its order, payment and tickets once paid.

    ``?wait=N`` (seconds, at most :data:`~waitroom.reservation_changes.MAX_WAIT_S`): while
    a payment is under way, answer when the order is paid or the payment failed, or after
    ``N`` seconds with the reservation as it is (a long poll, instead of polling).
    """
    fan_id = _fan(request)
    hold_id = _hold_id(request.path_params["reservation_id"])
    wait_s = _wait_param(request)
    svc = services(request)
    changes = svc.reservation_changes
    if wait_s <= 0 or not changes.listening:
        async with svc.db.acquire() as conn:
            reservation = await get_reservation(conn, hold_id, fan_id)
        return JSONResponse(_with_tokens(request, reservation))
    # Watching before the read: a payment settling in between is not missed. The first read
    # asks only whether to wait (a long poll is sent while paying: it nearly always waits);
    # the reservation itself is read once, when there is something to answer.
    with changes.watch(str(hold_id)) as settled:
        async with svc.db.acquire() as conn:
            under_way = await payment_under_way(conn, hold_id, fan_id)
        if under_way:
            deadline.extend(request.scope, wait_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(settled.wait(), wait_s)
        async with svc.db.acquire() as conn:
            reservation = await get_reservation(conn, hold_id, fan_id)
    return JSONResponse(_with_tokens(request, reservation))


def _wait_param(request: Request) -> float:
    """``?wait=N``: seconds from 0 to MAX_WAIT_S (0 when absent); 422 otherwise."""
    raw = request.query_params.get("wait")
    if raw is None or raw == "":
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 <= value <= MAX_WAIT_S:  # NaN fails too
        raise ValidationFailed(
            f"wait must be a number of seconds from 0 to {MAX_WAIT_S:g}", field="wait"
        )
    return value


async def confirm(request: Request) -> Response:
    """Pay for a hold: starts a payment (202); poll the reservation for the outcome."""
    fan_id = _fan(request)
    hold_id = _hold_id(request.path_params["reservation_id"])
    # Sent again with its key (a lost answer, a 503), a confirm is answered with the payment
    # it started, whatever became of it; a confirm with another key while one is under way
    # answers that payment too. start_payment refuses the rest (paid, cancelled, expired).
    key = _idempotency_key(request)
    pool = services(request).db
    async with pool.acquire() as conn:
        event_id = await reservation_event(conn, hold_id, fan_id)
    await require_pass(request, event_id, fan_id, write=True)
    body = await read_json(request, ConfirmRequest)
    async with pool.acquire() as conn:
        try:
            await start_payment(
                conn, hold_id, fan_id, body.payment_method, email=body.email, key=key
            )
        except PaymentRefused as exc:
            # Confirming again while the payment runs answers with that payment: a retried
            # confirm never starts a second charge.
            if exc.code != "payment_in_progress":
                raise
        reservation = await get_reservation(conn, hold_id, fan_id)
    return JSONResponse(_with_tokens(request, reservation), status_code=202)


async def cancel(request: Request) -> Response:
    """Release a hold before its deadline."""
    fan_id = _fan(request)
    hold_id = _hold_id(request.path_params["reservation_id"])
    key = _idempotency_key(request)
    svc = services(request)
    async with svc.db.acquire() as conn:
        current = await get_reservation(conn, hold_id, fan_id)
    claims = await require_pass(request, current.event_id, fan_id, write=True)
    result = await svc.inventory.ask(current.event_id, Cancel(hold_id, fan_id, key))
    if isinstance(result, Refused):
        raise refusal_error(result)
    assert isinstance(result, Cancelled)
    headers: dict[str, str] = {}
    await _route_to_owner(request, current.event_id, headers)
    live = await svc.db.fetchval(
        "SELECT count(*) FROM holds WHERE event_id = $1 AND fan_id = $2 AND status = 'held'",
        current.event_id,
        fan_id,
    )
    if not live:
        # Nothing left on hold: the fan is done shopping, so the next fan may be admitted.
        await complete_pass(svc.redis, svc.keys, current.event_id, claims.jti)
    return JSONResponse(CancelledReservation(result.hold.id, result.hold.status), headers=headers)


async def my_orders(request: Request) -> Response:
    """The fan's orders, newest first, with their ticket codes."""
    fan_id = _fan(request)
    async with services(request).db.acquire() as conn:
        orders = await list_orders(conn, fan_id)
    return JSONResponse(
        [
            msgspec.structs.replace(o, tickets=_signed(request, o.event_id, o.id, o.tickets))
            for o in orders
        ]
    )


_PASS_ERRORS = (401, 403, 404, 409, 410, 429, 503)
OPERATIONS = [
    Operation(
        "POST",
        "/v1/events/{event_id}/reservations",
        reserve,
        "Reserve tickets (by quantity) or seats (picked, or the best available)",
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
        show_reservation,
        "A reservation with its order and tickets; with ?wait=N, answered when its payment"
        " settles (or after N seconds)",
        response=Reservation,
        errors=(401, 404, 422, 503),
        tags=("checkout",),
        parameters=(
            {
                "name": "wait",
                "in": "query",
                "required": False,
                "description": "while a payment is under way, wait up to this many seconds"
                " for the order to be paid or the payment to fail before answering",
                "schema": {"type": "number", "minimum": 0, "maximum": MAX_WAIT_S, "default": 0},
            },
        ),
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
        my_orders,
        "The fan's orders and tickets",
        response=list[Order],
        errors=(401, 503),
        tags=("checkout",),
    ),
]
