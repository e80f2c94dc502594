"""The dependency clients every process kind opens the same way: Redis, PostgreSQL, key names.

Each composition root (the HTTP app's :mod:`waitroom.services`, the workers'
:mod:`workers.main`, the CLI) starts from :func:`open_clients`, so they all reach Redis and
PostgreSQL with the same pools, timeouts and schema check.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import asyncpg
from redis.asyncio import Redis

from waitroom.core.db import create_pool, require_current_schema
from waitroom.core.keys import Keys
from waitroom.core.redis import make_redis
from waitroom.core.settings import Settings


@dataclass(frozen=True, slots=True)
class Clients:
    """Settings and the clients built from them, for one process."""

    settings: Settings
    keys: Keys
    #: redis-py with a blocking pool (bursts wait for a connection instead of failing).
    redis: Redis
    #: A PostgreSQL pool that connects on demand (it starts while PostgreSQL is down).
    db: asyncpg.Pool[Any]


async def open_clients(
    settings: Settings, stack: AsyncExitStack, *, check_schema: bool = True
) -> Clients:
    """Open the clients of ``settings``; ``stack`` closes them.

    With ``check_schema`` (long-running processes), a reachable database that lacks a
    migration or has drifted from the shipped files stops the process with
    :class:`~waitroom.core.errors.SchemaError`.
    """
    redis = make_redis(settings)
    stack.push_async_callback(redis.aclose)
    db = await create_pool(settings)
    stack.push_async_callback(db.close)
    if check_schema:
        await require_current_schema(db)
    return Clients(settings=settings, keys=Keys(settings.redis_prefix), redis=redis, db=db)
