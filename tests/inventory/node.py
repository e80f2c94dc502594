"""A stand-alone inventory node for the cross-process tests: ``python -m tests.inventory.node``.

It hosts or forwards like a server process would (an :class:`InventoryHost` on the settings
from its environment), asks for ``COUNT`` single-ticket holds for fans ``PREFIX0..``, each with
its own idempotency key, retrying a key after a 503 until it gets an answer, and prints one
JSON line per answered key: ``{"key", "hold_id" | null, "code" | null}``. It prints
``{"ready": node_id, "owner": bool}`` first.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import asyncpg
import msgspec

from inventory.hosting import InventoryHost
from inventory.ledger import Refused, Reserve, Reserved
from waitroom.core.errors import Unavailable
from waitroom.core.keys import Keys
from waitroom.core.redis import make_redis
from waitroom.core.settings import load_settings


def emit(value: dict[str, Any]) -> None:
    sys.stdout.write(msgspec.json.encode(value).decode() + "\n")
    sys.stdout.flush()


async def main(event_id: str, count: int, prefix: str, pace_s: float) -> None:
    settings = load_settings()
    pool: asyncpg.Pool[Any] = await asyncpg.create_pool(
        settings.database_url, min_size=1, max_size=4
    )
    redis = make_redis(settings)
    host = InventoryHost(pool, redis, Keys(settings.redis_prefix), lease_ttl_s=1.5, ask_timeout_s=2)
    await host.start()
    try:
        first = await host.ask(
            event_id, Reserve(f"{prefix}-probe", "ga", 1, f"{prefix}-probe", None)
        )
        emit(
            {
                "ready": host.node_id,
                "owner": host.owns(event_id),
                "probe": isinstance(first, Reserved),
            }
        )

        async def one(i: int) -> None:
            key = f"{prefix}{i}"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    result = await host.ask(event_id, Reserve(key, "ga", 1, key, None))
                except Unavailable:
                    await asyncio.sleep(0.2)
                    continue
                hold = result.hold.id if isinstance(result, Reserved) else None
                code = result.code if isinstance(result, Refused) else None
                emit({"key": key, "hold_id": hold, "code": code, "owner": host.owns(event_id)})
                return
            emit({"key": key, "gave_up": True})

        tasks = []
        for i in range(count):
            tasks.append(asyncio.create_task(one(i)))
            await asyncio.sleep(pace_s)
        await asyncio.gather(*tasks)
        emit({"done": True})
    finally:
        await host.stop()
        await redis.aclose()
        await pool.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])))
