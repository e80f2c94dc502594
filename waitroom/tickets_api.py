"""Tickets at the door over HTTP: the fan's QR code, check-in, and voiding.

- ``GET /v1/tickets/{ticket_code}/qr.svg`` (the fan who owns the ticket): the signed ticket
  (:mod:`inventory.tickets`) as a QR code, an SVG drawn by ``segno``;
- ``POST /v1/checkin`` (door staff, ``WAITROOM_STAFF_TOKENS``, or an operator): mark a ticket
  used, given its signed form (scanned) or its code (typed); refusals in :mod:`inventory.tickets`;
- ``POST /v1/admin/tickets/{ticket_code}/void`` (an operator): check-in refuses it from now on.

The staff's page is ``GET /checkin`` (:mod:`waitroom.pages`).
"""

from __future__ import annotations

import io
import time
from typing import Annotated

import msgspec
import segno
from msgspec import Meta
from starlette.requests import Request
from starlette.responses import Response

from inventory.tickets import (
    MAX_TICKET_CHARS,
    CheckIn,
    TicketClaims,
    VoidedTicket,
    check_in,
    fans_ticket,
    read_ticket,
    sign_ticket,
    void_ticket,
)
from waitroom.core import ids
from waitroom.core.http import JSONResponse, read_json
from waitroom.core.openapi import Operation
from waitroom.line.identity import missing
from waitroom.pages import SECURITY_HEADERS
from waitroom.services import require_admin, require_staff, services

#: A gate's or device's name, as the door staff's page sends it.
GATE_PATTERN = r"^[A-Za-z0-9 _.:#/-]{1,64}" + ids.END


class CheckInRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/checkin``."""

    #: The signed ticket (the QR code's text) or the ticket's code.
    ticket: Annotated[str, Meta(min_length=1, max_length=MAX_TICKET_CHARS)]
    #: Where it is scanned; shown to the door that scans the ticket a second time.
    gate: Annotated[str, Meta(pattern=GATE_PATTERN)] | None = None
    #: The event this door admits to: another event's ticket is refused.
    event_id: Annotated[str, Meta(pattern=ids.EVENT_ID.pattern)] | None = None


class VoidRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/admin/tickets/{ticket_code}/void``."""

    reason: Annotated[str, Meta(min_length=1, max_length=200)] | None = None


def qr_svg(token: str) -> bytes:
    """``token`` as a QR code (error correction M: survives a scuffed phone screen)."""
    out = io.BytesIO()
    # A white background: a transparent one vanishes on a phone in dark mode.
    segno.make_qr(token, error="m").save(
        out, kind="svg", scale=4, border=4, xmldecl=False, dark="#000", light="#fff"
    )
    return out.getvalue()


async def ticket_qr(request: Request) -> Response:
    """The fan's ticket as a QR code of its signed form (SVG)."""
    svc = services(request)
    identity = svc.identities.resolve(request, time.time())
    if identity is None:
        raise missing()
    code = ids.TICKET_CODE.check(request.path_params["ticket_code"])
    async with svc.db.acquire() as conn:
        claims: TicketClaims = await fans_ticket(
            conn, code, identity.fan_id, issuer=svc.settings.pass_issuer
        )
    token = sign_ticket(svc.passes.pass_keys, claims)
    return Response(
        qr_svg(token),
        media_type="image/svg+xml",
        headers={**SECURITY_HEADERS, "Cache-Control": "private, no-store"},
    )


async def checkin(request: Request) -> Response:
    """Check a ticket in at the door: once; a second scan says when and where the first was."""
    actor = await require_staff(request)
    svc = services(request)
    body = await read_json(request, CheckInRequest)
    code, claims = read_ticket(
        svc.passes.pass_keys, body.ticket, issuer=svc.settings.pass_issuer, event_id=body.event_id
    )
    async with svc.db.acquire() as conn:
        result = await check_in(
            conn,
            code,
            by=actor.name,
            gate=body.gate,
            event_id=body.event_id,
            signed=claims is not None,
        )
    return JSONResponse(result, headers={"Cache-Control": "no-store"})


async def void(request: Request) -> Response:
    """Void a ticket: check-in refuses it from now on (idempotent)."""
    actor = await require_admin(request)
    code = ids.TICKET_CODE.check(request.path_params["ticket_code"])
    body = await read_json(request, VoidRequest)
    async with services(request).db.acquire() as conn:
        return JSONResponse(await void_ticket(conn, code, actor=actor, reason=body.reason))


OPERATIONS = [
    Operation(
        "GET",
        "/v1/tickets/{ticket_code}/qr.svg",
        ticket_qr,
        "The fan's ticket as a QR code of its signed form",
        errors=(401, 404, 503),
        tags=("tickets",),
        content_type="image/svg+xml",
    ),
    Operation(
        "POST",
        "/v1/checkin",
        checkin,
        "Check a ticket in at the door (door staff's or operator's token)",
        request=CheckInRequest,
        response=CheckIn,
        errors=(401, 403, 404, 409, 429, 503),
        # "operators": what needs an operator-class bearer token (the fuzz test sends one).
        tags=("tickets", "operators"),
        auth="admin",
    ),
    Operation(
        "POST",
        "/v1/admin/tickets/{ticket_code}/void",
        void,
        "Void a ticket: check-in refuses it",
        request=VoidRequest,
        response=VoidedTicket,
        errors=(404, 503),
        tags=("operators",),
        auth="admin",
    ),
]
