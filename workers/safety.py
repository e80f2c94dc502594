"""The hold safety net: lapsed holds get released even when no inventory actor is running.

An event's actor expires its own holds on a timer, but only while some process hosts it: after
every server that hosted it went away (a deploy, a crash, a quiet event nobody reserves in),
holds in PostgreSQL can sit in ``held`` past their deadline, keeping tickets off sale. The
safety net looks for holds still ``held`` more than ``grace_s`` past their deadline (on the
``holds_live`` partial index), and for each such event whose owner lease is absent, asks the
event's actor for :class:`~inventory.ledger.Expire` through an
:class:`~inventory.hosting.InventoryHost`, which hosts the actor, and the actor expires what
is due and commits it like any other batch. The safety net never writes a hold itself:
the actor stays the single writer (invariant 3).

An event whose owner lease is present is left alone: its actor is running and will expire
the holds itself (the grace covers a timer that is merely late).

It also keeps the idempotency records bounded (:func:`purge_idempotency`): a record is
worth keeping while a client might still retry its request, so ``idempotency_keys`` rows
go after ``WAITROOM_IDEMPOTENCY_TTL_S`` (a day by default), refusals after
:data:`REFUSAL_TTL_S` at most (a retry comes within minutes; a kept refusal only saves
re-running a request that changed nothing), and every record of an event that is
``closed``. An actor that loads its ledger afterwards simply does not know the purged
keys: a retry that late is applied afresh. (Keys of successful reserves live on their hold
rows and go with them.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncpg
from redis.asyncio import Redis

from inventory.hosting import InventoryHost
from inventory.ledger import Expire
from waitroom.core.keys import Keys

log = logging.getLogger("waitroom.safety")

GRACE_S = 5.0
INTERVAL_S = 5.0
#: The longest a refusal stays in ``idempotency_keys``.
REFUSAL_TTL_S = 3600.0
#: Rows deleted per statement: short transactions, so a purge never holds locks for long.
PURGE_BATCH = 5_000
#: Least time between two purges (each is a few index range scans).
PURGE_EVERY_S = 60.0

#: ``$1`` grace in seconds, ``$2`` most events. ``status = 'held'`` in the WHERE clause is
#: what lets PostgreSQL use the partial index ``holds_live``: only live holds are scanned,
#: never the settled history, however long it grows.
OVERDUE_QUERY = (
    "SELECT event_id, count(*) AS overdue FROM holds"
    " WHERE status = 'held' AND expires_at < now() - make_interval(secs => $1)"
    " GROUP BY event_id ORDER BY min(expires_at) LIMIT $2"
)


async def overdue_events(
    pool: asyncpg.Pool[Any], *, grace_s: float = GRACE_S, limit: int = 1000
) -> dict[str, int]:
    """Events with holds still ``held`` more than ``grace_s`` past their deadline, and how many."""
    rows = await pool.fetch(OVERDUE_QUERY, grace_s, limit)
    return {r["event_id"]: r["overdue"] for r in rows}


async def sweep_once(
    pool: asyncpg.Pool[Any],
    redis: Redis,
    keys: Keys,
    *,
    host: InventoryHost | None = None,
    grace_s: float = GRACE_S,
    stop: asyncio.Event | None = None,
) -> dict[str, int]:
    """Release lapsed holds of events nobody hosts; return ``{event_id: overdue holds}`` asked.

    With ``host=None`` a temporary host is used, which lets go of each event once its holds
    are expired (so it hosts one at a time) and is stopped afterwards, so the lease goes back
    at once and the next checkout request hosts the actor where the traffic is, rather than
    forwarding every reservation to this process. Once ``stop`` is set the sweep ends after
    the event in hand (up to 1,000 events may be overdue: a shutdown must not wait for all).
    """
    overdue = await overdue_events(pool, grace_s=grace_s)
    orphaned: dict[str, int] = {}
    for event_id, count in overdue.items():
        if stop is not None and stop.is_set():
            break
        if await redis.exists(keys.event(event_id).owner):
            log.info(
                "overdue holds on a hosted event; its actor will expire them",
                extra={"event": event_id, "overdue": count},
            )
            continue
        orphaned[event_id] = count
    if not orphaned:
        return {}
    own = host is None
    asker = host or InventoryHost(pool, redis, keys, node_id=None)
    if own:
        await asker.start()
    asked: dict[str, int] = {}
    try:
        for event_id, count in orphaned.items():
            if stop is not None and stop.is_set():
                break
            try:
                await asker.ask(event_id, Expire())
            except Exception as exc:  # one broken event must not stop the sweep of the others
                log.warning(
                    "could not expire lapsed holds", extra={"event": event_id, "error": repr(exc)}
                )
                continue
            finally:
                if own:
                    # One event at a time: each hosted event keeps a Redis connection blocked
                    # on its inbox, and up to 1,000 events may be overdue.
                    await asker.let_go(event_id)
            asked[event_id] = count
            log.info("expired lapsed holds", extra={"event": event_id, "holds": count})
    finally:
        if own:
            await asker.stop()
    return asked


#: What goes, one statement each so that each can use an index: refusals past their time
#: and everything past the TTL (``idempotency_keys_created``, schema 7), and the records of
#: closed events (the primary key's ``event_id`` prefix). ``$1`` seconds, ``$2`` batch.
_PURGES = (
    "created_at < now() - make_interval(secs => $1) AND status_code >= 400",
    "created_at < now() - make_interval(secs => $1)",
    "event_id IN (SELECT id FROM events WHERE status = 'closed') AND $1::float8 >= 0",
)


def _purge_query(where: str) -> str:
    return (
        "DELETE FROM idempotency_keys WHERE ctid = ANY(ARRAY("
        f"SELECT ctid FROM idempotency_keys WHERE {where} LIMIT $2))"
    )


async def purge_idempotency(
    pool: asyncpg.Pool[Any],
    *,
    ttl_s: float,
    refusal_ttl_s: float = REFUSAL_TTL_S,
    batch: int = PURGE_BATCH,
    max_batches: int = 100,
) -> int:
    """Delete expired idempotency records (see the module docstring); how many went."""
    ages = (min(refusal_ttl_s, ttl_s), ttl_s, 0.0)
    total = 0
    for where, age in zip(_PURGES, ages, strict=True):
        query = _purge_query(where)
        for _ in range(max_batches):
            status = await pool.execute(query, float(age), batch)
            deleted = int(status.split()[-1])
            total += deleted
            if deleted < batch:
                break
    if total:
        log.info("purged idempotency records", extra={"rows": total})
    return total


async def run_safety_net(
    pool: asyncpg.Pool[Any],
    redis: Redis,
    keys: Keys,
    stop: asyncio.Event,
    *,
    interval_s: float = INTERVAL_S,
    grace_s: float = GRACE_S,
    idempotency_ttl_s: float = 86_400.0,
) -> None:
    """Sweep every ``interval_s`` until ``stop`` is set; outages are logged, never fatal.

    Idempotency records are purged every :data:`PURGE_EVERY_S` (the first time at once).
    """
    purged_at = -PURGE_EVERY_S
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        try:
            await sweep_once(pool, redis, keys, grace_s=grace_s, stop=stop)
        except Exception as exc:
            log.warning("safety net sweep failed", extra={"error": repr(exc)})
        if loop.time() - purged_at >= PURGE_EVERY_S:
            purged_at = loop.time()
            try:
                await purge_idempotency(pool, ttl_s=idempotency_ttl_s)
            except Exception as exc:
                log.warning("idempotency purge failed", extra={"error": repr(exc)})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
