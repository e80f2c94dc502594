"""Fixtures of the admission tests: a private database with admission loops switched on.

The run's shared database holds every other test module's events; admission loops there
would admit their fans. So admission tests get a database of their own per module.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from tests.harness import ADMIN_TOKEN, ServerThread, cleanup, fresh_settings, running
from waitroom.core.settings import Settings


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """This module's settings: a fresh database and Redis prefix, admission loops on.

    The leaders do not warm the events' inventory actors (ADR 0022): these tests play the
    actor's part, writing what it publishes (``sold_out``) to Redis, and a live actor would
    publish its own figures over theirs (test_service.py warms hosts of its own)."""
    run_dir: Path = tmp_path_factory.mktemp("admission-run")
    value = fresh_settings(run_dir, admission_loop=True, warm_inventory=False)
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
def r(redis: Redis) -> Redis:
    """The shared Redis client, under the short name these tests use."""
    return redis
