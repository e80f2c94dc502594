"""The inventory actor against real PostgreSQL: group commit, durability, fencing, recovery."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest

from inventory import store
from inventory.actor import CONNECTION_HOLD_S, ActorStopped, InventoryActor
from inventory.ledger import (
    MAX_REFUSALS_PER_FAN,
    PASS_USED,
    TICKETS_HELD,
    Cancel,
    Cancelled,
    Confirm,
    Confirmed,
    Refused,
    Reserve,
    Reserved,
)
from tests.inventory.conftest import held_sold, make_event
from waitroom.core.errors import Unavailable
from waitroom.core.settings import Settings

pytestmark = pytest.mark.anyio


async def start_actor(
    pool: asyncpg.Pool[Any], event_id: str
) -> tuple[InventoryActor, asyncio.Task[None]]:
    epoch = await store.take_ownership(pool, event_id, "test")
    actor = await InventoryActor.load(event_id, pool, epoch)
    return actor, asyncio.create_task(actor.run())


async def stop_actor(actor: InventoryActor, task: asyncio.Task[None]) -> None:
    actor.close()
    await asyncio.gather(task, return_exceptions=True)


async def test_many_concurrent_asks_never_oversell_and_every_ack_is_durable(
    pool: asyncpg.Pool[Any],
) -> None:
    event_id = await make_event(pool, quantity=50, per_fan=2)
    actor, task = await start_actor(pool, event_id)
    try:
        results = await asyncio.gather(
            *(actor.ask(Reserve(f"fan{i}", "ga", 1 + i % 2, f"k{i}", None)) for i in range(300))
        )
    finally:
        await stop_actor(actor, task)
    held_ids = {r.hold.id for r in results if isinstance(r, Reserved)}
    tickets = sum(r.hold.quantity for r in results if isinstance(r, Reserved))
    assert tickets == 50
    # Nothing is paid here: what is left is held, and may come back.
    assert all(r.code == TICKETS_HELD for r in results if isinstance(r, Refused))
    held, sold, quantity = await held_sold(pool, event_id)
    assert (held, sold) == (50, 0) and held <= quantity
    rows = await pool.fetch("SELECT id::text FROM holds WHERE event_id = $1", event_id)
    assert {r["id"] for r in rows} == held_ids


async def test_a_retry_with_the_same_key_returns_the_first_result_and_changes_nothing(
    pool: asyncpg.Pool[Any],
) -> None:
    event_id = await make_event(pool, quantity=5)
    actor, task = await start_actor(pool, event_id)
    try:
        first = await actor.ask(Reserve("fan", "ga", 2, "same-key", "pass-1"))
        again = await actor.ask(Reserve("fan", "ga", 2, "same-key", "pass-2"))
    finally:
        await stop_actor(actor, task)
    assert isinstance(first, Reserved) and again == first
    assert await held_sold(pool, event_id) == (2, 0, 5)


async def test_a_failed_commit_answers_503_and_rebuilds_from_postgresql(
    pool: asyncpg.Pool[Any],
) -> None:
    event_id = await make_event(pool, quantity=10)
    actor, task = await start_actor(pool, event_id)
    try:
        assert isinstance(await actor.ask(Reserve("a", "ga", 2, None, None)), Reserved)
        # Behind the actor's back, the stock shrinks to what is held: its next commit breaks
        # the database's no-oversell check.
        await pool.execute("UPDATE ticket_types SET quantity = held WHERE event_id = $1", event_id)
        with pytest.raises(ActorStopped):
            await actor.ask(Reserve("b", "ga", 1, None, None))
        # Nothing of the failed batch stayed in memory: the rebuilt ledger sees no stock.
        after = await actor.ask(Reserve("c", "ga", 1, None, None))
        assert isinstance(after, Refused) and after.code == TICKETS_HELD
        assert actor.ledger.fan_count("b") == 0
    finally:
        await stop_actor(actor, task)
    assert await held_sold(pool, event_id) == (2, 0, 2)


async def test_tickets_freed_and_taken_again_in_one_group_commit_never_trip_the_oversell_check(
    pool: asyncpg.Pool[Any],
) -> None:
    event_id = await make_event(pool, quantity=2)
    actor, task = await start_actor(pool, event_id)
    try:
        first = await actor.ask(Reserve("a", "ga", 2, None, None))
        assert isinstance(first, Reserved)
        # Submitted together, so they land in one batch and one commit: at full stock, the
        # cancelled hold must be settled in PostgreSQL before the new one goes in.
        cancel = actor.submit(Cancel(first.hold.id, "a", None))
        again = actor.submit(Reserve("b", "ga", 2, None, None))
        assert isinstance(await cancel, Cancelled)
        assert isinstance(await again, Reserved)
    finally:
        await stop_actor(actor, task)
    assert await held_sold(pool, event_id) == (2, 0, 2)
    statuses = await pool.fetch(
        "SELECT fan_id, status FROM holds WHERE event_id = $1 ORDER BY fan_id", event_id
    )
    assert [(r["fan_id"], r["status"]) for r in statuses] == [("a", "cancelled"), ("b", "held")]


async def test_an_ask_that_gets_no_answer_in_time_is_told_so_and_a_retry_is_safe(
    pool: asyncpg.Pool[Any],
) -> None:
    event_id = await make_event(pool, quantity=5)
    actor, task = await start_actor(pool, event_id)
    try:
        async with pool.acquire() as blocker, blocker.transaction():
            # The commit's fencing check waits for this row lock: no answer can come.
            await blocker.execute(
                "SELECT 1 FROM inventory_owners WHERE event_id = $1 FOR UPDATE", event_id
            )
            started = time.monotonic()
            with pytest.raises(Unavailable) as timed_out:
                await actor.ask(Reserve("a", "ga", 2, "key-a", None), timeout=0.3)
            waited = time.monotonic() - started
        assert timed_out.value.code == "inventory_timeout"
        assert 0.3 <= waited < 1.0
        # The lock is gone and the command committed after all; the retry gets its result.
        retry = await actor.ask(Reserve("a", "ga", 2, "key-a", None))
        assert isinstance(retry, Reserved)
    finally:
        await stop_actor(actor, task)
    assert await held_sold(pool, event_id) == (2, 0, 5)


async def test_a_busy_actor_does_not_keep_a_shared_pool_to_itself(
    pool: asyncpg.Pool[Any], settings: Settings
) -> None:
    event_id = await make_event(pool, quantity=1_000_000, per_fan=1)
    # One connection for everyone: the actor's commits and this test's own queries.
    tiny: asyncpg.Pool[Any] = await asyncpg.create_pool(
        settings.database_url, min_size=1, max_size=1
    )
    epoch = await store.take_ownership(tiny, event_id, "test")
    actor = await InventoryActor.load(event_id, tiny, epoch)
    task = asyncio.create_task(actor.run())
    stop_at = time.monotonic() + 2.0
    fans = iter(range(10**9))

    async def shopper() -> None:
        while time.monotonic() < stop_at:
            i = next(fans)
            assert isinstance(await actor.ask(Reserve(f"f{i}", "ga", 1, None, None)), Reserved)

    shoppers = [asyncio.create_task(shopper()) for _ in range(1024)]
    waits = []
    try:
        await asyncio.sleep(0.3)  # the actor is busy and holds the connection
        while time.monotonic() < stop_at - 0.5:
            started = time.monotonic()
            assert await tiny.fetchval("SELECT 1") == 1
            waits.append(time.monotonic() - started)
        await asyncio.gather(*shoppers)
    finally:
        await stop_actor(actor, task)
        await tiny.close()
    # It is given back at least every CONNECTION_HOLD_S, then queued for like anyone else.
    assert len(waits) >= 3
    assert max(waits) < CONNECTION_HOLD_S + 0.5


async def test_a_command_that_breaks_the_ledger_leaves_nothing_unacknowledged_behind(
    pool: asyncpg.Pool[Any],
) -> None:
    event_id = await make_event(pool, quantity=10)
    actor, task = await start_actor(pool, event_id)
    assert isinstance(await actor.ask(Reserve("before", "ga", 1, None, None)), Reserved)
    # In one batch: a good reserve, then one no caller could build through the API (msgspec
    # checks types when decoding, not here), which makes the ledger raise half-way.
    good = actor.submit(Reserve("good", "ga", 1, "k", None))
    bad = actor.submit(Reserve("bad", "ga", None, None, None))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await task
    for pending in (good, bad):
        with pytest.raises(ActorStopped):
            await pending
    assert not actor.running
    # Only what was acknowledged is in PostgreSQL.
    fans = await pool.fetch("SELECT fan_id FROM holds WHERE event_id = $1", event_id)
    assert [r["fan_id"] for r in fans] == ["before"]
    assert await held_sold(pool, event_id) == (1, 0, 10)


async def test_a_stale_owner_can_never_commit(pool: asyncpg.Pool[Any]) -> None:
    event_id = await make_event(pool, quantity=10)
    actor, task = await start_actor(pool, event_id)
    assert isinstance(await actor.ask(Reserve("a", "ga", 1, None, None)), Reserved)
    newer = await store.take_ownership(pool, event_id, "another process")
    assert newer == actor.epoch + 1
    with pytest.raises(ActorStopped):
        await actor.ask(Reserve("b", "ga", 1, None, None))
    with pytest.raises(store.Fenced):
        await task
    assert not actor.running
    assert await held_sold(pool, event_id) == (1, 0, 10)


async def test_restart_recovery_reproduces_the_ledger_exactly(pool: asyncpg.Pool[Any]) -> None:
    event_id = await make_event(pool, quantity=12, per_fan=3)
    actor, task = await start_actor(pool, event_id)
    try:
        reserved = [await actor.ask(Reserve(f"f{i}", "ga", 2, f"r{i}", f"j{i}")) for i in range(5)]
        holds = [r.hold for r in reserved if isinstance(r, Reserved)]
        assert isinstance(await actor.ask(Confirm(holds[0].id, "f0", "pay-0", "c0")), Confirmed)
        assert isinstance(await actor.ask(Cancel(holds[1].id, "f1", "x1")), Cancelled)
        refused = await actor.ask(Reserve("f9", "ga", 99, "big", None))
        assert isinstance(refused, Refused)
        live = actor.ledger
    finally:
        await stop_actor(actor, task)
    async with pool.acquire() as conn:
        restored = await store.load_ledger(conn, event_id)
    assert restored.availability() == live.availability()
    assert sorted(restored.live_holds(), key=lambda h: h.id) == sorted(
        live.live_holds(), key=lambda h: h.id
    )
    for i in range(5):
        assert restored.fan_count(f"f{i}") == live.fan_count(f"f{i}")
    # Every keyed request replays its first result after the restart.
    now = time.time()
    for i in range(5):
        assert restored.apply(Reserve(f"f{i}", "ga", 2, f"r{i}", None), now, str) == reserved[i]
    assert restored.apply(Reserve("f9", "ga", 99, "big", None), now, str) == refused
    again = restored.apply(Confirm(holds[0].id, "f0", "pay-0", "c0"), now, str)
    assert isinstance(again, Confirmed) and again.hold.payment_ref == "pay-0"


async def test_holds_expire_from_the_actors_own_timer(pool: asyncpg.Pool[Any]) -> None:
    event_id = await make_event(pool, quantity=3, hold_ttl_s=1)
    actor, task = await start_actor(pool, event_id)
    try:
        assert isinstance(await actor.ask(Reserve("a", "ga", 3, None, None)), Reserved)
        assert await held_sold(pool, event_id) == (3, 0, 3)
        # No command arrives: only the actor's timer can expire the hold.
        deadline = time.monotonic() + 5
        while (await held_sold(pool, event_id))[0] and time.monotonic() < deadline:  # noqa: ASYNC110 - polls PostgreSQL
            await asyncio.sleep(0.1)
        assert await held_sold(pool, event_id) == (0, 0, 3)
        assert actor.ledger.available("ga") == 3
        topics = await pool.fetch(
            "SELECT topic FROM outbox WHERE event_id = $1 ORDER BY id", event_id
        )
        assert [r["topic"] for r in topics] == ["hold.created", "hold.expired"]
    finally:
        await stop_actor(actor, task)


async def test_at_shutdown_pending_asks_get_a_clear_error(pool: asyncpg.Pool[Any]) -> None:
    event_id = await make_event(pool, quantity=100)
    actor, task = await start_actor(pool, event_id)
    pending = [
        asyncio.ensure_future(actor.ask(Reserve(f"f{i}", "ga", 1, None, None))) for i in range(50)
    ]
    await asyncio.sleep(0)
    await stop_actor(actor, task)
    with pytest.raises(ActorStopped):
        await actor.ask(Reserve("late", "ga", 1, None, None))
    outcomes = await asyncio.gather(*pending, return_exceptions=True)
    acknowledged = [o for o in outcomes if isinstance(o, Reserved)]
    assert all(isinstance(o, Reserved | ActorStopped) for o in outcomes)
    held, _, _ = await held_sold(pool, event_id)
    assert held == len(acknowledged)


async def test_a_pass_whose_holds_were_all_released_stays_used_after_a_restart(
    pool: asyncpg.Pool[Any],
) -> None:
    event_id = await make_event(pool, quantity=5)
    actor, task = await start_actor(pool, event_id)
    try:
        first = await actor.ask(Reserve("fan", "ga", 1, "k1", "pass-1"))
        assert isinstance(first, Reserved)
        assert isinstance(await actor.ask(Cancel(first.hold.id, "fan", None)), Cancelled)
        refused = await actor.ask(Reserve("fan", "ga", 1, "k2", "pass-1"))
        assert isinstance(refused, Refused) and refused.code == PASS_USED
    finally:
        await stop_actor(actor, task)
    # Another owner (a restart, a failover) rebuilds the ledger from PostgreSQL only.
    actor, task = await start_actor(pool, event_id)
    try:
        again = await actor.ask(Reserve("fan", "ga", 1, "k3", "pass-1"))
        assert isinstance(again, Refused) and again.code == PASS_USED
        assert isinstance(await actor.ask(Reserve("fan", "ga", 1, "k4", "pass-2")), Reserved)
    finally:
        await stop_actor(actor, task)


async def test_a_key_whose_refusal_was_forgotten_can_be_used_again_and_commits(
    pool: asyncpg.Pool[Any],
) -> None:
    event_id = await make_event(pool, quantity=1, per_fan=1)
    actor, task = await start_actor(pool, event_id)
    try:
        assert isinstance(await actor.ask(Reserve("other", "ga", 1, None, None)), Reserved)
        for i in range(MAX_REFUSALS_PER_FAN + 1):
            refused = await actor.ask(Reserve("fan", "ga", 1, f"k{i}", None))
            assert isinstance(refused, Refused) and refused.code == TICKETS_HELD
        # The ledger kept the newest refusals only; k0 comes back as a new request, and its
        # record replaces the old row instead of failing the group commit on its key.
        again = await actor.ask(Reserve("fan", "ga", 1, "k0", None))
        assert isinstance(again, Refused) and again.code == TICKETS_HELD
        assert actor.running
        assert actor.ledger.stored_keys("fan") == MAX_REFUSALS_PER_FAN
    finally:
        await stop_actor(actor, task)
    rows = await pool.fetchval(
        "SELECT count(*) FROM idempotency_keys WHERE event_id = $1 AND fan_id = 'fan'", event_id
    )
    assert rows == MAX_REFUSALS_PER_FAN + 1
