"""HTTP routes of the event catalogue: the public event view and the operators' event API."""

from __future__ import annotations

import contextlib
import time
from datetime import UTC, datetime
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from admission import operators
from inventory import catalogue
from waitroom.core.http import JSONResponse, read_json
from waitroom.core.openapi import Operation
from waitroom.line.room import not_found
from waitroom.services import require_admin, services


async def get_public_event(request: Request) -> Response:
    """Public event info and availability per ticket type.

    In a sale every fan's page asks for this, and a PostgreSQL query each would take the
    pool: the event is served from this process's cache (for at most ``view_cache_ttl_s``,
    1 s by default), and an unknown id costs no query at all. The availability shown is the
    lower of that cached PostgreSQL figure and the live one: the ledger of the event's
    actor when this process runs it, otherwise what the actor publishes to Redis after its
    commits (one round trip on the pipelined connection). So a hold shows at once, and what
    is shown is never better than the truth of ``view_cache_ttl_s`` ago.
    Checkout, not this view, decides whether a ticket is still there.
    """
    svc = services(request)
    event_id: str = request.path_params["event_id"]
    if not await svc.events.exists(event_id):
        raise not_found(event_id)

    async def load() -> tuple[catalogue.EventInfo, float]:
        event = await catalogue.get_event(svc.db, event_id)
        return event.public(), svc.settings.view_cache_ttl_s

    info = await svc.event_views.get(event_id, load)
    actor = svc.inventory.actor(event_id)
    if actor is not None:
        # This process runs the event's actor: its ledger is the freshest figure there is.
        live = actor.ledger.availability()
    else:
        live = _published(await svc.mux.execute("HGETALL", svc.keys.event(event_id).availability))
    return JSONResponse(
        _lower_availability(info, live),
        headers={"Cache-Control": f"public, max-age={max(1, int(svc.settings.view_cache_ttl_s))}"},
    )


def _published(reply: Any) -> dict[str, int]:
    """The availability an actor published (an ``HGETALL`` reply: names and counts)."""
    live: dict[str, int] = {}
    for name, value in zip(reply[::2], reply[1::2], strict=True):
        with contextlib.suppress(ValueError):
            live[name.decode() if isinstance(name, bytes) else str(name)] = int(value)
    return live


def _lower_availability(info: catalogue.EventInfo, live: dict[str, int]) -> catalogue.EventInfo:
    """``info`` with each ticket type's availability lowered to the live one, if lower."""
    if not live:
        return info
    types = [
        msgspec.structs.replace(t, available=max(0, live[t.name]))
        if t.name in live and live[t.name] < t.available
        else t
        for t in info.ticket_types
    ]
    return msgspec.structs.replace(info, ticket_types=types)


async def create_event(request: Request) -> Response:
    """Create an event with its ticket types and waiting-room rules."""
    actor = await require_admin(request)
    spec = await read_json(request, catalogue.EventCreate)
    svc = services(request)
    event = await catalogue.create_event(svc.db, spec, actor=actor, now=datetime.now(UTC))
    # Known at once here; a "no such event" this process may have cached is dropped.
    svc.events.add(event.id)
    svc.event_views.invalidate(event.id)
    svc.lottery_views.invalidate(event.id)
    return JSONResponse(
        event, status_code=201, headers={"Location": f"/v1/admin/events/{event.id}"}
    )


async def list_events(request: Request) -> Response:
    """The newest events first."""
    await require_admin(request)
    return JSONResponse(await catalogue.list_events(services(request).db))


async def get_event(request: Request) -> Response:
    """Everything about one event, including the room's rules."""
    await require_admin(request)
    event = await catalogue.get_event(services(request).db, request.path_params["event_id"])
    return JSONResponse(event)


async def get_event_stats(request: Request) -> Response:
    """Live counts of one event."""
    await require_admin(request)
    svc = services(request)
    event_id = request.path_params["event_id"]
    stats = await catalogue.event_stats(svc.db, event_id)
    # The live side of the sale (line, admissions, passes): see admission.operators.
    live = await operators.admission_status(svc.db, svc.redis, svc.keys, event_id, now=time.time())
    stats = msgspec.structs.replace(
        stats, extra={**stats.extra, "admission": msgspec.to_builtins(live)}
    )
    return JSONResponse(stats)


OPERATIONS = [
    Operation(
        "GET",
        "/v1/events/{event_id}",
        get_public_event,
        "Public event info",
        response=catalogue.EventInfo,
        errors=(404, 503),
        tags=("fans",),
    ),
    Operation(
        "POST",
        "/v1/admin/events",
        create_event,
        "Create an event",
        request=catalogue.EventCreate,
        response=catalogue.EventDetail,
        status=201,
        errors=(409, 503),
        tags=("operators",),
        auth="admin",
    ),
    Operation(
        "GET",
        "/v1/admin/events",
        list_events,
        "List events",
        response=list[catalogue.EventSummary],
        errors=(503,),
        tags=("operators",),
        auth="admin",
    ),
    Operation(
        "GET",
        "/v1/admin/events/{event_id}",
        get_event,
        "Show an event",
        response=catalogue.EventDetail,
        errors=(404, 503),
        tags=("operators",),
        auth="admin",
    ),
    Operation(
        "GET",
        "/v1/admin/events/{event_id}/stats",
        get_event_stats,
        "Event statistics",
        response=catalogue.EventStats,
        errors=(404, 503),
        tags=("operators",),
        auth="admin",
    ),
]
