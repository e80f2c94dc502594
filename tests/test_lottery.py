"""The lottery: uniform, reproducible from the revealed seed, drawn once across processes."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from inventory import catalogue
from tests.queue_support import redis_client
from waitroom.core.db import create_pool
from waitroom.core.keys import Keys
from waitroom.core.settings import Settings
from waitroom.line import lottery
from waitroom.line.room import Rooms

#: chi-square critical value for 23 degrees of freedom at the 0.999 level.
CHI2_23_999 = 49.73
#: A room's entry salt (any 32 bytes in hex).
SALT = lottery.new_salt()


def test_the_commitment_is_sha256_and_entries_are_salted() -> None:
    seed = "00" * 32
    assert lottery.commitment(seed) == hashlib.sha256(bytes(32)).hexdigest()
    salt = "ab" * 32
    assert (
        lottery.entry(salt, "v_abc")
        == hmac.new(bytes.fromhex(salt), b"v_abc", "sha256").hexdigest()
    )
    # Without the salt the entry says nothing of who entered: not sha256(fan_id), and another
    # room's salt gives the same fan another entry.
    assert lottery.entry(salt, "v_abc") != hashlib.sha256(b"v_abc").hexdigest()
    assert lottery.entry(lottery.new_salt(), "v_abc") != lottery.entry(salt, "v_abc")
    assert lottery.legacy_entry("v_abc") == hashlib.sha256(b"v_abc").hexdigest()
    assert len(lottery.new_seed()) == 64 and lottery.new_seed() != lottery.new_seed()


def test_the_order_is_reproducible_from_the_seed_and_entries_alone() -> None:
    seed = lottery.new_seed()
    entries = [lottery.entry(SALT, f"fan{i}") for i in range(50)]
    order = lottery.draw_order(seed, entries)
    assert lottery.draw_order(seed, reversed(entries)) == order
    assert sorted(order) == sorted(entries)
    # The recipe published in waitroom/line/lottery.py and README, verbatim.
    raw = bytes.fromhex(seed)
    pool = hashlib.sha256("".join(sorted(entries)).encode("ascii")).digest()
    mixed = hashlib.sha256(raw + pool).digest()
    key = lambda e: (hashlib.sha256(mixed + e.encode("ascii")).digest(), e)  # noqa: E731
    assert sorted(entries, key=key) == order
    assert lottery.verify(seed, lottery.commitment(seed), order)


def test_a_tampered_draw_does_not_verify() -> None:
    seed = lottery.new_seed()
    order = lottery.draw_order(seed, [lottery.entry(SALT, f"fan{i}") for i in range(10)])
    assert not lottery.verify(seed, lottery.commitment(seed), [order[1], order[0], *order[2:]])
    other = lottery.new_seed()
    assert not lottery.verify(other, lottery.commitment(seed), order)
    assert not lottery.verify("zz" * 32, lottery.commitment(seed), order)
    assert not lottery.verify(seed[:10], lottery.commitment(seed), order)


def test_the_draw_mixes_every_entry_so_the_seed_alone_does_not_place_anyone() -> None:
    seed = lottery.new_seed()
    entries = [lottery.entry(SALT, f"fan{i}") for i in range(20)]
    full = lottery.draw_order(seed, entries)
    # Knowing the seed, an insider ranks candidate entries by sha256(seed || entry), as the
    # unmixed scheme did; the real draw sorts by a key that depends on every other entry.
    raw = bytes.fromhex(seed)
    unmixed = sorted(entries, key=lambda e: hashlib.sha256(raw + e.encode("ascii")).digest())
    assert full != unmixed
    # One more entry (an identity added at the last moment) reshuffles everyone else.
    extra = lottery.entry(SALT, "grinder")
    with_extra = [e for e in lottery.draw_order(seed, [*entries, extra]) if e != extra]
    assert with_extra != full
    assert lottery.mixed_seed(seed, entries) == lottery.mixed_seed(seed, reversed(entries))


@given(st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=30, unique=True))
def test_any_draw_is_a_permutation_that_verifies(fans: list[str]) -> None:
    seed = lottery.new_seed()
    entries = [lottery.entry(SALT, f) for f in fans]
    order = lottery.draw_order(seed, entries)
    assert sorted(order) == sorted(entries)
    assert lottery.verify(seed, lottery.commitment(seed), order)


def test_drawn_places_come_before_every_fifo_place() -> None:
    assert lottery.places(3) == [-3, -2, -1]
    assert lottery.places(0) == []


def test_orders_are_uniform_over_all_permutations() -> None:
    entries = [lottery.entry(SALT, f"fan{i}") for i in range(4)]
    permutations = list(itertools.permutations(entries))
    rounds = 24 * 250
    # Seeds derived deterministically, so the test is reproducible; each is as good as random
    # for sha256.
    counts = Counter(
        tuple(lottery.draw_order(hashlib.sha256(b"seed%d" % i).hexdigest(), entries))
        for i in range(rounds)
    )
    assert set(counts) <= set(permutations)
    expected = rounds / len(permutations)
    chi2 = sum((counts.get(p, 0) - expected) ** 2 / expected for p in permutations)
    assert chi2 < CHI2_23_999, (chi2, counts)
    # And it is a real test: a biased shuffle (one entry always first) fails it.
    biased = Counter(p for p in counts.elements() if p[0] == entries[0])
    biased_chi2 = sum(
        (biased.get(p, 0) - sum(biased.values()) / 24) ** 2 / (sum(biased.values()) / 24)
        for p in permutations
    )
    assert biased_chi2 > CHI2_23_999


# --- drawing a real room (Redis + PostgreSQL) ----------------------------------------------


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool[Any]]:
    db = await create_pool(settings)
    try:
        yield db
    finally:
        await db.close()


async def lottery_event(pool: asyncpg.Pool[Any], opens_in: timedelta) -> str:
    event_id = f"lot-{uuid.uuid4().hex[:10]}"
    spec = catalogue.EventCreate(
        id=event_id,
        name="Lottery",
        ticket_types=[catalogue.TicketTypeSpec("ga", 10, 100, "EUR")],
        room=catalogue.RoomSpec(queue_mode="lottery", opens_at=datetime.now(UTC) + opens_in),
    )
    await catalogue.create_event(pool, spec, actor="test", now=datetime.now(UTC))
    return event_id


@pytest.mark.anyio
async def test_a_room_is_drawn_once_even_when_many_processes_open_it_at_once(
    settings: Settings, pool: asyncpg.Pool[Any]
) -> None:
    event_id = await lottery_event(pool, timedelta(hours=1))
    keys = Keys(settings.redis_prefix)
    async with redis_client(settings) as r:
        # Five "processes", each with its own Rooms (no shared in-process state).
        processes = [Rooms(r, pool, keys) for _ in range(5)]
        await asyncio.gather(*(p.ensure(event_id) for p in processes))
        assert (
            await pool.fetchval("SELECT count(*) FROM room_lottery WHERE event_id = $1", event_id)
            == 1
        )
        now = time.time()
        fans = [f"v_{i:032x}" for i in range(40)]
        for i, fan in enumerate(fans):
            reply = await processes[i % 5].join(
                event_id, fan, now=now, ip=f"10.0.0.{i}", known_fan=False
            )
            assert (reply.state, reply.created) == ("prequeue", True)
        before = await processes[0].lottery(event_id)
        assert (before.seed, before.drawn, before.entries) == (None, False, [])
        stored_seed: Any = await r.get(keys.event(event_id).seed)
        assert before.commitment == lottery.commitment(stored_seed.decode())

        outcomes = await asyncio.gather(*(p.open_room(event_id, now) for p in processes))
        assert "drawn" in outcomes and set(outcomes) <= {"drawn", "busy"}
        assert await processes[1].open_room(event_id, now) == "drawn"

        after = await processes[2].lottery(event_id)
        assert after.drawn and after.seed is not None and after.drawn_at is not None
        assert lottery.verify(after.seed, before.commitment, after.entries)
        salt = await pool.fetchval(
            "SELECT entry_salt FROM room_lottery WHERE event_id = $1", event_id
        )
        assert sorted(after.entries) == sorted(lottery.entry(salt, f) for f in fans)
        mine = await processes[2].lottery(event_id, fans[7])
        assert mine.my_entry == lottery.entry(salt, fans[7]) and mine.my_entry in after.entries
        assert after.scheme == 2 and after.my_entry is None
        # The line is the draw: places -40..-1 in the published order.
        ek = keys.event(event_id)
        line: Any = await r.zrange(ek.queue, 0, -1, withscores=True)
        assert [lottery.entry(salt, f.decode()) for f, _ in line] == after.entries
        assert [int(score) for _, score in line] == list(range(-40, 0))
        assert await r.zcard(ek.prequeue) == 0
        # Latecomers line up FIFO behind the drawn fans.
        late = await processes[3].join(event_id, "v_late", now=now, ip="10.1.1.1", known_fan=False)
        assert (late.state, late.rank) == ("waiting", 40)
        for p in processes:
            await p.close()


@pytest.mark.anyio
async def test_the_first_join_after_opening_time_triggers_the_draw(
    settings: Settings, pool: asyncpg.Pool[Any]
) -> None:
    event_id = await lottery_event(pool, timedelta(seconds=1))
    keys = Keys(settings.redis_prefix)
    async with redis_client(settings) as r:
        rooms = Rooms(r, pool, keys)
        for i in range(5):
            reply = await rooms.join(
                event_id, f"v_{i:032x}", now=time.time(), ip="10.0.0.1", known_fan=False
            )
            assert reply.state == "prequeue"
        await asyncio.sleep(1.2)
        late = await rooms.join(event_id, "v_late", now=time.time(), ip="10.0.0.1", known_fan=False)
        assert (late.state, late.rank, late.draw_due) == ("waiting", 5, True)
        for _ in range(100):
            if await r.hget(keys.event(event_id).meta, "drawn") == b"1":
                break
            await asyncio.sleep(0.05)
        info = await rooms.lottery(event_id)
        assert info.drawn and info.seed is not None and len(info.entries) == 5
        assert lottery.verify(info.seed, info.commitment, info.entries)
        await rooms.close()


@pytest.mark.anyio
async def test_a_reloaded_room_is_never_drawn_twice(
    settings: Settings, pool: asyncpg.Pool[Any]
) -> None:
    event_id = await lottery_event(pool, timedelta(hours=1))
    keys = Keys(settings.redis_prefix)
    async with redis_client(settings) as r:
        rooms = Rooms(r, pool, keys)
        await rooms.join(event_id, "v_" + "1" * 32, now=time.time(), ip="10.0.0.1", known_fan=False)
        assert await rooms.open_room(event_id, time.time()) == "drawn"
        ek = keys.event(event_id)
        await r.delete(ek.meta, ek.queue, ek.fans, ek.seen, ek.seed, ek.prequeue)  # Redis lost
        await rooms.ensure(event_id)
        assert await r.hget(ek.meta, "drawn") == b"1"
        assert await rooms.open_room(event_id, time.time()) == "drawn"
        await rooms.close()
