"""The outbox relay: publishes ``outbox`` rows to a Redis Stream, at least once.

Writers (the inventory actor's group commits, the payment workers) add an ``outbox`` row in
the same transaction as the change it announces. The relay claims unpublished rows in id
order (``FOR UPDATE SKIP LOCKED``, so several relays may run), adds each to the stream
``Keys.outbox`` with ``XADD``, and marks them ``published_at`` *in the same
transaction*.

Each message's fields: ``id`` (the outbox row id, the id consumers dedupe on), ``topic``,
``event_id``, ``payload`` (JSON text as stored) and ``created_at``.

At least once, never at most once: a relay that dies after ``XADD`` but before its commit
leaves the rows unpublished, and the next pass publishes them again under the same ``id``.

Failures:

- A row whose own ``XADD`` fails (Redis refuses that command) counts an attempt; at
  ``MAX_ATTEMPTS`` it moves to the dead-letter stream ``Keys.outbox_dead`` (with
  its ``attempts`` and last ``error``) and is marked ``dead``, so one poisoned message cannot
  block the rest.
- Redis being unreachable is nobody's message's fault: the whole batch rolls back with no
  attempt counted and the relay backs off, so an outage never dead-letters anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
import msgspec
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

from waitroom.core.keys import Keys

log = logging.getLogger("waitroom.outbox")

BATCH = 500
MAX_ATTEMPTS = 5
#: Approximate bound on the stream's length: consumers must keep up within this many messages.
STREAM_MAXLEN = 1_000_000


class OutboxRow(msgspec.Struct, frozen=True):
    """One message waiting to be published."""

    id: int
    event_id: str
    topic: str
    payload: str
    created_at: str
    attempts: int

    def fields(self) -> dict[FieldT, EncodableT]:
        """The stream entry's fields."""
        return {
            "id": str(self.id),
            "topic": self.topic,
            "event_id": self.event_id,
            "payload": self.payload,
            "created_at": self.created_at,
        }


#: Test-only fault hooks: ``before_publish(row)`` raising fails that row's publication (as
#: if Redis refused it); ``after_publish(rows)`` raising aborts the batch after XADD and
#: before the commit (a crash between publishing and marking).
BeforePublish = Callable[[OutboxRow], None]
AfterPublish = Callable[[Sequence[OutboxRow]], None]


async def relay_once(
    pool: asyncpg.Pool[Any],
    redis: Redis,
    keys: Keys,
    *,
    batch: int = BATCH,
    max_attempts: int = MAX_ATTEMPTS,
    before_publish: BeforePublish | None = None,
    after_publish: AfterPublish | None = None,
) -> int:
    """Publish one batch of unpublished rows; return how many rows it settled.

    Settled = published or dead-lettered. Rows that failed and will be retried are not
    counted. Raises when Redis or PostgreSQL is unreachable (nothing is marked then).
    """
    stream = keys.outbox
    dead_stream = keys.outbox_dead
    async with pool.acquire() as conn, conn.transaction():
        records = await conn.fetch(
            "SELECT id, event_id, topic, payload::text AS payload, created_at::text AS created_at,"
            " attempts FROM outbox WHERE published_at IS NULL AND NOT dead"
            " ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
            batch,
        )
        if not records:
            return 0
        rows = [OutboxRow(**dict(r)) for r in records]
        errors: dict[int, str] = {}
        to_send: list[OutboxRow] = []
        for row in rows:
            if before_publish is not None:
                try:
                    before_publish(row)
                except Exception as exc:
                    errors[row.id] = _describe(exc)
                    continue
            to_send.append(row)
        if to_send:
            # One round trip for the batch; raise_on_error=False gives a per-command outcome
            # (a refused XADD), while a lost connection still raises for the whole batch.
            async with redis.pipeline(transaction=False) as pipe:
                for row in to_send:
                    pipe.xadd(stream, row.fields(), maxlen=STREAM_MAXLEN, approximate=True)
                results = await pipe.execute(raise_on_error=False)
            for row, result in zip(to_send, results, strict=True):
                if isinstance(result, Exception):
                    if _is_outage(result):
                        raise result
                    errors[row.id] = _describe(result)
        published = [row.id for row in rows if row.id not in errors]
        if after_publish is not None:
            after_publish(rows)
        dead = await _record_failures(
            conn, redis, dead_stream, [r for r in rows if r.id in errors], errors, max_attempts
        )
        if published:
            await conn.execute(
                "UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[])", published
            )
    if errors:
        log.warning(
            "outbox rows failed to publish",
            extra={
                "failed": len(errors),
                "dead_lettered": dead,
                "first_error": next(iter(errors.values())),
            },
        )
    return len(published) + dead


async def _record_failures(
    conn: Any,
    redis: Redis,
    dead_stream: str,
    failed: list[OutboxRow],
    errors: dict[int, str],
    max_attempts: int,
) -> int:
    """Count the failed rows' attempts; dead-letter those out of attempts. Returns how many."""
    if not failed:
        return 0
    exhausted = [r for r in failed if r.attempts + 1 >= max_attempts]
    dead: list[int] = []
    if exhausted:
        try:
            async with redis.pipeline(transaction=False) as pipe:
                for row in exhausted:
                    entry: dict[FieldT, EncodableT] = {
                        **row.fields(),
                        "attempts": str(row.attempts + 1),
                        "error": errors[row.id][:1000],
                    }
                    pipe.xadd(dead_stream, entry, maxlen=STREAM_MAXLEN, approximate=True)
                results = await pipe.execute(raise_on_error=False)
            dead = [
                r.id
                for r, res in zip(exhausted, results, strict=True)
                if not isinstance(res, Exception)
            ]
        except redis_errors.RedisError as exc:  # retried next pass, still out of attempts
            log.warning("dead-lettering failed", extra={"error": repr(exc)})
    await conn.execute(
        "UPDATE outbox SET attempts = attempts + 1, dead = (id = ANY($2::bigint[]))"
        " WHERE id = ANY($1::bigint[])",
        [r.id for r in failed],
        dead,
    )
    for row_id in dead:
        log.error("outbox row dead-lettered", extra={"outbox_id": row_id, "error": errors[row_id]})
    return len(dead)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _is_outage(exc: BaseException) -> bool:
    return isinstance(exc, redis_errors.ConnectionError | redis_errors.TimeoutError | OSError)


async def run_relay(
    pool: asyncpg.Pool[Any],
    redis: Redis,
    keys: Keys,
    stop: asyncio.Event,
    *,
    interval_s: float = 0.1,
) -> None:
    """Relay until ``stop`` is set; the batch in progress always finishes (commit or rollback).

    A full batch is followed by the next at once (a backlog drains at full speed); otherwise
    the relay waits ``interval_s``. Outages are logged and retried with backoff.
    """
    failures = 0
    while not stop.is_set():
        try:
            # Shielded: a cancellation must not cut a batch between XADD and its commit
            # (harmless, it would be republished, but it would double messages for nothing).
            settled = await asyncio.shield(relay_once(pool, redis, keys))
            failures = 0
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failures += 1
            log.warning("outbox relay failed", extra={"error": repr(exc), "failures": failures})
            await _wait(stop, min(5.0, 0.1 * 2**failures))
            continue
        if settled < BATCH:
            await _wait(stop, interval_s)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
