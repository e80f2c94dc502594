"""``waitroom workers`` as a real process: it pays orders, and SIGTERM stops it cleanly."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import msgspec
import pytest
from redis.asyncio import Redis

from inventory.hosting import InventoryHost
from inventory.orders import start_payment
from tests.harness import ServerThread
from tests.inventory.conftest import make_event
from tests.workers.conftest import reserve, spawn_workers, wait_until_started
from waitroom.core.keys import Keys
from waitroom.core.settings import Settings

pytestmark = pytest.mark.anyio


@pytest.fixture
def workers(settings: Settings, provider: ServerThread) -> Iterator[subprocess.Popen[str]]:
    """The console script, with its logs at info, talking to the test's provider."""
    proc = spawn_workers(settings, provider)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


def log_lines(stderr: str) -> list[dict[str, Any]]:
    return [msgspec.json.decode(line) for line in stderr.splitlines() if line.startswith("{")]


async def test_the_workers_process_pays_an_order_and_exits_0_on_sigterm(
    workers: subprocess.Popen[str], pool: asyncpg.Pool[Any], redis: Redis, keys: Keys
) -> None:
    event_id = await make_event(pool)
    # The hold is made by a short-lived host that lets go of the event, as a server that
    # restarted would; the workers process then hosts the actor to confirm the payment.
    owner = InventoryHost(pool, redis, keys, node_id="runner-test", lease_ttl_s=1.5)
    await owner.start()
    jti = f"jti-{uuid.uuid4().hex}"
    await redis.zadd(keys.event(event_id).active, {jti: time.time() + 600})
    try:
        hold = await reserve(owner, event_id, "fan-r", 2, jti=jti)
    finally:
        await owner.stop()
    async with pool.acquire() as conn:
        order_id, payment_id = await start_payment(conn, hold.id, "fan-r", "card_ok")
    deadline = time.monotonic() + 30
    while (
        await pool.fetchval("SELECT state FROM payments WHERE id = $1", payment_id) != "succeeded"
    ):
        assert workers.poll() is None, workers.communicate()[1]
        assert time.monotonic() < deadline, "the workers never paid the order"
        await asyncio.sleep(0.1)
    assert await pool.fetchval("SELECT count(*) FROM tickets WHERE order_id = $1", order_id) == 2
    # The outbox consumer spends the pass: its slot is freed and it cannot reserve again.
    while await redis.get(keys.event(event_id).spent_pass(jti)) != b"1":
        assert time.monotonic() < deadline, "the workers never spent the pass"
        await asyncio.sleep(0.05)
    assert await redis.zscore(keys.event(event_id).active, jti) is None

    workers.send_signal(signal.SIGTERM)
    _, stderr = await asyncio.to_thread(workers.communicate, timeout=30)
    assert workers.returncode == 0, stderr
    messages = [entry["msg"] for entry in log_lines(stderr)]
    assert "workers started" in messages
    started = next(entry for entry in log_lines(stderr) if entry["msg"] == "workers started")
    assert set(started["loops"]) == {
        "payments",
        "refunds",
        "reconcile",
        "outbox",
        "outbox-tasks",
        "safety-net",
        "redis-restarts",
        "backlog",
    }
    assert "signal received; shutting down" in messages
    assert messages[-1] == "workers stopped"
    assert not any(entry["level"] == "error" for entry in log_lines(stderr)), stderr


def test_sigint_stops_the_workers_too(workers: subprocess.Popen[str]) -> None:
    # Wait until it runs (signal handlers installed) before interrupting it.
    wait_until_started(workers)
    workers.send_signal(signal.SIGINT)
    _, stderr = workers.communicate(timeout=30)
    assert workers.returncode == 0, stderr
    # Every loop returned by itself: none had to be cancelled after the grace.
    assert not any(entry["level"] == "error" for entry in log_lines(stderr)), stderr


async def test_a_long_sweep_or_rebuild_stops_at_once_on_sigint(
    pool: asyncpg.Pool[Any], settings: Settings, provider: ServerThread
) -> None:
    # A database with many events to sweep (lapsed holds nobody hosts) and to rebuild after a
    # first look at Redis (unexpired passes), as a long-lived deployment, or the test suite's
    # own database, has: the safety net and the restart watch must notice the stop between
    # events instead of finishing every event first.
    events = [await make_event(pool) for _ in range(300)]
    try:
        await _stop_while_sweeping(pool, settings, provider, events)
    finally:
        # Gone for the tests after this one, which share the database: nothing to sweep or
        # rebuild in these events any more (each had that one hold).
        await pool.execute(
            "UPDATE queue_passes SET expires_at = now() WHERE event_id = ANY($1)", events
        )
        await pool.execute(
            "UPDATE holds SET status = 'expired' WHERE event_id = ANY($1) AND status = 'held'",
            events,
        )
        await pool.execute("UPDATE ticket_types SET held = 0 WHERE event_id = ANY($1)", events)


async def _stop_while_sweeping(
    pool: asyncpg.Pool[Any], settings: Settings, provider: ServerThread, events: list[str]
) -> None:
    for event_id in events:
        await pool.execute(
            "INSERT INTO holds (id, event_id, ticket_type, fan_id, quantity, status, expires_at)"
            " VALUES ($1, $2, 'ga', 'fan-lapsed', 1, 'held', now() - interval '1 hour')",
            uuid.uuid4(),
            event_id,
        )
        await pool.execute("UPDATE ticket_types SET held = held + 1 WHERE event_id = $1", event_id)
        await pool.execute(
            "INSERT INTO queue_passes (jti, event_id, fan_id, seq, issued_at, expires_at)"
            " VALUES ($1, $2, 'fan-waiting', 1, now(), now() + interval '1 hour')",
            f"jti-{uuid.uuid4().hex}",
            event_id,
        )
    proc = spawn_workers(settings, provider)
    try:
        await asyncio.to_thread(wait_until_started, proc)
        proc.send_signal(signal.SIGINT)
        stopped_at = time.monotonic()
        _, stderr = await asyncio.to_thread(proc.communicate, timeout=30)
        took = time.monotonic() - stopped_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, stderr
    assert not any(entry["level"] == "error" for entry in log_lines(stderr)), stderr
    assert took < 5, f"stopping took {took:.1f} s"
    # The sweep ended with the event in hand when the signal came, not with all 300.
    messages = [entry["msg"] for entry in log_lines(stderr)]
    after = messages[messages.index("signal received; shutting down") :]
    assert after.count("expired lapsed holds") <= 1, after
