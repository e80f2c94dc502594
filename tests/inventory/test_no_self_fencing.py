"""A process never fences itself off (issue 12, item 5; ADR 0009).

The first burst of reservations for an event, in one process or in two (two hosts in one
process stand for two uvicorn workers), must take exactly one fencing epoch and answer every
reservation; a new epoch is taken only when ownership really changes hands.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from typing import Any, cast

import asyncpg
import pytest
from redis.asyncio import Redis

from inventory.hosting import InventoryHost
from inventory.ledger import Ledger, Reserve, Reserved, Result
from tests.inventory.conftest import held_sold, make_event
from waitroom.core import lease
from waitroom.core.errors import Unavailable
from waitroom.core.keys import Keys
from waitroom.core.redis import make_redis
from waitroom.core.settings import Settings

pytestmark = pytest.mark.anyio

BURST = 400


async def epoch_of(pool: asyncpg.Pool[Any], event_id: str) -> int | None:
    epoch: int | None = await pool.fetchval(
        "SELECT epoch FROM inventory_owners WHERE event_id = $1", event_id
    )
    return epoch


def reserve(i: int, prefix: str = "fan") -> Reserve:
    return Reserve(f"{prefix}{i}", "ga", 1, f"{prefix}-key{i}", None)


async def arriving(
    asks: Iterable[Coroutine[Any, Any, Result]], wave: int
) -> list[Result | BaseException]:
    """Run ``asks`` as requests reach a server: ``wave`` more every turn of the event loop
    (0: all in the same turn).

    All in the same turn, every one checks the lease before the first has hosted the actor,
    and they all wait for that one acquisition. Arriving in waves, as at a live sale, some
    check it while the acquisition completes: that is where the self-fencing happened.
    """
    tasks = []
    for i, ask in enumerate(asks):
        tasks.append(asyncio.create_task(ask))
        if wave and i % wave == wave - 1:
            await asyncio.sleep(0)
    return await asyncio.gather(*tasks, return_exceptions=True)


ARRIVALS = pytest.mark.parametrize("wave", [5, 0], ids=["in-waves", "all-at-once"])


@pytest.fixture
async def clients(settings: Settings) -> AsyncIterator[list[Redis]]:
    """Redis clients as the server makes them (a blocking pool), one per simulated process."""
    made: list[Redis] = []
    yield made
    for client in made:
        await client.aclose()


@pytest.fixture
async def hosts(
    pool: asyncpg.Pool[Any], settings: Settings, clients: list[Redis]
) -> AsyncIterator[Callable[..., Awaitable[InventoryHost]]]:
    started: list[InventoryHost] = []

    async def start(node_id: str, redis: Any = None, **kwargs: Any) -> InventoryHost:
        if redis is None:
            redis = make_redis(settings)
            clients.append(redis)
        kwargs.setdefault("lease_ttl_s", 1.5)
        host = InventoryHost(pool, redis, Keys(settings.redis_prefix), node_id=node_id, **kwargs)
        await host.start()
        started.append(host)
        return host

    yield start
    for host in started:
        await host.stop()


@ARRIVALS
async def test_a_burst_of_first_reservations_in_one_process_takes_one_epoch(
    pool: asyncpg.Pool[Any], hosts: Callable[..., Awaitable[InventoryHost]], wave: int
) -> None:
    host = await hosts("solo")
    event_id = await make_event(pool, quantity=BURST, per_fan=1)
    results = await arriving((host.ask(event_id, reserve(i)) for i in range(BURST)), wave)
    failed = [r for r in results if not isinstance(r, Reserved)]
    assert failed == [], f"{len(failed)} of {BURST} not reserved, first: {failed[:3]}"
    assert await epoch_of(pool, event_id) == 1
    assert host.owns(event_id)
    assert await held_sold(pool, event_id) == (BURST, 0, BURST)


@ARRIVALS
async def test_a_burst_through_two_processes_takes_one_epoch_and_answers_everyone(
    pool: asyncpg.Pool[Any], hosts: Callable[..., Awaitable[InventoryHost]], wave: int
) -> None:
    """Also: what the process that lost the lease forwards at once is served by the winner
    (it used to read where the inbox ended only after taking the epoch, and skipped it)."""
    a = await hosts("worker-a", ask_timeout_s=3.0)
    b = await hosts("worker-b", ask_timeout_s=3.0)
    event_id = await make_event(pool, quantity=BURST, per_fan=1)
    results = await arriving(
        ((a if i % 2 else b).ask(event_id, reserve(i)) for i in range(BURST)), wave
    )
    failed = [r for r in results if not isinstance(r, Reserved)]
    assert failed == [], f"{len(failed)} of {BURST} not reserved, first: {failed[:3]}"
    assert await epoch_of(pool, event_id) == 1
    assert a.owns(event_id) != b.owns(event_id)
    assert await held_sold(pool, event_id) == (BURST, 0, BURST)


class _SlowOwnerRead:
    """A Redis client whose next GET of the owner key answers only when told to.

    It stands for a request whose lease check is slow (a busy loop, a full connection pool)
    while another request of the same process hosts the actor.
    """

    def __init__(self, inner: Redis, owner_key: str) -> None:
        self._inner = inner
        self._owner_key = owner_key
        self.hold = False
        self.held = asyncio.Event()
        self.go_on = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def get(self, key: str) -> Any:
        value = await self._inner.get(key)
        if key == self._owner_key and self.hold:
            self.hold = False
            self.held.set()
            await self.go_on.wait()
        return value


async def test_an_ask_that_checked_the_lease_before_the_actor_was_hosted_uses_it(
    pool: asyncpg.Pool[Any],
    settings: Settings,
    clients: list[Redis],
    hosts: Callable[..., Awaitable[InventoryHost]],
) -> None:
    """The exact interleaving: B checks for a local actor (none), its lease check is slow;
    meanwhile A takes the lease and hosts the actor; then B's check comes back."""
    event_id = await make_event(pool, quantity=20, per_fan=1)
    inner = make_redis(settings)
    clients.append(inner)
    slow = _SlowOwnerRead(inner, Keys(settings.redis_prefix).event(event_id).owner)
    host = await hosts("solo", redis=cast(Redis, slow))
    slow.hold = True
    late = asyncio.create_task(host.ask(event_id, reserve(0)))
    await slow.held.wait()  # B saw no local actor and is reading the lease
    first = await host.ask(event_id, reserve(1))  # A hosts the actor (epoch 1)
    assert isinstance(first, Reserved) and await epoch_of(pool, event_id) == 1
    slow.go_on.set()
    assert isinstance(await late, Reserved)
    # B used A's actor: no second epoch, and the actor A started keeps answering.
    assert await epoch_of(pool, event_id) == 1
    after = await asyncio.gather(*(host.ask(event_id, reserve(i)) for i in range(2, 12)))
    assert all(isinstance(r, Reserved) for r in after)
    assert await epoch_of(pool, event_id) == 1 and host.owns(event_id)


async def test_asks_while_the_actor_restarts_do_not_take_a_new_epoch(
    pool: asyncpg.Pool[Any],
    hosts: Callable[..., Awaitable[InventoryHost]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A crashed actor is restarted under its own epoch; asks in the meantime get a
    retryable 503, never a second tenure of the same process."""
    host = await hosts("solo")
    event_id = await make_event(pool, quantity=50, per_fan=1)
    assert isinstance(await host.ask(event_id, reserve(0)), Reserved)
    crash = {"armed": True}
    apply_many = Ledger.apply_many

    def breaking(self: Ledger, *args: Any, **kwargs: Any) -> list[Result]:
        if crash["armed"]:
            crash["armed"] = False
            raise RuntimeError("a bug in the ledger")
        return apply_many(self, *args, **kwargs)

    monkeypatch.setattr(Ledger, "apply_many", breaking)
    reserved, i = 0, 0
    # Until 20 are reserved, not a fixed number of tries: on a busy CI machine the restart
    # window (0.1 s of back-off, then the ledger's load) can outlast 40 tries 10 ms apart.
    deadline = asyncio.get_running_loop().time() + 10.0
    while reserved < 20 and asyncio.get_running_loop().time() < deadline:
        i += 1
        try:
            if isinstance(await host.ask(event_id, reserve(i)), Reserved):
                reserved += 1
        except Unavailable:
            pass  # the crash, and the restart window: retryable
        await asyncio.sleep(0.01)
    assert reserved == 20
    assert not crash["armed"], "the ledger never crashed: the test tested nothing"
    assert await epoch_of(pool, event_id) == 1
    assert host.owns(event_id)
    assert isinstance(await host.ask(event_id, reserve(99)), Reserved)


async def test_a_deposed_owner_is_fenced_and_leaves_the_new_owners_lease_alone(
    pool: asyncpg.Pool[Any],
    redis: Redis,
    settings: Settings,
    hosts: Callable[..., Awaitable[InventoryHost]],
) -> None:
    """Fencing still holds: when a's lease is gone (lapsed while it was paused, say) and b
    takes over, a's next commit is refused, and a steps down without touching b's lease."""
    a = await hosts("node-a")
    b = await hosts("node-b")
    event_id = await make_event(pool, quantity=20, per_fan=1)
    owner_key = Keys(settings.redis_prefix).event(event_id).owner
    assert isinstance(await a.ask(event_id, reserve(0)), Reserved)
    await redis.delete(owner_key)  # a's lease lapsed without a noticing yet
    assert isinstance(await b.ask(event_id, reserve(1)), Reserved)
    assert b.owns(event_id) and await epoch_of(pool, event_id) == 2
    actor = a.actor(event_id)
    assert actor is not None  # a still thinks it owns the event
    with pytest.raises(Unavailable):
        await actor.ask(reserve(2))  # fenced in PostgreSQL: nothing written
    for _ in range(100):
        if not a.owns(event_id):
            break
        await asyncio.sleep(0.02)
    assert not a.owns(event_id)
    assert await redis.get(owner_key) == b"node-b"
    assert await held_sold(pool, event_id) == (2, 0, 20)
    assert isinstance(await a.ask(event_id, reserve(3)), Reserved)  # forwarded to b
    assert await epoch_of(pool, event_id) == 2


async def test_a_claim_is_idempotent_for_its_holder_and_marks_the_stream_atomically(
    redis: Redis, settings: Settings
) -> None:
    ek = Keys(settings.redis_prefix).event(f"claim-{uuid.uuid4().hex[:8]}")
    try:
        entry: Any = await redis.xadd(ek.inbox, {"c": "before"})
        last = entry.decode()
        first = await lease.claim(redis, ek.owner, "p1", lease_ms=1000, mark=ek.inbox)
        assert first == lease.Claim(kept=False, mark=last)
        assert await lease.claim(redis, ek.owner, "p2", lease_ms=1000) is None
        again = await lease.claim(redis, ek.owner, "p1", lease_ms=5000)
        assert again == lease.Claim(kept=True, mark="0-0")  # the same holder keeps it
        assert 4000 < await redis.pttl(ek.owner) <= 5000
        assert await redis.get(ek.owner) == b"p1"
        assert await lease.release(redis, ek.owner, "p1")
        taken = await lease.claim(redis, ek.owner, "p2", lease_ms=1000, mark=ek.inbox)
        assert taken == lease.Claim(kept=False, mark=last)
    finally:
        await redis.delete(ek.owner, ek.inbox)
