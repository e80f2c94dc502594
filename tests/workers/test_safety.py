"""The safety net releases lapsed holds through the event's actor when nobody hosts it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from inventory.hosting import InventoryHost
from tests.inventory.conftest import held_sold, make_event
from tests.workers.conftest import reserve
from waitroom.core.keys import Keys
from workers.safety import (
    OVERDUE_QUERY,
    REFUSAL_TTL_S,
    overdue_events,
    purge_idempotency,
    run_safety_net,
    sweep_once,
)

pytestmark = pytest.mark.anyio

GRACE_S = 0.5


async def orphaned_hold(pool: asyncpg.Pool[Any], redis: Redis, keys: Keys) -> tuple[str, str]:
    """An event with a 1 s hold whose actor stopped (lease released) before the deadline."""
    event_id = await make_event(pool, hold_ttl_s=1)
    owner = InventoryHost(pool, redis, keys, node_id="short-lived", lease_ttl_s=1.5)
    await owner.start()
    try:
        hold = await reserve(owner, event_id, "fan-s", 2)
    finally:
        await owner.stop()
    assert not await redis.exists(keys.event(event_id).owner)
    return event_id, hold.id


async def wait_until_overdue(pool: asyncpg.Pool[Any], hold_id: str) -> None:
    expires_at = await pool.fetchval("SELECT expires_at FROM holds WHERE id = $1", hold_id)
    await asyncio.sleep(max(0.0, expires_at.timestamp() + GRACE_S + 0.2 - time.time()))


async def status(pool: asyncpg.Pool[Any], hold_id: str) -> str:
    value: str = await pool.fetchval("SELECT status FROM holds WHERE id = $1", hold_id)
    return value


async def test_a_lapsed_hold_of_an_event_nobody_hosts_is_expired_by_its_actor(
    pool: asyncpg.Pool[Any], redis: Redis, keys: Keys
) -> None:
    event_id, hold_id = await orphaned_hold(pool, redis, keys)
    assert event_id not in await overdue_events(pool, grace_s=GRACE_S)  # not overdue yet
    await wait_until_overdue(pool, hold_id)
    assert await status(pool, hold_id) == "held"  # nobody expired it
    assert (await overdue_events(pool, grace_s=GRACE_S))[event_id] == 1
    swept = await sweep_once(pool, redis, keys, grace_s=GRACE_S)
    assert swept[event_id] == 1
    assert await status(pool, hold_id) == "expired"
    assert await held_sold(pool, event_id) == (0, 0, 20)
    # Written by the actor like any expiry: under a fresh fencing epoch, announced in the outbox.
    assert (
        await pool.fetchval("SELECT epoch FROM inventory_owners WHERE event_id = $1", event_id) == 2
    )
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM outbox WHERE event_id = $1 AND topic = 'hold.expired'", event_id
        )
        == 1
    )
    # The borrowed actor is let go, so the next checkout request hosts it where it runs.
    assert not await redis.exists(keys.event(event_id).owner)
    assert event_id not in await sweep_once(pool, redis, keys, grace_s=GRACE_S)


async def test_an_event_whose_actor_is_hosted_is_left_to_its_owner(
    pool: asyncpg.Pool[Any], redis: Redis, keys: Keys
) -> None:
    event_id, hold_id = await orphaned_hold(pool, redis, keys)
    await wait_until_overdue(pool, hold_id)
    await redis.set(keys.event(event_id).owner, "some-other-process", px=10_000)
    try:
        assert event_id not in await sweep_once(pool, redis, keys, grace_s=GRACE_S)
        assert await status(pool, hold_id) == "held"
    finally:
        await redis.delete(keys.event(event_id).owner)


async def test_the_sweep_can_use_the_processs_own_host(
    pool: asyncpg.Pool[Any], redis: Redis, keys: Keys, host: InventoryHost
) -> None:
    event_id, hold_id = await orphaned_hold(pool, redis, keys)
    await wait_until_overdue(pool, hold_id)
    assert event_id in await sweep_once(pool, redis, keys, host=host, grace_s=GRACE_S)
    assert await status(pool, hold_id) == "expired"
    assert host.owns(event_id)


async def test_the_safety_net_loop_sweeps_until_stopped(
    pool: asyncpg.Pool[Any], redis: Redis, keys: Keys
) -> None:
    _, hold_id = await orphaned_hold(pool, redis, keys)
    stop = asyncio.Event()
    loop = asyncio.create_task(
        run_safety_net(pool, redis, keys, stop, interval_s=0.2, grace_s=GRACE_S)
    )
    try:
        deadline = time.monotonic() + 30  # generous: shared CI machines stall
        while await status(pool, hold_id) != "expired":
            assert time.monotonic() < deadline, "the safety net never expired the hold"
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.wait_for(loop, 10)


async def test_the_sweep_query_uses_the_live_holds_index(pool: asyncpg.Pool[Any]) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")  # a tiny table would seq-scan
        rows = await conn.fetch("EXPLAIN " + OVERDUE_QUERY, 5.0, 1000)
    plan = "\n".join(r[0] for r in rows)
    assert "holds_live" in plan, plan


async def _keyed_rows(
    pool: asyncpg.Pool[Any], event_id: str, rows: list[tuple[str, int, float]]
) -> None:
    """Idempotency records ``(key, status, age in seconds)`` of one fan, as commits leave them."""
    await pool.executemany(
        "INSERT INTO idempotency_keys (event_id, fan_id, key, request_hash, status_code,"
        " response, created_at) VALUES ($1, 'fan', $2, 'h', $3, '{}',"
        " now() - make_interval(secs => $4))",
        [(event_id, key, code, age) for key, code, age in rows],
    )


async def test_idempotency_records_are_purged_by_age_refusals_sooner(
    pool: asyncpg.Pool[Any],
) -> None:
    event_id = await make_event(pool)
    day = 86_400.0
    await _keyed_rows(
        pool,
        event_id,
        [
            ("fresh-refusal", 409, 60),
            ("old-refusal", 409, REFUSAL_TTL_S + 60),
            ("old-success", 200, REFUSAL_TTL_S + 60),
            ("expired-success", 200, day + 60),
        ],
    )
    purged = await purge_idempotency(pool, ttl_s=day, batch=1)
    kept = await pool.fetch(
        "SELECT key FROM idempotency_keys WHERE event_id = $1 ORDER BY key", event_id
    )
    assert [r["key"] for r in kept] == ["fresh-refusal", "old-success"]
    assert purged >= 2


async def test_the_records_of_a_closed_event_are_purged(pool: asyncpg.Pool[Any]) -> None:
    event_id = await make_event(pool)
    await _keyed_rows(pool, event_id, [("k", 200, 1), ("r", 409, 1)])
    await purge_idempotency(pool, ttl_s=86_400)
    assert (
        await pool.fetchval("SELECT count(*) FROM idempotency_keys WHERE event_id = $1", event_id)
        == 2
    )
    await pool.execute("UPDATE events SET status = 'closed' WHERE id = $1", event_id)
    await purge_idempotency(pool, ttl_s=86_400)
    assert (
        await pool.fetchval("SELECT count(*) FROM idempotency_keys WHERE event_id = $1", event_id)
        == 0
    )


async def test_a_sweep_of_many_orphaned_events_hosts_one_at_a_time(
    pool: asyncpg.Pool[Any], redis: Redis, keys: Keys
) -> None:
    """More overdue events than a Redis client's pool has connections (redis-py's default is
    100): the temporary host lets go of each once its holds are expired. It used to host them
    all until the end, each with a connection blocked on its inbox, and ran out of them."""
    count = 130
    owner = InventoryHost(pool, redis, keys, node_id="short-lived", lease_ttl_s=1.5)
    await owner.start()
    holds: dict[str, str] = {}
    try:
        for _ in range(count):
            event_id = await make_event(pool, hold_ttl_s=1)
            holds[event_id] = (await reserve(owner, event_id, "fan-s", 1)).id
            await owner.let_go(event_id)
            assert not owner.owns(event_id)
    finally:
        await owner.stop()
    for hold_id in holds.values():
        await wait_until_overdue(pool, hold_id)
    swept = await sweep_once(pool, redis, keys, grace_s=GRACE_S)
    assert set(holds) <= set(swept)
    statuses = await pool.fetch(
        "SELECT status FROM holds WHERE id = ANY($1::uuid[])", list(holds.values())
    )
    assert {r["status"] for r in statuses} == {"expired"}
    assert not any([await redis.exists(keys.event(e).owner) for e in holds])
