"""HTTP routes of the event catalogue: the public event view and the operators' event API."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from admission import operators
from inventory import catalogue
from waitroom.core.http import JSONResponse, read_json
from waitroom.core.openapi import Operation
from waitroom.services import require_admin, services


async def get_public_event(request: Request) -> Response:
    """Public event info and availability per ticket type."""
    event = await catalogue.get_event(services(request).db, request.path_params["event_id"])
    return JSONResponse(event.public())


async def create_event(request: Request) -> Response:
    """Create an event with its ticket types and waiting-room rules."""
    actor = require_admin(request)
    spec = await read_json(request, catalogue.EventCreate)
    event = await catalogue.create_event(
        services(request).db, spec, actor=actor, now=datetime.now(UTC)
    )
    return JSONResponse(
        event, status_code=201, headers={"Location": f"/v1/admin/events/{event.id}"}
    )


async def list_events(request: Request) -> Response:
    """The newest events first."""
    require_admin(request)
    return JSONResponse(await catalogue.list_events(services(request).db))


async def get_event(request: Request) -> Response:
    """Everything about one event, including the room's rules."""
    require_admin(request)
    event = await catalogue.get_event(services(request).db, request.path_params["event_id"])
    return JSONResponse(event)


async def get_event_stats(request: Request) -> Response:
    """Live counts of one event."""
    require_admin(request)
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
