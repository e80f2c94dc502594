"""The event catalogue: events, their ticket types and their waiting-room rules.

Integrators create events (admin API or ``waitroom event create``); fans read the public view.
The request and response shapes are msgspec structs whose constraints do the field-level
validation while decoding; :func:`validate_event` adds the rules that need more than one
field or the clock (unique names, times in the future). The functions at the bottom are the
thin PostgreSQL adapter; the HTTP routes and the CLI both call them, so they behave the same.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

import asyncpg
import msgspec
from msgspec import Meta

from waitroom.core import audit, ids
from waitroom.core.errors import Conflict, NotFound, ValidationFailed

# The patterns end with ids.END, not `$`: msgspec matches with Python's re, where `$` also
# matches before a final newline ("evt\n" passed, then failed PostgreSQL's CHECK: a 500).
EventId = Annotated[
    str,
    Meta(
        pattern=ids.EVENT_ID.pattern,
        max_length=ids.EVENT_ID.max_length,
        description="lowercase letters, digits, '-' and '_'; at most 63 characters",
    ),
]
TicketTypeName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9 _-]{0,63}" + ids.END)]
Currency = Annotated[
    str, Meta(pattern=r"^[A-Z]{3}" + ids.END, description="ISO 4217 code, e.g. EUR")
]
AwareDatetime = Annotated[datetime, Meta(tz=True)]
QueueMode = Literal["fifo", "lottery"]

#: Active ISO 4217 currency codes.
CURRENCIES = frozenset(
    [
        "AED",
        "AFN",
        "ALL",
        "AMD",
        "ANG",
        "AOA",
        "ARS",
        "AUD",
        "AWG",
        "AZN",
        "BAM",
        "BBD",
        "BDT",
        "BGN",
        "BHD",
        "BIF",
        "BMD",
        "BND",
        "BOB",
        "BRL",
        "BSD",
        "BTN",
        "BWP",
        "BYN",
        "BZD",
        "CAD",
        "CDF",
        "CHF",
        "CLP",
        "CNY",
        "COP",
        "CRC",
        "CUP",
        "CVE",
        "CZK",
        "DJF",
        "DKK",
        "DOP",
        "DZD",
        "EGP",
        "ERN",
        "ETB",
        "EUR",
        "FJD",
        "FKP",
        "GBP",
        "GEL",
        "GHS",
        "GIP",
        "GMD",
        "GNF",
        "GTQ",
        "GYD",
        "HKD",
        "HNL",
        "HTG",
        "HUF",
        "IDR",
        "ILS",
        "INR",
        "IQD",
        "IRR",
        "ISK",
        "JMD",
        "JOD",
        "JPY",
        "KES",
        "KGS",
        "KHR",
        "KMF",
        "KPW",
        "KRW",
        "KWD",
        "KYD",
        "KZT",
        "LAK",
        "LBP",
        "LKR",
        "LRD",
        "LSL",
        "LYD",
        "MAD",
        "MDL",
        "MGA",
        "MKD",
        "MMK",
        "MNT",
        "MOP",
        "MRU",
        "MUR",
        "MVR",
        "MWK",
        "MXN",
        "MYR",
        "MZN",
        "NAD",
        "NGN",
        "NIO",
        "NOK",
        "NPR",
        "NZD",
        "OMR",
        "PAB",
        "PEN",
        "PGK",
        "PHP",
        "PKR",
        "PLN",
        "PYG",
        "QAR",
        "RON",
        "RSD",
        "RUB",
        "RWF",
        "SAR",
        "SBD",
        "SCR",
        "SDG",
        "SEK",
        "SGD",
        "SHP",
        "SLE",
        "SOS",
        "SRD",
        "SSP",
        "STN",
        "SVC",
        "SYP",
        "SZL",
        "THB",
        "TJS",
        "TMT",
        "TND",
        "TOP",
        "TRY",
        "TTD",
        "TWD",
        "TZS",
        "UAH",
        "UGX",
        "USD",
        "UYU",
        "UZS",
        "VES",
        "VND",
        "VUV",
        "WST",
        "XAF",
        "XCD",
        "XOF",
        "XPF",
        "YER",
        "ZAR",
        "ZMW",
        "ZWL",
    ]
)
#: How far in the past an "opens at" may lie and still be accepted (clock skew).
CLOCK_SKEW = timedelta(seconds=5)


class TicketTypeSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A ticket type of a new event."""

    name: TicketTypeName
    quantity: Annotated[int, Meta(ge=1, le=10_000_000)]
    price_minor: Annotated[int, Meta(ge=0, le=10**12, description="price in minor units")]
    currency: Currency
    per_fan_limit: Annotated[int, Meta(ge=1, le=100)] = 4


class RoomSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The waiting room's rules for an event."""

    queue_mode: QueueMode = "fifo"
    #: When the sale opens; omitted means now.
    opens_at: AwareDatetime | None = None
    rate_per_second: Annotated[float, Meta(gt=0, le=100_000)] = 10.0
    max_active: Annotated[int, Meta(ge=1, le=10_000_000)] = 1000
    pass_ttl_s: Annotated[int, Meta(ge=10, le=86_400)] = 900
    hold_ttl_s: Annotated[int, Meta(ge=10, le=86_400)] = 600
    abandon_grace_s: Annotated[int, Meta(ge=5, le=86_400)] = 60
    #: Tickets one fan may hold or buy across all ticket types of the event.
    per_fan_limit: Annotated[int, Meta(ge=1, le=1000)] = 4
    #: Once sold out, keep the fans in line as a waitlist for tickets that come back
    #: (admission/waitlist.py) instead of sending them away.
    waitlist: bool = False
    #: When the waitlist ends (a sold-out line then closes); omitted: when turned off.
    waitlist_until: AwareDatetime | None = None


class EventCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/admin/events``."""

    name: Annotated[str, Meta(min_length=1, max_length=200)]
    ticket_types: Annotated[list[TicketTypeSpec], Meta(min_length=1, max_length=50)]
    id: EventId | None = None
    venue: Annotated[str, Meta(max_length=200)] = ""
    #: When the show itself starts; must lie after the sale opens.
    starts_at: AwareDatetime | None = None
    room: RoomSpec = RoomSpec()


class TicketTypeInfo(msgspec.Struct, frozen=True):
    """Public view of a ticket type."""

    name: str
    price_minor: int
    currency: str
    per_fan_limit: int
    quantity: int
    available: int
    #: Tickets held by fans checking out: not available now, but they come back if those
    #: holds lapse or are cancelled (``available`` 0 with ``held`` above 0 is not sold out).
    held: int = 0


class RoomSettings(msgspec.Struct, frozen=True):
    """The room's rules as stored."""

    queue_mode: QueueMode
    opens_at: datetime
    rate_per_second: float
    max_active: int
    paused: bool
    pass_ttl_s: int
    hold_ttl_s: int
    abandon_grace_s: int
    per_fan_limit: int
    #: Whether a sold-out sale keeps its line as a waitlist (admission/waitlist.py).
    waitlist: bool = False
    #: When that waitlist ends; null: when an operator turns it off.
    waitlist_until: datetime | None = None


class EventInfo(msgspec.Struct, frozen=True):
    """Public view of an event (``GET /v1/events/{event_id}``)."""

    id: str
    name: str
    venue: str
    starts_at: datetime | None
    status: str
    queue_mode: QueueMode
    opens_at: datetime
    per_fan_limit: int
    ticket_types: list[TicketTypeInfo]


class EventDetail(msgspec.Struct, frozen=True):
    """Operators' view of an event: everything, including the room's rules."""

    id: str
    name: str
    venue: str
    starts_at: datetime | None
    status: str
    created_at: datetime
    room: RoomSettings
    ticket_types: list[TicketTypeInfo]

    def public(self) -> EventInfo:
        """The view fans may see."""
        return EventInfo(
            id=self.id,
            name=self.name,
            venue=self.venue,
            starts_at=self.starts_at,
            status=self.status,
            queue_mode=self.room.queue_mode,
            opens_at=self.room.opens_at,
            per_fan_limit=self.room.per_fan_limit,
            ticket_types=self.ticket_types,
        )


class EventSummary(msgspec.Struct, frozen=True):
    """One line of ``waitroom event list``."""

    id: str
    name: str
    status: str
    opens_at: datetime
    queue_mode: QueueMode
    quantity: int
    available: int


class TicketTypeStats(msgspec.Struct, frozen=True):
    """Counts of one ticket type, straight from PostgreSQL."""

    name: str
    quantity: int
    held: int
    sold: int
    available: int


class EventStats(msgspec.Struct, frozen=True):
    """``GET /v1/admin/events/{event_id}/stats``."""

    event_id: str
    status: str
    room: RoomSettings
    ticket_types: list[TicketTypeStats]
    quantity: int
    held: int
    sold: int
    available: int
    extra: dict[str, Any] = {}


def new_event_id() -> str:
    """A fresh, unguessable event id."""
    return "evt-" + secrets.token_hex(6)


def validate_event(spec: EventCreate, now: datetime) -> None:
    """Rules beyond single fields; raises :class:`ValidationFailed` naming the field."""
    seen: set[str] = set()
    for i, ticket_type in enumerate(spec.ticket_types):
        folded = ticket_type.name.casefold()
        if folded in seen:
            raise ValidationFailed(
                f"ticket type name {ticket_type.name!r} is used twice",
                field=f"ticket_types[{i}].name",
                code="duplicate_ticket_type",
            )
        seen.add(folded)
        if ticket_type.currency not in CURRENCIES:
            raise ValidationFailed(
                f"{ticket_type.currency!r} is not an ISO 4217 currency code",
                field=f"ticket_types[{i}].currency",
            )
    opens_at = spec.room.opens_at
    if opens_at is not None and opens_at < now - CLOCK_SKEW:
        raise ValidationFailed(
            "room.opens_at lies in the past; omit it to open the sale now",
            field="room.opens_at",
        )
    if spec.starts_at is not None:
        if spec.starts_at <= now:
            raise ValidationFailed("starts_at must lie in the future", field="starts_at")
        if spec.starts_at <= (opens_at or now):
            raise ValidationFailed(
                "starts_at must lie after the sale opens (room.opens_at)", field="starts_at"
            )


# --- PostgreSQL adapter ------------------------------------------------------------------

_ROOM_COLUMNS = (
    "queue_mode, opens_at, rate_per_second, max_active, paused, pass_ttl_s, hold_ttl_s,"
    " abandon_grace_s, per_fan_limit, waitlist, waitlist_until"
)


def _room(row: asyncpg.Record) -> RoomSettings:
    return RoomSettings(
        queue_mode=row["queue_mode"],
        opens_at=row["opens_at"],
        rate_per_second=row["rate_per_second"],
        max_active=row["max_active"],
        paused=row["paused"],
        pass_ttl_s=row["pass_ttl_s"],
        hold_ttl_s=row["hold_ttl_s"],
        abandon_grace_s=row["abandon_grace_s"],
        per_fan_limit=row["per_fan_limit"],
        waitlist=row["waitlist"],
        waitlist_until=row["waitlist_until"],
    )


async def create_event(
    pool: asyncpg.Pool[Any], spec: EventCreate, *, actor: audit.Actor | str, now: datetime
) -> EventDetail:
    """Validate and store a new event; 409 ``event_exists`` when the id is taken."""
    validate_event(spec, now)
    event_id = spec.id or new_event_id()
    room = spec.room
    async with pool.acquire() as conn, conn.transaction():
        try:
            await conn.execute(
                "INSERT INTO events (id, name, venue, starts_at) VALUES ($1, $2, $3, $4)",
                event_id,
                spec.name,
                spec.venue,
                spec.starts_at,
            )
        except asyncpg.UniqueViolationError:
            raise Conflict(
                f"event {event_id!r} exists already",
                code="event_exists",
                details={"event_id": event_id},
            ) from None
        await conn.execute(
            f"INSERT INTO room_settings (event_id, {_ROOM_COLUMNS})"
            " VALUES ($1, $2, $3, $4, $5, false, $6, $7, $8, $9, $10, $11)",
            event_id,
            room.queue_mode,
            room.opens_at or now,
            room.rate_per_second,
            room.max_active,
            room.pass_ttl_s,
            room.hold_ttl_s,
            room.abandon_grace_s,
            room.per_fan_limit,
            room.waitlist,
            room.waitlist_until,
        )
        await conn.executemany(
            "INSERT INTO ticket_types (event_id, name, quantity, price_minor, currency,"
            " per_fan_limit, position) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            [
                (event_id, t.name, t.quantity, t.price_minor, t.currency, t.per_fan_limit, i)
                for i, t in enumerate(spec.ticket_types)
            ],
        )
        await audit.record(
            conn, actor, "event.create", event_id, new=msgspec.json.encode(spec).decode()
        )
    return await get_event(pool, event_id)


async def get_event(pool: asyncpg.Pool[Any], event_id: str) -> EventDetail:
    """The event with its rules and ticket types; 404 ``event_not_found`` when unknown."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            f"SELECT e.id, e.name, e.venue, e.starts_at, e.status, e.created_at, {_ROOM_COLUMNS}"
            " FROM events e JOIN room_settings r ON r.event_id = e.id WHERE e.id = $1",
            event_id,
        )
        if row is None:
            raise NotFound(
                f"no event {event_id!r}", code="event_not_found", details={"event_id": event_id}
            )
        types = await conn.fetch(
            "SELECT name, price_minor, currency, per_fan_limit, quantity,"
            " quantity - held - sold AS available, held"
            " FROM ticket_types WHERE event_id = $1 ORDER BY position",
            event_id,
        )
    return EventDetail(
        id=row["id"],
        name=row["name"],
        venue=row["venue"],
        starts_at=row["starts_at"],
        status=row["status"],
        created_at=row["created_at"],
        room=_room(row),
        ticket_types=[
            TicketTypeInfo(
                name=t["name"],
                price_minor=t["price_minor"],
                currency=t["currency"],
                per_fan_limit=t["per_fan_limit"],
                quantity=t["quantity"],
                available=t["available"],
                held=t["held"],
            )
            for t in types
        ],
    )


async def list_events(pool: asyncpg.Pool[Any], *, limit: int = 100) -> list[EventSummary]:
    """The newest events first."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT e.id, e.name, e.status, r.opens_at, r.queue_mode,"
            " coalesce(sum(t.quantity), 0) AS quantity,"
            " coalesce(sum(t.quantity - t.held - t.sold), 0) AS available"
            " FROM events e JOIN room_settings r ON r.event_id = e.id"
            " LEFT JOIN ticket_types t ON t.event_id = e.id"
            " GROUP BY e.id, r.opens_at, r.queue_mode ORDER BY e.created_at DESC, e.id LIMIT $1",
            limit,
        )
    return [
        EventSummary(
            id=r["id"],
            name=r["name"],
            status=r["status"],
            opens_at=r["opens_at"],
            queue_mode=r["queue_mode"],
            quantity=int(r["quantity"]),
            available=int(r["available"]),
        )
        for r in rows
    ]


async def ticket_type_stats(pool: asyncpg.Pool[Any], event_id: str) -> list[TicketTypeStats]:
    """Each ticket type's counts from PostgreSQL, in the event's order (none when unknown)."""
    rows = await pool.fetch(
        "SELECT name, quantity, held, sold FROM ticket_types WHERE event_id = $1 ORDER BY position",
        event_id,
    )
    return [
        TicketTypeStats(
            name=r["name"],
            quantity=r["quantity"],
            held=r["held"],
            sold=r["sold"],
            available=r["quantity"] - r["held"] - r["sold"],
        )
        for r in rows
    ]


async def event_stats(pool: asyncpg.Pool[Any], event_id: str) -> EventStats:
    """Ticket counts of an event from PostgreSQL, the source of truth."""
    detail = await get_event(pool, event_id)
    types = await ticket_type_stats(pool, event_id)
    return EventStats(
        event_id=event_id,
        status=detail.status,
        room=detail.room,
        ticket_types=types,
        quantity=sum(t.quantity for t in types),
        held=sum(t.held for t in types),
        sold=sum(t.sold for t in types),
        available=sum(t.available for t in types),
    )


class PriceBook:
    """Ticket prices by event, read once: an event's types and prices never change."""

    def __init__(self, pool: asyncpg.Pool[Any]) -> None:
        self._pool = pool
        self._events: dict[str, EventDetail] = {}

    async def price(self, event_id: str, ticket_type: str) -> tuple[int, str]:
        """``(price_minor, currency)`` of ``ticket_type``; ``(0, "")`` for an unknown type."""
        event = self._events.get(event_id)
        if event is None:
            event = await get_event(self._pool, event_id)
            self._events[event_id] = event
        for t in event.ticket_types:
            if t.name == ticket_type:
                return t.price_minor, t.currency
        return 0, ""


class EventDirectory:
    """Which event ids exist, kept in memory, so that an unknown id costs no query.

    Refreshed from ``events`` (the whole id list: a deployment has thousands of events, not
    millions) only when an id it does not know is asked for, and then at most once every
    ``refresh_s``: a flood of made-up ids costs at most one query per ``refresh_s`` per
    process, and an event created elsewhere (another node, the CLI) is known here within
    ``refresh_s``. Events are never deleted by waitroom, so a known id stays known; an id
    this process creates is added at once (:meth:`add`).
    """

    def __init__(
        self,
        pool: asyncpg.Pool[Any],
        *,
        refresh_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._refresh_s = refresh_s
        self._clock = clock
        self._ids: set[str] = set()
        self._refreshed_at = -math.inf
        self._refreshing: asyncio.Task[None] | None = None

    def add(self, event_id: str) -> None:
        """This process created ``event_id``."""
        self._ids.add(event_id)

    async def exists(self, event_id: str) -> bool:
        """Whether ``event_id`` names an event (refreshing the list when due, see above)."""
        if event_id in self._ids:
            return True
        if self._clock() - self._refreshed_at < self._refresh_s:
            return False
        task = self._refreshing
        if task is None:
            task = self._refreshing = asyncio.create_task(self._refresh(), name="event-ids")
            task.add_done_callback(self._refreshed)
        # Shielded: one caller giving up does not cancel the refresh the others wait for.
        await asyncio.shield(task)
        return event_id in self._ids

    async def _refresh(self) -> None:
        rows = await self._pool.fetch("SELECT id FROM events")
        self._ids.update(r["id"] for r in rows)
        self._refreshed_at = self._clock()

    def _refreshed(self, task: asyncio.Task[None]) -> None:
        self._refreshing = None
        if not task.cancelled():
            task.exception()  # a failed refresh is the waiting callers' error, not lost
