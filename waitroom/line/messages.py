"""What the server pushes to a fan over the queue WebSocket, and how a fan's state maps to it.

Every message is a JSON object tagged by ``type``::

    {"type": "position", "position": 42, "fans_ahead": 41, "eta_seconds": 120.0}
    {"type": "admitted", "pass": "<jwt>", "expires_at": 1767225600}
    {"type": "sold_out"}
    {"type": "paused"}
    {"type": "prequeue", "commitment": "<sha256 of the lottery seed>"}
    {"type": "waitlist", "position": 3, "fans_ahead": 2, "returned": 5, "eta_seconds": null}

``position`` is 1-based (1 = next in line); ``eta_seconds`` is ``null`` while the admission
rate is unknown (nothing admitted yet). ``prequeue`` means the fan is in a lottery's
pre-queue: no place until the draw at opening; ``commitment`` lets the fan check the draw
later (see :mod:`waitroom.line.lottery`). ``waitlist`` replaces ``position`` once the sale
has sold out in a room whose waitlist is on (:mod:`admission.waitlist`): the fan keeps the
place and is admitted only if enough tickets come back; ``returned`` counts the tickets that
came back so far, and ``eta_seconds`` is always ``null`` (nobody can know whether, let alone
when, a ticket will come back). ``admitted`` carries the queue pass; ``expires_at`` is
its ``exp`` claim, read without verification, for display only.

The same state drives the ``status`` of the HTTP answers (:func:`status_of`), so the
WebSocket and the polling fallback never disagree.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from admission.passes import read_claims
from waitroom.line.eta import eta_seconds
from waitroom.line.scripts import ADMITTED, ADMITTING, GONE, PREQUEUE, RoomView

Status = Literal["waiting", "prequeue", "admitted", "sold_out", "paused", "waitlist"]


class Position(msgspec.Struct, frozen=True, tag="position", tag_field="type"):
    """The fan's place in line and the estimated wait."""

    position: int
    fans_ahead: int
    eta_seconds: float | None


class Admitted(msgspec.Struct, frozen=True, tag="admitted", tag_field="type"):
    """The fan's turn: the queue pass that opens checkout."""

    queue_pass: str = msgspec.field(name="pass")
    expires_at: int | None = None


class SoldOut(msgspec.Struct, frozen=True, tag="sold_out", tag_field="type"):
    """Every ticket is gone; waiting longer will not help."""


class Paused(msgspec.Struct, frozen=True, tag="paused", tag_field="type"):
    """Operators paused admission; the fan keeps the place."""


class Prequeue(msgspec.Struct, frozen=True, tag="prequeue", tag_field="type"):
    """In a lottery's pre-queue: places are drawn when the sale opens."""

    commitment: str | None = None


class Waitlist(msgspec.Struct, frozen=True, tag="waitlist", tag_field="type"):
    """Sold out, but the fan stays in line for tickets that come back, in line order."""

    position: int
    fans_ahead: int
    #: Tickets that came back (expired holds, cancellations, refunds) since the sell-out.
    returned: int
    #: Always null: whether a ticket comes back at all is unknowable, so no wait is shown.
    eta_seconds: float | None = None


Message = Position | Admitted | SoldOut | Paused | Prequeue | Waitlist

SOLD_OUT = SoldOut()
PAUSED = Paused()

_encoder = msgspec.json.Encoder()
_decoder: msgspec.json.Decoder[Message] = msgspec.json.Decoder(Message)


def encode(message: Message) -> str:
    """The text frame of ``message``."""
    return _encoder.encode(message).decode()


def decode(data: str | bytes) -> Message:
    """Parse a text frame back into its message (clients and tests)."""
    return _decoder.decode(data)


def pass_expiry(queue_pass: str) -> int | None:
    """The ``exp`` claim of a pass, read WITHOUT verifying it: for display only."""
    claims = read_claims(queue_pass)
    return None if claims is None else claims.exp


def status_of(code: int, *, paused: bool, sold_out: bool, waitlisted: bool = False) -> Status:
    """The ``status`` of a fan whose ``positions`` code is ``code``, in a room so flagged.

    Admitted wins over everything (the pass stays good); sold out over the rest (nothing is
    left to wait for); a pre-queue fan is told so even while paused; a placed fan of a
    sold-out room with its waitlist on is on the waitlist (paused wins: nobody moves).
    """
    if code == ADMITTED:
        return "admitted"
    if sold_out:
        return "sold_out"
    if code == PREQUEUE:
        return "prequeue"
    if paused:
        return "paused"
    if waitlisted and code >= 0:
        return "waitlist"
    return "waiting"


def message_for(
    code: int, room: RoomView, rate: float | None, queue_pass: str | None = None
) -> Message | None:
    """The message for a fan in state ``code``; ``None`` when there is nothing to say.

    ``rate`` is the observed admission rate (admissions per second, ``None`` if unknown).
    ``GONE`` and ``ADMITTING`` have no message: the connection closes, or the next tick
    will carry the pass.
    """
    if code == ADMITTED:
        assert queue_pass is not None
        return Admitted(queue_pass, pass_expiry(queue_pass))
    if code in (GONE, ADMITTING):
        return None
    if room.sold_out:
        return SOLD_OUT
    if code == PREQUEUE:
        return Prequeue(room.commitment)
    if room.paused:
        return PAUSED
    if room.waitlisted:
        return Waitlist(code + 1, code, room.returned)
    return Position(code + 1, code, eta_seconds(code, rate))
