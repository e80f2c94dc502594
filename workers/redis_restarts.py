"""Put back what a Redis restart lost: the passes' markers and the outbox's last messages.

A Redis that restarts from its append-only file (``appendfsync everysec``), or a replica
promoted in its primary's place, comes back with almost everything: it loses only the last
second or so of writes (the replication lag for a replica). The rooms are there, so nothing
else notices what went missing, and what goes missing matters:

- a pass spent (its order paid: :func:`admission.operators.spend_pass`) or revoked just before
  the crash would be accepted again by the gate, whose markers are gone while the fan's
  admitted pass is not (the gate asks PostgreSQL only when Redis knows nothing of the pass);
- a freed admission slot would count against ``max_active`` again until the pass expires;
- outbox messages the relay published in that second are gone from the stream, while
  PostgreSQL says they were published.

A room Redis lost whole is rebuilt by its loader (:mod:`admission.recovery`); a partial loss
needs someone to notice the restart. This loop does (:func:`run_restart_watch`, in
``waitroom workers``): every :data:`WATCH_EVERY_S` it reads the *incarnation* of the Redis
deployment (:func:`incarnation`: the run ids of its primaries, new on every restart and on
every promotion) and compares it with the incarnation it last reconciled, kept in Redis itself
(:attr:`waitroom.core.keys.Keys.redis_incarnation`; a Redis restarted from its file brings the
old one back, an empty one none). When they differ it reconciles (:func:`reconcile`):

1. every event with an unexpired pass is rebuilt from PostgreSQL (:func:`admission.recovery.rebuild`,
   idempotent: markers, admitted fans, the passes that still count against ``max_active``);
2. outbox rows published in the last :data:`REPUBLISH_S` seconds are marked unpublished, so the
   relay publishes them again under the same ``id`` (consumers already dedupe on it: the relay
   is at least once);
3. only then the new incarnation is written, so a reconcile cut short is done again.

Several workers processes may reconcile the same restart at once: every step is idempotent.
Until the loop has run (at most :data:`WATCH_EVERY_S` after Redis answers again, most of which
Redis spends loading its file and answering ``LOADING``, a 503), a pass spent in the lost
second may still reserve once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import asyncpg
import msgspec
from prometheus_client import Counter
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from admission.recovery import rebuild
from waitroom.core.keys import Keys

log = logging.getLogger("waitroom.redis_restarts")

#: Seconds between two reads of the incarnation.
WATCH_EVERY_S = 0.5
#: Outbox rows published this recently are published again after a restart: well past the
#: second ``appendfsync everysec`` may lose, and a replica's usual lag.
REPUBLISH_S = 10.0
_ERROR_LOG_EVERY_S = 60.0

RECONCILES = Counter(
    "waitroom_redis_restarts_reconciled_total",
    "Redis restarts (or promotions) noticed, after which the passes' state was rebuilt from"
    " PostgreSQL and the outbox's last messages published again.",
)

_EVENTS = "SELECT DISTINCT event_id FROM queue_passes WHERE expires_at > now()"
_REPUBLISH = (
    "UPDATE outbox SET published_at = NULL WHERE published_at > now() - make_interval(secs => $1)"
    " AND NOT dead"
)


class Reconciled(msgspec.Struct, frozen=True):
    """What one reconcile after a restart did."""

    #: The incarnation reconciled (see :func:`incarnation`), and the one before it (None when
    #: Redis had none: empty, or never watched).
    incarnation: str
    previous: str | None
    #: Events rebuilt, and their passes written back.
    events: int
    passes: int
    #: Outbox rows to be published again.
    republished: int


async def incarnation(redis: Redis) -> str:
    """The run ids of the Redis deployment's primaries, sorted and joined by commas.

    A run id is new each time a Redis process starts, so this changes when any primary
    restarts or a replica is promoted in a primary's place.
    """
    if isinstance(redis, RedisCluster):
        # The cluster client knows its primaries once it has read the slot table.
        await redis.initialize()
        ids = [
            str((await redis.info("server", target_nodes=node))["run_id"])
            for node in redis.get_primaries()
        ]
    else:
        ids = [str((await redis.info("server"))["run_id"])]
    return ",".join(sorted(ids))


async def reconcile(
    db: asyncpg.Pool[Any],
    redis: Redis,
    keys: Keys,
    *,
    force: bool = False,
    republish_s: float = REPUBLISH_S,
    stop: asyncio.Event | None = None,
) -> Reconciled | None:
    """Reconcile Redis with PostgreSQL if it restarted since the last reconcile (or ``force``);
    None when it had not, or when ``stop`` was set before it was done (cut short between two
    events, it is done again by the next process: the incarnation is written last). Outbox
    rows published in the last ``republish_s`` are published again."""
    current = await incarnation(redis)
    stored = await redis.get(keys.redis_incarnation)
    previous = stored.decode() if isinstance(stored, bytes) else stored
    if previous == current and not force:
        return None
    events = [row["event_id"] for row in await db.fetch(_EVENTS)]
    passes = 0
    for event_id in events:
        if stop is not None and stop.is_set():
            return None
        passes += (await rebuild(db, redis, keys, event_id)).passes
    status = await db.execute(_REPUBLISH, republish_s)
    republished = int(status.split()[-1])
    await redis.set(keys.redis_incarnation, current)
    RECONCILES.inc()
    done = Reconciled(current, previous, len(events), passes, republished)
    log.warning(
        "redis restarted: its passes' state was rebuilt from PostgreSQL",
        extra=msgspec.structs.asdict(done),
    )
    return done


async def run_restart_watch(
    db: asyncpg.Pool[Any],
    redis: Redis,
    keys: Keys,
    stop: asyncio.Event,
    *,
    every_s: float = WATCH_EVERY_S,
    republish_s: float = REPUBLISH_S,
) -> None:
    """Run :func:`reconcile` every ``every_s`` until ``stop`` is set. Failures (Redis or
    PostgreSQL down, Redis still loading) are retried on the next turn, logged once a minute."""
    logged = 0.0
    while not stop.is_set():
        try:
            await reconcile(db, redis, keys, republish_s=republish_s, stop=stop)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if time.monotonic() - logged > _ERROR_LOG_EVERY_S:
                logged = time.monotonic()
                log.warning("checking for a redis restart failed", extra={"error": repr(exc)})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
