"""The actor publishes the seats each commit moved (for the seat map's live view): after the
commit, coalesced since the last publication, last state per seat, and only for seats."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from inventory import store
from inventory.actor import InventoryActor
from inventory.ledger import Cancel, Cancelled, Confirm, Confirmed, Reserve, Reserved
from tests.inventory.seating import make_seated_event

pytestmark = pytest.mark.anyio


class Publications:
    """Collects what the actor publishes; can be told to fail once."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        self.fail_next = False

    async def __call__(self, changes: dict[str, str]) -> None:
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("redis is away")
        self.seen.append(dict(changes))

    def merged(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for changes in self.seen:
            out.update(changes)
        return out

    async def until(self, wanted: dict[str, str], timeout: float = 5.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while self.merged() != wanted:
            assert asyncio.get_running_loop().time() < deadline, (self.seen, wanted)
            await asyncio.sleep(0.02)


async def test_the_actor_publishes_the_seats_its_commits_moved(pool: asyncpg.Pool[Any]) -> None:
    event_id = await make_seated_event(pool)
    published = Publications()
    epoch = await store.take_ownership(pool, event_id, "test")
    actor = await InventoryActor.load(event_id, pool, epoch, publish_seats=published)
    task = asyncio.create_task(actor.run())
    try:
        first = await actor.ask(
            Reserve("fan1", "", 2, None, None, seats=("stalls:A:1", "stalls:A:2"))
        )
        assert isinstance(first, Reserved)
        await published.until({"stalls:A:1": "held", "stalls:A:2": "held"})
        # General admission moves no seat: nothing new is published for it.
        before = len(published.seen)
        assert isinstance(await actor.ask(Reserve("fan9", "ga", 2, None, None)), Reserved)
        confirmed = await actor.ask(Confirm(first.hold.id, "fan1", "pay-1", None))
        assert isinstance(confirmed, Confirmed)
        await published.until({"stalls:A:1": "sold", "stalls:A:2": "sold"})
        assert all(set(c) <= {"stalls:A:1", "stalls:A:2"} for c in published.seen[before:])

        # A failed publication is kept and tried again: nothing is lost.
        published.fail_next = True
        second = await actor.ask(Reserve("fan2", "", 1, None, None, seats=("stalls:B:5",)))
        assert isinstance(second, Reserved)
        sold = {"stalls:A:1": "sold", "stalls:A:2": "sold"}
        await published.until({**sold, "stalls:B:5": "held"}, timeout=10)
        assert not published.fail_next, "the publication never failed"
        assert isinstance(await actor.ask(Cancel(second.hold.id, "fan2", None)), Cancelled)
        await published.until({**sold, "stalls:B:5": "free"})
    finally:
        actor.close()
        await asyncio.gather(task, return_exceptions=True)


async def test_an_actor_that_stops_publishes_the_seats_it_had_not_published_yet(
    pool: asyncpg.Pool[Any],
) -> None:
    """Committed seats still waiting for their publication (here: behind a failed one, whose
    retry waits half a second) are published as the actor stops, not dropped with it."""
    event_id = await make_seated_event(pool)
    published = Publications()
    epoch = await store.take_ownership(pool, event_id, "test")
    actor = await InventoryActor.load(event_id, pool, epoch, publish_seats=published)
    task = asyncio.create_task(actor.run())
    try:
        published.fail_next = True
        held = await actor.ask(Reserve("fan1", "", 1, None, None, seats=("stalls:B:3",)))
        assert isinstance(held, Reserved)
        deadline = asyncio.get_running_loop().time() + 5
        while published.fail_next:  # the publication failed: the retry is half a second off
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.005)
        assert published.merged() == {}
    finally:
        actor.close()
        await asyncio.gather(task, return_exceptions=True)
    assert published.merged() == {"stalls:B:3": "held"}
