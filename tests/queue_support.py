"""Helpers of the waiting-room tests: rooms straight in Redis, events through the admin API."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import httpx
from redis.asyncio import Redis

from tests.harness import async_redis
from waitroom.core.keys import EventKeys, Keys
from waitroom.core.settings import Settings
from waitroom.line import scripts

GA = [{"name": "ga", "quantity": 100, "price_minor": 1000, "currency": "EUR"}]


def room_fields(
    *, mode: str = "fifo", opens_at: float = 0.0, grace_s: int = 60, **extra: str
) -> dict[str, str]:
    """The meta fields a room loaded from PostgreSQL starts with."""
    fields = {
        "mode": mode,
        "opens_at": repr(opens_at),
        "grace_s": str(grace_s),
        "rate": "10.0",
        "max_active": "100",
        "pass_ttl_s": "900",
        "paused": "0",
        "sold_out": "0",
        "admitted_total": "0",
        "abandoned_total": "0",
        "opened": "0",
        "drawn": "0",
        "commitment": "",
    }
    fields.update(extra)
    return fields


@asynccontextmanager
async def redis_client(settings: Settings) -> AsyncIterator[Redis]:
    """An async Redis client for the run's Redis, closed afterwards."""
    client = async_redis(settings.redis_url)
    try:
        yield client
    finally:
        await client.aclose()


def fresh_room_keys(settings: Settings) -> EventKeys:
    """Keys of a room no other test touches."""
    return Keys(settings.redis_prefix).event("r" + secrets.token_hex(6))


async def make_room(redis: Redis, ek: EventKeys, seed: str | None = None, **fields: Any) -> None:
    """Create a room's meta in Redis directly, as loading it from PostgreSQL would."""
    await scripts.init_room(redis, ek, room_fields(**fields), seed)


def create_event(
    admin: httpx.Client,
    *,
    mode: str = "fifo",
    opens_at: datetime | None = None,
    grace_s: int = 60,
    prefix: str = "q",
) -> str:
    """Create an event through the admin API; its id."""
    event_id = f"{prefix}-{uuid.uuid4().hex[:10]}"
    room: dict[str, Any] = {"queue_mode": mode, "abandon_grace_s": grace_s}
    if opens_at is not None:
        room["opens_at"] = opens_at.isoformat()
    response = admin.post(
        "/v1/admin/events",
        json={"id": event_id, "name": "Queue test", "ticket_types": GA, "room": room},
    )
    assert response.status_code == 201, response.text
    return event_id


def fan_headers(token: str, ip: str | None = None) -> dict[str, str]:
    """Headers of a fan with ``token``, seen as coming from ``ip`` (the test settings trust
    X-Forwarded-For from 127.0.0.1, so tests can spread fans over many addresses)."""
    headers = {"Authorization": f"Bearer {token}"}
    if ip is not None:
        headers["X-Forwarded-For"] = ip
    return headers


def new_ip() -> str:
    """A random documentation-range address, so each fan has its own per-IP bucket."""
    return f"198.51.{secrets.randbelow(256)}.{secrets.randbelow(256)}"
