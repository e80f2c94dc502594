"""The fans' view of an event's seats: a cacheable snapshot and a live stream of changes.

- ``GET /v1/events/{event_id}/seats``: the seat map's layout (sections, rows, seats, price
  levels with their prices) and every seat's state, compactly (``docs/seatmap.md``, "The
  fans' snapshot"); a strong ETag, ``If-None-Match`` answered 304, fresh for a second;
- ``WS /v1/events/{event_id}/seats/live``: ``{"type": "ready", "version": V}`` once
  subscribed, then
  ``{"type": "seats", "version": n, "changes": {seat id: state}}`` at most four times a
  second (:mod:`waitroom.line.seatnews`).

Both are public and read-only: a seat's state is what any fan on the map may see. A seat
killed or held back is only ``x`` (not for sale), never which of the two.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from typing import Any

import asyncpg
import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from inventory import venue
from waitroom.core import ids
from waitroom.core.errors import NotFound
from waitroom.core.openapi import Operation
from waitroom.core.runtime import cancel_and_wait
from waitroom.line import seatnews
from waitroom.line.wsgate import DATA_FRAME, FORBIDDEN_ORIGIN, TOO_MANY_FROM_ADDRESS
from waitroom.queue_api import client_subject
from waitroom.services import services

log = logging.getLogger("waitroom.seats")

#: Shared caches may keep a snapshot for a second: a crowd opening the map at once costs
#: one read per second and cache, and the live stream carries what changes after it.
SNAPSHOT_CACHE = "public, max-age=1"
#: A kept snapshot behind the published changes is read again once it is this old.
FRESH_S = seatnews.FLUSH_INTERVAL_S
#: Seat flags, bits of a seat's last field.
ACCESSIBLE, RESTRICTED_VIEW = 1, 2
#: Layouts kept per process (an event's layout changes only with a new map version).
_LAYOUTS_KEPT = 64


class PriceLevelView(msgspec.Struct, frozen=True):
    """A price level as fans see it: its ticket type's price."""

    id: str
    name: str
    ticket_type: str
    price_minor: int
    currency: str


class RowView(msgspec.Struct, frozen=True):
    """A row: its label and seats ``[label, x, y, level index, flags]`` in physical order."""

    label: str
    seats: list[tuple[str, float, float, int, int]]


class SectionView(msgspec.Struct, frozen=True):
    """A seated section."""

    id: str
    name: str
    rows: list[RowView]


class StandingView(msgspec.Struct, frozen=True):
    """A general-admission area (sold by quantity, not drawn seat by seat)."""

    id: str
    name: str
    ticket_type: str
    capacity: int


class SeatSnapshot(msgspec.Struct, frozen=True):
    """Body of ``GET /v1/events/{event_id}/seats``.

    ``states`` has one letter per seat in layout order (sections, rows, seats as listed):
    ``f`` free, ``h`` held, ``s`` sold, ``x`` not for sale. A seat's id is
    ``SECTION:ROW:SEAT``. ``flags``: 1 accessible, 2 restricted view.
    """

    event_id: str
    #: Seat ids (``SECTION:ROW:SEAT``) in layout order: the order of ``states``.
    seats: list[str]
    map_version: int
    #: The event's seat-change counter, read before the seats were: a page whose live socket
    #: said ``ready`` at version V needs a snapshot with ``version >= V`` (docs/seatmap.md).
    version: int
    levels: list[PriceLevelView]
    sections: list[SectionView]
    standing: list[StandingView]
    states: str


class _Layout(msgspec.Struct, frozen=True):
    levels: list[PriceLevelView]
    sections: list[SectionView]
    standing: list[StandingView]
    order: dict[str, int]


_layouts: dict[tuple[str, int], _Layout] = {}


def build_layout(seat_map: venue.SeatMap, prices: dict[str, tuple[int, str]]) -> _Layout:
    """The fans' layout of ``seat_map``, ``prices`` being ticket type -> (minor, currency)."""
    level_index = {level.id: i for i, level in enumerate(seat_map.price_levels)}
    levels = [
        PriceLevelView(
            id=level.id,
            name=level.name or level.ticket_type,
            ticket_type=level.ticket_type,
            price_minor=prices.get(level.ticket_type, (0, ""))[0],
            currency=prices.get(level.ticket_type, (0, ""))[1],
        )
        for level in seat_map.price_levels
    ]
    sections: list[SectionView] = []
    standing: list[StandingView] = []
    order: dict[str, int] = {}
    for section in seat_map.sections:
        if isinstance(section, venue.GeneralAdmissionSection):
            standing.append(
                StandingView(
                    section.id, section.name or section.id, section.ticket_type, section.capacity
                )
            )
            continue
        rows = []
        for row in section.rows:
            seats = []
            for seat in row.seats:
                order[venue.seat_id(section.id, row.label, seat.label)] = len(order)
                flags = (ACCESSIBLE if seat.accessible else 0) | (
                    RESTRICTED_VIEW if seat.restricted_view else 0
                )
                seats.append((seat.label, seat.x, seat.y, level_index[seat.level], flags))
            rows.append(RowView(row.label, seats))
        sections.append(SectionView(section.id, section.name or section.id, rows))
    return _Layout(levels, sections, standing, order)


def states_of(order: dict[str, int], rows: list[Any]) -> str:
    """The ``states`` string: every seat free, then ``rows`` of (seat id, letter) applied
    in turn (unavailable seats first, then live holds, so a sale always shows)."""
    states = bytearray(b"f" * len(order))
    for row in rows:
        index = order.get(row[0])
        if index is not None:
            states[index] = ord(row[1])
    return states.decode()


def etag_of(snapshot: SeatSnapshot) -> str:
    """A strong validator: the layout is fixed by the map version; the rest is the counter
    and the states."""
    key = f"{snapshot.event_id}\n{snapshot.map_version}\n{snapshot.version}\n{snapshot.states}"
    digest = hashlib.sha256(key.encode()).hexdigest()
    return f'"{digest[:32]}"'


def _matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    return etag in {tag.strip() for tag in if_none_match.split(",")} or if_none_match == "*"


async def read_snapshot(pool: asyncpg.Pool[Any], event_id: str, *, version: int) -> SeatSnapshot:
    """The event's seat map and seat states, read in one consistent snapshot of PostgreSQL;
    ``version`` is the seat-change counter read before it.

    404 ``event_not_found`` or ``seat_map_not_found``.
    """
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        row = await conn.fetchrow(
            "SELECT m.version FROM events e LEFT JOIN seat_maps m ON m.event_id = e.id"
            " WHERE e.id = $1",
            event_id,
        )
        if row is None:
            raise NotFound(
                f"no event {event_id!r}", code="event_not_found", details={"event_id": event_id}
            )
        map_version = row["version"]
        if map_version is None:
            raise NotFound(
                f"event {event_id!r} has no seat map",
                code="seat_map_not_found",
                details={"event_id": event_id},
            )
        layout = _layouts.get((event_id, map_version))
        if layout is None:
            document = await conn.fetchval(
                "SELECT document::text FROM seat_maps WHERE event_id = $1", event_id
            )
            types = await conn.fetch(
                "SELECT name, price_minor, currency FROM ticket_types WHERE event_id = $1",
                event_id,
            )
            layout = build_layout(
                msgspec.json.decode(document, type=venue.SeatMap),
                {t["name"]: (t["price_minor"], t["currency"]) for t in types},
            )
            if len(_layouts) >= _LAYOUTS_KEPT:
                _layouts.clear()
            _layouts[(event_id, map_version)] = layout
        changed = await conn.fetch(
            "SELECT seat_id, 'x' FROM seats WHERE event_id = $1 AND status <> 'open'"
            " UNION ALL"
            " SELECT seat_id, CASE status WHEN 'held' THEN 'h' ELSE 's' END FROM seat_holds"
            " WHERE event_id = $1 AND status IN ('held', 'paid')",
            event_id,
        )
    return SeatSnapshot(
        event_id=event_id,
        seats=list(layout.order),
        map_version=map_version,
        version=version,
        levels=layout.levels,
        sections=layout.sections,
        standing=layout.standing,
        states=states_of(layout.order, sorted(changed, key=lambda r: r[1] != "x")),
    )


def _wanted_version(request: Request) -> int:
    """``?v=N``: the version the page's socket was ready at (0 when absent or malformed)."""
    raw = request.query_params.get("v", "")
    return int(raw) if raw.isdigit() and len(raw) <= 18 else 0


async def get_seats(request: Request) -> Response:
    """An event's seats and their states, for the first paint of the seat map.

    Kept per process for ``view_cache_ttl_s`` however many fans ask, and read again sooner
    when it is behind: at once for a page that asks for a newer version (``?v=N``: its live
    socket may lack a change only a newer snapshot has), and for anyone once seats have
    changed since it was read and it is :data:`FRESH_S` old (one read per process at most
    four times a second in a busy sale, the pace of the live changes).
    """
    event_id: str = request.path_params["event_id"]
    svc = services(request)
    wanted = _wanted_version(request)
    # One GET: has anything been published since the kept snapshot was read?
    current = await seatnews.current_version(svc.redis, svc.keys, event_id)

    async def load() -> tuple[tuple[bytes, str, int, float], float]:
        # The counter before the seats: see the ordering argument in waitroom.line.seatnews.
        version = await seatnews.current_version(svc.redis, svc.keys, event_id)
        snapshot = await read_snapshot(svc.db, event_id, version=version)
        kept = (msgspec.json.encode(snapshot), etag_of(snapshot), version, time.monotonic())
        return kept, svc.settings.view_cache_ttl_s

    body, etag, version, read_at = await svc.seat_snapshots.get(event_id, load)
    stale = version < current and time.monotonic() - read_at >= FRESH_S
    if version < wanted or stale:
        svc.seat_snapshots.invalidate(event_id)
        body, etag, version, read_at = await svc.seat_snapshots.get(event_id, load)
    headers = {"ETag": etag, "Cache-Control": SNAPSHOT_CACHE}
    if _matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)


async def _refuse(websocket: WebSocket, code: int, reason: str) -> None:
    # Accepted, then closed: browsers read a close code, never a refused handshake's status.
    with contextlib.suppress(OSError, WebSocketDisconnect, WebSocketDisconnected):
        await websocket.accept()
        await websocket.close(code, reason)


async def _watch_client(websocket: WebSocket, viewer: seatnews.Viewer) -> tuple[int, str] | None:
    """Wait for the client to leave; a data frame closes the socket (viewers only listen)."""
    try:
        message = await websocket.receive()
        if message["type"] == "websocket.receive":
            return DATA_FRAME
    except (WebSocketDisconnect, WebSocketDisconnected, OSError):
        pass
    finally:
        viewer.close()
    return None


async def seats_live(websocket: WebSocket) -> None:
    """Live changes of an event's seats to one viewer of its map."""
    svc = services(websocket)
    gate = svc.ws_gate
    if not gate.origin_ok(websocket.headers.get("origin"), websocket.headers.get("host")):
        await _refuse(websocket, *FORBIDDEN_ORIGIN)
        return
    address = client_subject(websocket)
    if not gate.slots.enter(address):
        await _refuse(websocket, *TOO_MANY_FROM_ADDRESS)
        return
    event_id: str = websocket.path_params["event_id"]
    viewer: seatnews.Viewer | None = None
    watcher: asyncio.Task[tuple[int, str] | None] | None = None
    try:
        if not ids.EVENT_ID.matches(event_id) or not await svc.events.exists(event_id):
            await _refuse(websocket, 4404, "unknown event")
            return
        try:
            decision = await svc.rooms.charge_address(event_id, address, now=time.time())
            if not decision.allowed:
                await _refuse(websocket, *TOO_MANY_FROM_ADDRESS)
                return
            viewer = await svc.seat_news.subscribe(event_id)
            version = await seatnews.current_version(svc.redis, svc.keys, event_id)
        except Exception as exc:  # Redis unavailable, or the process stopping
            log.warning("seat viewer refused", extra={"event_id": event_id, "error": repr(exc)})
            await _refuse(websocket, 1013, "service unavailable, try again later")
            return
        await websocket.accept()
        await websocket.send_text(seatnews.ready_text(version))
        watcher = asyncio.create_task(_watch_client(websocket, viewer), name="seats-reader")
        while (text := await viewer.next()) is not None:
            await websocket.send_text(text)
        close_with = await watcher if watcher.done() else seatnews.RELOAD
        if close_with is not None:
            await websocket.close(*close_with)
    except (WebSocketDisconnect, WebSocketDisconnected, OSError):
        pass  # the client went away mid-send
    finally:
        gate.slots.leave(address)
        if viewer is not None:
            await svc.seat_news.leave(viewer)
        if watcher is not None:
            await cancel_and_wait(watcher)


OPERATIONS = [
    Operation(
        "GET",
        "/v1/events/{event_id}/seats",
        get_seats,
        "The event's seat map and every seat's state (f free, h held, s sold, x not for sale),"
        " compact (docs/seatmap.md); strong ETag, If-None-Match answered 304, max-age 1 s."
        " Live changes: WS /v1/events/{event_id}/seats/live",
        response=SeatSnapshot,
        errors=(404, 503),
        tags=("fans",),
    ),
]

ROUTES: list[BaseRoute] = [
    WebSocketRoute("/v1/events/{event_id}/seats/live", seats_live, name="seats_live"),
]
