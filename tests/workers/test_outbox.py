"""The outbox relay on real PostgreSQL and Redis: at least once, same id, dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import msgspec
import pytest
from redis.asyncio import Redis

from waitroom.core.keys import Keys
from workers.outbox import (
    MAX_ATTEMPTS,
    PASS_SPENT,
    OutboxRow,
    OutboxTask,
    PassSpent,
    handle_once,
    pass_spent_handler,
    relay_once,
    run_relay,
)

pytestmark = pytest.mark.anyio


class Crash(Exception):
    """The relay process dying between publishing and marking."""


@pytest.fixture
async def stream_keys(pool: asyncpg.Pool[Any], redis: Redis, keys: Keys) -> AsyncIterator[Keys]:
    """Keys of streams private to this test, after the rows other tests left are published.

    Their prefix lies under the run's (``<run prefix>:s<n>:outbox``), so the run's cleanup finds
    them even if this fixture cannot delete them (the streams have no TTL).
    """
    while await relay_once(pool, redis, keys):
        pass
    private = Keys(f"{keys.prefix}:s{uuid.uuid4().hex[:8]}")
    try:
        yield private
    finally:
        await redis.delete(private.outbox, private.outbox_dead)


async def add_rows(pool: asyncpg.Pool[Any], event_id: str, n: int) -> list[int]:
    rows = await pool.fetch(
        "INSERT INTO outbox (event_id, topic, payload)"
        " SELECT $1, 'test.topic', json_build_object('n', g) FROM generate_series(1, $2) g"
        " RETURNING id",
        event_id,
        n,
    )
    return [r["id"] for r in rows]


async def messages(redis: Redis, stream: str) -> list[dict[str, str]]:
    entries: Any = await redis.xrange(stream)
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


async def test_rows_are_published_once_with_their_id_topic_and_payload(
    pool: asyncpg.Pool[Any], redis: Redis, stream_keys: Keys
) -> None:
    event_id = f"ob-{uuid.uuid4().hex[:8]}"
    ids = await add_rows(pool, event_id, 3)
    assert await relay_once(pool, redis, stream_keys) == 3
    sent = await messages(redis, stream_keys.outbox)
    assert [int(m["id"]) for m in sent] == ids
    assert {m["topic"] for m in sent} == {"test.topic"}
    assert {m["event_id"] for m in sent} == {event_id}
    assert [msgspec.json.decode(m["payload"]) for m in sent] == [{"n": 1}, {"n": 2}, {"n": 3}]
    unpublished = await pool.fetchval(
        "SELECT count(*) FROM outbox WHERE id = ANY($1::bigint[]) AND published_at IS NULL", ids
    )
    assert unpublished == 0
    assert await relay_once(pool, redis, stream_keys) == 0  # nothing twice


async def test_a_crash_between_publishing_and_marking_republishes_with_the_same_id(
    pool: asyncpg.Pool[Any], redis: Redis, stream_keys: Keys
) -> None:
    event_id = f"ob-{uuid.uuid4().hex[:8]}"
    ids = await add_rows(pool, event_id, 2)

    def crash(rows: Sequence[OutboxRow]) -> None:
        raise Crash

    with pytest.raises(Crash):
        await relay_once(pool, redis, stream_keys, after_publish=crash)
    stream = stream_keys.outbox
    assert [int(m["id"]) for m in await messages(redis, stream)] == ids  # published...
    still = await pool.fetchval(
        "SELECT count(*) FROM outbox WHERE id = ANY($1::bigint[]) AND published_at IS NULL", ids
    )
    assert still == 2  # ...but not marked
    assert await relay_once(pool, redis, stream_keys) == 2
    sent = await messages(redis, stream)
    assert [int(m["id"]) for m in sent] == ids + ids  # at least once: again, same ids
    assert {m["id"] for m in sent} == {str(i) for i in ids}  # a consumer dedupes to one each


async def test_a_row_redis_keeps_refusing_is_dead_lettered_after_five_attempts(
    pool: asyncpg.Pool[Any], redis: Redis, stream_keys: Keys
) -> None:
    event_id = f"ob-{uuid.uuid4().hex[:8]}"
    ids = await add_rows(pool, event_id, 2)
    stream = stream_keys.outbox
    await redis.set(stream, "not a stream")  # every XADD to it fails with WRONGTYPE
    for attempt in range(1, 5):
        assert await relay_once(pool, redis, stream_keys) == 0
        rows = await pool.fetch(
            "SELECT attempts, dead, published_at FROM outbox WHERE id = ANY($1::bigint[])", ids
        )
        assert all(r["attempts"] == attempt and not r["dead"] for r in rows)
    assert await relay_once(pool, redis, stream_keys) == 2
    rows = await pool.fetch(
        "SELECT attempts, dead, published_at FROM outbox WHERE id = ANY($1::bigint[])", ids
    )
    assert all(r["attempts"] == 5 and r["dead"] and r["published_at"] is None for r in rows)
    dead = await messages(redis, stream_keys.outbox_dead)
    assert [int(m["id"]) for m in dead] == ids
    assert all(m["attempts"] == "5" and "WRONGTYPE" in m["error"] for m in dead)
    assert await relay_once(pool, redis, stream_keys) == 0  # dead rows are not retried


async def test_one_poisoned_message_does_not_hold_up_the_others(
    pool: asyncpg.Pool[Any], redis: Redis, stream_keys: Keys
) -> None:
    event_id = f"ob-{uuid.uuid4().hex[:8]}"
    ids = await add_rows(pool, event_id, 3)
    poisoned = ids[1]

    def refuse(row: OutboxRow) -> None:
        if row.id == poisoned:
            raise ValueError("poisoned payload")

    assert await relay_once(pool, redis, stream_keys, before_publish=refuse) == 2
    for _ in range(4):
        await relay_once(pool, redis, stream_keys, before_publish=refuse)
    sent = await messages(redis, stream_keys.outbox)
    assert [int(m["id"]) for m in sent] == [ids[0], ids[2]]
    dead = await messages(redis, stream_keys.outbox_dead)
    assert [int(m["id"]) for m in dead] == [poisoned]
    assert "poisoned payload" in dead[0]["error"]


async def test_the_relay_loop_publishes_new_rows_and_stops_when_asked(
    pool: asyncpg.Pool[Any], redis: Redis, stream_keys: Keys
) -> None:
    stop = asyncio.Event()
    loop = asyncio.create_task(run_relay(pool, redis, stream_keys, stop, interval_s=0.05))
    try:
        event_id = f"ob-{uuid.uuid4().hex[:8]}"
        ids = await add_rows(pool, event_id, 4)
        stream = stream_keys.outbox
        for _ in range(200):
            if {int(m["id"]) for m in await messages(redis, stream)} >= set(ids):
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the relay did not publish the rows")
    finally:
        stop.set()
        await asyncio.wait_for(loop, 5)


# --- tasks: rows the workers act on themselves --------------------------------------------


async def add_task(pool: asyncpg.Pool[Any], topic: str) -> int:
    row_id: int = await pool.fetchval(
        "INSERT INTO outbox (event_id, topic, payload, handle_after)"
        " VALUES ($1, $2, '{}', now()) RETURNING id",
        f"ob-{uuid.uuid4().hex[:8]}",
        topic,
    )
    return row_id


async def task_row(pool: asyncpg.Pool[Any], row_id: int) -> asyncpg.Record:
    row: asyncpg.Record | None = await pool.fetchrow(
        "SELECT handle_after, handled_at, handle_attempts, handle_error, dead,"
        " handle_after - now() AS wait FROM outbox WHERE id = $1",
        row_id,
    )
    assert row is not None
    return row


async def test_a_failing_task_is_retried_with_backoff_and_never_given_up(
    pool: asyncpg.Pool[Any],
) -> None:
    topic = f"test.task.{uuid.uuid4().hex[:8]}"
    row_id = await add_task(pool, topic)
    seen: list[int] = []
    failing = True

    async def handler(task: OutboxTask) -> None:
        seen.append(task.attempts)
        if failing:
            raise ConnectionError("Redis is down")

    handlers = {topic: handler}
    for attempt in range(1, MAX_ATTEMPTS + 4):  # past the relay's dead-letter limit
        assert await handle_once(pool, handlers, base_backoff_s=30, max_backoff_s=60) == (0, 1)
        row = await task_row(pool, row_id)
        assert row["handle_attempts"] == attempt and row["handled_at"] is None
        assert "Redis is down" in row["handle_error"] and not row["dead"]
        # Full jitter under a ceiling that doubles: never before now, never past the cap.
        ceiling = min(60.0, 30.0 * 2 ** (attempt - 1))
        assert 0 <= row["wait"].total_seconds() <= ceiling
        assert await handle_once(pool, handlers) == (0, 0)  # not due yet
        await pool.execute("UPDATE outbox SET handle_after = now() WHERE id = $1", row_id)
    failing = False
    assert await handle_once(pool, handlers) == (1, 0)
    row = await task_row(pool, row_id)
    assert row["handled_at"] is not None and row["handle_after"] is None
    assert row["handle_error"] is None
    assert seen == list(range(1, MAX_ATTEMPTS + 5))
    assert await handle_once(pool, handlers) == (0, 0)  # done once


async def test_a_task_whose_consumer_died_is_run_again_after_the_lease(
    pool: asyncpg.Pool[Any],
) -> None:
    topic = f"test.task.{uuid.uuid4().hex[:8]}"
    row_id = await add_task(pool, topic)
    started = asyncio.Event()

    async def hangs(task: OutboxTask) -> None:
        started.set()
        await asyncio.sleep(3600)

    dying = asyncio.create_task(handle_once(pool, {topic: hangs}, lease_s=0.3))
    await asyncio.wait_for(started.wait(), 5)
    dying.cancel()  # the consumer dies with the task claimed and nothing recorded
    with contextlib.suppress(asyncio.CancelledError):
        await dying
    ran: list[int] = []

    async def works(task: OutboxTask) -> None:
        ran.append(task.attempts)

    assert await handle_once(pool, {topic: works}) == (0, 0)  # still leased
    await asyncio.sleep(0.4)
    assert await handle_once(pool, {topic: works}) == (1, 0)
    assert ran == [2]
    assert (await task_row(pool, row_id))["handled_at"] is not None


async def test_pass_spent_frees_the_slot_and_marks_the_pass_idempotently(
    pool: asyncpg.Pool[Any], redis: Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Watched, not replaced: a thread started on the way (redis-py's cluster transactions run
    # each queued command in a thread of its own, stalling the event loop) fails the test.
    started: list[threading.Thread] = []
    start = threading.Thread.start

    def watched_start(thread: threading.Thread) -> None:
        started.append(thread)
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", watched_start)
    event_id = f"ob-{uuid.uuid4().hex[:8]}"
    jti = f"jti-{uuid.uuid4().hex}"
    await redis.zadd(keys.event(event_id).active, {jti: 1e12})
    payload = msgspec.json.encode(PassSpent("order-1", "fan-1", jti)).decode()
    handler = pass_spent_handler(redis, keys)
    task = OutboxTask(id=0, event_id=event_id, topic=PASS_SPENT, payload=payload, attempts=1)
    for _ in range(2):  # at least once: a second run changes nothing
        await handler(task)
        assert await redis.get(keys.event(event_id).spent_pass(jti)) == b"1"
        assert await redis.zscore(keys.event(event_id).active, jti) is None
        assert 0 < await redis.ttl(keys.event(event_id).spent_pass(jti)) <= 86_400
    assert not started, started
