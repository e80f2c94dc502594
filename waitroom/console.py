"""The operators' live console: its live stream and the audit trail, over HTTP.

- ``GET /v1/admin/events/{event_id}/live``: a Server-Sent Events stream of the sale's figures,
  one ``sample`` a second;
- ``GET /v1/admin/events/{event_id}/audit``: the event's audit log, newest first, a page at a
  time.

The page itself (``GET /admin``, ``static/console.html``) is served by :mod:`waitroom.pages`;
its controls call the operators' API that the CLI's commands mirror (``PATCH .../admission``,
``POST /v1/admin/passes/{jti}/revoke``), so a change from the console is the same change,
with the same rules and the same audit row, as one from ``waitroom admission``.

**Why Server-Sent Events read with fetch(), not EventSource or a WebSocket.** The stream is
one-way (the controls are ordinary requests), so SSE is enough. A browser's ``EventSource``
cannot send an ``Authorization`` header, and a token in the URL would end up in proxies' and
servers' logs; the page therefore reads the same ``text/event-stream`` with ``fetch()`` and a
stream reader, sending ``Authorization: Bearer <token>`` like every other admin call. So the
stream is authenticated by the very code of every admin route (:func:`require_admin`: the
operator's name, the failed-login throttle, the log line), and refused the same way, before
anything is streamed: 401 ``admin_token_invalid`` with the documented error body, 404
``event_not_found``, 429 with ``Retry-After``. A WebSocket would need a second way to carry the
token (a first message) and its own close codes for each of these.

**Bounded.** Each stream samples what ``waitroom status`` shows
(:func:`admission.operators.admission_status`: one PostgreSQL query and one Redis pipeline) and
the ticket counts per type (one query), every :data:`INTERVAL_S`, whatever the client asks; a
client cannot make it sample faster or send more. At most :data:`MAX_STREAMS` streams are open
per process (429 ``too_many_streams`` past that), and a stream ends after
:data:`MAX_DURATION_S` with an ``end`` event, so the page reconnects (and is authenticated
again). A client that stops reading stalls its own stream (each sample waits for the socket to
take the previous one, so nothing queues in memory), and one that goes away is noticed at once
and its stream's work is cancelled. A dependency that fails during a stream is reported as a
``problem`` event (the 503 error body) and the next tick tries again.

Events of the stream (each ``data`` is one line of JSON):

- ``sample``: :class:`LiveSample`;
- ``problem``: an error body (``{"error": {...}}``); the stream goes on unless the event is gone;
- ``end``: ``{"reason": "max_duration" | "event_gone"}``; the client may reconnect.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from admission import operators
from inventory.catalogue import TicketTypeStats, ticket_type_stats
from waitroom.core.errors import NotFound, RateLimited, ValidationFailed
from waitroom.core.http import JSONResponse, dependency_error, internal_error_body
from waitroom.core.openapi import Operation
from waitroom.services import Services, require_admin, services

log = logging.getLogger("waitroom.console")

#: Seconds between two samples of a stream.
INTERVAL_S = 1.0
#: Seconds after which a stream ends (``end``), so that the client reconnects.
MAX_DURATION_S = 900.0
#: Live streams open at once in one process; one more is refused with 429.
MAX_STREAMS = 16
#: The page's reconnect delay, sent as the stream's ``retry`` field (milliseconds).
RETRY_MS = 2000
#: Audit entries per page: the default and the most a client may ask for.
AUDIT_PAGE = 50
AUDIT_PAGE_MAX = 200
_BIGINT_MAX = 2**63 - 1


class LiveSample(msgspec.Struct, frozen=True):
    """One ``sample`` of the live stream: the sale at one moment."""

    #: 1 for the stream's first sample, then 2, 3...
    seq: int
    #: What ``waitroom status --json`` prints: the line, admissions, active passes, rates.
    admission: operators.AdmissionStatus
    #: Tickets per type, from PostgreSQL (``held`` are in carts, ``sold`` are paid).
    ticket_types: list[TicketTypeStats]
    quantity: int
    held: int
    sold: int
    available: int


class AuditEntry(msgspec.Struct, frozen=True):
    """One row of the audit log."""

    id: int
    at: datetime
    #: ``admin:NAME`` over HTTP, ``cli:USER`` from the CLI.
    actor: str
    #: ``event.create``, ``admission.update``, ``pass.revoke``, ``event.delete``...
    action: str
    event_id: str | None
    old: Any
    new: Any
    client_address: str | None
    request_id: str | None


class AuditPage(msgspec.Struct, frozen=True):
    """``GET /v1/admin/events/{event_id}/audit``: entries newest first."""

    event_id: str
    entries: list[AuditEntry]
    #: Pass as ``before`` to get the next (older) page; null on the last page.
    next_before: int | None


# --- the live stream -------------------------------------------------------------------------


async def sample(svc: Services, event_id: str, seq: int) -> LiveSample:
    """The sale's figures now; 404 ``event_not_found`` for an unknown event."""
    status = await operators.admission_status(
        svc.db, svc.redis, svc.keys, event_id, now=time.time()
    )
    types = await ticket_type_stats(svc.db, event_id)
    return LiveSample(
        seq=seq,
        admission=status,
        ticket_types=types,
        quantity=sum(t.quantity for t in types),
        held=sum(t.held for t in types),
        sold=sum(t.sold for t in types),
        available=sum(t.available for t in types),
    )


_encoder = msgspec.json.Encoder()


def sse(event: str, data: Any, *, event_id: int | None = None) -> bytes:
    """One Server-Sent Event (``data`` as one line of JSON)."""
    head = f"event: {event}\n" + (f"id: {event_id}\n" if event_id is not None else "")
    return head.encode() + b"data: " + _encoder.encode(data) + b"\n\n"


class StreamSlots:
    """The live streams of this process: at most ``limit`` at once."""

    def __init__(self) -> None:
        self.open = 0

    def take(self, limit: int) -> Callable[[], None]:
        """A slot, or 429 ``too_many_streams``; call the returned function to give it back."""
        if self.open >= limit:
            raise RateLimited(
                f"at most {limit} live streams are open at once on this server; retry later",
                code="too_many_streams",
                retry_after=5,
            )
        self.open += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.open -= 1

        return release


#: Shared by every app of this process (tests run several): the limit is the process's.
SLOTS = StreamSlots()


class _LiveResponse(StreamingResponse):
    """The stream, giving its slot back however it ends (even if it never started)."""

    def __init__(self, content: AsyncIterator[bytes], release: Callable[[], None]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={
                "Cache-Control": "no-store",
                # nginx and some proxies buffer responses; a live stream must not be.
                "X-Accel-Buffering": "no",
            },
        )
        self._release = release
        self._content = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except OSError:
            pass  # the client went away while a sample was being sent
        finally:
            self._release()
            aclose = getattr(self._content, "aclose", None)
            if aclose is not None:
                await aclose()


async def _samples(svc: Services, event_id: str, first: LiveSample) -> AsyncIterator[bytes]:
    """The stream's events: ``first``, then a sample every :data:`INTERVAL_S`."""
    started = time.monotonic()
    yield f"retry: {RETRY_MS}\n".encode() + sse("sample", first, event_id=first.seq)
    seq = first.seq
    tick = started
    while True:
        # Ticks stay on the stream's own second; a slow sample delays the next one, never
        # makes two in a row.
        now = time.monotonic()
        tick = max(tick + INTERVAL_S, now)
        if tick - started >= MAX_DURATION_S:
            yield sse("end", {"reason": "max_duration"})
            return
        await asyncio.sleep(tick - now)
        seq += 1
        try:
            current = await sample(svc, event_id, seq)
        except NotFound as exc:
            yield sse("problem", exc.body())
            yield sse("end", {"reason": "event_gone"})
            return
        except Exception as exc:
            unavailable = dependency_error(exc)
            if unavailable is None:
                log.exception("live stream sample failed", extra={"event_id": event_id})
                yield sse("problem", internal_error_body())
                return
            log.warning("live stream sample failed", extra={"error": repr(exc)})
            yield sse("problem", unavailable.body(), event_id=seq)
            continue
        yield sse("sample", current, event_id=seq)


async def live(request: Request) -> Response:
    """A live stream of the sale's figures (Server-Sent Events, a sample a second)."""
    await require_admin(request)
    svc = services(request)
    event_id: str = request.path_params["event_id"]
    release = SLOTS.take(MAX_STREAMS)
    try:
        # The first sample before the answer starts: an unknown event is a plain 404.
        first = await sample(svc, event_id, 1)
    except BaseException:
        release()
        raise
    return _LiveResponse(_samples(svc, event_id, first), release)


# --- the audit trail -------------------------------------------------------------------------


def _int_param(request: Request, name: str, default: int | None, low: int, high: int) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw, 10)
    except ValueError:
        raise ValidationFailed(f"{name} must be a whole number", field=name) from None
    if not low <= value <= high:
        raise ValidationFailed(f"{name} must be between {low} and {high}", field=name)
    return value


def _json(text: str | None) -> Any:
    return None if text is None else msgspec.json.decode(text)


async def read_audit(svc: Services, event_id: str, *, limit: int, before: int | None) -> AuditPage:
    """Up to ``limit`` audit entries of ``event_id`` older than the entry ``before``.

    404 ``event_not_found`` when the event neither exists nor ever had an entry (a deleted
    event's trail stays readable: its rows outlive it).
    """
    async with svc.db.acquire() as conn:
        rows = await conn.fetch(
            "SELECT id, at, actor, action, event_id, old::text AS old, new::text AS new,"
            " host(client_address) AS client_address, request_id FROM audit_log"
            " WHERE event_id = $1 AND ($2::bigint IS NULL OR id < $2)"
            " ORDER BY id DESC LIMIT $3",
            event_id,
            before,
            limit + 1,
        )
        if not rows and before is None:
            known = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM events WHERE id = $1)", event_id
            )
            if not known:
                raise NotFound(
                    f"no event {event_id!r}",
                    code="event_not_found",
                    details={"event_id": event_id},
                )
    entries = [
        AuditEntry(
            id=r["id"],
            at=r["at"],
            actor=r["actor"],
            action=r["action"],
            event_id=r["event_id"],
            old=_json(r["old"]),
            new=_json(r["new"]),
            client_address=r["client_address"],
            request_id=r["request_id"],
        )
        for r in rows[:limit]
    ]
    more = len(rows) > limit
    return AuditPage(event_id, entries, entries[-1].id if more and entries else None)


async def audit(request: Request) -> Response:
    """The event's audit log, newest first (``before`` pages back)."""
    await require_admin(request)
    limit = _int_param(request, "limit", AUDIT_PAGE, 1, AUDIT_PAGE_MAX)
    assert limit is not None
    before = _int_param(request, "before", None, 1, _BIGINT_MAX)
    page = await read_audit(
        services(request), request.path_params["event_id"], limit=limit, before=before
    )
    return JSONResponse(page, headers={"Cache-Control": "no-store"})


def _query(name: str, description: str, **schema: Any) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": {"type": "integer", **schema},
    }


OPERATIONS = [
    Operation(
        "GET",
        "/v1/admin/events/{event_id}/live",
        live,
        "Live figures of a sale: Server-Sent Events; each 'sample' event's data is a"
        " LiveSample, one a second",
        response=LiveSample,
        errors=(404, 503),
        tags=("operators",),
        auth="admin",
        content_type="text/event-stream",
    ),
    Operation(
        "GET",
        "/v1/admin/events/{event_id}/audit",
        audit,
        "The event's audit log, newest first",
        response=AuditPage,
        errors=(404, 422, 503),
        tags=("operators",),
        auth="admin",
        parameters=(
            _query(
                "limit",
                "entries per page",
                minimum=1,
                maximum=AUDIT_PAGE_MAX,
                default=AUDIT_PAGE,
            ),
            _query(
                "before",
                "only entries older than this id (a page's next_before)",
                minimum=1,
                maximum=_BIGINT_MAX,
            ),
        ),
    ),
]
