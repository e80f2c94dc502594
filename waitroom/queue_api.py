"""The fans' side of the waiting room: join, status, leave, the lottery, and the live WebSocket.

HTTP (JSON, declared as :class:`~waitroom.core.openapi.Operation` so ``/openapi.json`` shows them):

- ``POST /v1/events/{event_id}/queue`` joins (body empty or ``{}``): 201 with a new place, 200
  with the same place for a fan already in line. Without an identity in anonymous mode a
  visitor token is issued (``visitor_token`` in the body and the ``wr_visitor`` cookie).
  Limited per client IP and per fan (:mod:`waitroom.line.ratelimit`): 429 with ``Retry-After``
  and ``X-RateLimit-Limit/Remaining/Reset``, which 2xx answers carry too.
- ``GET /v1/events/{event_id}/queue/me``: the same body, for clients that poll; it counts as a
  sign of life. 404 ``not_in_line`` when the fan is not (or no longer) in line.
- ``DELETE /v1/events/{event_id}/queue/me``: leave; 200 ``{"left": true}``. Leaving again is
  404 ``not_in_line`` (nothing left to leave); a fan already admitted gets 409
  ``already_admitted`` (the pass stays valid; leaving the line is no longer possible).
- ``GET /v1/events/{event_id}/lottery``: commitment, then seed and draw (lottery rooms).

WebSocket ``/v1/events/{event_id}/queue/ws``: identity from ``Authorization``, the ``token``
query parameter or the cookie. Refusals are sent after accepting, as close codes a browser
can read: 4401 (no or bad identity), 4404 (unknown event, or not in line), 1013 (a
dependency is down: retry later), 1012 (this server is restarting: reconnect). Then the messages of :mod:`waitroom.line.messages`, pushed by
this process's broadcaster (:mod:`waitroom.line.broadcast`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time

import msgspec
from prometheus_client import Counter, Gauge, Histogram
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from waitroom.core.errors import Conflict, NotFound, RateLimited, WaitroomError
from waitroom.core.http import JSONResponse, dependency_error, read_json
from waitroom.core.openapi import Operation
from waitroom.line import messages
from waitroom.line.broadcast import Subscriber, pump
from waitroom.line.eta import eta_seconds
from waitroom.line.identity import Identity, missing, visitor_cookie_header
from waitroom.line.room import LotteryInfo
from waitroom.line.scripts import ADMITTED, ADMITTING, GONE, PREQUEUE
from waitroom.services import Services, services

log = logging.getLogger("waitroom.queue")

JOINS = Counter(
    "waitroom_joins_total",
    "Join requests by outcome: created, existing, sold_out, rate_limited, unauthorized,"
    " not_found, bad_request, unavailable, error.",
    ["outcome"],
)
JOIN_SECONDS = Histogram(
    "waitroom_join_duration_seconds",
    "Time to answer a join, from the handler's start to its response.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
_OUTCOMES = (
    "created",
    "existing",
    "sold_out",
    "rate_limited",
    "unauthorized",
    "not_found",
    "bad_request",
    "unavailable",
    "error",
)
#: One child per outcome, made once: labels() on every join is measurable work.
_JOIN_OUTCOME = {outcome: JOINS.labels(outcome) for outcome in _OUTCOMES}
WS_CONNECTIONS = Gauge(
    "waitroom_websocket_connections", "Queue WebSocket connections open in this process."
)

_NO_STORE = {"Cache-Control": "no-store"}
#: WebSocket close reasons are limited to 123 bytes by the protocol.
_MAX_REASON = 120


class JoinRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of a join: optional, and empty for now (``{}``)."""


class QueueStatus(msgspec.Struct, frozen=True):
    """A fan's place in line: the answer of join and of ``GET .../queue/me``."""

    event_id: str
    fan_id: str
    status: messages.Status
    #: 1 = next in line; null in the lottery pre-queue or when not in line (sold out).
    position: int | None
    fans_ahead: int | None
    #: Seconds until admission at the observed rate; null while that rate is unknown.
    eta_seconds: float | None
    #: The queue pass (a JWT), once admitted.
    queue_pass: str | None
    #: A visitor token issued by this very request (also set as the wr_visitor cookie).
    visitor_token: str | None = None


class Left(msgspec.Struct, frozen=True):
    """Body of a successful leave."""

    left: bool = True


def client_subject(conn: HTTPConnection) -> str:
    """Who the per-IP limit counts: the client's IPv4 address, or its IPv6 /64 network.

    One IPv6 host usually holds a whole /64, so limiting single addresses would not limit it.
    Behind a proxy, uvicorn's ``--forwarded-allow-ips`` decides whether X-Forwarded-For is
    believed (by default only from 127.0.0.1).
    """
    host = conn.client.host if conn.client else ""
    if ":" not in host:
        return host or "unknown"  # an IPv4 address as the server saw it: nothing to fold
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host[:64] or "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False).network_address) + "/64"
    return str(address)


def status_body(
    event_id: str,
    fan_id: str,
    code: int | None,
    *,
    paused: bool,
    sold_out: bool,
    rate: float | None,
    queue_pass: str | None = None,
    visitor_token: str | None = None,
) -> QueueStatus:
    """The :class:`QueueStatus` of a fan whose ``positions`` code is ``code``.

    ``code`` None means "not in line" (a join refused because the sale is sold out).
    A fan being admitted right now (``ADMITTING``) is shown as next in line.
    """
    if code == ADMITTING:
        code = 0
    ahead = code if code is not None and code >= 0 else None
    return QueueStatus(
        event_id=event_id,
        fan_id=fan_id,
        status=(
            "sold_out"
            if code is None
            else messages.status_of(code, paused=paused, sold_out=sold_out)
        ),
        position=None if ahead is None else ahead + 1,
        fans_ahead=ahead,
        eta_seconds=None if ahead is None else eta_seconds(ahead, rate),
        queue_pass=queue_pass if code == ADMITTED else None,
        visitor_token=visitor_token,
    )


_JOIN_CODES = {"prequeue": PREQUEUE, "admitted": ADMITTED}
_ERROR_OUTCOMES = {401: "unauthorized", 404: "not_found", 429: "rate_limited", 503: "unavailable"}


async def _read_optional_body(request: Request) -> None:
    if request.headers.get("content-length", "0") == "0" and (
        "transfer-encoding" not in request.headers
    ):
        return
    await read_json(request, JoinRequest)


async def join_queue(request: Request) -> Response:
    """Join the event's line (idempotent: the same fan keeps the same place)."""
    started = time.perf_counter()
    outcome = "error"
    try:
        response, outcome = await _join(request)
        return response
    except WaitroomError as exc:
        outcome = _ERROR_OUTCOMES.get(exc.status, "bad_request" if exc.status < 500 else "error")
        raise
    except Exception as exc:
        outcome = "unavailable" if dependency_error(exc) is not None else "error"
        raise
    finally:
        _JOIN_OUTCOME[outcome].inc()
        JOIN_SECONDS.observe(time.perf_counter() - started)


async def _join(request: Request) -> tuple[Response, str]:
    event_id: str = request.path_params["event_id"]
    svc = services(request)
    svc.rooms.check(event_id)
    await _read_optional_body(request)
    now = time.time()
    identity: Identity | None = svc.identities.resolve(request, now)
    if identity is None:
        if not svc.identities.anonymous:
            raise missing()
        identity = svc.identities.issue_visitor(now)
    issued = identity.token if identity.source == "issued" else None
    reply = await svc.rooms.join(
        event_id,
        identity.fan_id,
        now=now,
        ip=client_subject(request),
        known_fan=issued is None,
    )
    if reply.outcome == "limited":
        raise RateLimited(
            "too many joins; wait for Retry-After seconds",
            retry_after=reply.limit.retry_after_ms / 1000,
            headers=reply.limit.headers(),
            details={"limit": reply.limit.limit},
        )
    code = reply.rank if reply.state == "waiting" else _JOIN_CODES.get(reply.state)
    body = status_body(
        event_id,
        identity.fan_id,
        code,
        paused=reply.paused,
        sold_out=reply.sold_out,
        rate=svc.rooms.estimator(event_id).rate,
        queue_pass=reply.queue_pass,
        visitor_token=issued,
    )
    headers = {**reply.limit.headers(), **_NO_STORE}
    if issued is not None:
        headers["Set-Cookie"] = visitor_cookie_header(
            issued, secure=request.scope["scheme"] == "https"
        )
    outcome = "created" if reply.created else ("sold_out" if code is None else "existing")
    return JSONResponse(body, status_code=201 if reply.created else 200, headers=headers), outcome


def _identity(request: Request, svc: Services, now: float) -> Identity:
    identity = svc.identities.resolve(request, now)
    if identity is None:
        raise missing()
    return identity


async def my_status(request: Request) -> Response:
    """The fan's status, position and ETA, and the pass once admitted (polling fallback)."""
    event_id: str = request.path_params["event_id"]
    svc = services(request)
    svc.rooms.check(event_id)
    now = time.time()
    identity = _identity(request, svc, now)
    room, code, queue_pass = await svc.rooms.status(event_id, identity.fan_id, now=now)
    svc.rooms.sweep_soon(event_id, now)
    if code == GONE:
        raise NotFound(
            "you are not in line for this event: join it first",
            code="not_in_line",
            details={"event_id": event_id},
        )
    body = status_body(
        event_id,
        identity.fan_id,
        code,
        paused=room.paused,
        sold_out=room.sold_out,
        rate=svc.rooms.estimator(event_id).rate,
        queue_pass=queue_pass,
    )
    return JSONResponse(body, headers=_NO_STORE)


async def leave_queue(request: Request) -> Response:
    """Leave the line, giving up the place."""
    event_id: str = request.path_params["event_id"]
    svc = services(request)
    svc.rooms.check(event_id)
    identity = _identity(request, svc, time.time())
    outcome = await svc.rooms.leave(event_id, identity.fan_id)
    if outcome == "admitted":
        raise Conflict(
            "you have been admitted already; your queue pass stays valid until it expires",
            code="already_admitted",
        )
    if outcome != "left":
        raise NotFound(
            "you are not in line for this event", code="not_in_line", details={"event_id": event_id}
        )
    return JSONResponse(Left(), headers=_NO_STORE)


async def get_lottery(request: Request) -> Response:
    """The lottery's commitment before the draw; the seed and the drawn order after it."""
    event_id: str = request.path_params["event_id"]
    info = await services(request).rooms.lottery(event_id)
    return JSONResponse(info)


# --- WebSocket ----------------------------------------------------------------------------


async def _refuse(websocket: WebSocket, code: int, reason: str) -> None:
    # Browsers cannot read the HTTP status of a refused handshake, only a close code: so
    # accept, then close with a code and reason that say what went wrong.
    with contextlib.suppress(OSError, WebSocketDisconnect, WebSocketDisconnected):
        await websocket.accept()
        await websocket.close(code, reason.encode()[:_MAX_REASON].decode(errors="ignore"))


async def _watch_client(websocket: WebSocket, sub: Subscriber) -> None:
    """Read (and drop) what the client sends, to notice at once when it goes away."""
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
    except (WebSocketDisconnect, WebSocketDisconnected, OSError):
        pass
    finally:
        sub.close(None)


async def queue_ws(websocket: WebSocket) -> None:
    """Live position, ETA and admission of one fan (see :mod:`waitroom.line.messages`)."""
    event_id: str = websocket.path_params["event_id"]
    svc = services(websocket)
    now = time.time()
    try:
        identity = svc.identities.resolve(websocket, now, websocket=True)
    except WaitroomError as exc:
        await _refuse(websocket, 4401, exc.message)
        return
    if identity is None:
        await _refuse(websocket, 4401, "identity required")
        return
    try:
        room, code, queue_pass = await svc.rooms.status(event_id, identity.fan_id, now=now)
    except NotFound:
        await _refuse(websocket, 4404, "unknown event")
        return
    except Exception as exc:
        if dependency_error(exc) is None and not isinstance(exc, WaitroomError):
            log.exception("queue websocket failed", extra={"event_id": event_id})
            await _refuse(websocket, 1011, "internal error")
            return
        await _refuse(websocket, 1013, "service unavailable, try again later")
        return
    if code == GONE:
        await _refuse(websocket, 4404, "not in line")
        return

    try:
        await websocket.accept()
    except OSError:  # the client left during the handshake
        return
    try:
        sub = svc.hub.subscribe(event_id, identity.fan_id)
    except RuntimeError:  # the hub is closed: this process is shutting down
        await websocket.close(1012, "server restarting, reconnect")
        return
    WS_CONNECTIONS.inc()
    reader: asyncio.Task[None] | None = None
    try:
        first = messages.message_for(code, room, svc.rooms.estimator(event_id).rate, queue_pass)
        if first is not None:
            sub.offer(messages.encode(first), now)
        # This frame lives as long as the connection: let go of what only the handshake
        # needed (the token, the room's state, the first message), some 0.5 KB a fan.
        del identity, room, queue_pass, first
        reader = asyncio.create_task(_watch_client(websocket, sub), name="ws-reader")
        close_with = await pump(sub, websocket.send_text)
        if close_with is not None:
            await websocket.close(*close_with)
    except (WebSocketDisconnect, WebSocketDisconnected, OSError):
        pass  # the client went away mid-send
    finally:
        WS_CONNECTIONS.dec()
        svc.hub.unsubscribe(sub)
        if reader is not None:
            reader.cancel()
            await asyncio.wait([reader])


OPERATIONS = [
    Operation(
        "POST",
        "/v1/events/{event_id}/queue",
        join_queue,
        "Join the line (body optional: {}); 201 new place, 200 same place again",
        response=QueueStatus,
        status=201,
        errors=(400, 401, 404, 413, 415, 422, 429, 503),
        tags=("fans",),
        auth="visitor",
    ),
    Operation(
        "GET",
        "/v1/events/{event_id}/queue/me",
        my_status,
        "My status, position and ETA (polling fallback of the WebSocket)",
        response=QueueStatus,
        errors=(401, 404, 503),
        tags=("fans",),
        auth="visitor",
    ),
    Operation(
        "DELETE",
        "/v1/events/{event_id}/queue/me",
        leave_queue,
        "Leave the line",
        response=Left,
        errors=(401, 404, 409, 503),
        tags=("fans",),
        auth="visitor",
    ),
    Operation(
        "GET",
        "/v1/events/{event_id}/lottery",
        get_lottery,
        "The lottery's commitment, and after the draw its seed and order",
        response=LotteryInfo,
        errors=(404, 503),
        tags=("fans",),
    ),
]

ROUTES: list[BaseRoute] = [
    WebSocketRoute("/v1/events/{event_id}/queue/ws", queue_ws, name="queue_ws"),
]
