"""An event's inventory serves again by itself once PostgreSQL comes back (issue 12).

The actor crashes when a commit fails and its ledger cannot be reloaded; its supervisor
restarts it from PostgreSQL. A restart whose load failed (PostgreSQL still down) used to leave
the crashed actor in place: the supervisor ended as if the actor had been closed on purpose,
the process kept renewing its lease, and every reservation got 503 until the server was
restarted. Here a real private PostgreSQL is stopped under a hosted event and started again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from inventory.hosting import InventoryHost
from inventory.ledger import Reserve, Reserved
from stress.private_services import PrivatePostgres
from tests.harness import cleanup, fresh_settings
from tests.inventory.conftest import held_sold, make_event
from waitroom.core.db import create_pool
from waitroom.core.errors import WaitroomError
from waitroom.core.keys import Keys
from waitroom.core.redis import make_redis
from waitroom.core.settings import Settings

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PrivatePostgres]:
    with PrivatePostgres() as pg:
        yield pg


@pytest.fixture
def pg_settings(
    private_pg: PrivatePostgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Settings]:
    monkeypatch.setenv("WAITROOM_DATABASE_URL", private_pg.dsn)
    settings = fresh_settings(tmp_path, dependency_timeout_s=1.0)
    try:
        yield settings
    finally:
        if private_pg.pid is None:
            private_pg.start()
        cleanup(settings)


@pytest.fixture
async def host(pg_settings: Settings) -> AsyncIterator[tuple[InventoryHost, asyncpg.Pool[Any]]]:
    pool = await create_pool(pg_settings)
    redis: Redis = make_redis(pg_settings)
    inventory = InventoryHost(pool, redis, Keys(pg_settings.redis_prefix), node_id="solo")
    await inventory.start()
    try:
        yield inventory, pool
    finally:
        await inventory.stop()
        await redis.aclose()
        await pool.close()


def reserve(i: int) -> Reserve:
    return Reserve(f"fan{i}", "ga", 1, f"key{i}", None)


async def test_reservations_are_served_again_soon_after_postgresql_restarts(
    host: tuple[InventoryHost, asyncpg.Pool[Any]], private_pg: PrivatePostgres
) -> None:
    inventory, pool = host
    event_id = await make_event(pool, quantity=100)
    first = await inventory.ask(event_id, reserve(0))
    assert isinstance(first, Reserved)

    await asyncio.to_thread(private_pg.stop, "immediate")
    # Reservations during the outage fail (503), which crashes the actor; its restarts fail
    # too while PostgreSQL is down.
    failed = 0
    for i in range(1, 6):
        try:
            await inventory.ask(event_id, reserve(i), timeout=2)
        except WaitroomError as exc:
            assert exc.status == 503, exc
            failed += 1
        await asyncio.sleep(0.3)
    assert failed == 5
    await asyncio.to_thread(private_pg.start)

    started = time.monotonic()
    served: Reserved | None = None
    i = 100
    while served is None and time.monotonic() - started < 10:
        i += 1
        try:
            result = await inventory.ask(event_id, reserve(i), timeout=2)
        except WaitroomError as exc:
            assert exc.status == 503, exc
            await asyncio.sleep(0.1)
            continue
        assert isinstance(result, Reserved), result
        served = result
    assert served is not None, "the inventory never served again after PostgreSQL came back"
    assert time.monotonic() - started < 5
    # Still served from here on, and the holds are on record.
    for j in range(200, 205):
        assert isinstance(await inventory.ask(event_id, reserve(j)), Reserved)
    held, sold, _ = await held_sold(pool, event_id)
    assert (held, sold) == (7, 0)
