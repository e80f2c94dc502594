"""Redis is a cache of the passes: rebuild an event's admission state from PostgreSQL.

Redis may lose an event's data (a restart without persistence, a failover to a replica that
had not caught up). Left alone, that would forget who was admitted (a fan joining again would
be placed and admitted a second time), which passes count against ``max_active`` (more fans
than ``max_active`` would shop at once), which passes are revoked or spent (the gate would
accept them again) and where the admission sequence stands (new passes would be numbered
from 1 again). PostgreSQL holds all of it: ``queue_passes`` (every pass, with its signed
token, its number and its revocation) and ``holds`` (a pass whose hold was paid is spent; one
whose holds were all released has finished its hold cycle).

:func:`restore` writes that state back before a room is served again: the room's loader
(:class:`waitroom.line.room.Rooms`) calls it when the room's meta has no ``mode`` (the room
was never loaded, or Redis lost it), before it creates the meta, so nothing is served from a
half-rebuilt room. Writing is idempotent (two processes loading the same room at once write
the same values), and it returns the highest pass number ever issued, where the admission
sequence goes on.

:func:`pass_state` is the gate's fallback for a single pass Redis does not know
(:class:`admission.passes.PassGate`).
"""

from __future__ import annotations

import time
from typing import Any

import asyncpg
import msgspec
from redis.asyncio import Redis

from waitroom.core.errors import NotFound
from waitroom.core.keys import Keys

#: Redis commands per pipeline while restoring (a room may have had 100,000s of passes).
BATCH = 2_000
#: Seconds the revoked and spent markers outlive the pass (the gate's clock leeway).
MARKER_SLACK_S = 10

_PASSES = """
SELECT q.jti, q.fan_id, q.seq, q.token, extract(epoch FROM q.expires_at)::float8 AS exp,
       q.revoked_at IS NOT NULL AS revoked,
       coalesce(bool_or(h.status = 'paid'), false) AS paid,
       coalesce(bool_or(o.status = 'paid'), false) AS settled,
       coalesce(bool_or(h.status = 'held'), false) AS holding,
       count(DISTINCT h.id) AS holds
FROM queue_passes q
LEFT JOIN holds h ON h.event_id = q.event_id AND h.fan_id = q.fan_id AND h.pass_jti = q.jti
LEFT JOIN orders o ON o.hold_id = h.id
WHERE q.event_id = $1 AND q.expires_at > now()
GROUP BY q.jti
"""


class RestoredPass(msgspec.Struct, frozen=True):
    """One unexpired pass as PostgreSQL knows it, and what it means for Redis."""

    jti: str
    fan_id: str
    seq: int
    token: str | None
    expires_at: float
    revoked: bool
    #: Its hold was confirmed (paid, or its payment under way): it may not reserve again.
    spent: bool
    #: Still counts against ``max_active``: not revoked, its order not paid yet, and its hold
    #: cycle not over (a hold still held or being paid for, or none made yet). As the live
    #: path frees the slot (``spend_pass``, once the order is paid), not at the confirm: a
    #: rebuild between the two would let the next fan in while this one still pays.
    active: bool


def classify(row: asyncpg.Record | dict[str, Any]) -> RestoredPass:
    """A :class:`RestoredPass` from a row of the restore query (pure)."""
    revoked, spent, settled = bool(row["revoked"]), bool(row["paid"]), bool(row["settled"])
    cycle_over = int(row["holds"]) > 0 and not bool(row["holding"]) and not spent
    return RestoredPass(
        jti=row["jti"],
        fan_id=row["fan_id"],
        seq=int(row["seq"]),
        token=row["token"],
        expires_at=float(row["exp"]),
        revoked=revoked,
        spent=spent,
        active=not revoked and not settled and not cycle_over,
    )


class Rebuilt(msgspec.Struct, frozen=True):
    """What :func:`rebuild` wrote."""

    event_id: str
    #: The highest pass number PostgreSQL has: the admission sequence goes on after it.
    last_seq: int
    #: Unexpired passes written back (their fans admitted again), of which how many count
    #: against ``max_active``, are revoked, are spent.
    passes: int
    active: int
    revoked: int
    spent: int


async def rebuild(
    db: asyncpg.Pool[Any], redis: Redis, keys: Keys, event_id: str, *, now: float | None = None
) -> Rebuilt:
    """Write the event's admission state from PostgreSQL into Redis (idempotent).

    Every unexpired pass: its fan is admitted again (``fans`` and ``admitted``, so joining
    again answers with the same pass, and out of the line), counted in ``active`` if it still is (and no longer
    if it is not: those states are final), and marked revoked or spent if it is. Expired passes need nothing: the gate refuses them by their
    signature's expiry. 404 ``event_not_found`` for an unknown event.
    """
    now = time.time() if now is None else now
    async with db.acquire() as conn:
        if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM events WHERE id = $1)", event_id):
            raise NotFound(f"no event {event_id!r}", code="event_not_found")
        rows = await conn.fetch(_PASSES, event_id)
        last = await conn.fetchval(
            "SELECT coalesce(max(seq), 0) FROM queue_passes WHERE event_id = $1", event_id
        )
    ek = keys.event(event_id)
    pipe = redis.pipeline(transaction=False)
    queued = passes = active = revoked = spent = 0
    for row in rows:
        p = classify(row)
        ttl_ms = int((p.expires_at - now + MARKER_SLACK_S) * 1000)
        if ttl_ms <= 0:
            continue
        # The markers before the admitted pass: the gate trusts Redis's markers for a pass
        # Redis knows, so it must never see the pass without them.
        if p.revoked:
            pipe.set(ek.revoked_pass(p.jti), event_id, px=ttl_ms)
            revoked += 1
        if p.spent:
            pipe.set(ek.spent_pass(p.jti), "1", px=ttl_ms)
            spent += 1
        # Admitted: in `fans` without an address (not a live place), with its pass, and out
        # of the line. A Redis back from its append-only file may have lost the second in
        # which the fan left the line for this pass: still at its head, the fan would be
        # admitted a second time, over max_active (a fan holding a pass never rejoins).
        pipe.hset(ek.fans, p.fan_id, str(p.seq))
        pipe.zrem(ek.queue, p.fan_id)
        pipe.zrem(ek.seen, p.fan_id)
        if p.token:
            pipe.hset(ek.admitted, p.fan_id, p.token)
        if p.active:
            pipe.zadd(ek.active, {p.jti: p.expires_at})
            active += 1
        else:
            # Spent, revoked or done shopping for good: a Redis that lost the last second
            # of its writes may still count it.
            pipe.zrem(ek.active, p.jti)
        passes += 1
        queued += 1
        if queued >= BATCH:
            await pipe.execute()
            pipe = redis.pipeline(transaction=False)
            queued = 0
    if queued:
        await pipe.execute()
    return Rebuilt(event_id, int(last), passes, active, revoked, spent)


async def restore(
    db: asyncpg.Pool[Any], redis: Redis, keys: Keys, event_id: str, *, now: float | None = None
) -> int:
    """:func:`rebuild`, answering the last pass number (what the room's loader needs)."""
    return (await rebuild(db, redis, keys, event_id, now=now)).last_seq


class PassState(msgspec.Struct, frozen=True):
    """What PostgreSQL says of one pass: revoked, spent."""

    revoked: bool
    spent: bool


async def pass_state(
    db: asyncpg.Pool[Any], jti: str, *, event_id: str, fan_id: str
) -> PassState | None:
    """PostgreSQL's record of one pass, or None when it has none (not recorded yet)."""
    row = await db.fetchrow(
        "SELECT q.revoked_at IS NOT NULL AS revoked, EXISTS ("
        "  SELECT 1 FROM holds h WHERE h.event_id = q.event_id AND h.fan_id = q.fan_id"
        "  AND h.pass_jti = q.jti AND h.status = 'paid') AS spent"
        " FROM queue_passes q WHERE q.jti = $1 AND q.event_id = $2 AND q.fan_id = $3",
        jti,
        event_id,
        fan_id,
    )
    if row is None:
        return None
    return PassState(revoked=bool(row["revoked"]), spent=bool(row["spent"]))
