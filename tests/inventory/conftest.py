"""Fixtures of the inventory tests: a pool, a Redis client and a fresh event per test."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg

from inventory import catalogue


async def make_event(
    pool: asyncpg.Pool[Any], *, quantity: int = 20, per_fan: int = 4, hold_ttl_s: int = 600
) -> str:
    """A new event with one ticket type 'ga' of ``quantity`` tickets."""
    event_id = f"inv-{uuid.uuid4().hex[:10]}"
    spec = catalogue.EventCreate(
        id=event_id,
        name="Inventory test",
        ticket_types=[catalogue.TicketTypeSpec("ga", quantity, 1000, "EUR", per_fan)],
        room=catalogue.RoomSpec(per_fan_limit=per_fan),
    )
    await catalogue.create_event(pool, spec, actor="test", now=datetime.now(UTC))
    if hold_ttl_s != 600:
        await pool.execute(
            "UPDATE room_settings SET hold_ttl_s = $2 WHERE event_id = $1", event_id, hold_ttl_s
        )
    return event_id


async def held_sold(pool: asyncpg.Pool[Any], event_id: str) -> tuple[int, int, int]:
    """(held, sold, quantity) of the event's 'ga' tickets, from PostgreSQL."""
    row = await pool.fetchrow(
        "SELECT held, sold, quantity FROM ticket_types WHERE event_id = $1", event_id
    )
    assert row is not None
    return row["held"], row["sold"], row["quantity"]
