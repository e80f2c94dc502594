"""Refunds over HTTP: a fan asks, an operator decides, the refund worker pays back.

Fans (their identity, as for their orders; no queue pass: the sale may be long over):

- ``POST /v1/orders/{order_id}/refunds`` ``{"tickets": [codes]}`` (optional: no body, ``{}``
  or ``"tickets": null`` asks for every ticket of the order not used, voided or in a refund
  yet) with an optional ``Idempotency-Key`` → 202 with the refund (a retry with the same key
  answers the first refund; another request under it is 422 ``idempotency_key_reused``);
- ``GET /v1/orders/{order_id}/refunds`` → the order's refunds.

Operators (the admin token): ``GET /v1/admin/refunds?event_id=&state=&limit=``,
``POST /v1/admin/refunds/{refund_id}/approve``, ``POST /v1/admin/refunds/{refund_id}/reject``
(``{"reason"}``, optional), ``PUT|GET /v1/admin/events/{event_id}/refund-policy``.

Refusals are those of :mod:`inventory.refunds`; see docs/refunds.md.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, TypeVar, get_args

import msgspec
from msgspec import Meta
from starlette.requests import Request
from starlette.responses import Response

from inventory.refund_policy import RefundPolicy
from inventory.refunds import (
    MAX_TICKETS,
    Refund,
    RefundState,
    StoredPolicy,
    approve_refund,
    get_policy,
    list_refunds,
    order_refunds,
    reject_refund,
    request_refund,
    set_policy,
)
from waitroom.core import ids
from waitroom.core.errors import NotFound, UnsupportedMediaType, ValidationFailed
from waitroom.core.http import JSONResponse, decode_json, read_body, read_json
from waitroom.core.openapi import Operation
from waitroom.line.identity import missing
from waitroom.services import require_admin, services

T = TypeVar("T")
_KEY_RE = re.compile(r"^[\x21-\x7e]{1,200}$")
_LIMIT_RE = re.compile(r"[0-9]{1,4}")
_STATES = frozenset(get_args(RefundState))
#: Most refunds one list returns.
MAX_LIST = 500

TicketCode = Annotated[str, Meta(pattern=ids.TICKET_CODE.pattern, max_length=64)]


class RefundRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/orders/{order_id}/refunds`` (optional)."""

    #: The tickets to refund; absent or null: every ticket of the order still refundable.
    tickets: Annotated[list[TicketCode], Meta(min_length=1, max_length=MAX_TICKETS)] | None = None


class RejectRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/admin/refunds/{refund_id}/reject`` (optional)."""

    reason: Annotated[str, Meta(min_length=1, max_length=200)] | None = None


async def _optional_json(request: Request, type_: type[T], default: T) -> T:
    """The body as ``type_``, or ``default`` when there is none (an empty body)."""
    body = await read_body(request, services(request).settings.max_body_bytes)
    if not body.strip():
        return default
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise UnsupportedMediaType(
            "send the body as application/json",
            details={"content_type": content_type or None},
        )
    return decode_json(body, type_)


def _fan(request: Request) -> str:
    identity = services(request).identities.resolve(request, time.time())
    if identity is None:
        raise missing()
    return identity.fan_id


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not _KEY_RE.fullmatch(key):
        raise ValidationFailed(
            "Idempotency-Key must be 1 to 200 visible ASCII characters", field="Idempotency-Key"
        )
    return key


async def ask_refund(request: Request) -> Response:
    """A fan asks for (part of) their order back: 202 with the refund."""
    fan_id = _fan(request)
    order_id = ids.ORDER_ID.check(request.path_params["order_id"])
    key = _idempotency_key(request)
    body = await _optional_json(request, RefundRequest, RefundRequest())
    async with services(request).db.acquire() as conn:
        refund, _ = await request_refund(
            conn, order_id=order_id, fan_id=fan_id, codes=body.tickets, key=key
        )
    return JSONResponse(
        refund, status_code=202, headers={"Location": f"/v1/orders/{order_id}/refunds"}
    )


async def my_refunds(request: Request) -> Response:
    """The refunds of the fan's order, oldest first."""
    fan_id = _fan(request)
    order_id = ids.ORDER_ID.check(request.path_params["order_id"])
    async with services(request).db.acquire() as conn:
        return JSONResponse(await order_refunds(conn, order_id, fan_id))


async def admin_refunds(request: Request) -> Response:
    """Refunds, newest first, of one event and/or in one state."""
    await require_admin(request)
    query = request.query_params
    event_id = query.get("event_id")
    if event_id is not None and not ids.EVENT_ID.matches(event_id):
        raise ValidationFailed("event_id is not an event id", field="event_id")
    state = query.get("state")
    if state is not None and state not in _STATES:
        raise ValidationFailed(f"state is one of {', '.join(sorted(_STATES))}", field="state")
    raw_limit = query.get("limit", "100")
    # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
    if not _LIMIT_RE.fullmatch(raw_limit) or not 1 <= int(raw_limit) <= MAX_LIST:
        raise ValidationFailed(f"limit is a whole number from 1 to {MAX_LIST}", field="limit")
    async with services(request).db.acquire() as conn:
        found = await list_refunds(conn, event_id=event_id, state=state, limit=int(raw_limit))
    return JSONResponse(found)


async def approve(request: Request) -> Response:
    """Approve a refund waiting for an operator: its tickets are voided, the money goes back."""
    actor = await require_admin(request)
    refund_id = ids.REFUND_ID.check(request.path_params["refund_id"])
    async with services(request).db.acquire() as conn:
        return JSONResponse(await approve_refund(conn, refund_id, actor=actor))


async def reject(request: Request) -> Response:
    """Reject a refund waiting for an operator: its tickets stay valid."""
    actor = await require_admin(request)
    refund_id = ids.REFUND_ID.check(request.path_params["refund_id"])
    body = await _optional_json(request, RejectRequest, RejectRequest())
    async with services(request).db.acquire() as conn:
        return JSONResponse(await reject_refund(conn, refund_id, actor=actor, reason=body.reason))


async def put_policy(request: Request) -> Response:
    """Set an event's refund policy."""
    actor = await require_admin(request)
    event_id = ids.EVENT_ID.check(request.path_params["event_id"])
    body = await read_json(request, RefundPolicy)
    async with services(request).db.acquire() as conn:
        return JSONResponse(await set_policy(conn, event_id, body, actor=actor))


async def show_policy(request: Request) -> Response:
    """An event's refund policy; 404 ``refund_policy_not_found`` when it takes no refunds."""
    await require_admin(request)
    event_id = ids.EVENT_ID.check(request.path_params["event_id"])
    async with services(request).db.acquire() as conn:
        policy = await get_policy(conn, event_id)
    if policy is None:
        raise NotFound("this event has no refund policy", code="refund_policy_not_found")
    return JSONResponse(policy)


def _query(name: str, schema: dict[str, object], text: str) -> dict[str, object]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": text}


OPERATIONS = [
    Operation(
        "POST",
        "/v1/orders/{order_id}/refunds",
        ask_refund,
        "Ask for (part of) an order back",
        request=RefundRequest,
        response=Refund,
        status=202,
        errors=(401, 404, 409, 503),
        tags=("refunds",),
    ),
    Operation(
        "GET",
        "/v1/orders/{order_id}/refunds",
        my_refunds,
        "The refunds of the fan's order",
        response=list[Refund],
        errors=(401, 404, 503),
        tags=("refunds",),
    ),
    Operation(
        "GET",
        "/v1/admin/refunds",
        admin_refunds,
        "Refunds of an event and/or in a state, newest first",
        response=list[Refund],
        errors=(422,),
        tags=("operators", "refunds"),
        auth="admin",
        parameters=(
            _query("event_id", ids.EVENT_ID.schema(), "only this event's refunds"),
            _query("state", {"type": "string", "enum": sorted(_STATES)}, "only in this state"),
            _query(
                "limit",
                {"type": "integer", "minimum": 1, "maximum": MAX_LIST},
                "at most this many (100)",
            ),
        ),
    ),
    Operation(
        "POST",
        "/v1/admin/refunds/{refund_id}/approve",
        approve,
        "Approve a refund: its tickets are voided, the money goes back",
        response=Refund,
        errors=(404, 409),
        tags=("operators", "refunds"),
        auth="admin",
    ),
    Operation(
        "POST",
        "/v1/admin/refunds/{refund_id}/reject",
        reject,
        "Reject a refund: its tickets stay valid",
        request=RejectRequest,
        response=Refund,
        errors=(404, 409),
        tags=("operators", "refunds"),
        auth="admin",
    ),
    Operation(
        "PUT",
        "/v1/admin/events/{event_id}/refund-policy",
        put_policy,
        "Set an event's refund policy",
        request=RefundPolicy,
        response=StoredPolicy,
        errors=(404,),
        tags=("operators", "refunds"),
        auth="admin",
    ),
    Operation(
        "GET",
        "/v1/admin/events/{event_id}/refund-policy",
        show_policy,
        "An event's refund policy",
        response=StoredPolicy,
        errors=(404,),
        tags=("operators", "refunds"),
        auth="admin",
    ),
]
