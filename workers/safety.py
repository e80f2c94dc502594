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
) -> dict[str, int]:
    """Release lapsed holds of events nobody hosts; return ``{event_id: overdue holds}`` asked.

    With ``host=None`` a temporary host is used and stopped afterwards, so the lease goes back
    at once and the next checkout request hosts the actor where the traffic is, rather than
    forwarding every reservation to this process.
    """
    overdue = await overdue_events(pool, grace_s=grace_s)
    orphaned: dict[str, int] = {}
    for event_id, count in overdue.items():
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
            try:
                await asker.ask(event_id, Expire())
            except Exception as exc:  # one broken event must not stop the sweep of the others
                log.warning(
                    "could not expire lapsed holds", extra={"event": event_id, "error": repr(exc)}
                )
                continue
            asked[event_id] = count
            log.info("expired lapsed holds", extra={"event": event_id, "holds": count})
    finally:
        if own:
            await asker.stop()
    return asked


async def run_safety_net(
    pool: asyncpg.Pool[Any],
    redis: Redis,
    keys: Keys,
    stop: asyncio.Event,
    *,
    interval_s: float = INTERVAL_S,
    grace_s: float = GRACE_S,
) -> None:
    """Sweep every ``interval_s`` until ``stop`` is set; outages are logged, never fatal."""
    while not stop.is_set():
        try:
            await sweep_once(pool, redis, keys, grace_s=grace_s)
        except Exception as exc:
            log.warning("safety net sweep failed", extra={"error": repr(exc)})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
