"""The restart watch on a Redis of the test's own, restarted from its append-only file."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from stress.private_services import PrivateRedis
from waitroom.core.keys import Keys
from workers.redis_restarts import incarnation, reconcile, run_restart_watch

pytestmark = pytest.mark.anyio


async def test_a_restart_from_the_append_only_file_is_noticed_once(
    pool: asyncpg.Pool[Any], keys: Keys
) -> None:
    with PrivateRedis(appendonly=True) as server:
        redis = Redis.from_url(server.url)
        try:
            first = await reconcile(pool, redis, keys, republish_s=0)
            # Never reconciled: done, and the incarnation written for the next look.
            assert first is not None and first.previous is None
            assert first.incarnation == await incarnation(redis)
            assert await reconcile(pool, redis, keys, republish_s=0) is None
            await redis.aclose()

            # Restarted from its file: the incarnation it keeps is the old one's.
            await asyncio.to_thread(server.kill)
            await asyncio.to_thread(server.start)
            redis = Redis.from_url(server.url)
            assert await redis.get(keys.redis_incarnation) == first.incarnation.encode()
            again = await reconcile(pool, redis, keys, republish_s=0)
            assert again is not None
            assert (again.previous, again.incarnation) == (
                first.incarnation,
                await incarnation(redis),
            )
            assert again.incarnation != first.incarnation
            assert await reconcile(pool, redis, keys, republish_s=0) is None
        finally:
            await redis.aclose()


async def test_the_watch_keeps_going_while_redis_is_down_and_reconciles_when_it_is_back(
    pool: asyncpg.Pool[Any], keys: Keys
) -> None:
    with PrivateRedis(appendonly=True) as server:
        redis = Redis.from_url(server.url, socket_timeout=1)
        stop = asyncio.Event()
        watch = asyncio.create_task(
            run_restart_watch(pool, redis, keys, stop, every_s=0.05, republish_s=0)
        )
        try:
            for _ in range(100):
                if await redis.get(keys.redis_incarnation) is not None:
                    break
                await asyncio.sleep(0.05)
            before = await redis.get(keys.redis_incarnation)
            assert before is not None
            await asyncio.to_thread(server.kill)
            await asyncio.sleep(0.3)  # the watch meets a Redis that is not there
            assert not watch.done()
            await asyncio.to_thread(server.start)
            now = (await incarnation(redis)).encode()
            assert now != before
            for _ in range(100):
                if await redis.get(keys.redis_incarnation) == now:
                    break
                await asyncio.sleep(0.05)
            assert await redis.get(keys.redis_incarnation) == now
        finally:
            stop.set()
            await asyncio.wait_for(watch, 5)
            await redis.aclose()
