"""Fixtures of the worker tests: the mock provider on port 0, clients, an inventory host."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from inventory.hosting import InventoryHost
from inventory.ledger import Hold, Reserve, Reserved
from tests.harness import ROOT, ServerThread
from waitroom.core.keys import Keys
from waitroom.core.settings import Settings, settings_env
from workers import mock_provider
from workers.payments import PaymentPool

#: Sets the provider's behaviour for the rest of the test (fields of mock_provider.Control).
Control = Callable[..., Awaitable[None]]


@pytest.fixture(scope="module")
def provider() -> Iterator[ServerThread]:
    """The mock payment provider, a real HTTP server on a free port."""
    server = ServerThread(mock_provider.create_app()).start()
    try:
        yield server
    finally:
        server.stop()


def spawn_workers(
    settings: Settings, provider: ServerThread, *, stdout: int = subprocess.PIPE, **env: str
) -> subprocess.Popen[str]:
    """``waitroom workers`` as its own process (the console script), logging at info to its
    piped stderr, paying through the test's provider; ``env``: more settings."""
    return subprocess.Popen(
        [str(Path(sys.executable).with_name("waitroom")), "workers"],
        env={
            **settings_env(settings),
            "WAITROOM_PAYMENT_URL": provider.url,
            "WAITROOM_LOG_LEVEL": "info",
            **env,
        },
        cwd=ROOT,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until_started(proc: subprocess.Popen[str], within_s: float = 20) -> None:
    """Read the process's log until it says its loops run (its signal handlers are set)."""
    assert proc.stderr is not None
    deadline = time.monotonic() + within_s
    while True:
        line = proc.stderr.readline()
        assert line, "the workers exited before starting"
        if '"workers started"' in line:
            return
        assert time.monotonic() < deadline, "the workers did not start in time"


@pytest.fixture
def keys(settings: Settings) -> Keys:
    return Keys(settings.redis_prefix)


@pytest.fixture
async def host(pool: asyncpg.Pool[Any], redis: Redis, keys: Keys) -> AsyncIterator[InventoryHost]:
    """An inventory host, as the workers process has one."""
    h = InventoryHost(pool, redis, keys, node_id=f"test-{uuid.uuid4().hex[:8]}", lease_ttl_s=1.5)
    await h.start()
    try:
        yield h
    finally:
        await h.stop()


@pytest.fixture
async def http(provider: ServerThread) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the provider, as the payment pool uses one."""
    async with httpx.AsyncClient(base_url=provider.url, timeout=10) as client:
        yield client


@pytest.fixture
async def control(http: httpx.AsyncClient) -> AsyncIterator[Control]:
    """Set the provider's behaviour; it goes back to the defaults after the test."""

    async def set_control(**fields: Any) -> None:
        response = await http.post("/v1/control", json=fields)
        assert response.status_code == 200, response.text

    await set_control()
    try:
        yield set_control
    finally:
        await set_control()


def make_payments(
    pool: asyncpg.Pool[Any], host: InventoryHost, http: httpx.AsyncClient, **overrides: Any
) -> PaymentPool:
    """A payment pool with test-sized timeouts and backoff (fast, still exponential)."""
    options: dict[str, Any] = {
        "timeout_s": 0.5,
        "base_backoff_s": 0.02,
        "max_backoff_s": 0.1,
        "poll_s": 0.05,
    }
    options.update(overrides)
    return PaymentPool(pool, host, http, **options)


async def reserve(
    host: InventoryHost, event_id: str, fan_id: str, quantity: int = 1, jti: str | None = None
) -> Hold:
    """A new hold for ``fan_id`` through the event's actor."""
    result = await host.ask(event_id, Reserve(fan_id, "ga", quantity, uuid.uuid4().hex, jti))
    assert isinstance(result, Reserved), result
    return result.hold


async def payment(pool: asyncpg.Pool[Any], payment_id: str) -> asyncpg.Record:
    row: asyncpg.Record | None = await pool.fetchrow(
        "SELECT * FROM payments WHERE id = $1", payment_id
    )
    assert row is not None
    return row


async def settle(
    payments: PaymentPool, pool: asyncpg.Pool[Any], payment_id: str, timeout: float = 30
) -> asyncpg.Record:
    """Run the pool until the payment is succeeded or failed; its final row."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await payments.run_once()
        row = await payment(pool, payment_id)
        if row["state"] in ("succeeded", "failed"):
            return row
        await asyncio.sleep(0.02)
    raise AssertionError(f"payment {payment_id} did not settle: {dict(row)}")


async def stats(http: httpx.AsyncClient) -> dict[str, Any]:
    response = await http.get("/v1/stats")
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body
