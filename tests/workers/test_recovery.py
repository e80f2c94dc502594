"""Nothing dropped after a commit: a pass spent after Redis comes back, payments taken over.

Real PostgreSQL, real Redis (a private ``redis-server`` where it must die), real inventory
actors and the mock provider over HTTP; the ``waitroom workers`` process is killed with
SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from inventory.hosting import InventoryHost
from inventory.orders import order_history, start_payment
from stress.private_services import PrivateRedis
from tests.harness import ServerThread
from tests.inventory.conftest import make_event
from tests.workers.conftest import (
    Control,
    make_payments,
    payment,
    reserve,
    settle,
    spawn_workers,
    stats,
)
from waitroom.core.keys import Keys
from waitroom.core.settings import Settings
from workers.outbox import PASS_SPENT, pass_spent_handler, run_handlers

pytestmark = pytest.mark.anyio


@pytest.fixture
def redis_server() -> Iterator[PrivateRedis]:
    """A ``redis-server`` of this test's own, which it may kill -9 and start again.

    Append-only with ``fsync always``, so a restart after SIGKILL has every write back (the
    admission slot that must be freed is still there). Only its own pid is ever signalled.
    """
    with PrivateRedis(appendonly=True, extra=["--appendfsync", "always"]) as server:
        yield server


async def begin(pool: asyncpg.Pool[Any], hold_id: str, fan_id: str) -> tuple[str, str]:
    async with pool.acquire() as conn:
        return await start_payment(conn, hold_id, fan_id, "card_ok")


async def eventually(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def test_an_order_paid_while_redis_is_down_spends_its_pass_once_redis_is_back(
    pool: asyncpg.Pool[Any],
    host: InventoryHost,
    http: httpx.AsyncClient,
    control: Control,
    keys: Keys,
    redis_server: PrivateRedis,
) -> None:
    event_id = await make_event(pool)
    jti = f"jti-{uuid.uuid4().hex}"
    live = keys.event(event_id)
    redis = Redis.from_url(redis_server.url, socket_timeout=1, socket_connect_timeout=1)
    stop = asyncio.Event()
    consumer: asyncio.Task[None] | None = None
    try:
        # The fan's pass counts against max_active while the fan shops.
        await redis.zadd(live.active, {jti: time.time() + 600})
        hold = await reserve(host, event_id, "fan-down", 2, jti=jti)
        order_id, payment_id = await begin(pool, hold.id, "fan-down")
        consumer = asyncio.create_task(
            run_handlers(
                pool,
                {PASS_SPENT: pass_spent_handler(redis, keys)},
                stop,
                interval_s=0.05,
                base_backoff_s=0.1,
                max_backoff_s=1.0,
            )
        )
        redis_server.kill()

        # The order is paid: PostgreSQL alone decides that.
        row = await settle(make_payments(pool, host, http), pool, payment_id)
        assert row["state"] == "succeeded"
        task_sql = (
            "SELECT handle_after, handled_at, handle_attempts, handle_error FROM outbox"
            " WHERE event_id = $1 AND topic = 'pass.spent'"
        )

        async def tried_and_failed() -> bool:
            task = await pool.fetchrow(task_sql, event_id)
            return task is not None and task["handle_attempts"] >= 2

        await eventually(tried_and_failed, 15, "the consumer never tried the task")
        task = await pool.fetchrow(task_sql, event_id)
        assert task is not None
        assert task["handled_at"] is None and task["handle_after"] is not None
        assert "ConnectionError" in task["handle_error"]

        # Redis comes back with its data (the slot still counted): no operator does anything.
        redis_server.start()

        async def handled() -> bool:
            return bool(
                await pool.fetchval(
                    "SELECT handled_at IS NOT NULL FROM outbox"
                    " WHERE event_id = $1 AND topic = 'pass.spent'",
                    event_id,
                )
            )

        await eventually(handled, 15, "the pass was never spent after Redis came back")
        assert await redis.get(keys.event(event_id).spent_pass(jti)) == b"1"
        assert await redis.zscore(live.active, jti) is None
        task = await pool.fetchrow(task_sql, event_id)
        assert task is not None and task["handle_after"] is None and task["handle_error"] is None
    finally:
        stop.set()
        if consumer is not None:
            await asyncio.wait_for(consumer, 10)
        await redis.aclose()
    assert (await stats(http))["captured_by_reference"][order_id] == 1


async def test_a_stalled_worker_is_taken_over_and_cannot_write_when_it_comes_back(
    pool: asyncpg.Pool[Any], host: InventoryHost, http: httpx.AsyncClient, control: Control
) -> None:
    event_id = await make_event(pool)
    hold = await reserve(host, event_id, "fan-stall", 2)
    order_id, payment_id = await begin(pool, hold.id, "fan-stall")
    await control(latency_ms=3000)  # every provider request takes 3 s
    # The stalled worker runs the attempt with no heartbeat (its pool's loop is stuck).
    stalled = make_payments(pool, host, http, timeout_s=10)
    (claim,) = [c for c in await stalled.claim(100) if c.id == payment_id]
    claimed_at = time.monotonic()
    stalled_attempt = asyncio.create_task(stalled.process(claim))
    survivor = make_payments(pool, host, http, timeout_s=10, heartbeat_timeout_s=1.0)
    stop = asyncio.Event()
    runner = asyncio.create_task(survivor.run(stop))
    try:

        async def taken_over() -> bool:
            return int((await payment(pool, payment_id))["attempts"]) == 2

        await eventually(taken_over, 10, "nobody took the payment over")
        assert time.monotonic() - claimed_at < 3.0  # 1 s heartbeat timeout, not 30 s
        # The stalled worker gets its charge answered and confirms, but cannot write.
        assert await asyncio.wait_for(stalled_attempt, 15) == "lost"

        async def paid() -> bool:
            return bool((await payment(pool, payment_id))["state"] == "succeeded")

        await eventually(paid, 15, "the survivor never paid the order")
    finally:
        stop.set()
        await asyncio.wait_for(runner, 15)
    assert await pool.fetchval("SELECT count(*) FROM tickets WHERE order_id = $1", order_id) == 2
    numbers = await stats(http)
    assert numbers["captured_by_reference"][order_id] == 1
    assert numbers["attempts"][f"{order_id}:1"] == 2  # the same key twice: charged once
    async with pool.acquire() as conn:
        kinds = [e.kind for e in await order_history(conn, order_id)]
    assert kinds == ["payment.started", "payment.succeeded"]


@pytest.fixture
def workers_process(settings: Settings, provider: ServerThread) -> Iterator[subprocess.Popen[str]]:
    """``waitroom workers`` as its own process, to be killed with SIGKILL."""
    proc = spawn_workers(
        settings, provider, stdout=subprocess.DEVNULL, WAITROOM_PAYMENT_TIMEOUT_S="30"
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)


async def test_a_killed_workers_process_has_its_payment_taken_over_within_seconds(
    workers_process: subprocess.Popen[str],
    pool: asyncpg.Pool[Any],
    host: InventoryHost,
    http: httpx.AsyncClient,
    control: Control,
) -> None:
    event_id = await make_event(pool)
    hold = await reserve(host, event_id, "fan-kill", 1)
    await control(latency_ms=4000)  # the workers process is mid-charge when it dies
    order_id, payment_id = await begin(pool, hold.id, "fan-kill")

    async def processing() -> bool:
        assert workers_process.poll() is None, workers_process.communicate()[1]
        return bool((await payment(pool, payment_id))["state"] == "processing")

    await eventually(processing, 30, "the workers process never claimed the payment")
    await asyncio.sleep(1.0)  # heartbeating, its charge in flight
    os.kill(workers_process.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    workers_process.wait(10)

    survivor = make_payments(pool, host, http, timeout_s=10, heartbeat_timeout_s=4.0)
    stop = asyncio.Event()
    runner = asyncio.create_task(survivor.run(stop))
    try:

        async def taken_over() -> bool:
            row = await payment(pool, payment_id)
            return int(row["attempts"]) >= 2

        await eventually(taken_over, 15, "nobody took the payment over")
        took = time.monotonic() - killed_at
        assert took < 10, f"taken over after {took:.1f} s"

        async def paid() -> bool:
            return bool((await payment(pool, payment_id))["state"] == "succeeded")

        await eventually(paid, 20, "the order was never paid")
    finally:
        stop.set()
        await asyncio.wait_for(runner, 15)
    row = await payment(pool, payment_id)
    assert row["attempts"] == 2 and row["last_error"] is None
    assert await pool.fetchval("SELECT status FROM orders WHERE id = $1", order_id) == "paid"
    assert await pool.fetchval("SELECT count(*) FROM tickets WHERE order_id = $1", order_id) == 1
    numbers = await stats(http)
    assert numbers["captured_by_reference"][order_id] == 1
    assert numbers["attempts"][f"{order_id}:1"] == 2  # the same key twice: charged once


async def test_a_long_provider_call_keeps_heartbeating_and_is_never_taken_over(
    pool: asyncpg.Pool[Any], host: InventoryHost, http: httpx.AsyncClient, control: Control
) -> None:
    event_id = await make_event(pool)
    hold = await reserve(host, event_id, "fan-slow", 1)
    order_id, payment_id = await begin(pool, hold.id, "fan-slow")
    await control(latency_ms=3000)  # three heartbeat timeouts
    working = make_payments(pool, host, http, timeout_s=10, heartbeat_timeout_s=1.0)
    other = make_payments(pool, host, http, heartbeat_timeout_s=1.0)
    attempt = asyncio.create_task(working.run_once())
    while not attempt.done():  # another worker looks for stalled payments all along
        await other.recover_stale()
        await asyncio.sleep(0.1)
    # Had it been taken for stalled, its claim would have been fenced off ("lost").
    assert (await attempt)[payment_id] == "succeeded"
    row = await payment(pool, payment_id)
    assert row["state"] == "succeeded" and row["attempts"] == 1
    assert (await stats(http))["attempts"][f"{order_id}:1"] == 1
