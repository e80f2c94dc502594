"""The venue and seat map of an event: sections, rows and seats, and their price levels.

A seat map is what operators import (admin API ``PUT /v1/admin/events/{id}/seatmap`` or
``waitroom venue import EVENT FILE``) and export; its JSON format is documented in
``docs/seatmap.md``. The structs below do the field-level validation while decoding;
:func:`validate_seat_map` adds the rules that span fields (unique labels, known price levels,
ticket types of the event and their quantities) and raises a 422 naming the bad section, row
or seat both in ``details.field`` (a JSON path) and in the message (the labels).

Terms: a *section* is either ``seated`` (rows of seats) or ``general_admission`` (a standing
area sold by quantity of one ticket type); both may mix in one event. A *row* is a contiguous
run of seats, listed in physical order, so neighbours in the list sit side by side (an aisle
splits a row into two sections). A *price level* maps seats to a ticket type of the event.
A seat is ``open`` (for sale), ``killed`` (never sold: broken, camera position, sound desk) or
``held_back`` (kept off sale by the operator; may be released later). Every seat's id is
``SECTION:ROW:SEAT``, unambiguous because labels cannot contain ``:``.

The functions at the bottom are the thin PostgreSQL adapter shared by the API and the CLI.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import asyncpg
import msgspec
from msgspec import Meta

from waitroom.core import audit, ids
from waitroom.core.errors import Conflict, NotFound, ValidationFailed

SectionId = Annotated[
    str,
    Meta(
        pattern=r"^[a-z0-9][a-z0-9_-]{0,31}" + ids.END,
        description="lowercase letters, digits, '-' and '_'; at most 32 characters",
    ),
]
LevelId = Annotated[
    str,
    Meta(
        pattern=r"^[a-z0-9][a-z0-9_-]{0,31}" + ids.END,
        description="lowercase letters, digits, '-' and '_'; at most 32 characters",
    ),
]
Label = Annotated[
    str,
    Meta(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,15}" + ids.END,
        description="letters, digits, '.', '-' and '_'; at most 16 characters",
    ),
]
TicketTypeName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9 _-]{0,63}" + ids.END)]
Coordinate = Annotated[float, Meta(ge=-1_000_000, le=1_000_000)]
SeatStatus = Literal["open", "killed", "held_back"]

#: Seats one map may hold: a large stadium, with room to spare.
MAX_SEATS = 150_000
#: Largest seat-map body the API reads. The default 64 KiB limit of other bodies fits some
#: 1,000 seats; a seat costs 45-110 bytes of JSON (``{"label":"12","x":120.5,"y":40,
#: "level":"a"}`` and flags), so 150,000 seats take up to ~16 MiB. Only operators may send
#: one (the token is checked before a byte is read), so the larger limit costs fans nothing.
MAX_BODY_BYTES = 16 * 1024 * 1024


class Point(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A point in the map's drawing coordinates (``y`` grows away from the stage)."""

    x: Coordinate
    y: Coordinate


class Seat(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One seat: its label in the row, where it is drawn, and its price level."""

    label: Label
    x: Coordinate
    y: Coordinate
    level: LevelId
    accessible: bool = False
    restricted_view: bool = False
    status: SeatStatus = "open"


class Row(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A contiguous run of seats in physical order (neighbours in the list sit together)."""

    label: Label
    seats: Annotated[list[Seat], Meta(min_length=1, max_length=1000)]


class SeatedSection(
    msgspec.Struct,
    frozen=True,
    forbid_unknown_fields=True,
    omit_defaults=True,
    tag="seated",
    tag_field="kind",
):
    """A section of rows of seats.

    ``focal`` is the point best-available seats are chosen closest to (default: the
    section's front-centre, see :func:`focal_point`); ``priority`` orders sections for
    best-available (lower first; equal priorities compete on distance to their focal points).
    """

    id: SectionId
    rows: Annotated[list[Row], Meta(min_length=1, max_length=1000)]
    name: Annotated[str, Meta(max_length=200)] = ""
    focal: Point | None = None
    priority: Annotated[int, Meta(ge=0, le=1000)] = 0


class GeneralAdmissionSection(
    msgspec.Struct,
    frozen=True,
    forbid_unknown_fields=True,
    omit_defaults=True,
    tag="general_admission",
    tag_field="kind",
):
    """A standing area, sold by quantity of one ticket type (the ticket type's quantity
    decides; ``capacity`` is the area's licensed size, for the drawing and the operator)."""

    id: SectionId
    ticket_type: TicketTypeName
    capacity: Annotated[int, Meta(ge=1, le=10_000_000)]
    name: Annotated[str, Meta(max_length=200)] = ""


Section = SeatedSection | GeneralAdmissionSection


class PriceLevel(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """A price level: the seats marked with it are sold as tickets of ``ticket_type``."""

    id: LevelId
    ticket_type: TicketTypeName
    name: Annotated[str, Meta(max_length=200)] = ""


class SeatMap(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of ``PUT /v1/admin/events/{event_id}/seatmap``: an event's whole seat map."""

    sections: Annotated[list[Section], Meta(min_length=1, max_length=1000)]
    price_levels: Annotated[list[PriceLevel], Meta(max_length=100)] = []
    format: Literal[1] = 1


class LevelCount(msgspec.Struct, frozen=True):
    """Seats of one price level by status."""

    level: str
    ticket_type: str
    open: int
    held_back: int
    killed: int


class SeatMapSummary(msgspec.Struct, frozen=True):
    """Answer to an import: what the stored map holds."""

    event_id: str
    sections: int
    seated_sections: int
    general_admission_sections: int
    seats: int
    levels: list[LevelCount]


def seat_id(section: str, row: str, seat: str) -> str:
    """The id of a seat: ``SECTION:ROW:SEAT``."""
    return f"{section}:{row}:{seat}"


def focal_point(section: SeatedSection) -> Point:
    """The point best-available is closest to: ``section.focal``, or else the front-centre
    (the middle of the seats' x range, at the smallest y, the row nearest the stage)."""
    if section.focal is not None:
        return section.focal
    xs = [seat.x for row in section.rows for seat in row.seats]
    ys = [seat.y for row in section.rows for seat in row.seats]
    return Point(x=(min(xs) + max(xs)) / 2, y=min(ys))


def distance(seat: Seat, point: Point) -> float:
    """Euclidean distance of ``seat`` from ``point``, in drawing units."""
    return math.hypot(seat.x - point.x, seat.y - point.y)


def _invalid(message: str, field: str, code: str) -> ValidationFailed:
    return ValidationFailed(message, field=field, code=code)


def validate_seat_map(
    seat_map: SeatMap,
    ticket_types: Mapping[str, int] | None = None,
    *,
    check_quantities: bool = True,
) -> None:
    """Rules beyond single fields; raises :class:`ValidationFailed` naming what is wrong.

    ``ticket_types`` (name -> quantity) are the event's; when given, every price level and
    general-admission section must name one, and, with ``check_quantities``, the seats not
    killed of each ticket type must fit its quantity (the no-oversell constraint counts
    tickets, not seats). :func:`import_seat_map` does not check quantities: it sets a seated
    ticket type's quantity from the map.
    """
    levels: dict[str, PriceLevel] = {}
    for i, defined in enumerate(seat_map.price_levels):
        if defined.id in levels:
            raise _invalid(
                f"price level {defined.id!r} is defined twice",
                f"price_levels[{i}].id",
                "duplicate_price_level",
            )
        if ticket_types is not None and defined.ticket_type not in ticket_types:
            raise _invalid(
                f"price level {defined.id!r} names ticket type {defined.ticket_type!r},"
                " which the event does not have",
                f"price_levels[{i}].ticket_type",
                "unknown_ticket_type",
            )
        levels[defined.id] = defined
    level_types = {level.ticket_type for level in levels.values()}
    sections: set[str] = set()
    sellable: dict[str, int] = {}
    seats = 0
    for s, section in enumerate(seat_map.sections):
        where = f"sections[{s}]"
        if section.id in sections:
            raise _invalid(
                f"section {section.id!r} is defined twice", f"{where}.id", "duplicate_section"
            )
        sections.add(section.id)
        if isinstance(section, GeneralAdmissionSection):
            if ticket_types is not None and section.ticket_type not in ticket_types:
                raise _invalid(
                    f"section {section.id!r} names ticket type {section.ticket_type!r},"
                    " which the event does not have",
                    f"{where}.ticket_type",
                    "unknown_ticket_type",
                )
            if section.ticket_type in level_types:
                raise _invalid(
                    f"general-admission section {section.id!r} sells ticket type"
                    f" {section.ticket_type!r}, which a price level sells as seats too;"
                    " a ticket type is either seated or general admission",
                    f"{where}.ticket_type",
                    "mixed_ticket_type",
                )
            continue
        rows: set[str] = set()
        spots: dict[tuple[float, float], str] = {}
        for r, row in enumerate(section.rows):
            here = f"{where}.rows[{r}]"
            if row.label.casefold() in rows:
                raise _invalid(
                    f"section {section.id!r}: row {row.label!r} is defined twice",
                    f"{here}.label",
                    "duplicate_row",
                )
            rows.add(row.label.casefold())
            labels: set[str] = set()
            for k, seat in enumerate(row.seats):
                name = f"section {section.id!r} row {row.label!r} seat {seat.label!r}"
                if seat.label.casefold() in labels:
                    raise _invalid(
                        f"{name}: the label is used twice in the row",
                        f"{here}.seats[{k}].label",
                        "duplicate_seat",
                    )
                labels.add(seat.label.casefold())
                level = levels.get(seat.level)
                if level is None:
                    raise _invalid(
                        f"{name}: price level {seat.level!r} is not in price_levels",
                        f"{here}.seats[{k}].level",
                        "unknown_price_level",
                    )
                spot = (seat.x, seat.y)
                if spot in spots:
                    raise _invalid(
                        f"{name}: drawn at the same point ({seat.x:g}, {seat.y:g}) as seat"
                        f" {spots[spot]}",
                        f"{here}.seats[{k}]",
                        "overlapping_seats",
                    )
                spots[spot] = f"{row.label!r} {seat.label!r}"
                if seat.status != "killed":
                    sellable[level.ticket_type] = sellable.get(level.ticket_type, 0) + 1
                seats += 1
                if seats > MAX_SEATS:
                    raise _invalid(
                        f"the map has more than {MAX_SEATS} seats", where, "too_many_seats"
                    )
    if ticket_types is not None and check_quantities:
        for name, count in sellable.items():
            if count > ticket_types[name]:
                raise _invalid(
                    f"ticket type {name!r} has quantity {ticket_types[name]} but the map"
                    f" offers {count} seats of it (not killed); raise the quantity or kill"
                    " seats",
                    "price_levels",
                    "seats_over_quantity",
                )


def summarize(event_id: str, seat_map: SeatMap) -> SeatMapSummary:
    """How many sections and seats ``seat_map`` holds, by price level and status."""
    counts: dict[str, dict[str, int]] = {
        level.id: {"open": 0, "held_back": 0, "killed": 0} for level in seat_map.price_levels
    }
    seated = 0
    seats = 0
    for section in seat_map.sections:
        if isinstance(section, SeatedSection):
            seated += 1
            for row in section.rows:
                for seat in row.seats:
                    counts[seat.level][seat.status] += 1
                    seats += 1
    return SeatMapSummary(
        event_id=event_id,
        sections=len(seat_map.sections),
        seated_sections=seated,
        general_admission_sections=len(seat_map.sections) - seated,
        seats=seats,
        levels=[
            LevelCount(level=level.id, ticket_type=level.ticket_type, **counts[level.id])
            for level in seat_map.price_levels
        ],
    )


# --- PostgreSQL adapter ------------------------------------------------------------------

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(SeatMap)


def encode(seat_map: SeatMap) -> bytes:
    """The compact JSON of ``seat_map`` (defaults omitted), as export writes it."""
    return _encoder.encode(seat_map)


def _seat_rows(event_id: str, seat_map: SeatMap) -> list[tuple[Any, ...]]:
    levels = {level.id: level.ticket_type for level in seat_map.price_levels}
    return [
        (
            event_id,
            seat_id(section.id, row.label, seat.label),
            section.id,
            row.label,
            seat.label,
            seat.level,
            levels[seat.level],
            seat.status,
            seat.accessible,
            seat.restricted_view,
        )
        for section in seat_map.sections
        if isinstance(section, SeatedSection)
        for row in section.rows
        for seat in row.seats
    ]


def _open_seats(seat_map: SeatMap) -> dict[str, int]:
    """Open seats per ticket type: a seated ticket type's quantity."""
    levels = {level.id: level.ticket_type for level in seat_map.price_levels}
    counts = dict.fromkeys(levels.values(), 0)
    for section in seat_map.sections:
        if isinstance(section, SeatedSection):
            for row in section.rows:
                for seat in row.seats:
                    if seat.status == "open":
                        counts[levels[seat.level]] += 1
    return counts


async def import_seat_map(
    pool: asyncpg.Pool[Any], event_id: str, seat_map: SeatMap, *, actor: audit.Actor | str
) -> SeatMapSummary:
    """Validate ``seat_map`` against the event and store it, replacing the previous one.

    404 ``event_not_found``; 422 naming the bad part; 409 ``seat_map_in_use`` once any seat
    of the event was ever held (a map cannot change under a sale: replace it before one), or
    once a ticket type the map seats has tickets held or sold by quantity. The event's
    inventory actor, if one is running, is fenced off (its owner's epoch is bumped), so that
    the next one loads the new map.

    A ticket type sold as seats gets its quantity set to its ``open`` seats (the map's
    ``killed`` and ``held_back`` seats are not for sale), so the inventory's counts of
    tickets (held + sold <= quantity) and of seats always agree; 422 ``no_seats_on_sale``
    when a seated ticket type would have none.
    """
    async with pool.acquire() as conn, conn.transaction():
        # Locks the event against a concurrent import (the second waits, then replaces).
        found = await conn.fetchval("SELECT true FROM events WHERE id = $1 FOR UPDATE", event_id)
        if found is None:
            raise NotFound(
                f"no event {event_id!r}", code="event_not_found", details={"event_id": event_id}
            )
        types = await conn.fetch(
            "SELECT name, quantity FROM ticket_types WHERE event_id = $1", event_id
        )
        validate_seat_map(
            seat_map, {t["name"]: t["quantity"] for t in types}, check_quantities=False
        )
        if await conn.fetchval("SELECT true FROM seat_holds WHERE event_id = $1 LIMIT 1", event_id):
            raise Conflict(
                f"seats of event {event_id!r} have been held already; the map cannot change",
                code="seat_map_in_use",
                details={"event_id": event_id},
            )
        on_sale = _open_seats(seat_map)
        for name in sorted({level.ticket_type for level in seat_map.price_levels}):
            if not on_sale.get(name):
                raise ValidationFailed(
                    f"ticket type {name!r} has no open seat in the map: nothing to sell",
                    field="price_levels",
                    code="no_seats_on_sale",
                )
        sold = await conn.fetchval(
            "SELECT string_agg(name, ', ') FROM ticket_types"
            " WHERE event_id = $1 AND name = ANY($2::text[]) AND held + sold > 0",
            event_id,
            list(on_sale),
        )
        if sold:
            raise Conflict(
                f"tickets of {sold} are held or sold by quantity already; they cannot become seats",
                code="seat_map_in_use",
                details={"event_id": event_id},
            )
        await conn.execute(
            "UPDATE ticket_types t SET quantity = q.quantity"
            " FROM unnest($2::text[], $3::int[]) AS q(name, quantity)"
            " WHERE t.event_id = $1 AND t.name = q.name",
            event_id,
            list(on_sale),
            list(on_sale.values()),
        )
        # The event's inventory actor, if one runs, sells from the map it loaded: a new
        # fencing epoch refuses its next commit, and whoever hosts the event next loads
        # this map (and these quantities). Committed with the import, or not at all.
        await conn.execute(
            "UPDATE inventory_owners SET epoch = epoch + 1 WHERE event_id = $1", event_id
        )
        old = await conn.fetchval("SELECT seats FROM seat_maps WHERE event_id = $1", event_id)
        await conn.execute("DELETE FROM seats WHERE event_id = $1", event_id)
        document = encode(seat_map).decode()
        summary = summarize(event_id, seat_map)
        await conn.execute(
            "INSERT INTO seat_maps (event_id, document, seats) VALUES ($1, $2::jsonb, $3)"
            " ON CONFLICT (event_id) DO UPDATE SET document = EXCLUDED.document,"
            " seats = EXCLUDED.seats, version = seat_maps.version + 1, updated_at = now()",
            event_id,
            document,
            summary.seats,
        )
        await conn.copy_records_to_table(
            "seats",
            records=_seat_rows(event_id, seat_map),
            columns=[
                "event_id",
                "seat_id",
                "section",
                "row_label",
                "seat_label",
                "level",
                "ticket_type",
                "status",
                "accessible",
                "restricted_view",
            ],
        )
        # The audit row carries the summary, not the (possibly megabytes of) map itself.
        await audit.record(
            conn,
            actor,
            "seatmap.import",
            event_id,
            old=None if old is None else _encoder.encode({"seats": old}).decode(),
            new=_encoder.encode(summary).decode(),
        )
    return summary


async def export_seat_map(pool: asyncpg.Pool[Any], event_id: str) -> SeatMap:
    """The event's stored seat map; 404 ``event_not_found`` or ``seat_map_not_found``."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT m.document::text AS document FROM events e"
            " LEFT JOIN seat_maps m ON m.event_id = e.id WHERE e.id = $1",
            event_id,
        )
    if row is None:
        raise NotFound(
            f"no event {event_id!r}", code="event_not_found", details={"event_id": event_id}
        )
    if row["document"] is None:
        raise NotFound(
            f"event {event_id!r} has no seat map",
            code="seat_map_not_found",
            details={"event_id": event_id},
        )
    return _decoder.decode(row["document"])
