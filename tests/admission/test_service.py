"""The per-process admission service: one leader among many, hand-over, closed events."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from redis.asyncio import Redis

from admission.loop import AdmissionService
from admission.passes import PassKeys
from inventory import catalogue
from inventory.hosting import InventoryHost
from waitroom.core.errors import SettingsError
from waitroom.core.keys import Keys
from waitroom.core.settings import Settings, load_settings
from waitroom.line.room import Rooms

pytestmark = pytest.mark.anyio


def test_the_admission_loop_can_be_switched_off_per_process() -> None:
    assert load_settings({}).admission_loop is True
    assert load_settings({"WAITROOM_ADMISSION_LOOP": "off"}).admission_loop is False
    assert load_settings({"WAITROOM_ADMISSION_LOOP": "True"}).admission_loop is True
    with pytest.raises(SettingsError, match="WAITROOM_ADMISSION_LOOP"):
        load_settings({"WAITROOM_ADMISSION_LOOP": "maybe"})


async def new_event(pool: asyncpg.Pool[Any]) -> str:
    event_id = f"s-{uuid.uuid4().hex[:10]}"
    spec = catalogue.EventCreate(
        id=event_id,
        name="service test",
        ticket_types=[catalogue.TicketTypeSpec("ga", 10, 1000, "EUR")],
    )
    await catalogue.create_event(pool, spec, actor="test", now=datetime.now(UTC))
    return event_id


@asynccontextmanager
async def service(
    pool: asyncpg.Pool[Any],
    r: Redis,
    settings: Settings,
    on_lead: Callable[[str], None] | None = None,
) -> AsyncIterator[AdmissionService]:
    keys = Keys(settings.redis_prefix)
    rooms = Rooms(r, pool, keys)
    svc = AdmissionService(
        redis=r,
        db=pool,
        keys=keys,
        pass_keys=PassKeys(Ed25519PrivateKey.generate()),
        issuer="waitroom",
        rooms=rooms,
        poll_s=0.2,
        on_lead=on_lead,
    )
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()
        await rooms.close()


async def eventually(predicate: Any, timeout: float = 5.0) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError("condition not met")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_one_of_many_processes_leads_and_a_clean_stop_hands_over_at_once(
    pool: asyncpg.Pool[Any], r: Redis, settings: Settings
) -> None:
    event_id = await new_event(pool)
    async with service(pool, r, settings) as one, service(pool, r, settings) as two:
        await eventually(lambda: event_id in one.leading() + two.leading())
        await asyncio.sleep(0.5)
        assert (event_id in one.leading()) != (event_id in two.leading())
        leader, follower = (one, two) if event_id in one.leading() else (two, one)
        await leader.stop()
        # Released, not left to lapse: the follower leads at its next attempt.
        assert await eventually(lambda: event_id in follower.leading()) < 1.0


async def test_the_leader_of_an_events_admission_hosts_its_inventory_before_any_checkout(
    pool: asyncpg.Pool[Any], r: Redis, settings: Settings
) -> None:
    # As `waitroom serve` wires it: the sale's first reservations find an actor loaded, on
    # the leader's node, rather than all racing to become its owner at once.
    event_id = await new_event(pool)
    keys = Keys(settings.redis_prefix)
    hosts = [InventoryHost(pool, r, keys, node_id=f"node-{n}") for n in (1, 2)]
    for host in hosts:
        await host.start()
    try:
        async with (
            service(pool, r, settings, on_lead=hosts[0].warm) as one,
            service(pool, r, settings, on_lead=hosts[1].warm) as two,
        ):
            await eventually(lambda: event_id in one.leading() + two.leading())
            leading = 0 if event_id in one.leading() else 1
            await eventually(lambda: hosts[leading].owns(event_id))
            assert not hosts[1 - leading].owns(event_id)
            # Warming it again, or elsewhere, changes nothing: the event has its owner.
            hosts[1 - leading].warm(event_id)
            hosts[leading].warm(event_id)
            await asyncio.sleep(0.3)
            assert hosts[leading].owns(event_id) and not hosts[1 - leading].owns(event_id)
            owner = await r.get(keys.event(event_id).owner)
            assert owner in (b"node-1", b"node-2", "node-1", "node-2")
    finally:
        for host in hosts:
            await host.stop()


async def test_a_second_cancellation_while_a_leader_stops_still_releases_its_lease(
    pool: asyncpg.Pool[Any], r: Redis, settings: Settings
) -> None:
    """A stopper cancels again a loop still running after a second; landing while the loop
    was letting go of its lease, that cancellation left the renewer running (CI, on the
    cluster: the lease stayed held, renewed by nobody's loop, and no other process led)."""
    event_id = await new_event(pool)
    leader_key = Keys(settings.redis_prefix).event(event_id).leader
    async with service(pool, r, settings) as svc:
        await eventually(lambda: event_id in svc.leading())
        runner = svc.events[event_id]
        assert runner.task is not None
        runner.task.cancel()
        await asyncio.sleep(0)  # the loop takes the cancellation and starts letting go
        runner.task.cancel()  # and a second one lands there
        await runner.stop()
        assert not await r.exists(leader_key)
        await asyncio.sleep(1.0)  # and nothing renews it meanwhile
        assert not await r.exists(leader_key)


async def test_the_loop_of_a_closed_event_stops_and_lets_go_of_the_lease(
    pool: asyncpg.Pool[Any], r: Redis, settings: Settings
) -> None:
    event_id = await new_event(pool)
    leader_key = Keys(settings.redis_prefix).event(event_id).leader
    async with service(pool, r, settings) as svc:
        await eventually(lambda: event_id in svc.leading())
        assert await r.exists(leader_key)
        await pool.execute("UPDATE events SET status = 'closed' WHERE id = $1", event_id)
        await eventually(lambda: event_id not in svc.events)
        assert not await r.exists(leader_key)
