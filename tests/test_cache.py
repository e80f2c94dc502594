"""The view cache: one load per key at a time, bounded staleness, kept 404s, invalidation."""

from __future__ import annotations

import asyncio

import pytest

from waitroom.core.cache import ViewCache
from waitroom.core.errors import NotFound, Unavailable

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_a_stampede_of_misses_costs_one_load() -> None:
    cache: ViewCache[str] = ViewCache(negative_ttl_s=1.0)
    loads = 0
    gate = asyncio.Event()

    async def load() -> tuple[str, float]:
        nonlocal loads
        loads += 1
        await gate.wait()
        return "view", 5.0

    waiting = [asyncio.create_task(cache.get("e", load)) for _ in range(200)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*waiting) == ["view"] * 200
    assert loads == 1


async def test_a_value_is_served_for_its_ttl_and_loaded_again_after_it() -> None:
    clock = Clock()
    cache: ViewCache[int] = ViewCache(negative_ttl_s=1.0, clock=clock)
    version = 0

    async def load() -> tuple[int, float]:
        return version, 2.0

    assert await cache.get("e", load) == 0
    version = 1
    clock.now = 1.999
    assert await cache.get("e", load) == 0  # still within its TTL
    clock.now = 2.0
    assert await cache.get("e", load) == 1  # never older than the TTL


async def test_not_found_is_kept_for_the_negative_ttl_and_other_errors_are_not() -> None:
    clock = Clock()
    cache: ViewCache[str] = ViewCache(negative_ttl_s=1.0, clock=clock)
    calls: list[str] = []

    async def missing() -> tuple[str, float]:
        calls.append("missing")
        raise NotFound("no event 'x'", code="event_not_found", details={"event_id": "x"})

    for _ in range(3):
        with pytest.raises(NotFound) as raised:
            await cache.get("x", missing)
        assert raised.value.code == "event_not_found"
        assert raised.value.details == {"event_id": "x"}
    assert calls == ["missing"]
    clock.now = 1.0
    with pytest.raises(NotFound):
        await cache.get("x", missing)
    assert calls == ["missing", "missing"]

    async def down() -> tuple[str, float]:
        calls.append("down")
        raise Unavailable("PostgreSQL is unavailable", retry_after=2)

    for _ in range(2):
        with pytest.raises(Unavailable):
            await cache.get("y", down)
    assert calls.count("down") == 2


async def test_invalidation_drops_the_entry_and_a_load_already_under_way() -> None:
    cache: ViewCache[str] = ViewCache(negative_ttl_s=60.0)

    async def missing() -> tuple[str, float]:
        raise NotFound("no event", code="event_not_found")

    with pytest.raises(NotFound):
        await cache.get("e", missing)
    cache.invalidate("e")  # this process created the event

    gate = asyncio.Event()

    async def slow_old() -> tuple[str, float]:
        await gate.wait()
        return "old", 60.0

    async def fresh() -> tuple[str, float]:
        return "new", 60.0

    stale = asyncio.create_task(cache.get("e", slow_old))
    await asyncio.sleep(0)
    cache.invalidate("e")  # changed while that load ran: its result must not be kept
    gate.set()
    assert await stale == "old"  # its own caller asked before the change
    assert await cache.get("e", fresh) == "new"
    assert await cache.get("e", slow_old) == "new"


async def test_a_caller_that_gives_up_does_not_cancel_the_others_load() -> None:
    cache: ViewCache[str] = ViewCache(negative_ttl_s=1.0)
    gate = asyncio.Event()

    async def load() -> tuple[str, float]:
        await gate.wait()
        return "view", 5.0

    impatient = asyncio.create_task(cache.get("e", load))
    patient = asyncio.create_task(cache.get("e", load))
    await asyncio.sleep(0)
    impatient.cancel()
    gate.set()
    assert await patient == "view"


async def test_the_cache_stays_bounded() -> None:
    cache: ViewCache[int] = ViewCache(negative_ttl_s=1.0, max_entries=100)

    async def load() -> tuple[int, float]:
        return 1, 60.0

    for i in range(1000):
        await cache.get(f"k{i}", load)
    assert len(cache) <= 100
