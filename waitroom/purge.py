"""Deleting an event for good: its rows in PostgreSQL and its keys in Redis.

``waitroom event delete EVENT`` calls :func:`delete_event`. It is for events that should never
have been kept (a test, a rehearsal, the demo's simulated sales), not for closing a real sale:

- An event with paid orders, or a payment still in flight or in doubt, is refused
  (409 ``event_has_orders``) unless ``force`` is given: deleting it erases tickets fans
  bought. The demo's sales are paid with the mock provider, so its reset forces.
- An event a running process serves is refused (409 ``event_in_use``): the event's leases
  (inventory owner, admission leader, lottery draw) must be free. They are then taken by the
  deletion itself and released last, so no server or worker starts hosting the event and
  writing its keys again while they are being removed.
- PostgreSQL goes first, in one transaction, so the event is either there whole or gone.
  Redis holds nothing that cannot be rebuilt, so its keys follow: if Redis fails half way,
  running the command again removes what is left (an event that is only in Redis any more
  is cleaned up the same way).

The ``audit_log`` rows of the event are kept, as the record of what operators did to it,
with one more row, ``event.delete``, saying what was removed. Messages the outbox relay has
already published to the ``outbox`` stream stay there: they belong to its consumers.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import asyncpg
import msgspec
from redis.asyncio import Redis

from waitroom.core import audit, ids, lease
from waitroom.core.errors import Conflict, NotFound
from waitroom.core.keys import EventKeys, Keys

#: How long a lease held by someone else may take to lapse before the deletion is refused:
#: a process that has just stopped without releasing its leases lets them go within the
#: lease's TTL (1.5 s); one that is alive keeps renewing them.
LEASE_PATIENCE_S = 3.0
#: The deletion's own hold on the event's leases; it needs a fraction of this.
DELETION_LEASE_MS = 60_000
#: Keys deleted per round trip.
BATCH = 500
#: Bound on each statement: a benchmark's event may have millions of holds.
STATEMENT_TIMEOUT_S = 120.0


class DeletedEvent(msgspec.Struct, frozen=True):
    """What :func:`delete_event` removed."""

    event_id: str
    #: False when the event was only left in Redis (a deletion Redis interrupted).
    in_database: bool
    orders: int
    paid_orders: int
    tickets: int
    holds: int
    passes: int
    redis_keys: int


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis ``SCAN MATCH`` pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _leases(ek: EventKeys) -> dict[str, str]:
    """The event's lease keys, with what each one's holder does."""
    return {
        ek.owner: "inventory owner",
        ek.leader: "admission leader",
        ek.draw_lease: "lottery draw",
    }


async def delete_event(
    db: asyncpg.Pool[Any],
    redis: Redis,
    keys: Keys,
    event_id: str,
    *,
    actor: audit.Actor | str,
    force: bool = False,
) -> DeletedEvent:
    """Delete ``event_id``'s rows and Redis keys (see the module's docstring for the rules).

    Raises :class:`NotFound` when neither PostgreSQL nor Redis knows the event, and
    :class:`Conflict` when it has paid orders (without ``force``) or a process serves it.
    """
    if not ids.EVENT_ID.matches(event_id):
        # Never built into a SCAN pattern: an id of another form could match other events.
        raise NotFound(f"no event {event_id!r}", code="event_not_found")
    ek = keys.event(event_id)
    async with db.acquire() as conn:
        exists = await conn.fetchval("SELECT 1 FROM events WHERE id = $1", event_id)
        if exists:
            await _check_orders(conn, event_id, force=force)
    token = "delete-" + secrets.token_hex(8)
    await _take_leases(redis, ek, event_id, token)
    try:
        deleted = await _delete_rows(db, event_id, actor=actor, force=force) if exists else None
        counts, jtis = deleted or ({}, [])
        removed = await _delete_keys(redis, keys, event_id, jtis)
    finally:
        for key in _leases(ek):
            await lease.release(redis, key, token)
    if deleted is None and removed == 0:
        raise NotFound(f"no event {event_id!r}", code="event_not_found")
    return DeletedEvent(
        event_id=event_id,
        in_database=deleted is not None,
        orders=counts.get("orders", 0),
        paid_orders=counts.get("paid_orders", 0),
        tickets=counts.get("tickets", 0),
        holds=counts.get("holds", 0),
        passes=counts.get("passes", 0),
        redis_keys=removed,
    )


async def _check_orders(conn: Any, event_id: str, *, force: bool) -> None:
    """Refuse (without ``force``) to erase paid orders or payments that may still charge."""
    row = await conn.fetchrow(
        "SELECT (SELECT count(*) FROM orders WHERE event_id = $1 AND status = 'paid') AS paid,"
        " (SELECT count(*) FROM tickets t JOIN orders o ON o.id = t.order_id"
        "   WHERE o.event_id = $1) AS tickets,"
        " (SELECT count(*) FROM payments p JOIN orders o ON o.id = p.order_id"
        "   WHERE o.event_id = $1"
        "   AND (p.state IN ('pending', 'processing') OR p.reconcile = 'due')) AS open_payments",
        event_id,
    )
    paid, tickets, open_payments = int(row["paid"]), int(row["tickets"]), row["open_payments"]
    if force or (paid == 0 and open_payments == 0):
        return
    what = [f"{paid} paid orders ({tickets} tickets)"] if paid else []
    if open_payments:
        what.append(f"{open_payments} payments in flight or in doubt")
    raise Conflict(
        f"event {event_id!r} has {' and '.join(what)}; deleting it would erase what fans"
        " bought. Refused: use --force only for a test or demo sale",
        code="event_has_orders",
        details={"paid_orders": paid, "tickets": tickets, "open_payments": open_payments},
    )


async def _take_leases(redis: Redis, ek: EventKeys, event_id: str, token: str) -> None:
    """Hold every lease of the event, or raise 409 ``event_in_use`` naming who holds one."""
    deadline = time.monotonic() + LEASE_PATIENCE_S
    taken: set[str] = set()
    while True:
        for key in _leases(ek):
            if key not in taken and await lease.acquire(
                redis, key, token, lease_ms=DELETION_LEASE_MS
            ):
                taken.add(key)
        busy = [key for key in _leases(ek) if key not in taken]
        if not busy:
            return
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.25)
    for key in taken:
        await lease.release(redis, key, token)
    holder = await redis.get(busy[0])
    by = f" by {holder.decode(errors='replace')}" if isinstance(holder, bytes) else ""
    name = _leases(ek)[busy[0]]
    raise Conflict(
        f"event {event_id!r} is being served: its {name} lease is held{by};"
        " stop `waitroom serve` and `waitroom workers` first",
        code="event_in_use",
        details={"lease": name},
    )


async def _delete_rows(
    db: asyncpg.Pool[Any], event_id: str, *, actor: audit.Actor | str, force: bool
) -> tuple[dict[str, int], list[str]] | None:
    """Delete the event's rows in one transaction: the counts and the jtis of its passes,
    or None when the event is not there (any more)."""
    t = STATEMENT_TIMEOUT_S
    async with db.acquire() as conn, conn.transaction():
        # The row lock keeps new orders and passes out while the counts are taken.
        if not await conn.fetchval(
            "SELECT 1 FROM events WHERE id = $1 FOR UPDATE", event_id, timeout=t
        ):
            return None
        await _check_orders(conn, event_id, force=force)
        orders: asyncpg.Record | None = await conn.fetchrow(
            "SELECT count(*) AS n, count(*) FILTER (WHERE status = 'paid') AS paid"
            " FROM orders WHERE event_id = $1",
            event_id,
            timeout=t,
        )
        assert orders is not None  # an aggregate without GROUP BY returns one row
        jtis = [
            r["jti"]
            for r in await conn.fetch(
                "SELECT jti FROM queue_passes WHERE event_id = $1", event_id, timeout=t
            )
        ]
        # Children before parents: tickets and payments name orders, orders name holds.
        # order_events go with their orders and payments (ON DELETE CASCADE).
        tickets = await conn.execute("DELETE FROM tickets WHERE event_id = $1", event_id, timeout=t)
        await conn.execute(
            "DELETE FROM payments WHERE order_id IN (SELECT id FROM orders WHERE event_id = $1)",
            event_id,
            timeout=t,
        )
        await conn.execute("DELETE FROM orders WHERE event_id = $1", event_id, timeout=t)
        holds = await conn.execute("DELETE FROM holds WHERE event_id = $1", event_id, timeout=t)
        await conn.execute("DELETE FROM idempotency_keys WHERE event_id = $1", event_id, timeout=t)
        await conn.execute("DELETE FROM outbox WHERE event_id = $1", event_id, timeout=t)
        # The rest goes with the event (ON DELETE CASCADE): room settings, ticket types, the
        # lottery, queue passes, the inventory owner's epoch. A table added later that names
        # events without a cascade makes this fail, and the transaction keeps everything.
        await conn.execute("DELETE FROM events WHERE id = $1", event_id, timeout=t)
        counts = {
            "orders": int(orders["n"]),
            "paid_orders": int(orders["paid"]),
            "tickets": _rowcount(tickets),
            "holds": _rowcount(holds),
            "passes": len(jtis),
        }
        await audit.record(
            conn, actor, "event.delete", event_id, old=msgspec.json.encode(counts).decode()
        )
    return counts, jtis


def _rowcount(status: str) -> int:
    """The row count of a command status such as ``DELETE 12``."""
    return int(status.rsplit(" ", 1)[-1])


async def _delete_keys(redis: Redis, keys: Keys, event_id: str, jtis: list[str]) -> int:
    """Delete the event's keys (all in its hash slot) but the leases, and its passes' markers."""
    ek = keys.event(event_id)
    keep = {k.encode() for k in _leases(ek)}
    removed = 0
    batch: list[bytes] = []
    async for key in redis.scan_iter(match=_glob_escape(ek.base) + ":*", count=1000):
        if key in keep:
            continue
        batch.append(key)
        if len(batch) >= BATCH:
            removed += int(await redis.delete(*batch))
            batch = []
    if batch:
        removed += int(await redis.delete(*batch))
    # The revoked/spent markers of the event's passes are the event's keys (its hash tag),
    # so the scan above found them; the markers of passes of earlier releases, which were
    # deployment-wide keys, are deleted by name.
    for i in range(0, len(jtis), BATCH):
        async with redis.pipeline(transaction=False) as pipe:
            for jti in jtis[i : i + BATCH]:
                pipe.delete(f"{keys.prefix}:revoked:{jti}")
                pipe.delete(f"{keys.prefix}:spent:{jti}")
            removed += sum(int(n) for n in await pipe.execute())
    return removed
