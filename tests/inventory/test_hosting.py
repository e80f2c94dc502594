"""One owner per event across processes: leases, forwarding, takeover after kill -9."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import msgspec
import pytest
from redis.asyncio import Redis

from inventory.forwarding import FORWARD_BATCHES
from inventory.hosting import InventoryHost
from inventory.ledger import Expire, Expired, Refused, Reserve, Reserved
from tests.checkout.test_tracing import Receiver, wait_for_spans
from tests.harness import ROOT
from tests.inventory.conftest import held_sold, make_event
from waitroom.core import tracing
from waitroom.core.errors import Unavailable
from waitroom.core.keys import Keys
from waitroom.core.settings import Settings, settings_env

pytestmark = pytest.mark.anyio


@pytest.fixture
async def hosts(
    pool: asyncpg.Pool[Any], redis: Redis, settings: Settings
) -> AsyncIterator[tuple[InventoryHost, InventoryHost]]:
    keys = Keys(settings.redis_prefix)
    a = InventoryHost(pool, redis, keys, node_id="node-a", lease_ttl_s=1.5)
    b = InventoryHost(pool, redis, keys, node_id="node-b", lease_ttl_s=1.5)
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await a.stop()
        await b.stop()


async def test_the_first_asker_hosts_the_actor_and_the_other_forwards_to_it(
    pool: asyncpg.Pool[Any],
    hosts: tuple[InventoryHost, InventoryHost],
    redis: Redis,
    settings: Settings,
) -> None:
    a, b = hosts
    event_id = await make_event(pool, quantity=30, per_fan=1)
    assert isinstance(await a.ask(event_id, Reserve("first", "ga", 1, None, None)), Reserved)
    assert a.owns(event_id) and not b.owns(event_id)
    results = await asyncio.gather(
        *(
            (a if i % 2 else b).ask(event_id, Reserve(f"fan{i}", "ga", 1, f"k{i}", None))
            for i in range(60)
        )
    )
    assert not b.owns(event_id)  # b forwarded, it never wrote the event's rows
    # The inbox keeps nothing it has answered (issue 13: it kept 100,000 entries forever).
    inbox = Keys(settings.redis_prefix).event(event_id).inbox
    assert await redis.xlen(inbox) <= 1
    reserved = [r for r in results if isinstance(r, Reserved)]
    assert len(reserved) == 29
    assert all(
        isinstance(r, Refused) and r.code == "tickets_held" for r in results if r not in reserved
    )
    assert await held_sold(pool, event_id) == (30, 0, 30)
    owner = await pool.fetchval("SELECT owner FROM inventory_owners WHERE event_id = $1", event_id)
    assert owner == "node-a"


async def test_when_the_owner_stops_the_other_process_takes_over(
    pool: asyncpg.Pool[Any], hosts: tuple[InventoryHost, InventoryHost]
) -> None:
    a, b = hosts
    event_id = await make_event(pool, quantity=10)
    await a.ask(event_id, Reserve("x", "ga", 1, None, None))
    await a.stop()  # releases the lease
    result = await b.ask(event_id, Reserve("y", "ga", 1, None, None))
    assert isinstance(result, Reserved) and b.owns(event_id)
    epoch = await pool.fetchval("SELECT epoch FROM inventory_owners WHERE event_id = $1", event_id)
    assert epoch == 2
    assert await held_sold(pool, event_id) == (2, 0, 10)


@pytest.fixture
async def standby(
    pool: asyncpg.Pool[Any], redis: Redis, settings: Settings
) -> AsyncIterator[InventoryHost]:
    """A host that leaves an unowned event to the others for 1 s first (the workers' kind)."""
    host = InventoryHost(
        pool, redis, Keys(settings.redis_prefix), node_id="workers", lease_ttl_s=1.5, standby_s=1.0
    )
    await host.start()
    try:
        yield host
    finally:
        await host.stop()


async def test_a_standby_host_leaves_an_unowned_event_to_a_node_that_asks_meanwhile(
    pool: asyncpg.Pool[Any], hosts: tuple[InventoryHost, InventoryHost], standby: InventoryHost
) -> None:
    a, _ = hosts
    event_id = await make_event(pool, quantity=10)
    # The workers ask first (a payment to confirm while the event's node was lost) ...
    waiting = asyncio.create_task(standby.ask(event_id, Reserve("w", "ga", 1, "kw", None)))
    await asyncio.sleep(0.3)
    assert not standby.owns(event_id) and not waiting.done()
    # ... and a node asks before the standby is over: the node hosts, the workers forward.
    assert isinstance(await a.ask(event_id, Reserve("n", "ga", 1, None, None)), Reserved)
    assert isinstance(await waiting, Reserved)
    assert a.owns(event_id) and not standby.owns(event_id)
    owner = await pool.fetchval("SELECT owner FROM inventory_owners WHERE event_id = $1", event_id)
    assert owner == "node-a"
    assert await held_sold(pool, event_id) == (2, 0, 10)


async def test_a_standby_host_hosts_an_event_nobody_else_takes_once_its_standby_is_over(
    pool: asyncpg.Pool[Any], standby: InventoryHost
) -> None:
    event_id = await make_event(pool, quantity=10)
    started = time.monotonic()
    assert isinstance(await standby.ask(event_id, Reserve("w", "ga", 1, None, None)), Reserved)
    assert standby.owns(event_id)
    assert time.monotonic() - started >= 1.0
    # Once it owns the event, it answers at once.
    started = time.monotonic()
    assert isinstance(await standby.ask(event_id, Reserve("v", "ga", 1, None, None)), Reserved)
    assert time.monotonic() - started < 0.5


async def test_a_host_is_selling_while_its_actor_takes_reservations_and_not_after(
    pool: asyncpg.Pool[Any], hosts: tuple[InventoryHost, InventoryHost]
) -> None:
    # What the node's balancer agent reports (waitroom.balancer_agent): the owner of an
    # actor that reservations reach, including those the other node forwards to it.
    a, b = hosts
    event_id = await make_event(pool, quantity=10)
    assert not a.selling(60.0) and not b.selling(60.0)
    assert isinstance(await a.ask(event_id, Expire()), Expired)  # hosted, nothing sold yet
    assert a.owns(event_id) and not a.selling(60.0)
    await asyncio.sleep(0.2)
    assert isinstance(await b.ask(event_id, Reserve("f", "ga", 1, "k", None)), Reserved)
    assert a.selling(60.0) and not b.selling(60.0)  # b forwarded, it hosts nothing
    await asyncio.sleep(0.2)
    assert a.selling(1.0) and not a.selling(0.1)
    await a.let_go(event_id)
    assert not a.selling(60.0)
    # Warmed by the admission leader as its sale starts: a checkout before any reservation.
    other = await make_event(pool, quantity=10)
    b.warm(other)
    for _ in range(100):
        if b.owns(other):
            break
        await asyncio.sleep(0.02)
    assert b.owns(other) and b.selling(1.0) and not a.selling(60.0)
    # Warmed where another process hosts it (a leader whose node lost the race): that node
    # keeps nothing of it, not even the note that its sale started.
    a.warm(other)
    for _ in range(100):
        if other not in a._warmed:
            break
        await asyncio.sleep(0.02)
    assert other not in a._warmed and not a.owns(other) and not a.selling(60.0)
    await asyncio.sleep(0.2)
    assert not b.selling(0.1)


def _node(
    settings: Settings, event_id: str, count: int, prefix: str, pace: float
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.inventory.node", event_id, str(count), prefix, str(pace)],
        env=settings_env(settings),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def _lines(proc: subprocess.Popen[str]) -> Iterator[dict[str, Any]]:
    assert proc.stdout is not None
    for line in proc.stdout:
        yield msgspec.json.decode(line)


async def test_killing_the_owner_mid_burst_loses_no_acknowledged_hold_and_never_oversells(
    pool: asyncpg.Pool[Any], settings: Settings, processes: list[subprocess.Popen[str]]
) -> None:
    event_id = await make_event(pool, quantity=150, per_fan=1)
    owner = _node(settings, event_id, 400, "a", 0.005)
    processes.append(owner)
    first = next(_lines(owner))
    assert first["owner"] is True
    other = _node(settings, event_id, 400, "b", 0.005)
    processes.append(other)
    lines = _lines(other)
    assert next(lines)["owner"] is False

    # Let the burst run through the owner for a moment, then kill it without warning.
    await asyncio.sleep(0.6)
    os.kill(owner.pid, signal.SIGKILL)
    killed_at = time.monotonic()

    answers: dict[str, dict[str, Any]] = {}
    took_over_at: float | None = None
    for line in await asyncio.to_thread(list, lines):
        if "key" in line:
            answers[line["key"]] = line
            if line.get("owner") and took_over_at is None:
                took_over_at = time.monotonic()
    assert other.wait(timeout=60) == 0
    assert len(answers) == 400 and not any(a.get("gave_up") for a in answers.values())

    held, sold, quantity = await held_sold(pool, event_id)
    assert held + sold <= quantity  # no oversell, ever
    rows = await pool.fetch(
        "SELECT id::text, idempotency_key FROM holds WHERE event_id = $1", event_id
    )
    by_key = {r["idempotency_key"]: r["id"] for r in rows}
    assert len(by_key) == len(rows)  # one hold per key: retries never doubled one
    for key, answer in answers.items():
        if answer["hold_id"] is not None:
            assert by_key.get(key) == answer["hold_id"]  # acknowledged means durable
        else:
            assert answer["code"] == "tickets_held" and key not in by_key
    # Nothing appears that nobody asked for.
    assert set(by_key) <= {f"a{i}" for i in range(400)} | set(answers) | {"a-probe", "b-probe"}
    owner_now = await pool.fetchval(
        "SELECT epoch FROM inventory_owners WHERE event_id = $1", event_id
    )
    assert owner_now >= 2
    assert killed_at is not None


async def test_an_ask_forwarded_to_a_killed_owner_is_asked_again_once_its_lease_lapses(
    pool: asyncpg.Pool[Any],
    hosts: tuple[InventoryHost, InventoryHost],
    settings: Settings,
    processes: list[subprocess.Popen[str]],
) -> None:
    """Forwarded asks do not wait out their timeout on a dead owner (issue 12): once its
    lease (1.5 s) lapses they see it gone and ask again, here, within the same timeout; a
    command that is not safe to apply twice (no idempotency key) gets its 503 then."""
    _, b = hosts
    event_id = await make_event(pool, quantity=10)
    owner = _node(settings, event_id, 1, "a", 600)  # hosts the event, then idles
    processes.append(owner)
    assert next(_lines(owner))["owner"] is True
    os.kill(owner.pid, signal.SIGKILL)
    killed_at = time.monotonic()

    async def timed(command: Reserve) -> tuple[Any, float]:
        try:
            result: Any = await b.ask(event_id, command, timeout=6)
        except Unavailable as exc:
            result = exc
        return result, time.monotonic() - killed_at

    (keyed, keyed_s), (unkeyed, unkeyed_s) = await asyncio.gather(
        timed(Reserve("y", "ga", 1, "key-y", None)), timed(Reserve("z", "ga", 1, None, None))
    )
    assert isinstance(keyed, Reserved), keyed
    assert keyed_s < 2.5, keyed_s  # lease 1.5 s + one check (0.5 s) + taking over
    assert isinstance(unkeyed, Unavailable) and unkeyed.code == "inventory_timeout", unkeyed
    assert unkeyed_s < 2.5, unkeyed_s
    assert b.owns(event_id)
    keys = await pool.fetch("SELECT idempotency_key FROM holds WHERE event_id = $1", event_id)
    assert sorted(r[0] for r in keys if r[0] in ("key-y", None)) == ["key-y"]


async def test_asks_of_one_turn_of_the_event_loop_go_to_the_owner_in_one_inbox_entry(
    pool: asyncpg.Pool[Any], hosts: tuple[InventoryHost, InventoryHost]
) -> None:
    """Issue 14, item 3: forwarding is batched. 60 reservations asked at once through the
    process that does not own the event take a handful of XADDs, not 100, and every one is
    answered on its own."""
    a, b = hosts
    event_id = await make_event(pool, quantity=200, per_fan=1)
    assert isinstance(await a.ask(event_id, Reserve("owner", "ga", 1, "k-owner", None)), Reserved)
    # b learns the owner first: otherwise each ask looks it up in Redis, and the replies to
    # those 60 GETs reach b over several turns of its loop (each turn's asks one entry).
    assert isinstance(await b.ask(event_id, Reserve("warm", "ga", 1, "k-warm", None)), Reserved)
    before = FORWARD_BATCHES._value.get()
    results = await asyncio.gather(
        *(b.ask(event_id, Reserve(f"fan{i}", "ga", 1, f"k{i}", None)) for i in range(60))
    )
    entries = FORWARD_BATCHES._value.get() - before
    assert all(isinstance(r, Reserved) for r in results)
    assert len({r.hold.id for r in results if isinstance(r, Reserved)}) == 60
    assert 1 <= entries <= 5, entries
    assert await held_sold(pool, event_id) == (62, 0, 200)


async def test_a_forwarded_ask_carries_its_span_to_the_owners_commit(
    pool: asyncpg.Pool[Any], hosts: tuple[InventoryHost, InventoryHost]
) -> None:
    receiver = Receiver()
    try:
        assert tracing.configure_tracing("waitroom-test", {tracing.ENDPOINT_VARIABLE: receiver.url})
        a, b = hosts
        event_id = await make_event(pool, quantity=5, per_fan=1)
        assert isinstance(await a.ask(event_id, Reserve("first", "ga", 1, None, None)), Reserved)
        with tracing.span("asker"):
            assert isinstance(await b.ask(event_id, Reserve("fan", "ga", 1, "k", None)), Reserved)
        assert not b.owns(event_id)
        # In a thread: the hosts' event loop keeps renewing their leases meanwhile.
        await asyncio.to_thread(
            wait_for_spans, receiver, "asker", "inventory.ask", "inventory.commit"
        )
        (asker,) = receiver.named("asker")
        (forwarded,) = [s for s in receiver.named("inventory.ask") if s.parent_id == asker.span_id]
        # The commit ran in the owner's actor: linked to the asker's span over the inbox.
        commits = [
            s
            for s in receiver.named("inventory.commit")
            if (forwarded.trace_id, forwarded.span_id) in s.links
        ]
        assert len(commits) == 1
    finally:
        tracing.shutdown_tracing()
        receiver.close()
