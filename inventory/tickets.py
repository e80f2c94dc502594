"""Tickets at the door: the signed ticket, check-in (used once) and voiding.

A ticket's signed form is a compact JWS, verifiable offline with the deployment's published
keys (``GET /.well-known/jwks.json``), small enough for a QR code (about 380 characters)::

    header  {"alg": "EdDSA", "kid": <thumbprint of the pass key>, "typ": "wr-ticket"}
    claims  {"iss", "tkt": code, "evt": event, "tt": ticket type, "ord": order, "iat"}

It is signed by the same Ed25519 key as queue passes (:class:`admission.passes.PassKeys`;
ADR 0012 says why), told apart by ``typ`` and by its claims: a pass is no ticket and a ticket
no pass, whichever verifier sees it. Ed25519 is deterministic, so the token is computed when
it is shown (the same bytes every time) and never stored; the human ``code`` stays what the
database knows a ticket by, and a door may type it instead of scanning.

Check-in is one conditional ``UPDATE ... WHERE used_at IS NULL AND voided_at IS NULL``: under
concurrent scans PostgreSQL lets one of them through and the others see the row already used,
so a ticket is admitted once however many gates scan it at the same moment. Refusals:

- 403 ``ticket_invalid``: not a ticket we signed (malformed, tampered, another algorithm, a
  key we do not trust, a queue pass), or a text that is neither a token nor a code;
- 403 ``ticket_wrong_event``: the door checks in another event's tickets;
- 404 ``ticket_not_found``: a code no ticket has;
- 409 ``ticket_voided`` (``details``: ``voided_at``, ``reason``);
- 409 ``ticket_already_used`` (``details``: ``used_at``, ``gate``, ``checked_in_by``).
"""

from __future__ import annotations

import base64
import re
from datetime import datetime

import msgspec
from cryptography.exceptions import InvalidSignature

from admission.passes import ALGORITHM, PassKeys
from inventory.orders import record_event
from inventory.store import Conn
from waitroom.core import audit
from waitroom.core.audit import Actor
from waitroom.core.errors import Conflict, Forbidden, NotFound

#: ``typ`` of a signed ticket's header: what tells it from a queue pass (``JWT``).
TICKET_TYP = "wr-ticket"
#: Longest text check-in looks at; a signed ticket is about 380 characters.
MAX_TICKET_CHARS = 2048
#: A ticket's code as issued (``randomness.token_urlsafe(18)``); the CHECK wants 16+ characters.
CODE_RE = re.compile(r"[A-Za-z0-9_-]{16,64}")

#: Kinds of ``order_events`` rows written here.
TICKET_CHECKED_IN = "ticket.checked_in"
TICKET_VOIDED = "ticket.voided"


class TicketClaims(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """The claims of a signed ticket (short names: it travels in a QR code)."""

    #: Issuer (``WAITROOM_PASS_ISSUER``), as in queue passes.
    iss: str
    #: The ticket's code.
    tkt: str
    #: Its event.
    evt: str
    #: Its ticket type.
    tt: str
    #: Its order.
    ord: str
    #: When it was issued (Unix seconds).
    iat: int
    #: The seat it admits to (``SECTION:ROW:SEAT``); absent for general admission.
    seat: str | None = None


class _Header(msgspec.Struct, frozen=True):
    alg: str
    kid: str | None = None
    typ: str | None = None


_HEADER_DECODER = msgspec.json.Decoder(_Header)
_CLAIMS_DECODER = msgspec.json.Decoder(TicketClaims)
_ENCODER = msgspec.json.Encoder()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64decode(segment: str) -> bytes:
    return base64.b64decode(segment + "=" * (-len(segment) % 4), altchars=b"-_", validate=True)


def sign_ticket(keys: PassKeys, claims: TicketClaims) -> str:
    """The compact JWS of ``claims``, signed with the deployment's current key."""
    header = _b64(_ENCODER.encode({"alg": ALGORITHM, "kid": keys.kid, "typ": TICKET_TYP}))
    signing_input = f"{header}.{_b64(_ENCODER.encode(claims))}"
    return f"{signing_input}.{_b64(keys.signing.sign(signing_input.encode()))}"


def claims_of(
    *,
    issuer: str,
    code: str,
    event_id: str,
    ticket_type: str,
    order_id: str,
    issued_at: datetime,
    seat: str | None = None,
) -> TicketClaims:
    """The claims of an issued ticket."""
    return TicketClaims(
        issuer, code, event_id, ticket_type, order_id, int(issued_at.timestamp()), seat
    )


def _invalid(message: str) -> Forbidden:
    return Forbidden(message, code="ticket_invalid")


def verify_ticket(keys: PassKeys, token: str, *, issuer: str) -> TicketClaims:
    """The claims of ``token`` if we signed it as a ticket; 403 ``ticket_invalid`` otherwise.

    The algorithm is pinned (the header's ``alg`` is compared, never obeyed: no ``none``, no
    HMAC keyed with a public key) and only our Ed25519 keys, by ``kid``, verify.
    """
    if len(token) > MAX_TICKET_CHARS or token.count(".") != 2:
        raise _invalid("this is not a signed ticket")
    head, body, signature = token.split(".")
    try:
        header = _HEADER_DECODER.decode(_b64decode(head))
    except (ValueError, msgspec.DecodeError, msgspec.ValidationError):
        raise _invalid("this is not a signed ticket") from None
    if header.alg != ALGORITHM or header.typ != TICKET_TYP:
        raise _invalid("this is not a ticket signed with EdDSA")
    key = keys.public.get(header.kid) if header.kid is not None else None
    if key is None:
        raise _invalid("this ticket is not signed by a key we trust")
    try:
        key.verify(_b64decode(signature), f"{head}.{body}".encode())
    except (ValueError, InvalidSignature):
        raise _invalid("this ticket's signature is invalid") from None
    try:
        claims = _CLAIMS_DECODER.decode(_b64decode(body))
    except (ValueError, msgspec.DecodeError, msgspec.ValidationError):
        raise _invalid("this ticket's claims are invalid") from None
    if claims.iss != issuer:
        raise _invalid("this ticket is from another issuer")
    return claims


def read_ticket(
    keys: PassKeys, text: str, *, issuer: str, event_id: str | None
) -> tuple[str, TicketClaims | None]:
    """``(code, claims)`` of what a door scanned or typed: a signed ticket (verified, and
    checked against ``event_id`` offline) or a bare code (claims None)."""
    text = text.strip()
    if "." in text:
        claims = verify_ticket(keys, text, issuer=issuer)
        if event_id is not None and claims.evt != event_id:
            raise _wrong_event(claims.evt, event_id)
        return claims.tkt, claims
    if CODE_RE.fullmatch(text) is None:
        raise _invalid("this is neither a signed ticket nor a ticket code")
    return text, None


def _wrong_event(ticket_event: str, door_event: str) -> Forbidden:
    return Forbidden(
        "this ticket is for another event",
        code="ticket_wrong_event",
        details={"ticket_event_id": ticket_event, "event_id": door_event},
    )


class CheckIn(msgspec.Struct, frozen=True):
    """A ticket admitted at the door (``POST /v1/checkin``)."""

    status: str
    code: str
    event_id: str
    ticket_type: str
    order_id: str
    used_at: datetime
    gate: str | None
    checked_in_by: str
    #: ``signature`` when a signed ticket was scanned, ``code`` when the code was typed.
    verified_by: str


async def check_in(
    conn: Conn,
    code: str,
    *,
    by: str,
    gate: str | None = None,
    event_id: str | None = None,
    signed: bool = False,
) -> CheckIn:
    """Mark the ticket ``code`` used, once; the refusals of the module's docstring."""
    async with conn.transaction():
        # One conditional write: a concurrent scan of the same ticket waits for this row's
        # lock, then re-reads it used and matches nothing.
        row = await conn.fetchrow(
            "UPDATE tickets SET used_at = now(), used_by = $2, used_gate = $3"
            " WHERE code = $1 AND used_at IS NULL AND voided_at IS NULL"
            " AND ($4::text IS NULL OR event_id = $4)"
            " RETURNING order_id::text, event_id, ticket_type, used_at",
            code,
            by,
            gate,
            event_id,
        )
        if row is None:
            raise await _refusal(conn, code, event_id)
        await record_event(conn, row["order_id"], TICKET_CHECKED_IN, code=code, gate=gate, by=by)
    return CheckIn(
        status="checked_in",
        code=code,
        event_id=row["event_id"],
        ticket_type=row["ticket_type"],
        order_id=row["order_id"],
        used_at=row["used_at"],
        gate=gate,
        checked_in_by=by,
        verified_by="signature" if signed else "code",
    )


async def _refusal(conn: Conn, code: str, event_id: str | None) -> Exception:
    row = await conn.fetchrow(
        "SELECT event_id, used_at, used_by, used_gate, voided_at, void_reason"
        " FROM tickets WHERE code = $1",
        code,
    )
    if row is None:
        return NotFound("no ticket has this code", code="ticket_not_found")
    if event_id is not None and row["event_id"] != event_id:
        return _wrong_event(row["event_id"], event_id)
    if row["voided_at"] is not None:
        return Conflict(
            "this ticket was voided",
            code="ticket_voided",
            details={"voided_at": row["voided_at"].isoformat(), "reason": row["void_reason"]},
        )
    return Conflict(
        "this ticket was used already",
        code="ticket_already_used",
        details={
            "used_at": row["used_at"].isoformat(),
            "gate": row["used_gate"],
            "checked_in_by": row["used_by"],
        },
    )


class VoidedTicket(msgspec.Struct, frozen=True):
    """A voided ticket (check-in refuses it from now on)."""

    code: str
    event_id: str
    order_id: str
    voided_at: datetime
    voided_by: str
    reason: str | None


async def void_ticket(
    conn: Conn, code: str, *, actor: Actor | str, reason: str | None = None
) -> VoidedTicket:
    """Void the ticket ``code`` (idempotent: a voided ticket is returned as it is); 404
    ``ticket_not_found``. Audited, and in the order's history."""
    who = audit.actor_of(actor)
    async with conn.transaction():
        row = await conn.fetchrow(
            "UPDATE tickets SET voided_at = now(), voided_by = $2, void_reason = $3"
            " WHERE code = $1 AND voided_at IS NULL"
            " RETURNING event_id, order_id::text, voided_at, voided_by, void_reason",
            code,
            who.name,
            reason,
        )
        if row is not None:
            await record_event(conn, row["order_id"], TICKET_VOIDED, code=code, reason=reason)
            await audit.record(
                conn,
                who,
                "ticket.void",
                row["event_id"],
                new=msgspec.json.encode({"code": code, "reason": reason}).decode(),
            )
        else:
            row = await conn.fetchrow(
                "SELECT event_id, order_id::text, voided_at, voided_by, void_reason"
                " FROM tickets WHERE code = $1",
                code,
            )
            if row is None:
                raise NotFound("no ticket has this code", code="ticket_not_found")
    return VoidedTicket(
        code=code,
        event_id=row["event_id"],
        order_id=row["order_id"],
        voided_at=row["voided_at"],
        voided_by=row["voided_by"],
        reason=row["void_reason"],
    )


async def fans_ticket(conn: Conn, code: str, fan_id: str, *, issuer: str) -> TicketClaims:
    """The claims of ``fan_id``'s ticket ``code``; 404 ``ticket_not_found`` for anyone else's."""
    row = await conn.fetchrow(
        "SELECT event_id, ticket_type, order_id::text, issued_at, seat_id FROM tickets"
        " WHERE code = $1 AND fan_id = $2",
        code,
        fan_id,
    )
    if row is None:
        raise NotFound("no such ticket", code="ticket_not_found")
    return claims_of(
        issuer=issuer,
        code=code,
        event_id=row["event_id"],
        ticket_type=row["ticket_type"],
        order_id=row["order_id"],
        issued_at=row["issued_at"],
        seat=row["seat_id"],
    )
