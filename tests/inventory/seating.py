"""A small seated venue for the seat-inventory tests (inventory and checkout).

Stalls: row A, ten ``front`` seats (A:10 killed); row B, ten ``back`` seats (B:1 held back).
A standing ``pit`` sold by quantity as ticket type ``ga``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec

from inventory import catalogue, venue
from inventory.store import Conn

FRONT = [f"stalls:A:{n}" for n in range(1, 10)]  # on sale; A:10 is killed
BACK = [f"stalls:B:{n}" for n in range(2, 11)]  # on sale; B:1 is held back


def seat_map_document() -> dict[str, Any]:
    """The venue as the JSON an operator imports."""

    def row(label: str, level: str, status: dict[int, str]) -> dict[str, Any]:
        seats: list[dict[str, Any]] = []
        for n in range(1, 11):
            seat: dict[str, Any] = {"label": str(n), "x": n * 10, "y": 0 if label == "A" else 10}
            seat["level"] = level
            if n in status:
                seat["status"] = status[n]
            seats.append(seat)
        return {"label": label, "seats": seats}

    return {
        "price_levels": [
            {"id": "front", "ticket_type": "Front"},
            {"id": "back", "ticket_type": "Back"},
        ],
        "sections": [
            {
                "kind": "seated",
                "id": "stalls",
                "rows": [row("A", "front", {10: "killed"}), row("B", "back", {1: "held_back"})],
            },
            {"kind": "general_admission", "id": "pit", "ticket_type": "ga", "capacity": 100},
        ],
    }


def ticket_types(per_fan: int = 4) -> list[catalogue.TicketTypeSpec]:
    """The event's ticket types: quantities above the seats, which the import lowers."""
    return [
        catalogue.TicketTypeSpec("Front", 20, 5000, "EUR", per_fan),
        catalogue.TicketTypeSpec("Back", 20, 3000, "EUR", per_fan),
        catalogue.TicketTypeSpec("ga", 30, 2000, "EUR", per_fan),
    ]


async def make_seated_event(
    pool: asyncpg.Pool[Any], *, per_fan: int = 4, hold_ttl_s: int = 600
) -> str:
    """A new event with the venue above imported."""
    event_id = f"seat-{uuid.uuid4().hex[:10]}"
    spec = catalogue.EventCreate(
        id=event_id,
        name="Seated test",
        ticket_types=ticket_types(per_fan),
        room=catalogue.RoomSpec(per_fan_limit=per_fan),
    )
    await catalogue.create_event(pool, spec, actor="test", now=datetime.now(UTC))
    if hold_ttl_s != 600:
        await pool.execute(
            "UPDATE room_settings SET hold_ttl_s = $2 WHERE event_id = $1", event_id, hold_ttl_s
        )
    seat_map = msgspec.convert(seat_map_document(), venue.SeatMap)
    await venue.import_seat_map(pool, event_id, seat_map, actor="test")
    return event_id


async def seat_rows(pool: asyncpg.Pool[Any], event_id: str) -> dict[str, str]:
    """Seat id -> status of its live (held or paid) seat_holds row, from PostgreSQL."""
    rows = await pool.fetch(
        "SELECT seat_id, status FROM seat_holds WHERE event_id = $1 AND status IN ('held', 'paid')",
        event_id,
    )
    return {r["seat_id"]: r["status"] for r in rows}


async def write_seat_holds(
    conn: Conn, event_id: str, seats: list[str], status: str = "held"
) -> list[uuid.UUID]:
    """Holds of ``seats`` written straight to PostgreSQL, behind the actor's back (one per
    ticket type of the seats, as PostgreSQL requires); their ``seat_holds`` rows say
    ``status`` ('held', or 'paid' for sold seats). The caller runs a transaction if it
    wants one."""
    rows = await conn.fetch(
        "SELECT seat_id, ticket_type FROM seats WHERE event_id = $1 AND seat_id = ANY($2::text[])",
        event_id,
        seats,
    )
    by_type: dict[str, list[str]] = {}
    for row in rows:
        by_type.setdefault(row["ticket_type"], []).append(row["seat_id"])
    holds: list[uuid.UUID] = []
    for ticket_type, taken in by_type.items():
        hold_id = uuid.uuid4()
        await conn.execute(
            "INSERT INTO holds (id, event_id, ticket_type, fan_id, quantity, status, expires_at)"
            " VALUES ($1, $2, $3, 'fan', $4, 'held', now() + interval '1h')",
            hold_id,
            event_id,
            ticket_type,
            len(taken),
        )
        await conn.executemany(
            "INSERT INTO seat_holds (hold_id, event_id, seat_id, status) VALUES ($1, $2, $3, $4)",
            [(hold_id, event_id, seat, status) for seat in taken],
        )
        holds.append(hold_id)
    return holds
