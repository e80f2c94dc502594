"""Fixtures of the admission tests: a private database with admission loops switched on.

The run's shared database holds every other test module's events; admission loops there
would admit their fans. So admission tests get a database of their own per module.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from tests.harness import ADMIN_TOKEN, ServerThread, cleanup, fresh_settings, running
from waitroom.settings import Settings


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """This module's settings: a fresh database and Redis prefix, admission loops on."""
    run_dir: Path = tmp_path_factory.mktemp("admission-run")
    value = fresh_settings(run_dir, admission_loop=True)
    try:
        yield value
    finally:
        cleanup(value)


@pytest.fixture(scope="module")
def server(settings: Settings) -> Iterator[ServerThread]:
    with running(settings) as srv:
        yield srv


@pytest.fixture
def admin(server: ServerThread) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(base_url=server.url, timeout=10, headers=headers) as c:
        yield c


@pytest.fixture
def client(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


@pytest.fixture
async def r(settings: Settings) -> AsyncIterator[Redis]:
    client = Redis.from_url(settings.redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool[Any]]:
    p: asyncpg.Pool[Any] = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=4)
    try:
        yield p
    finally:
        await p.close()
