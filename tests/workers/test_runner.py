"""``waitroom workers`` as a real process: it pays orders, and SIGTERM stops it cleanly."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
from redis.asyncio import Redis

from inventory.hosting import InventoryHost
from inventory.orders import start_payment
from tests.harness import ROOT, ServerThread
from tests.inventory.conftest import make_event
from tests.workers.conftest import reserve
from waitroom.core.keys import Keys
from waitroom.core.settings import Settings, settings_env

pytestmark = pytest.mark.anyio


@pytest.fixture
def workers(settings: Settings, provider: ServerThread) -> Iterator[subprocess.Popen[str]]:
    """The console script, with its logs at info, talking to the test's provider."""
    env = {
        **settings_env(settings),
        "WAITROOM_PAYMENT_URL": provider.url,
        "WAITROOM_LOG_LEVEL": "info",
    }
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("waitroom")), "workers"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
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
    deadline = time.monotonic() + 20
    assert workers.stderr is not None
    # Wait until it runs (signal handlers installed) before interrupting it.
    while True:
        line = workers.stderr.readline()
        assert line, "the workers exited before starting"
        if '"workers started"' in line:
            break
        assert time.monotonic() < deadline
    workers.send_signal(signal.SIGINT)
    _, stderr = workers.communicate(timeout=30)
    assert workers.returncode == 0, stderr
