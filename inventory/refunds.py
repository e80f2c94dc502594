"""Refunds in PostgreSQL: a fan's request, an operator's decision, and the refund as stored.

A fan asks for (part of) a paid order back (:func:`request_refund`); the event's refund policy
(:mod:`inventory.refund_policy`) decides the amount, and whether an operator must approve.
States (docs/refunds.md)::

    pending_approval ──approve──▶ approved ──worker claims──▶ processing ──▶ succeeded
          └──────────reject─────▶ rejected        ▲                 │   └──▶ failed
                                                  └──retry, backoff─┘

A request that needs no approval is ``approved`` at once. Moving to ``approved`` voids the
refund's tickets in the same transaction, which first locks them (``FOR UPDATE``, in code
order): a check-in of one of them either committed before (the refund is refused, 409
``ticket_used``) or waits for the lock and then finds the ticket voided (check-in's
conditional ``UPDATE`` refuses it, 409 ``ticket_voided``). Exactly one of the two wins.

The refund worker (:mod:`workers.refunds`) gives the money back through the provider and the
tickets back to stock through the event's inventory actor
(:class:`~inventory.ledger.Restock`), then marks the refund ``succeeded``. Every step writes
a row in the order's history (``order_events``) and in the audit log, in its transaction.

A ticket is in at most one live refund (``refund_tickets_one_live``, schema 15): a rejected
refund lets its tickets go; any other keeps them.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

import asyncpg
import msgspec

from inventory.orders import record_event
from inventory.refund_policy import (
    RefundPolicy,
    Tier,
    check_policy,
    percent_at,
    refund_amount,
)
from inventory.store import Conn
from waitroom.core import audit
from waitroom.core.audit import Actor
from waitroom.core.errors import Conflict, NotFound, ValidationFailed

RefundState = Literal[
    "requested", "pending_approval", "approved", "rejected", "processing", "succeeded", "failed"
]

#: PostgreSQL channel an approved refund is announced on, so an idle refund worker wakes.
REFUNDS_CHANNEL = "waitroom_refunds"

#: Kinds of ``order_events`` rows written for refunds.
REFUND_REQUESTED = "refund.requested"
REFUND_APPROVED = "refund.approved"
REFUND_REJECTED = "refund.rejected"
REFUND_RETRY = "refund.retry"
REFUND_RECONCILED = "refund.reconciled"
REFUND_SUCCEEDED = "refund.succeeded"
REFUND_FAILED = "refund.failed"

#: Outbox topic of a refund that succeeded; the payload is :class:`OrderRefunded`.
ORDER_REFUNDED = "order.refunded"

#: Most tickets one request may name.
MAX_TICKETS = 100


class OrderRefunded(msgspec.Struct, frozen=True):
    """Payload of the ``order.refunded`` outbox message (a contract: the e-mail worker reads it)."""

    order_id: str
    refund_id: str
    amount_minor: int
    currency: str


class Refund(msgspec.Struct, frozen=True):
    """A refund as the API shows it."""

    id: str
    order_id: str
    event_id: str
    state: str
    tickets: list[str]
    ticket_type: str
    amount_minor: int
    currency: str
    #: The policy's share at the time of the request.
    percent: int
    requested_by: str
    created_at: datetime
    updated_at: datetime
    decided_by: str | None = None
    decided_at: datetime | None = None
    reason: str | None = None
    attempts: int = 0
    last_error: str | None = None
    provider_ref: str | None = None
    #: ``due`` while the worker asks the provider what an unanswered request did;
    #: ``found`` or ``not_found`` once it knows.
    reconcile: str | None = None
    #: The tickets went back on sale (at success).
    stock_returned: bool = False


class StoredPolicy(msgspec.Struct, frozen=True):
    """An event's refund policy as stored."""

    event_id: str
    tiers: list[Tier]
    requires_approval: bool
    updated_by: str
    updated_at: datetime


_COLUMNS = (
    "id::text, order_id::text, event_id, state, tickets, ticket_type, amount_minor, currency,"
    " percent, requested_by, created_at, updated_at, decided_by, decided_at, reason, attempts,"
    " last_error, provider_ref, reconcile, stock_returned_at IS NOT NULL AS stock_returned"
)


def _refund(row: Mapping[str, Any]) -> Refund:
    values = dict(row)
    values["currency"] = values["currency"].strip()
    values["tickets"] = list(values["tickets"])
    return Refund(**values)


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def _uuid(value: str) -> str:
    """``value`` if it is a UUID; a malformed id is unknown (404), not a database error."""
    try:
        return str(uuid.UUID(value))
    except (ValueError, TypeError):
        return "00000000-0000-0000-0000-000000000000"


def fan_actor(fan_id: str) -> str:
    """Who the audit log names for a fan's request."""
    return f"fan:{fan_id}"


# --- policy --------------------------------------------------------------------------------


async def get_policy(conn: Conn, event_id: str) -> StoredPolicy | None:
    """``event_id``'s refund policy, or None (no refunds)."""
    row = await conn.fetchrow(
        "SELECT event_id, tiers::text, requires_approval, updated_by, updated_at"
        " FROM refund_policies WHERE event_id = $1",
        event_id,
    )
    if row is None:
        return None
    return StoredPolicy(
        event_id=row["event_id"],
        tiers=msgspec.json.decode(row["tiers"], type=list[Tier]),
        requires_approval=row["requires_approval"],
        updated_by=row["updated_by"],
        updated_at=row["updated_at"],
    )


async def set_policy(
    conn: Conn, event_id: str, policy: RefundPolicy, *, actor: Actor | str
) -> StoredPolicy:
    """Set ``event_id``'s refund policy (404 ``event_not_found``; 422 ``bad_refund_policy``)."""
    problem = check_policy(policy)
    if problem is not None:
        raise ValidationFailed(problem, field="tiers", code="bad_refund_policy")
    who = audit.actor_of(actor)
    tiers = sorted(policy.tiers, key=lambda t: -t.until_days_before)
    async with conn.transaction():
        if not await conn.fetchval("SELECT 1 FROM events WHERE id = $1", event_id):
            raise NotFound(f"no event {event_id!r}", code="event_not_found")
        old = await conn.fetchval(
            "SELECT json_build_object('tiers', tiers, 'requires_approval', requires_approval)::text"
            " FROM refund_policies WHERE event_id = $1 FOR UPDATE",
            event_id,
        )
        new = _json({"tiers": tiers, "requires_approval": policy.requires_approval})
        await conn.execute(
            "INSERT INTO refund_policies (event_id, tiers, requires_approval, updated_by)"
            " VALUES ($1, $2::jsonb, $3, $4) ON CONFLICT (event_id) DO UPDATE"
            " SET tiers = EXCLUDED.tiers, requires_approval = EXCLUDED.requires_approval,"
            " updated_by = EXCLUDED.updated_by, updated_at = now()",
            event_id,
            _json(tiers),
            policy.requires_approval,
            who.name,
        )
        await audit.record(conn, who, "refund.policy", event_id, old=old, new=new)
        stored = await get_policy(conn, event_id)
    assert stored is not None
    return stored


# --- a fan's request -------------------------------------------------------------------------


def request_hash(order_id: str, codes: list[str] | None) -> str:
    """What a keyed request asks for, to tell a retry from a reused key."""
    asked = None if codes is None else sorted(codes)
    return hashlib.sha256(_json(["refund", order_id, asked]).encode()).hexdigest()


async def _replay(conn: Conn, fan_id: str, key: str, digest: str) -> Refund | None:
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS}, request_hash FROM refunds WHERE fan_id = $1 AND idempotency_key = $2",
        fan_id,
        key,
    )
    if row is None:
        return None
    if row["request_hash"] != digest:
        raise ValidationFailed(
            "This Idempotency-Key was already used for a different request.",
            code="idempotency_key_reused",
            field="Idempotency-Key",
        )
    values = dict(row)
    del values["request_hash"]
    return _refund(values)


async def request_refund(
    conn: Conn,
    *,
    order_id: str,
    fan_id: str,
    codes: list[str] | None,
    key: str | None,
    now: datetime | None = None,
) -> tuple[Refund, bool]:
    """``fan_id`` asks for the tickets ``codes`` of their order back (None: every ticket not
    used, voided or in a refund yet); ``(refund, replayed)``.

    Refusals: 404 ``order_not_found`` (no such order, or not this fan's); 409
    ``order_not_paid``, ``refunds_not_allowed`` (no policy), ``refund_window_closed`` (the
    policy gives nothing back any more), ``nothing_to_refund``, ``ticket_used``,
    ``ticket_voided``, ``ticket_already_refunded``; 422 ``tickets_not_in_order``,
    ``duplicate_tickets``, ``idempotency_key_reused``.
    """
    if codes is not None and len(set(codes)) != len(codes):
        raise ValidationFailed("a ticket is named twice", field="tickets", code="duplicate_tickets")
    digest = request_hash(order_id, codes)
    if key is not None:
        replayed = await _replay(conn, fan_id, key, digest)
        if replayed is not None:
            return replayed, True
    try:
        return await _request(conn, order_id, fan_id, codes, key, digest, now), False
    except asyncpg.UniqueViolationError:
        # A concurrent request with the same key won the race (the index on the key).
        if key is not None:
            replayed = await _replay(conn, fan_id, key, digest)
            if replayed is not None:
                return replayed, True
        raise Conflict(
            "a ticket of this request is in another refund", code="ticket_already_refunded"
        ) from None


async def _request(
    conn: Conn,
    order_id: str,
    fan_id: str,
    codes: list[str] | None,
    key: str | None,
    digest: str,
    now: datetime | None,
) -> Refund:
    async with conn.transaction():
        # The order's row lock serializes the refunds of one order. NO KEY UPDATE, not UPDATE:
        # a check-in holding a ticket's lock writes the order's history, whose foreign key
        # takes KEY SHARE on the order; FOR UPDATE would wait on it while the check-in waits
        # on the ticket we lock next (a deadlock, found by the race test).
        order = await conn.fetchrow(
            "SELECT o.id::text, o.event_id, o.status, o.amount_minor, o.currency,"
            " o.hold_id::text, h.ticket_type, h.quantity, e.starts_at,"
            " (SELECT provider_ref FROM payments p WHERE p.order_id = o.id"
            "   AND p.state = 'succeeded' LIMIT 1) AS charge_id"
            " FROM orders o JOIN holds h ON h.id = o.hold_id JOIN events e ON e.id = o.event_id"
            " WHERE o.id = $1::uuid AND o.fan_id = $2 FOR NO KEY UPDATE OF o",
            _uuid(order_id),
            fan_id,
        )
        if order is None:
            raise NotFound("no such order", code="order_not_found", details={"order_id": order_id})
        if key is not None:
            # Checked again under the order's lock: a concurrent retry has committed by now.
            replayed = await _replay(conn, fan_id, key, digest)
            if replayed is not None:
                return replayed
        if order["status"] != "paid" or order["charge_id"] is None:
            raise Conflict("only a paid order can be refunded", code="order_not_paid")
        stored = await get_policy(conn, order["event_id"])
        if stored is None:
            raise Conflict("this event takes no refunds", code="refunds_not_allowed")
        policy = RefundPolicy(stored.tiers, stored.requires_approval)
        at = now or datetime.now(UTC)
        percent = percent_at(policy, order["starts_at"], at)
        if percent == 0:
            raise Conflict(
                "the refund policy gives nothing back any more",
                code="refund_window_closed",
                details={"starts_at": order["starts_at"].isoformat()},
            )
        chosen = await _lock_tickets(conn, order["id"], codes)
        refund_id = str(uuid.uuid4())
        price = order["amount_minor"] // order["quantity"]
        amount = refund_amount(price, len(chosen), percent)
        state = "pending_approval" if policy.requires_approval else "approved"
        actor = fan_actor(fan_id)
        await conn.execute(
            "INSERT INTO refunds (id, order_id, event_id, fan_id, hold_id, ticket_type, tickets,"
            " amount_minor, currency, percent, state, idempotency_key, request_hash, charge_id,"
            " next_attempt_at, requested_by)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14,"
            " CASE WHEN $11 = 'approved' THEN now() END, $15)",
            refund_id,
            order["id"],
            order["event_id"],
            fan_id,
            order["hold_id"],
            order["ticket_type"],
            chosen,
            amount,
            order["currency"],
            percent,
            state,
            key,
            digest,
            order["charge_id"],
            actor,
        )
        await conn.execute(
            "INSERT INTO refund_tickets (refund_id, code) SELECT $1, unnest($2::text[])",
            refund_id,
            chosen,
        )
        detail: dict[str, Any] = {"refund_id": refund_id, "tickets": chosen, "amount_minor": amount}
        await record_event(conn, order["id"], REFUND_REQUESTED, percent=percent, **detail)
        await audit.record(
            conn, actor, "refund.request", order["event_id"], new=_json({**detail, "state": state})
        )
        if state == "approved":
            await _approve(conn, refund_id, order["id"], order["event_id"], chosen, "policy")
        refund = await get_refund(conn, refund_id)
    return refund


async def _lock_tickets(conn: Conn, order_id: str, codes: list[str] | None) -> list[str]:
    """Lock the order's tickets (in code order) and return the ones to refund, or refuse."""
    rows = await conn.fetch(
        "SELECT t.code, t.used_at, t.voided_at,"
        " EXISTS (SELECT 1 FROM refund_tickets r WHERE r.code = t.code AND r.live) AS refunding"
        " FROM tickets t WHERE t.order_id = $1 ORDER BY t.code FOR UPDATE OF t",
        order_id,
    )
    by_code = {r["code"]: r for r in rows}
    if codes is None:
        chosen = [
            r["code"]
            for r in rows
            if r["used_at"] is None and r["voided_at"] is None and not r["refunding"]
        ]
        if not chosen:
            raise Conflict(
                "every ticket of this order is used, voided or refunded already",
                code="nothing_to_refund",
            )
        return chosen
    missing = [c for c in codes if c not in by_code]
    if missing:
        error = ValidationFailed(
            "these tickets are not in this order", field="tickets", code="tickets_not_in_order"
        )
        error.details["tickets"] = missing
        raise error
    _refuse_unrefundable([by_code[c] for c in codes])
    return sorted(codes)


def _refuse_unrefundable(rows: list[asyncpg.Record]) -> None:
    refunding = [r["code"] for r in rows if r["refunding"]]
    if refunding:
        raise Conflict(
            "these tickets are in a refund already",
            code="ticket_already_refunded",
            details={"tickets": refunding},
        )
    used = [r["code"] for r in rows if r["used_at"] is not None]
    if used:
        raise Conflict(
            "these tickets were checked in: a used ticket cannot be refunded",
            code="ticket_used",
            details={"tickets": used},
        )
    voided = [r["code"] for r in rows if r["voided_at"] is not None]
    if voided:
        raise Conflict(
            "these tickets were voided", code="ticket_voided", details={"tickets": voided}
        )


async def _approve(
    conn: Conn, refund_id: str, order_id: str, event_id: str, codes: list[str], by: str
) -> None:
    """Void the refund's tickets (locked by the caller) and make it due for the worker."""
    await conn.execute(
        "UPDATE tickets SET voided_at = now(), voided_by = $2, void_reason = $3"
        " WHERE code = ANY($1::text[])",
        codes,
        by,
        f"refund {refund_id}",
    )
    await conn.execute(
        "UPDATE refunds SET state = 'approved', next_attempt_at = now(), updated_at = now(),"
        " decided_by = $2, decided_at = now() WHERE id = $1",
        refund_id,
        by,
    )
    await record_event(conn, order_id, REFUND_APPROVED, refund_id=refund_id, tickets=codes, by=by)
    await audit.record(
        conn, by, "refund.approve", event_id, new=_json({"refund_id": refund_id, "tickets": codes})
    )
    # Delivered at commit: an idle refund worker starts at once instead of at its next poll.
    await conn.execute("SELECT pg_notify($1, $2)", REFUNDS_CHANNEL, refund_id)


# --- an operator's decision ------------------------------------------------------------------


async def _locked(conn: Conn, refund_id: str) -> asyncpg.Record:
    row: asyncpg.Record | None = await conn.fetchrow(
        "SELECT id::text, order_id::text, event_id, state, tickets FROM refunds"
        " WHERE id = $1::uuid FOR UPDATE",
        _uuid(refund_id),
    )
    if row is None:
        raise NotFound("no such refund", code="refund_not_found", details={"refund_id": refund_id})
    return row


async def approve_refund(conn: Conn, refund_id: str, *, actor: Actor | str) -> Refund:
    """Approve a ``pending_approval`` refund: its tickets are voided, the worker pays it back.

    Approving an approved (or later) refund again answers it as it is; 409
    ``refund_not_pending`` for a rejected one, ``ticket_used`` when a ticket was checked in
    meanwhile (reject it then).
    """
    who = audit.actor_of(actor)
    async with conn.transaction():
        row = await _locked(conn, refund_id)
        if row["state"] == "pending_approval":
            rows = await conn.fetch(
                "SELECT t.code, t.used_at, t.voided_at, false AS refunding FROM tickets t"
                " WHERE t.code = ANY($1::text[]) ORDER BY t.code FOR UPDATE",
                list(row["tickets"]),
            )
            _refuse_unrefundable(list(rows))
            await _approve(
                conn, row["id"], row["order_id"], row["event_id"], list(row["tickets"]), who.name
            )
        elif row["state"] == "rejected":
            raise Conflict("this refund was rejected", code="refund_not_pending")
        return await get_refund(conn, row["id"])


async def reject_refund(
    conn: Conn, refund_id: str, *, actor: Actor | str, reason: str | None = None
) -> Refund:
    """Reject a ``pending_approval`` refund: its tickets stay valid (and may be asked for
    again). Rejecting a rejected refund again answers it as it is; 409 ``refund_not_pending``
    once it was approved (its tickets are voided already)."""
    who = audit.actor_of(actor)
    async with conn.transaction():
        row = await _locked(conn, refund_id)
        if row["state"] == "pending_approval":
            await conn.execute(
                "UPDATE refunds SET state = 'rejected', decided_by = $2, decided_at = now(),"
                " reason = $3, updated_at = now() WHERE id = $1",
                row["id"],
                who.name,
                reason,
            )
            await conn.execute(
                "UPDATE refund_tickets SET live = false WHERE refund_id = $1", row["id"]
            )
            await record_event(
                conn, row["order_id"], REFUND_REJECTED, refund_id=row["id"], reason=reason
            )
            await audit.record(
                conn,
                who,
                "refund.reject",
                row["event_id"],
                new=_json({"refund_id": row["id"], "reason": reason}),
            )
        elif row["state"] != "rejected":
            raise Conflict(
                f"this refund is {row['state']}, not waiting for approval",
                code="refund_not_pending",
                details={"state": row["state"]},
            )
        return await get_refund(conn, row["id"])


# --- reading -----------------------------------------------------------------------------------


async def get_refund(conn: Conn, refund_id: str) -> Refund:
    """One refund; 404 ``refund_not_found``."""
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM refunds WHERE id = $1::uuid", _uuid(refund_id)
    )
    if row is None:
        raise NotFound("no such refund", code="refund_not_found", details={"refund_id": refund_id})
    return _refund(row)


async def order_refunds(conn: Conn, order_id: str, fan_id: str) -> list[Refund]:
    """The refunds of ``fan_id``'s order, oldest first; 404 ``order_not_found`` for anyone
    else's order."""
    if not await conn.fetchval(
        "SELECT 1 FROM orders WHERE id = $1::uuid AND fan_id = $2", _uuid(order_id), fan_id
    ):
        raise NotFound("no such order", code="order_not_found", details={"order_id": order_id})
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM refunds WHERE order_id = $1::uuid ORDER BY created_at, id",
        _uuid(order_id),
    )
    return [_refund(r) for r in rows]


async def list_refunds(
    conn: Conn, *, event_id: str | None = None, state: str | None = None, limit: int = 100
) -> list[Refund]:
    """Refunds, newest first, of one event and/or in one state (an operator's queue)."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM refunds WHERE ($1::text IS NULL OR event_id = $1)"
        " AND ($2::text IS NULL OR state = $2) ORDER BY created_at DESC, id LIMIT $3",
        event_id,
        state,
        limit,
    )
    return [_refund(r) for r in rows]
