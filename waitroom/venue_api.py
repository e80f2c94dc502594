"""HTTP routes of seat maps: the operators' import and export of an event's venue.

- ``PUT /v1/admin/events/{event_id}/seatmap``: import (replace) the event's seat map;
- ``GET /v1/admin/events/{event_id}/seatmap``: export it, in the format it was imported in.

The format is ``docs/seatmap.md``; validation and storage are :mod:`inventory.venue`, which
the CLI (``waitroom venue import|export``) calls too.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from inventory import venue
from waitroom.core.http import JSONResponse, read_json
from waitroom.core.openapi import Operation
from waitroom.services import require_admin, services


async def put_seat_map(request: Request) -> Response:
    """Import an event's seat map, replacing the one it had (before any seat is held).

    Bodies up to :data:`inventory.venue.MAX_BODY_BYTES` (16 MiB, not the 64 KiB of other
    bodies): a stadium's map is megabytes. The operator's token is checked first, so nobody
    else gets a byte of that larger body read.
    """
    actor = await require_admin(request)
    seat_map = await read_json(request, venue.SeatMap, limit=venue.MAX_BODY_BYTES)
    summary = await venue.import_seat_map(
        services(request).db, request.path_params["event_id"], seat_map, actor=actor
    )
    return JSONResponse(summary)


async def get_seat_map(request: Request) -> Response:
    """Export an event's seat map."""
    await require_admin(request)
    seat_map = await venue.export_seat_map(services(request).db, request.path_params["event_id"])
    return Response(
        venue.encode(seat_map),
        media_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


OPERATIONS = [
    Operation(
        "PUT",
        "/v1/admin/events/{event_id}/seatmap",
        put_seat_map,
        "Import an event's seat map",
        request=venue.SeatMap,
        response=venue.SeatMapSummary,
        errors=(404, 409, 503),
        tags=("operators",),
        auth="admin",
    ),
    Operation(
        "GET",
        "/v1/admin/events/{event_id}/seatmap",
        get_seat_map,
        "Export an event's seat map",
        response=venue.SeatMap,
        errors=(404, 503),
        tags=("operators",),
        auth="admin",
    ),
]
