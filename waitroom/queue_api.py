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

- ``POST /v1/events/{event_id}/queue/ws-ticket``: a one-time ticket (30 s) for the WebSocket,
  so that no token travels in its URL (:mod:`waitroom.line.wsgate`); 429 when the client
  address has opened too many sockets lately.

WebSocket ``/v1/events/{event_id}/queue/ws``: identity from ``?ticket=`` (what browsers use),
``Authorization`` or the cookie; ``?token=`` is refused. Fans only listen. Refusals are sent
after accepting, as close codes a browser can read: 4403 (the page's Origin is not allowed),
4429 (too many sockets from the address), 4401 (no or bad identity or ticket, or a token in
the URL), 4404 (unknown event, or not in line), 1013 (a dependency is down: retry later),
1012 (this server is restarting: reconnect). An open socket is closed with 4409 when its fan
opens one more than ``WAITROOM_WS_MAX_PER_FAN``, and with 1008 when the client sends a data
frame. Otherwise it carries the messages of :mod:`waitroom.line.messages`, pushed by this
process's broadcaster (:mod:`waitroom.line.broadcast`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

import msgspec
from prometheus_client import Counter, Gauge, Histogram
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from waitroom.core import clientaddr, tracing
from waitroom.core.affinity import add_owner_cookie
from waitroom.core.errors import Conflict, Forbidden, Gone, NotFound, RateLimited, WaitroomError
from waitroom.core.http import JSONResponse, dependency_error, read_json
from waitroom.core.httpserver import SEND_TEXT_NOW
from waitroom.core.openapi import Operation
from waitroom.core.runtime import cancel_and_wait
from waitroom.line import challenge, messages, receipts
from waitroom.line.broadcast import SOLD_OUT_CLOSE, Subscriber, pump
from waitroom.line.eta import eta_seconds
from waitroom.line.identity import Identity, missing, visitor_cookie_header
from waitroom.line.ratelimit import Decision
from waitroom.line.room import LotteryInfo, not_found
from waitroom.line.scripts import ADMITTED, ADMITTING, GONE, PREQUEUE, JoinGate, JoinReply
from waitroom.line.wsgate import (
    DATA_FRAME,
    FORBIDDEN_ORIGIN,
    TICKET_REFUSED,
    TICKET_TTL_S,
    TOKEN_IN_URL,
    TOO_MANY_FROM_ADDRESS,
    query_param,
)
from waitroom.services import Services, services

log = logging.getLogger("waitroom.queue")

JOINS = Counter(
    "waitroom_joins_total",
    "Join requests by outcome: created, existing, sold_out, rate_limited, challenge (missing,"
    " bad, expired or replayed proof-of-work), unauthorized,"
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
    "challenge",
    "unauthorized",
    "not_found",
    "bad_request",
    "unavailable",
    "error",
)
#: One child per outcome, made once: labels() on every join is measurable work.
_JOIN_OUTCOME = {outcome: JOINS.labels(outcome) for outcome in _OUTCOMES}
#: Per event, for the joining rate of each sale; only joins that created a place (their
#: event exists), so a scan of made-up event ids adds no series.
FANS_JOINED = Counter(
    "waitroom_fans_joined_total", "Fans who took a new place in the event's line.", ["event"]
)
_fans_joined: dict[str, Counter] = {}
WS_CONNECTIONS = Gauge(
    "waitroom_websocket_connections",
    "Queue WebSocket connections open (summed over the server's worker processes).",
    multiprocess_mode="livesum",
)
WS_CLOSES = Counter(
    "waitroom_websocket_server_closes_total",
    "Queue WebSockets this process refused or closed, by close code (4403 origin, 4429 too"
    " many from an address, 4401 identity, 4409 replaced, 1008 data frame...).",
    ["code"],
)
for _code in ("1008", "1011", "1012", "1013", "4401", "4403", "4404", "4409", "4429"):
    WS_CLOSES.labels(_code)  # at zero: a rate over them reads 0 before the first close

_NO_STORE = {"Cache-Control": "no-store"}
#: How long a line's join traces are kept after its last join (tracing on).
TRACE_KEEP_S = 3600
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
    #: Proof of this place in line (join only): if the line is ever lost (Redis restarted
    #: empty), joining again with it in ``X-Place-Receipt`` puts the fan back exactly here.
    place_receipt: str | None = None
    #: Status ``waitlist`` only (sold out, the room's waitlist on): tickets that came back
    #: since the sell-out. ``eta_seconds`` is then null: no wait can honestly be promised.
    returned: int | None = None


class Left(msgspec.Struct, frozen=True):
    """Body of a successful leave."""

    left: bool = True


def client_subject(conn: HTTPConnection) -> str:
    """Who per-address limits count: the client's IPv4 address, or its IPv6 /64 network.

    The socket peer, or behind a trusted reverse proxy (``WAITROOM_TRUSTED_PROXIES``) the
    rightmost untrusted hop of ``X-Forwarded-For``: see :mod:`waitroom.core.clientaddr`.
    """
    trusted = clientaddr.trusted_networks(services(conn).settings.trusted_proxies)
    forwarded = conn.headers.getlist("x-forwarded-for") if trusted else []
    peer = conn.scope.get("client")  # (host, port) or None; conn.client builds a tuple anew
    return clientaddr.client_subject(peer[0] if peer else None, forwarded, trusted)


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
    waitlisted: bool = False,
    returned: int = 0,
) -> QueueStatus:
    """The :class:`QueueStatus` of a fan whose ``positions`` code is ``code``.

    ``code`` None means "not in line" (a join refused because the sale is sold out).
    A fan being admitted right now (``ADMITTING``) is shown as next in line.
    """
    if code == ADMITTING:
        code = 0
    ahead = code if code is not None and code >= 0 else None
    status: messages.Status = (
        "sold_out"
        if code is None
        else messages.status_of(code, paused=paused, sold_out=sold_out, waitlisted=waitlisted)
    )
    on_waitlist = status == "waitlist"
    return QueueStatus(
        event_id=event_id,
        fan_id=fan_id,
        status=status,
        position=None if ahead is None else ahead + 1,
        fans_ahead=ahead,
        eta_seconds=None if ahead is None or on_waitlist else eta_seconds(ahead, rate),
        queue_pass=queue_pass if code == ADMITTED else None,
        visitor_token=visitor_token,
        returned=returned if on_waitlist else None,
    )


_JOIN_CODES = {"prequeue": PREQUEUE, "admitted": ADMITTED}
_ERROR_OUTCOMES = {
    401: "unauthorized",
    403: "challenge",
    404: "not_found",
    410: "challenge",
    429: "rate_limited",
    503: "unavailable",
}


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
        if outcome == "created":
            _count_joined(request.path_params["event_id"])
        JOIN_SECONDS.observe(time.perf_counter() - started)


def _count_joined(event_id: str) -> None:
    child = _fans_joined.get(event_id)
    if child is None:
        child = _fans_joined[event_id] = FANS_JOINED.labels(event_id)
    child.inc()


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
    subject = client_subject(request)
    gate = _join_gate(request, svc, event_id, subject, identity, issued is not None, now)
    reply = await svc.rooms.join(
        event_id,
        identity.fan_id,
        now=now,
        ip=subject,
        known_fan=issued is None,
        gate=gate,
    )
    if reply.outcome != "joined":
        raise _join_refused(reply, event_id)
    if reply.created and tracing.enabled():
        await _remember_trace(svc, event_id, identity.fan_id)
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
        waitlisted=reply.waitlisted,
        returned=reply.returned,
    )
    if reply.place is not None and reply.state == "waiting":
        body = msgspec.structs.replace(
            body,
            place_receipt=receipts.sign(
                svc.challenges.receipt_key, event_id, identity.fan_id, reply.place
            ),
        )
    headers = {**reply.limit.headers(), **_NO_STORE}
    if issued is not None:
        headers["Set-Cookie"] = visitor_cookie_header(
            issued, secure=svc.settings.secure_cookies or request.scope["scheme"] == "https"
        )
    outcome = "created" if reply.created else ("sold_out" if code is None else "existing")
    return JSONResponse(body, status_code=201 if reply.created else 200, headers=headers), outcome


async def _remember_trace(svc: Services, event_id: str, fan_id: str) -> None:
    """Keep this join's traceparent for the admission tick that admits the fan, which runs
    in whichever process leads the event's admission and links its span to the join's."""
    if not tracing.recording():  # sampled out: nothing will be exported to link to
        return
    key = svc.keys.event(event_id).traces
    try:
        async with svc.redis.pipeline(transaction=False) as pipe:  # one key: one slot
            pipe.hset(key, fan_id, tracing.traceparent())
            pipe.expire(key, TRACE_KEEP_S)
            await pipe.execute()
    except Exception:  # the fan has a place; only the trace's link is lost
        log.debug("could not keep the join's trace", exc_info=True)


def _join_gate(
    request: Request,
    svc: Services,
    event_id: str,
    subject: str,
    identity: Identity,
    new_visitor: bool,
    now: float,
) -> JoinGate:
    """What a new place costs this join: the verified challenge, and the caps."""
    address, subnet = challenge.networks(subject)
    need = svc.challenges.needed(identity.kind)
    solution = request.headers.get(challenge.HEADER) if need else None
    verified: challenge.Verified | None = None
    if solution is not None:
        verified = svc.challenges.verify(solution, event_id, subject, now)
    elif need and new_visitor:
        # A visitor minted by this request cannot be in line yet: no need to ask Redis.
        raise challenge.required(event_id)
    receipt = request.headers.get(receipts.HEADER)
    place: int | None = None
    if receipt is not None:
        place = receipts.verify(svc.challenges.receipt_key, receipt, event_id, identity.fan_id)
        if place is None:
            raise Forbidden(
                "the place receipt is not valid for this fan and event",
                code="receipt_invalid",
            )
    return JoinGate(
        address=address,
        subnet=subnet,
        receipt_place=place,
        challenge=verified.id if verified else None,
        challenge_ttl_ms=verified.ttl_ms if verified else 1,
        need_challenge=need,
        address_cap=challenge.CAPS.address,
        subnet_cap=challenge.CAPS.subnet,
        capped_retry_ms=challenge.CAPS.retry_after_s * 1000,
    )


def _join_refused(reply: JoinReply, event_id: str) -> WaitroomError:
    """The error of a join that ``join.lua`` refused."""
    if reply.outcome == "challenge_required":
        return challenge.required(event_id)
    if reply.outcome == "challenge_replayed":
        return challenge.replayed()
    if reply.outcome == "receipt_stale":
        return Gone(
            "the line still holds what it held when this receipt was issued: there is no lost"
            " place to restore (join without the receipt to take a new place)",
            code="receipt_not_restorable",
        )
    if reply.outcome == "capped":
        cap = challenge.CAPS.address if reply.state == "address" else challenge.CAPS.subnet
        return RateLimited(
            f"too many places in line from your {reply.state}"
            " (a shared address: wait for Retry-After seconds)",
            code="identity_limit",
            retry_after=reply.limit.retry_after_ms / 1000,
            details={"scope": reply.state, "cap": cap},
        )
    return RateLimited(
        "too many joins; wait for Retry-After seconds",
        retry_after=reply.limit.retry_after_ms / 1000,
        headers=reply.limit.headers(),
        details={"limit": reply.limit.limit},
    )


async def issue_challenge(request: Request) -> Response:
    """A proof-of-work challenge for joining this event from this client address.

    Difficulty rises with the challenges the address and its subnet asked for lately and
    with the line's growth (:func:`waitroom.line.challenge.difficulty`).
    """
    event_id: str = request.path_params["event_id"]
    svc = services(request)
    svc.rooms.check(event_id)
    now = time.time()
    subject = client_subject(request)
    address, subnet = challenge.networks(subject)
    reply = await svc.rooms.pressure(
        event_id,
        now=now,
        ip=subject,
        address=address,
        subnet=subnet,
        half_life_s=challenge.PRESSURE_HALF_LIFE_S,
    )
    if reply.limit is not None:
        raise _address_limited(reply.limit)
    pressure = challenge.Pressure(reply.address, reply.subnet, reply.crowd, reply.join_rate)
    max_number = challenge.difficulty(pressure, svc.challenges.policy)
    body = svc.challenges.issue(event_id, subject, max_number, now)
    return JSONResponse(body, headers=_NO_STORE)


def _address_limited(decision: Decision) -> RateLimited:
    return RateLimited(
        "too many requests from your address; wait for Retry-After seconds",
        retry_after=decision.retry_after_ms / 1000,
        headers=decision.headers(),
        details={"limit": decision.limit},
    )


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
    # Polls are charged to the client address, like challenges and WebSocket handshakes.
    decision = await svc.rooms.charge_address(event_id, client_subject(request), now=now)
    if not decision.allowed:
        raise _address_limited(decision)
    room, code, queue_pass = await svc.rooms.status(event_id, identity.fan_id, now=now)
    svc.rooms.sweep_soon(event_id, now)
    if code == GONE and not room.sold_out:
        raise NotFound(
            "you are not in line for this event: join it first",
            code="not_in_line",
            details={"event_id": event_id},
        )
    body = status_body(
        event_id,
        identity.fan_id,
        None if code == GONE else code,  # a sold-out room's line was closed: "sold_out"
        paused=room.paused,
        sold_out=room.sold_out,
        rate=svc.rooms.estimator(event_id).rate,
        queue_pass=queue_pass,
        waitlisted=room.waitlisted,
        returned=room.returned,
    )
    if queue_pass is None:
        return JSONResponse(body, headers=_NO_STORE)
    # Admitted: the fan's checkout comes next, so the balancer may as well send it to the
    # node hosting the event's actor.
    headers = dict(_NO_STORE)
    await add_owner_cookie(
        request, svc.inventory, event_id, headers, secure=svc.settings.secure_cookies
    )
    return JSONResponse(body, headers=headers)


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
    svc = services(request)
    # The identity is optional here: with one, the answer carries the fan's own entry (and
    # is private to them); without, it is the same public record for everyone.
    try:
        identity = svc.identities.resolve(request, time.time())
    except WaitroomError:
        identity = None
    if not await svc.events.exists(event_id):  # an unknown id costs no query
        raise not_found(event_id)
    if identity is None:
        # The public record is the same for everyone: served from this process's cache.
        body = await svc.lottery_views.get(event_id, lambda: _lottery_view(svc, event_id))
        return Response(
            body,
            media_type="application/json",
            headers={"Cache-Control": "public, max-age=1", "Vary": "Cookie, Authorization"},
        )
    info = await svc.rooms.lottery(event_id, identity.fan_id)
    return JSONResponse(
        info, headers={"Cache-Control": "private, no-store", "Vary": "Cookie, Authorization"}
    )


#: How long a drawn lottery's public record is cached: it never changes once drawn.
DRAWN_LOTTERY_TTL_S = 60.0


async def _lottery_view(svc: Services, event_id: str) -> tuple[bytes, float]:
    """The encoded public lottery record and how long it may be served from cache.

    Before the draw the record changes once (at the draw): at most ``view_cache_ttl_s``
    stale. After it, it is final, and may be big (an entry per pre-queue fan).
    """
    info = await svc.rooms.lottery(event_id, None)
    ttl = DRAWN_LOTTERY_TTL_S if info.drawn else svc.settings.view_cache_ttl_s
    return msgspec.json.encode(info), ttl


class WsTicket(msgspec.Struct, frozen=True):
    """A one-time ticket that opens the fan's queue WebSocket of one event."""

    #: Opaque; valid once, for ``expires_in_s`` seconds, for this fan and event only.
    ticket: str
    expires_in_s: int
    #: Where to connect (path and query, on this server): ``.../queue/ws?ticket=<ticket>``.
    url: str


async def issue_ws_ticket(request: Request) -> Response:
    """A one-time ticket for the WebSocket, so that no token has to travel in its URL."""
    event_id: str = request.path_params["event_id"]
    svc = services(request)
    svc.rooms.check(event_id)
    now = time.time()
    identity = _identity(request, svc, now)
    # The socket this ticket opens is paid for now, from the address's bucket (polls,
    # challenges and handshakes share it); its handshake then costs nothing more.
    decision = await svc.rooms.charge_address(event_id, client_subject(request), now=now)
    if not decision.allowed:
        raise _address_limited(decision)
    ticket = await svc.ws_gate.issue_ticket(event_id, identity.fan_id)
    body = WsTicket(
        ticket=ticket,
        expires_in_s=TICKET_TTL_S,
        url=f"/v1/events/{event_id}/queue/ws?ticket={ticket}",
    )
    return JSONResponse(body, headers={**decision.headers(), **_NO_STORE})


# --- WebSocket ----------------------------------------------------------------------------


class _Refusal(Exception):
    """A handshake refused with a close code (see :func:`_refuse`)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


async def _refuse(websocket: WebSocket, code: int, reason: str) -> None:
    # Browsers cannot read the HTTP status of a refused handshake, only a close code: so
    # accept, then close with a code and reason that say what went wrong.
    WS_CLOSES.labels(str(code)).inc()
    with contextlib.suppress(OSError, WebSocketDisconnect, WebSocketDisconnected):
        await websocket.accept()
        await websocket.close(code, reason.encode()[:_MAX_REASON].decode(errors="ignore"))


async def _watch_client(websocket: WebSocket, sub: Subscriber) -> None:
    """Wait for what the client sends, to notice at once when it goes away.

    Fans only listen: a data frame (text or binary) closes the socket with 1008. Reading it
    all the same, rather than leaving it in the server's buffers, keeps a client that
    streams data from costing memory; control frames (ping, pong) never get here.
    """
    try:
        message = await websocket.receive()
        if message["type"] == "websocket.receive":
            sub.close(DATA_FRAME)
    except (WebSocketDisconnect, WebSocketDisconnected, OSError):
        pass
    finally:
        sub.close(None)  # the client is gone (or has been told to go): a no-op after DATA_FRAME


async def _ws_fan(websocket: WebSocket, svc: Services, event_id: str, address: str) -> str:
    """The fan a handshake stands for, or a :class:`_Refusal`.

    Identity comes from a one-time ticket (``?ticket=``, paid for when it was issued), else
    ``Authorization`` or the cookie (then this handshake is charged to the address's
    bucket). A token in the URL is refused by name rather than ignored, so an old client
    learns why instead of falling back to a cookie it may not have.
    """
    now = time.time()
    if query_param(websocket, "token"):
        raise _Refusal(*TOKEN_IN_URL)
    svc.rooms.check(event_id)  # NotFound for an id that must never reach a Redis key
    ticket = query_param(websocket, "ticket")
    if ticket:
        fan_id = await svc.ws_gate.redeem(event_id, ticket)
        if fan_id is None:
            raise _Refusal(*TICKET_REFUSED)
        return fan_id
    try:
        identity = svc.identities.resolve(websocket, now)
    except WaitroomError as exc:
        raise _Refusal(4401, exc.message) from None
    if identity is None:
        raise _Refusal(4401, "identity required")
    decision = await svc.rooms.charge_address(event_id, address, now=now)
    if not decision.allowed:
        code, reason = TOO_MANY_FROM_ADDRESS
        raise _Refusal(code, f"{reason}; retry in {math.ceil(decision.retry_after_ms / 1000)} s")
    return identity.fan_id


async def queue_ws(websocket: WebSocket) -> None:
    """Live position, ETA and admission of one fan (see :mod:`waitroom.line.messages`).

    One coroutine for the whole connection: a helper awaited for its lifetime would add a
    second frame to each of tens of thousands of idle sockets.
    """
    svc = services(websocket)
    gate = svc.ws_gate
    # Before anything costs a Redis call: the page's origin, then this address's sockets.
    if not gate.origin_ok(websocket.headers.get("origin"), websocket.headers.get("host")):
        await _refuse(websocket, *FORBIDDEN_ORIGIN)
        return
    address = client_subject(websocket)
    if not gate.slots.enter(address):
        await _refuse(websocket, *TOO_MANY_FROM_ADDRESS)
        return
    event_id: str = websocket.path_params["event_id"]
    reader: asyncio.Task[None] | None = None
    sub: Subscriber | None = None
    try:
        try:
            fan_id = await _ws_fan(websocket, svc, event_id, address)
            now = time.time()
            room, code, queue_pass = await svc.rooms.status(event_id, fan_id, now=now)
        except _Refusal as refusal:
            await _refuse(websocket, refusal.code, refusal.reason)
            return
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
        if code == GONE and not room.sold_out:
            await _refuse(websocket, 4404, "not in line")
            return
        try:
            await websocket.accept()
        except OSError:  # the client left during the handshake
            return
        if code == GONE:
            # Sent away when the room sold out (its line was closed while this fan was
            # connecting): told so, as a poll would be, not that it never joined.
            await websocket.send_text(messages.encode(messages.SOLD_OUT))
            WS_CLOSES.labels(str(SOLD_OUT_CLOSE[0])).inc()
            await websocket.close(*SOLD_OUT_CLOSE)
            return
        try:
            sub = svc.hub.subscribe(event_id, fan_id)
        except RuntimeError:  # the hub is closed: this process is shutting down
            await websocket.close(1012, "server restarting, reconnect")
            return
        WS_CONNECTIONS.inc()
        # The server's own writer of whole frames where it has one (waitroom serve's).
        sub.send_now = (websocket.scope.get("extensions") or {}).get(SEND_TEXT_NOW)
        first = messages.message_for(code, room, svc.rooms.estimator(event_id).rate, queue_pass)
        if first is not None:
            sub.offer(messages.encode(first), now)
        # This frame lives as long as the connection: let go of what only the handshake
        # needed (the room's state, the pass, the first message), some 0.5 KB a fan.
        del room, queue_pass, first
        reader = asyncio.create_task(_watch_client(websocket, sub), name="ws-reader")
        close_with = await pump(sub, websocket.send_text)
        if close_with is not None:
            WS_CLOSES.labels(str(close_with[0])).inc()
            await websocket.close(*close_with)
    except (WebSocketDisconnect, WebSocketDisconnected, OSError):
        pass  # the client went away mid-send
    finally:
        gate.slots.leave(address)
        if sub is not None:
            WS_CONNECTIONS.dec()
            svc.hub.unsubscribe(sub)
        if reader is not None:
            await cancel_and_wait(reader)


OPERATIONS = [
    Operation(
        "POST",
        "/v1/events/{event_id}/queue",
        join_queue,
        "Join the line (body optional: {}); 201 new place, 200 same place again. A new place"
        " needs a solved challenge in X-Challenge-Solution (403 challenge_required,"
        " challenge_invalid, challenge_replayed, challenge_wrong_event, challenge_wrong_address;"
        " 410 challenge_expired; 429 identity_limit). A fan whose place Redis lost (restarted"
        " empty) sends the place_receipt of its join in X-Place-Receipt to be put back exactly"
        " there (403 receipt_invalid; 410 receipt_not_restorable when nothing was lost)",
        response=QueueStatus,
        status=201,
        errors=(400, 401, 403, 404, 410, 413, 415, 422, 429, 503),
        tags=("fans",),
        auth="visitor",
        parameters=(
            {
                "name": challenge.HEADER,
                "in": "header",
                "required": False,
                "description": "base64 of the ALTCHA payload JSON {algorithm, challenge, number,"
                " salt, signature} solving a challenge of POST /v1/events/{event_id}/challenge;"
                " needed when the join creates a place (WAITROOM_CHALLENGE on)",
                "schema": {"type": "string", "maxLength": challenge.MAX_SOLUTION_CHARS},
            },
            {
                "name": receipts.HEADER,
                "in": "header",
                "required": False,
                "description": "the place_receipt of an earlier join of this fan to this event:"
                " puts the fan back at that place after the line was lost",
                "schema": {"type": "string", "maxLength": receipts.MAX_CHARS},
            },
        ),
    ),
    Operation(
        "POST",
        "/v1/events/{event_id}/challenge",
        issue_challenge,
        "A proof-of-work challenge (ALTCHA, SHA-256) bound to the event and the client address,"
        " valid 120 s: find number in [0, maxnumber] with sha256(salt + number) = challenge,"
        " then join with X-Challenge-Solution; difficulty rises for busy addresses and subnets",
        response=challenge.ChallengeBody,
        errors=(404, 429, 503),
        tags=("fans",),
    ),
    Operation(
        "GET",
        "/v1/events/{event_id}/queue/me",
        my_status,
        "My status, position and ETA (polling fallback of the WebSocket); charged to the"
        " client address's request limit",
        response=QueueStatus,
        errors=(401, 404, 429, 503),
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
        "POST",
        "/v1/events/{event_id}/queue/ws-ticket",
        issue_ws_ticket,
        "A one-time ticket (30 s) that opens WS /v1/events/{event_id}/queue/ws?ticket=...;"
        " each costs a token of the address's WebSocket limit",
        response=WsTicket,
        errors=(401, 404, 429, 503),
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
