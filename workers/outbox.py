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

Tasks: the workers act on some messages themselves
--------------------------------------------------

A row written with ``handle_after`` set (a timestamp, normally ``now()``) is also a task for
the outbox consumer (:func:`handle_once`, :func:`run_handlers`), which runs the handler of its
topic. The one topic with a handler is :data:`PASS_SPENT`, written by the payment workers in
the transaction that marks an order paid: its handler (:func:`pass_spent_handler`) marks the
queue pass spent and frees its admission slot in Redis (:func:`admission.operators.spend_pass`).
So whatever happens to Redis or to the process after that commit, the slot is freed once
Redis answers again, with no operator.

- Claiming a task pushes its ``handle_after`` ``lease_s`` ahead and counts a
  ``handle_attempts``: a consumer that dies mid-task leaves it to be claimed again after the
  lease, so handlers run at least once and must be idempotent (spending a pass twice is).
- Done: ``handled_at`` is set and ``handle_after`` goes back to NULL (off the partial index
  ``outbox_handle_due``), fenced by the claim's ``handle_attempts``.
- Failed (Redis down, or anything else): ``handle_after`` moves ahead by a full-jitter
  backoff (:data:`TASK_BASE_BACKOFF_S` doubling to :data:`TASK_MAX_BACKOFF_S`) and
  ``handle_error`` says why. A task is never dropped or dead-lettered: what it does must
  happen, so it is retried until it does, and logged as an error from
  :data:`TASK_LOUD_AFTER` attempts on, for an operator to look at.

Publishing and handling are independent: the relay publishes task rows like any other
(consumers of the stream see ``pass.spent`` too), whichever of the two comes first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import asyncpg
import msgspec
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

from admission.operators import spend_pass
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


# --- tasks: messages the workers act on themselves ------------------------------------------

#: Topic of the task written when an order is paid: the pass is spent (see the docstring).
PASS_SPENT = "pass.spent"
TASK_BATCH = 100
#: How long a claimed task is left to its consumer before another may claim it again.
TASK_LEASE_S = 30.0
TASK_BASE_BACKOFF_S = 0.25
TASK_MAX_BACKOFF_S = 10.0
#: Bound on one handler run; a slower one counts as failed (and is retried).
TASK_TIMEOUT_S = 10.0
#: Failures of one task after which each further one is logged as an error.
TASK_LOUD_AFTER = 10


class PassSpent(msgspec.Struct, frozen=True):
    """Payload of :data:`PASS_SPENT`: the order paid with the pass ``jti`` of ``fan_id``."""

    order_id: str
    fan_id: str
    jti: str


class OutboxTask(msgspec.Struct, frozen=True):
    """An outbox row claimed for its handler; ``attempts`` counts this claim."""

    id: int
    event_id: str
    topic: str
    payload: str
    attempts: int


#: Runs one task; raises to have it retried later. Must be idempotent (at least once).
Handler = Callable[[OutboxTask], Awaitable[object]]


def pass_spent_handler(redis: Redis, keys: Keys) -> Handler:
    """The handler of :data:`PASS_SPENT`: spend the pass in Redis (idempotent)."""

    async def spend(task: OutboxTask) -> None:
        message = msgspec.json.decode(task.payload, type=PassSpent)
        await spend_pass(redis, keys, task.event_id, message.jti)

    return spend


def task_backoff(
    attempts: int,
    rng: random.Random,
    *,
    base: float = TASK_BASE_BACKOFF_S,
    cap: float = TASK_MAX_BACKOFF_S,
) -> float:
    """Seconds until a task that failed ``attempts`` times is tried again (full jitter)."""
    return rng.random() * min(cap, base * 2.0 ** min(max(attempts, 1) - 1, 32))


_CLAIM_TASKS = """
WITH due AS (
    SELECT id FROM outbox
     WHERE handle_after <= now() AND topic = ANY($1::text[])
     ORDER BY handle_after LIMIT $2
     FOR UPDATE SKIP LOCKED)
UPDATE outbox o
   SET handle_after = now() + make_interval(secs => $3), handle_attempts = o.handle_attempts + 1
  FROM due WHERE o.id = due.id
RETURNING o.id, o.event_id, o.topic, o.payload::text AS payload, o.handle_attempts AS attempts
"""

# Both fenced by the claim: a consumer whose lease ran out writes nothing over the next claim.
_TASKS_DONE = """
UPDATE outbox o SET handle_after = NULL, handled_at = now(), handle_error = NULL
  FROM unnest($1::bigint[], $2::integer[]) AS d(id, attempts)
 WHERE o.id = d.id AND o.handle_attempts = d.attempts AND o.handle_after IS NOT NULL
"""
_TASKS_FAILED = """
UPDATE outbox o
   SET handle_after = now() + make_interval(secs => d.delay), handle_error = d.error
  FROM unnest($1::bigint[], $2::integer[], $3::float8[], $4::text[])
       AS d(id, attempts, delay, error)
 WHERE o.id = d.id AND o.handle_attempts = d.attempts AND o.handle_after IS NOT NULL
"""


async def handle_once(
    pool: asyncpg.Pool[Any],
    handlers: Mapping[str, Handler],
    *,
    batch: int = TASK_BATCH,
    lease_s: float = TASK_LEASE_S,
    timeout_s: float = TASK_TIMEOUT_S,
    base_backoff_s: float = TASK_BASE_BACKOFF_S,
    max_backoff_s: float = TASK_MAX_BACKOFF_S,
    rng: random.Random | None = None,
) -> tuple[int, int]:
    """Claim the due tasks of ``handlers``' topics (at most ``batch``), run them at once.

    Returns ``(done, failed)``. Raises only when PostgreSQL cannot be reached to claim; a
    failure to record the outcomes is logged, and the lease brings those tasks back.
    """
    if not handlers:
        return 0, 0
    rng = rng or random.Random()
    records = await pool.fetch(_CLAIM_TASKS, list(handlers), batch, lease_s)
    if not records:
        return 0, 0
    tasks = [OutboxTask(**dict(r)) for r in records]

    async def run(task: OutboxTask) -> None:
        async with asyncio.timeout(timeout_s):
            await handlers[task.topic](task)

    results = await asyncio.gather(*(run(t) for t in tasks), return_exceptions=True)
    done: list[OutboxTask] = []
    failed: list[tuple[OutboxTask, str]] = []
    for task, result in zip(tasks, results, strict=True):
        if isinstance(result, BaseException):
            failed.append((task, _describe(result)))
        else:
            done.append(task)
    try:
        if done:
            await pool.execute(_TASKS_DONE, [t.id for t in done], [t.attempts for t in done])
        if failed:
            await pool.execute(
                _TASKS_FAILED,
                [t.id for t, _ in failed],
                [t.attempts for t, _ in failed],
                [
                    task_backoff(t.attempts, rng, base=base_backoff_s, cap=max_backoff_s)
                    for t, _ in failed
                ],
                [error[:1000] for _, error in failed],
            )
    except Exception as exc:  # the lease brings them back; handlers are idempotent
        log.warning("could not record outbox task outcomes", extra={"error": repr(exc)})
    for task, error in failed:
        level = logging.ERROR if task.attempts >= TASK_LOUD_AFTER else logging.WARNING
        log.log(
            level,
            "outbox task failed; will retry",
            extra={
                "outbox_id": task.id,
                "topic": task.topic,
                "attempts": task.attempts,
                "error": error,
            },
        )
    return len(done), len(failed)


async def run_handlers(
    pool: asyncpg.Pool[Any],
    handlers: Mapping[str, Handler],
    stop: asyncio.Event,
    *,
    interval_s: float = 0.1,
    lease_s: float = TASK_LEASE_S,
    base_backoff_s: float = TASK_BASE_BACKOFF_S,
    max_backoff_s: float = TASK_MAX_BACKOFF_S,
) -> None:
    """Run due tasks until ``stop`` is set; outages of PostgreSQL are retried with backoff.

    A full batch is followed by the next at once; otherwise the consumer waits ``interval_s``
    (the longest a paid order's pass stays unspent while Redis is up).
    """
    rng = random.Random()
    failures = 0
    while not stop.is_set():
        try:
            done, failed = await asyncio.shield(
                handle_once(
                    pool,
                    handlers,
                    lease_s=lease_s,
                    base_backoff_s=base_backoff_s,
                    max_backoff_s=max_backoff_s,
                    rng=rng,
                )
            )
            failures = 0
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failures += 1
            log.warning("outbox consumer failed", extra={"error": repr(exc), "failures": failures})
            await _wait(stop, min(5.0, 0.1 * 2**failures))
            continue
        if done + failed < TASK_BATCH:
            await _wait(stop, interval_s)
