"""Seats sold through the inventory actor, against real PostgreSQL: holds take seats, the
group commit writes them, PostgreSQL refuses a seat twice, a rebuilt ledger keeps them."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import msgspec
import pytest

from inventory import store, venue
from inventory.actor import ActorStopped, InventoryActor
from inventory.ledger import (
    FAN_LIMIT,
    MIXED_TICKET_TYPES,
    NOT_ENOUGH_SEATS,
    SEATS_NOT_FOR_SALE,
    SEATS_REQUIRED,
    SEATS_UNAVAILABLE,
    UNKNOWN_LEVEL,
    UNKNOWN_SEAT,
    Cancel,
    Cancelled,
    Confirm,
    Confirmed,
    Refused,
    Reserve,
    Reserved,
    Result,
)
from tests.inventory.seating import BACK, FRONT, make_seated_event, seat_map_document, seat_rows
from waitroom import seats_api

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


def pick(fan: str, *seats: str, key: str | None = None) -> Reserve:
    return Reserve(fan, "", len(seats), key, None, seats=seats)


def best(fan: str, level: str, count: int, key: str | None = None) -> Reserve:
    return Reserve(fan, "", count, key, None, level=level)


def refused(result: Result, code: str) -> Refused:
    assert isinstance(result, Refused), result
    assert result.code == code, result
    return result


async def counts(pool: asyncpg.Pool[Any], event_id: str) -> dict[str, tuple[int, int, int]]:
    rows = await pool.fetch(
        "SELECT name, held, sold, quantity FROM ticket_types WHERE event_id = $1", event_id
    )
    return {r["name"]: (r["held"], r["sold"], r["quantity"]) for r in rows}


async def test_the_import_makes_a_seated_ticket_types_quantity_its_open_seats(
    pool: asyncpg.Pool[Any],
) -> None:
    event_id = await make_seated_event(pool)
    # Ten seats a row: A:10 killed and B:1 held back are not for sale; ga keeps its quantity.
    assert await counts(pool, event_id) == {
        "Front": (0, 0, 9),
        "Back": (0, 0, 9),
        "ga": (0, 0, 30),
    }


async def test_a_pick_holds_exactly_those_seats_and_postgresql_has_them(
    pool: asyncpg.Pool[Any],
) -> None:
    event_id = await make_seated_event(pool)
    actor, task = await start_actor(pool, event_id)
    try:
        first = await actor.ask(pick("fan1", "stalls:A:3", "stalls:A:4"))
        clash = await actor.ask(pick("fan2", "stalls:A:4", "stalls:A:5", "stalls:A:3"))
        killed = await actor.ask(pick("fan2", "stalls:A:10"))
        held_back = await actor.ask(pick("fan2", "stalls:B:1"))
        unknown = await actor.ask(pick("fan2", "stalls:Z:1", "stalls:A:5"))
        mixed = await actor.ask(pick("fan2", "stalls:A:5", "stalls:B:5"))
        by_quantity = await actor.ask(Reserve("fan2", "Front", 1, None, None))
        standing = await actor.ask(Reserve("fan2", "ga", 2, None, None))
        no_level = await actor.ask(best("fan2", "balcony", 1))
    finally:
        await stop_actor(actor, task)
    assert isinstance(first, Reserved)
    assert first.hold.seats == ("stalls:A:3", "stalls:A:4")
    assert (first.hold.ticket_type, first.hold.quantity) == ("Front", 2)
    # Every seat that is taken is named, in the order asked.
    assert refused(clash, SEATS_UNAVAILABLE).details == {"seats": ["stalls:A:4", "stalls:A:3"]}
    assert refused(killed, SEATS_NOT_FOR_SALE).details == {"seats": ["stalls:A:10"]}
    assert refused(held_back, SEATS_NOT_FOR_SALE).details == {"seats": ["stalls:B:1"]}
    assert refused(unknown, UNKNOWN_SEAT).details == {"seats": ["stalls:Z:1"]}
    refused(mixed, MIXED_TICKET_TYPES)
    refused(by_quantity, SEATS_REQUIRED)
    refused(no_level, UNKNOWN_LEVEL)
    assert isinstance(standing, Reserved) and standing.hold.seats == ()
    assert await seat_rows(pool, event_id) == {"stalls:A:3": "held", "stalls:A:4": "held"}
    assert (await counts(pool, event_id))["Front"] == (2, 0, 9)
    assert (await counts(pool, event_id))["ga"] == (2, 0, 30)


async def test_best_available_holds_adjacent_seats_and_refuses_more_than_are_free(
    pool: asyncpg.Pool[Any],
) -> None:
    event_id = await make_seated_event(pool, per_fan=20)
    actor, task = await start_actor(pool, event_id)
    try:
        pair = await actor.ask(best("fan1", "back", 2))
        too_many = await actor.ask(best("fan2", "back", 8))
    finally:
        await stop_actor(actor, task)
    assert isinstance(pair, Reserved)
    rows = [int(s.rsplit(":", 1)[1]) for s in pair.hold.seats]
    assert rows[1] == rows[0] + 1  # side by side
    assert pair.hold.ticket_type == "Back"
    assert refused(too_many, NOT_ENOUGH_SEATS).details == {"level": "back", "available": 7}
    assert set(await seat_rows(pool, event_id)) == set(pair.hold.seats)


async def test_the_per_fan_limit_counts_seats(pool: asyncpg.Pool[Any]) -> None:
    event_id = await make_seated_event(pool, per_fan=3)
    actor, task = await start_actor(pool, event_id)
    try:
        two = await actor.ask(pick("fan", *FRONT[:2]))
        over = await actor.ask(best("fan", "back", 2))
        one = await actor.ask(best("fan", "back", 1))
    finally:
        await stop_actor(actor, task)
    assert isinstance(two, Reserved) and isinstance(one, Reserved)
    assert refused(over, FAN_LIMIT).details["scope"] == "event"


async def test_confirm_sells_the_seats_and_cancel_and_expiry_free_them(
    pool: asyncpg.Pool[Any],
) -> None:
    event_id = await make_seated_event(pool, hold_ttl_s=1)
    actor, task = await start_actor(pool, event_id)
    try:
        paid = await actor.ask(pick("fan1", "stalls:A:1"))
        cancelled = await actor.ask(pick("fan2", "stalls:A:2"))
        lapsing = await actor.ask(pick("fan3", "stalls:A:3"))
        assert isinstance(paid, Reserved) and isinstance(cancelled, Reserved)
        assert isinstance(lapsing, Reserved)
        assert isinstance(await actor.ask(Confirm(paid.hold.id, "fan1", "pay-1", None)), Confirmed)
        assert isinstance(await actor.ask(Cancel(cancelled.hold.id, "fan2", None)), Cancelled)
        assert await seat_rows(pool, event_id) == {"stalls:A:1": "paid", "stalls:A:3": "held"}
        # Sold stays sold; the cancelled seat is free again at once.
        refused(await actor.ask(pick("fan4", "stalls:A:1")), SEATS_UNAVAILABLE)
        again = await actor.ask(pick("fan4", "stalls:A:2"))
        assert isinstance(again, Reserved)
        await asyncio.sleep(1.3)  # the actor's timer expires the holds, A:3's among them
        for _ in range(50):
            if "stalls:A:3" not in await seat_rows(pool, event_id):
                break
            await asyncio.sleep(0.05)
        after = await actor.ask(pick("fan5", "stalls:A:3"))
    finally:
        await stop_actor(actor, task)
    assert isinstance(after, Reserved)
    statuses = dict(
        await pool.fetch(
            "SELECT hold_id::text, status FROM seat_holds"
            " WHERE event_id = $1 AND seat_id = 'stalls:A:3'",
            event_id,
        )
    )
    assert statuses == {lapsing.hold.id: "expired", after.hold.id: "held"}
    assert (await counts(pool, event_id))["Front"] == (1, 1, 9)


async def test_a_rebuilt_ledger_keeps_every_seat_and_replays_a_keyed_pick(
    pool: asyncpg.Pool[Any],
) -> None:
    event_id = await make_seated_event(pool)
    actor, task = await start_actor(pool, event_id)
    try:
        first = await actor.ask(best("fan1", "front", 3, key="k1"))
        other = await actor.ask(pick("fan2", BACK[0], key="k2"))
        gone = await actor.ask(pick("fan3", BACK[7], BACK[6], key="k3"))
        assert isinstance(first, Reserved) and isinstance(other, Reserved)
        assert isinstance(gone, Reserved)
        await actor.ask(Confirm(other.hold.id, "fan2", "pay", None))
        await actor.ask(Cancel(gone.hold.id, "fan3", None))
    finally:
        await stop_actor(actor, task)
    before = actor.ledger.seats
    assert before is not None
    actor, task = await start_actor(pool, event_id)
    try:
        seats = actor.ledger.seats
        assert seats is not None
        assert seats.states() == before.states()
        assert seats.state(BACK[0]) == "sold"
        replay = await actor.ask(best("fan1", "front", 3, key="k1"))
        # A keyed pick cancelled since still answers with its seats, in their order.
        assert await actor.ask(pick("fan3", BACK[7], BACK[6], key="k3")) == gone
        assert seats.state(BACK[7]) == "free"
        taken = await actor.ask(pick("fan3", first.hold.seats[1]))
    finally:
        await stop_actor(actor, task)
    assert replay == first
    refused(taken, SEATS_UNAVAILABLE)


async def test_many_fans_picking_overlapping_seats_at_once_get_each_seat_once(
    pool: asyncpg.Pool[Any],
) -> None:
    event_id = await make_seated_event(pool)
    actor, task = await start_actor(pool, event_id)
    try:
        # 60 fans, each wanting two neighbouring seats of row A: every pair overlaps others.
        results = await asyncio.gather(
            *(actor.ask(pick(f"fan{i}", FRONT[i % 8], FRONT[i % 8 + 1])) for i in range(60))
        )
    finally:
        await stop_actor(actor, task)
    won = [r.hold for r in results if isinstance(r, Reserved)]
    seats = [s for h in won for s in h.seats]
    assert len(seats) == len(set(seats)) and len(won) >= 4
    assert all(r.code == SEATS_UNAVAILABLE for r in results if isinstance(r, Refused))
    assert await seat_rows(pool, event_id) == dict.fromkeys(seats, "held")


async def test_postgresql_refuses_a_seat_in_two_live_holds_or_one_not_on_sale(
    pool: asyncpg.Pool[Any],
) -> None:
    event_id = await make_seated_event(pool)
    actor, task = await start_actor(pool, event_id)
    try:
        held = await actor.ask(pick("fan1", "stalls:A:1"))
        assert isinstance(held, Reserved)
    finally:
        await stop_actor(actor, task)

    async def write(seat: str, status: str = "held") -> None:
        hold_id = uuid.uuid4()
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO holds (id, event_id, ticket_type, fan_id, quantity, status,"
                " expires_at) VALUES ($1, $2, 'Front', 'intruder', 1, $3,"
                " now() + interval '1 minute')",
                hold_id,
                event_id,
                status,
            )
            await conn.execute(
                "INSERT INTO seat_holds (hold_id, event_id, seat_id, status)"
                " VALUES ($1, $2, $3, $4)",
                hold_id,
                event_id,
                seat,
                status,
            )

    with pytest.raises(asyncpg.UniqueViolationError):
        await write("stalls:A:1")
    with pytest.raises(asyncpg.UniqueViolationError):
        await write("stalls:A:1", "paid")
    with pytest.raises(asyncpg.CheckViolationError):
        await write("stalls:A:10")  # killed
    with pytest.raises(asyncpg.CheckViolationError):
        await write("stalls:B:2")  # a Back seat for a Front hold
    await write("stalls:A:2")  # a free seat of the right type goes in
    assert await seat_rows(pool, event_id) == {"stalls:A:1": "held", "stalls:A:2": "held"}


async def test_an_import_fences_a_running_actor_so_the_next_one_sells_seats(
    pool: asyncpg.Pool[Any],
) -> None:
    event_id = await make_seated_event(pool)
    await pool.execute("DELETE FROM seat_maps WHERE event_id = $1", event_id)
    actor, task = await start_actor(pool, event_id)
    try:
        assert actor.ledger.seats is None
        assert isinstance(await actor.ask(Reserve("fan1", "ga", 1, None, None)), Reserved)
        seat_map = msgspec.convert(seat_map_document(), venue.SeatMap)
        await venue.import_seat_map(pool, event_id, seat_map, actor="test")
        # The old actor sold without the map: its next commit is refused, nothing written.
        with pytest.raises(ActorStopped):
            await actor.ask(Reserve("fan2", "Front", 1, None, None))
    finally:
        await stop_actor(actor, task)
    actor, task = await start_actor(pool, event_id)
    try:
        seated = await actor.ask(pick("fan2", FRONT[0]))
    finally:
        await stop_actor(actor, task)
    assert isinstance(seated, Reserved) and seated.hold.seats == (FRONT[0],)
    assert (await counts(pool, event_id))["Front"] == (1, 0, 9)


async def test_a_commit_postgresql_refuses_rebuilds_the_ledger_with_the_seat_taken(
    pool: asyncpg.Pool[Any],
) -> None:
    event_id = await make_seated_event(pool)
    actor, task = await start_actor(pool, event_id)
    try:
        assert isinstance(await actor.ask(pick("fan1", FRONT[0])), Reserved)
        # Behind the actor's back (a bug, a second writer): A:2 goes to another hold.
        intruder = uuid.uuid4()
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO holds (id, event_id, ticket_type, fan_id, quantity, status,"
                " expires_at) VALUES ($1, $2, 'Front', 'intruder', 1, 'held',"
                " now() + interval '10 minutes')",
                intruder,
                event_id,
            )
            await conn.execute(
                "INSERT INTO seat_holds (hold_id, event_id, seat_id, status)"
                " VALUES ($1, $2, $3, 'held')",
                intruder,
                event_id,
                FRONT[1],
            )
        # The actor still thinks A:2 free; PostgreSQL refuses the commit: nothing acknowledged.
        with pytest.raises(ActorStopped):
            await actor.ask(pick("fan2", FRONT[1], FRONT[2]))
        # Rebuilt from PostgreSQL: A:2 is taken, A:3 was never held, A:1 is still fan1's.
        again = await actor.ask(pick("fan2", FRONT[1], FRONT[2]))
        free = await actor.ask(pick("fan2", FRONT[2]))
    finally:
        await stop_actor(actor, task)
    assert refused(again, SEATS_UNAVAILABLE).details == {"seats": [FRONT[1]]}
    assert isinstance(free, Reserved)
    assert await seat_rows(pool, event_id) == dict.fromkeys(FRONT[:3], "held")


async def test_the_snapshot_from_postgresql_matches_the_actors_ledger(
    pool: asyncpg.Pool[Any],
) -> None:
    event_id = await make_seated_event(pool)
    actor, task = await start_actor(pool, event_id)
    try:
        sold = await actor.ask(pick("fan1", FRONT[0], FRONT[1]))
        assert isinstance(sold, Reserved)
        await actor.ask(Confirm(sold.hold.id, "fan1", "pay", None))
        await actor.ask(best("fan2", "back", 3))
    finally:
        await stop_actor(actor, task)
    seats = actor.ledger.seats
    assert seats is not None
    letters = {"free": "f", "held": "h", "sold": "s", "killed": "x"}
    stored = await seats_api.read_snapshot(pool, event_id, version=0)
    assert stored.seats == seats.seat_ids()
    assert stored.states == "".join(letters[s] for s in seats.states())
    assert stored.states.count("s") == 2 and stored.states.count("h") == 3
