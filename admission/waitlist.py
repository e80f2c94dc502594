"""The waitlist of a sold-out sale: tickets that come back go to the fans in line, in order.

A room with ``waitlist`` on (``room_settings.waitlist``, live in the room's meta) does not
close its line when the event sells out. Instead:

- the sale *sells out* for the waitlist the moment no ticket of any type is available (the
  availability the inventory actor publishes sums to 0), or the actor says sold out. From
  then on the room is *waitlisting* (meta ``waitlisting`` = ``"1"``), until the setting is
  turned off. Fans in line are told they are on the waitlist (``{"type": "waitlist", ...}``
  over the WebSocket, status ``waitlist`` over HTTP), with no ETA (``eta_seconds`` null)
  and the count of tickets that came back (meta ``returned``); new fans may still join, at
  the back of the waitlist;
- admission stops issuing passes for stock that does not exist: while waitlisting, the
  leader admits a fan only for tickets that are available and not already *offered*.
  Every pass issued while waitlisting is an *offer* that claims ``min(per_fan_limit,
  unclaimed)`` tickets (meta ``per_fan_limit``, the event's limit per fan), recorded in the
  event's ``offers`` hash (jti -> claim) before the pass is issued. An offer's claim lasts
  while its pass counts against ``max_active`` (the ``active`` set): until the fan's order is
  paid, its holds are all released or expired, or the pass expires or is revoked. So a fan
  admitted from the waitlist can always reserve at least one ticket, and as many as the
  limit when that many came back: offers are conservative, by tickets, never by fans.
  The claim of a fan who has reserved counts on top of the tickets it holds (which are no
  longer available): that under-offers for as long as the hold lasts, never over-offers;
- the fans are admitted by the normal loop (rate, ``max_active``, fencing, passes written
  ahead to PostgreSQL), from the head of the line: strictly in line order;
- passes issued before the sell-out are not offers: their holders were ahead in line, and
  may still take a returned ticket if they try again;
- the sale is over for the waitlist when its deadline passes (``waitlist_until``: the meta's
  ``waitlist`` is the setting *in force*, mirrored by the admission poll) or an operator turns
  it off: a sold-out room then closes its line as a room without a waitlist does
  (``sold_out`` to every fan).

:func:`offer_claims` and :func:`follow` are the pure core (property-tested); the rest are
thin Redis adapters the admission loop (:mod:`admission.loop`) calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from waitroom.core.keys import EventKeys


def offer_claims(*, available: int, offered: int, per_fan_limit: int, most: int) -> list[int]:
    """The claims of the next offers to make, in line order: at most ``most`` of them.

    ``available`` tickets are there now, ``offered`` of them are claimed by offers still
    open. Each new offer claims ``min(per_fan_limit, unclaimed)`` tickets, so every fan
    offered can reserve at least one, and the claims never add up to more than
    ``available - offered``. No offers while nothing is unclaimed.
    """
    if per_fan_limit < 1:
        raise ValueError(f"per_fan_limit must be at least 1, not {per_fan_limit}")
    free = available - offered
    claims: list[int] = []
    while free >= 1 and len(claims) < most:
        claim = min(per_fan_limit, free)
        claims.append(claim)
        free -= claim
    return claims


@dataclass(frozen=True, slots=True)
class Phase:
    """Where a room stands with its waitlist (the meta fields of the same names)."""

    #: The sale has sold out and the line is kept as a waitlist.
    waitlisting: bool = False
    #: The tickets available at the leader's last look (to see tickets come back).
    seen: int = 0
    #: Tickets that came back since the sale sold out: shown to the waiting fans.
    returned: int = 0


def follow(phase: Phase, *, enabled: bool, available: int | None, sold_out: bool) -> Phase:
    """The phase after one look at the room: ``available`` is the sum of the availability
    the actor published (``None`` before it published any), ``sold_out`` its flag.

    Turning the setting off ends the waitlist (a sold-out room then closes its line). A room
    starts waitlisting when nothing is available; while it does, every rise of the
    availability is tickets that came back (a fall is tickets taken again).
    """
    if not enabled:
        return Phase()
    if not phase.waitlisting:
        if sold_out or available == 0:
            return Phase(waitlisting=True, seen=available or 0, returned=0)
        return phase
    if available is None:
        return phase
    returned = phase.returned + max(0, available - phase.seen)
    return Phase(waitlisting=True, seen=available, returned=returned)


# --- Redis adapters -------------------------------------------------------------------------


def parse_available(values: Sequence[Any]) -> int | None:
    """The sum of an ``HVALS availability`` reply; ``None`` when the actor published nothing."""
    if not values:
        return None
    total = 0
    for value in values:
        try:
            total += max(0, int(value))
        except ValueError:
            continue
    return total


async def store_phase(redis: Redis, ek: EventKeys, phase: Phase) -> None:
    """Write ``phase`` into the room's meta, where the join and positions scripts read it."""
    await redis.hset(
        ek.meta,
        mapping={
            "waitlisting": "1" if phase.waitlisting else "0",
            "wl_seen": str(phase.seen),
            "returned": str(phase.returned),
        },
    )


async def offered(redis: Redis, ek: EventKeys, now: float) -> int:
    """Tickets claimed by open offers; forgets the offers whose pass stopped counting.

    An offer is open while its pass is in ``active`` and unexpired. Offers recorded for
    passes that were never issued (the batch stopped, a leader died) are never in
    ``active``, so they are forgotten here too.
    """
    offers: dict[Any, Any] = await redis.hgetall(ek.offers)
    if not offers:
        return 0
    jtis = list(offers)
    scores = await redis.zmscore(ek.active, jtis)
    claimed = 0
    closed: list[Any] = []
    for jti, score in zip(jtis, scores, strict=True):
        if score is not None and score > now:
            claimed += int(offers[jti])
        else:
            closed.append(jti)
    if closed:
        await redis.hdel(ek.offers, *closed)
    return claimed


async def record_offers(redis: Redis, ek: EventKeys, offers: Sequence[tuple[str, int]]) -> None:
    """Record offers (jti, claim) before their passes are issued: a pass in ``active`` always
    has its claim counted (an offer never issued is forgotten by :func:`offered`)."""
    if offers:
        await redis.hset(ek.offers, mapping={jti: str(claim) for jti, claim in offers})
