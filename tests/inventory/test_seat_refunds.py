"""Refunds of seated tickets give their seats back: the ledger's Restock with seats (pure), and
through the actor into PostgreSQL (seat_holds, stock_returns, a rebuild)."""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import asyncpg
import msgspec
import pytest

from inventory.actor import InventoryActor
from inventory.ledger import (
    IDEMPOTENCY_MISMATCH,
    REFUSAL_STATUS,
    RETURN_EXCEEDS_SALE,
    RETURN_SEATS_REQUIRED,
    SEATS_ALREADY_RETURNED,
    SEATS_NOT_IN_HOLD,
    SEATS_UNAVAILABLE,
    Command,
    Confirm,
    Confirmed,
    Ledger,
    Refused,
    Reserve,
    Reserved,
    Restock,
    Restocked,
    decode_result,
    encode_result,
)
from inventory.seats import SeatHold, SeatLedger, SeatRefused
from tests.inventory.conftest import held_sold, make_event
from tests.inventory.seating import FRONT, make_seated_event, seat_rows
from tests.inventory.test_ledger_seats import RULES, SEAT_MAP
from tests.inventory.test_seat_inventory import counts, pick, refused, start_actor, stop_actor

A1, A2, A3 = FRONT[:3]


def bought(ledger: Ledger, fan: str, *seats: str, hold_id: str) -> str:
    """``fan`` picks ``seats`` and pays for them; the hold's id."""
    reserved = ledger.apply(pick(fan, *seats), 0.0, lambda: hold_id)
    assert isinstance(reserved, Reserved), reserved
    assert isinstance(
        ledger.apply(Confirm(hold_id, fan, f"ch-{hold_id}", None), 1.0, str), Confirmed
    )
    return hold_id


def give_back(hold: str, *seats: str, refund: str = "r1", fan: str = "ann") -> Restock:
    return Restock(refund, hold, fan, "Front", len(seats), seats)


def states(ledger: Ledger) -> dict[str, str]:
    assert ledger.seats is not None
    return dict(zip(ledger.seats.seat_ids(), ledger.seats.states(), strict=True))


# --- the ledger (pure) -------------------------------------------------------------------------


def test_a_refund_of_one_seat_frees_exactly_that_seat_for_the_next_fan() -> None:
    ledger = Ledger(RULES, seat_map=SEAT_MAP)
    hold = bought(ledger, "ann", A1, A2, hold_id="h1")
    assert ledger.available("Front") == 7

    result = ledger.apply(give_back(hold, A2), 2.0, str)
    assert result == Restocked("r1", hold, "Front", 1, 8, (A2,))
    assert (states(ledger)[A1], states(ledger)[A2]) == ("sold", "free")
    assert ledger.fan_count("ann") == 1
    assert ledger.seats is not None and ledger.seats.fan_seats("ann") == 1
    # The sale happened: the hold stays paid with the seats it sold; the return is recorded.
    paid = ledger.hold(hold)
    assert paid is not None and (paid.status, paid.seats) == ("paid", (A1, A2))
    assert ledger.returned_seats(hold) == (A2,)
    assert ledger.seats.hold_of(hold) == SeatHold(hold, "ann", (A1,), paid.expires_at, "paid")
    assert ledger.drain_changes().restocks == [give_back(hold, A2)]

    # Another fan picks the seat and buys it; the seat the refund kept stays sold.
    bob = bought(ledger, "bob", A2, hold_id="h2")
    assert ledger.seats.holder(A2) == bob and ledger.seats.holder(A1) == hold
    assert refused(ledger.apply(pick("cy", A1), 3.0, lambda: "h3"), SEATS_UNAVAILABLE)
    assert ledger.available("Front") == 7

    # Rebuilt from its holds and returns, the ledger is the same.
    restored = Ledger.restore(
        RULES, ledger.all_holds(), {}, returns=[give_back(hold, A2)], seat_map=SEAT_MAP
    )
    assert states(restored) == states(ledger)
    assert restored.availability() == ledger.availability()
    assert restored.returned_seats(hold) == (A2,)
    assert restored.seats is not None and restored.seats.hold_of(hold) == ledger.seats.hold_of(hold)


def test_a_full_refund_frees_every_seat_once() -> None:
    ledger = Ledger(RULES, seat_map=SEAT_MAP)
    hold = bought(ledger, "ann", A1, A2, hold_id="h1")
    first = ledger.apply(give_back(hold, A2, A1), 2.0, str)
    assert first == Restocked("r1", hold, "Front", 2, 9, (A2, A1))
    assert states(ledger)[A1] == states(ledger)[A2] == "free"
    assert ledger.fan_count("ann") == 0
    # A retry of the refund answers the same and frees nothing more; the same refund id
    # naming other seats is another request.
    assert ledger.apply(give_back(hold, A2, A1), 3.0, str) == first
    other = ledger.apply(give_back(hold, A1, A2), 3.0, str)
    assert isinstance(other, Refused) and other.code == IDEMPOTENCY_MISMATCH
    assert ledger.available("Front") == 9
    assert ledger.drain_changes().restocks == [give_back(hold, A2, A1)]
    # Rebuilt: the hold is known with no seat left, and both seats are on sale.
    restored = Ledger.restore(
        RULES, ledger.all_holds(), {}, returns=[give_back(hold, A2, A1)], seat_map=SEAT_MAP
    )
    assert states(restored) == states(ledger)
    assert restored.seats is not None
    assert restored.seats.hold_of(hold) == ledger.seats.hold_of(hold)  # type: ignore[union-attr]
    kept = restored.seats.hold_of(hold)
    assert kept is not None and kept.seats == ()


def test_a_return_must_name_exactly_its_own_seats_still_sold() -> None:
    ledger = Ledger(RULES, seat_map=SEAT_MAP)
    hold = bought(ledger, "ann", A1, A2, hold_id="h1")
    other = bought(ledger, "bob", A3, hold_id="h2")
    standing = ledger.apply(Reserve("ann", "ga", 1, None, None), 1.0, lambda: "h3")
    assert isinstance(standing, Reserved)
    assert isinstance(ledger.apply(Confirm("h3", "ann", "ch", None), 1.0, str), Confirmed)
    assert isinstance(ledger.apply(give_back(hold, A1, refund="r0"), 2.0, str), Restocked)
    ledger.drain_changes()
    before = (states(ledger), ledger.availability(), ledger.fan_count("ann"))
    for command, code in (
        # No seats, too few, a seat twice: one seat per ticket.
        (Restock("r", hold, "ann", "Front", 1), RETURN_SEATS_REQUIRED),
        (Restock("r", hold, "ann", "Front", 1, (A2, A2)), RETURN_SEATS_REQUIRED),
        (Restock("r", "h2", "bob", "Front", 1, (A3, A3)), RETURN_SEATS_REQUIRED),
        # Another hold's seat, a seat of no hold, a seat of no map.
        (give_back(hold, A3), SEATS_NOT_IN_HOLD),
        (give_back(hold, FRONT[5]), SEATS_NOT_IN_HOLD),
        (give_back(hold, "stalls:Q:1"), SEATS_NOT_IN_HOLD),
        # A seat an earlier refund gave back.
        (give_back(hold, A1), SEATS_ALREADY_RETURNED),
        # More than is left.
        (give_back(hold, A1, A2), RETURN_EXCEEDS_SALE),
        # A standing hold has no seats to give back.
        (Restock("r", "h3", "ann", "ga", 1, (A1,)), SEATS_NOT_IN_HOLD),
    ):
        result = refused(ledger.apply(command, 3.0, str), code)
        assert result.status == REFUSAL_STATUS[code]
    assert (states(ledger), ledger.availability(), ledger.fan_count("ann")) == before
    assert ledger.drain_changes().restocks == []
    assert ledger.seats is not None and ledger.seats.holder(A3) == other
    # The right return still works afterwards.
    assert isinstance(ledger.apply(give_back(hold, A2), 4.0, str), Restocked)


def test_the_seat_ledger_returns_only_sold_seats_of_the_hold() -> None:
    seats = SeatLedger(SEAT_MAP)
    assert isinstance(seats.hold("h1", "ann", (A1, A2), expires_at=10.0), SeatHold)
    assert isinstance(seats.hold("h2", "bob", (A3,), expires_at=10.0), SeatHold)
    assert isinstance(seats.confirm("h1", now=1.0), SeatHold)

    def refusal(result: SeatHold | SeatRefused) -> str:
        assert isinstance(result, SeatRefused), result
        return result.code

    assert refusal(seats.return_seats("nope", (A1,))) == "unknown_hold"
    assert refusal(seats.return_seats("h2", (A3,))) == "hold_not_paid"  # held, not sold
    assert refusal(seats.return_seats("h1", (A3,))) == "seat_not_in_hold"
    assert refusal(seats.return_seats("h1", (A1, A1))) == "duplicate_seat"
    free_front = seats.available("front")
    kept = seats.return_seats("h1", (A1,))
    assert isinstance(kept, SeatHold) and kept.seats == (A2,) and kept.status == "paid"
    assert seats.state(A1) == "free" and seats.holder(A1) is None
    assert seats.available("front") == free_front + 1 and seats.fan_seats("ann") == 1
    assert refusal(seats.return_seats("h1", (A1,))) == "seat_not_in_hold"  # already back
    # The freed seat is in its row's free runs again: best available of one seat in the front
    # row takes it (A:1 is the front row's first free seat nearest no one else's).
    assert isinstance(seats.hold("h3", "cy", (A1,), expires_at=10.0), SeatHold)
    assert seats.holder(A1) == "h3"


def test_restocks_with_seats_cross_processes_and_older_ones_still_decode() -> None:
    command = give_back("h1", A2, A1)
    wire = msgspec.msgpack.encode(command)
    assert msgspec.msgpack.decode(wire, type=Command) == command
    # As a process without seats would have sent it: no seats field at all.
    older: dict[str, Any] = {"type": "Restock", "refund_id": "r", "hold_id": "h"}
    older |= {"fan_id": "f", "ticket_type": "ga", "quantity": 1}
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(older), type=Command)
    assert decoded == Restock("r", "h", "f", "ga", 1)
    for result in (Restocked("r1", "h1", "Front", 2, 9, (A2, A1)), Restocked("r", "h", "ga", 1, 3)):
        assert decode_result(encode_result(result)) == result


# --- through the actor, into PostgreSQL -------------------------------------------------------


async def seat_statuses(pool: asyncpg.Pool[Any], hold_id: str) -> dict[str, str]:
    rows = await pool.fetch("SELECT seat_id, status FROM seat_holds WHERE hold_id = $1", hold_id)
    return {r["seat_id"]: r["status"] for r in rows}


async def bought_through(actor: InventoryActor, fan: str, *seats: str) -> str:
    reserved = await actor.ask(pick(fan, *seats, key=f"k-{fan}"))
    assert isinstance(reserved, Reserved), reserved
    paid = await actor.ask(Confirm(reserved.hold.id, fan, f"ch-{fan}", f"c-{fan}"))
    assert isinstance(paid, Confirmed), paid
    return str(reserved.hold.id)


@pytest.mark.anyio
async def test_a_seat_given_back_leaves_the_live_seats_is_sold_again_and_survives_a_rebuild(
    pool: asyncpg.Pool[Any],
) -> None:
    event_id = await make_seated_event(pool)
    # Refund ids are unique in the database (real ones are UUIDs).
    first_id = f"refund-{uuid.uuid4().hex}"
    actor, task = await start_actor(pool, event_id)
    try:
        ann = await bought_through(actor, "ann", A1, A2)
        result = await actor.ask(Restock(first_id, ann, "ann", "Front", 1, (A2,)))
        assert isinstance(result, Restocked) and result.seats == (A2,)
        # Committed before the answer: the seat's row is refunded, out of the live ones.
        assert await seat_statuses(pool, ann) == {A1: "paid", A2: "refunded"}
        assert await seat_rows(pool, event_id) == {A1: "paid"}
        assert (await counts(pool, event_id))["Front"] == (0, 1, 9)
        seats = await pool.fetchval(
            "SELECT seats FROM stock_returns WHERE refund_id = $1", first_id
        )
        assert seats == [A2]
        # The unique index on live seats lets the next buyer have it.
        bob = await bought_through(actor, "bob", A2)
        assert await seat_rows(pool, event_id) == {A1: "paid", A2: "paid"}
        assert await seat_statuses(pool, bob) == {A2: "paid"}
        live = states(actor.ledger)
    finally:
        await stop_actor(actor, task)

    # A new owner rebuilds the same ledger from PostgreSQL, the return and its seat in it.
    actor, task = await start_actor(pool, event_id)
    try:
        assert states(actor.ledger) == live
        assert actor.ledger.returned_seats(ann) == (A2,)
        assert actor.ledger.seats is not None and actor.ledger.seats.holder(A2) == bob
        # A retry of the refund answers as the first did (with today's stock) and frees nothing.
        again = await actor.ask(Restock(first_id, ann, "ann", "Front", 1, (A2,)))
        assert again == msgspec.structs.replace(result, available=7)
        twice = await actor.ask(Restock(f"{first_id}-2", ann, "ann", "Front", 1, (A2,)))
        assert isinstance(twice, Refused) and twice.code == SEATS_ALREADY_RETURNED
        # The rest of the order back: its last seat is free too.
        full = await actor.ask(Restock(f"{first_id}-3", ann, "ann", "Front", 1, (A1,)))
        assert isinstance(full, Restocked)
        assert await seat_statuses(pool, ann) == {A1: "refunded", A2: "refunded"}
        assert await seat_rows(pool, event_id) == {A2: "paid"}
        live = states(actor.ledger)
    finally:
        await stop_actor(actor, task)
    actor, task = await start_actor(pool, event_id)
    try:
        assert states(actor.ledger) == live
        assert (states(actor.ledger)[A1], states(actor.ledger)[A2]) == ("free", "sold")
    finally:
        await stop_actor(actor, task)
    assert (await counts(pool, event_id))["Front"] == (0, 1, 9)


@pytest.mark.anyio
async def test_postgresql_refuses_a_return_that_does_not_free_its_own_sold_seats(
    pool: asyncpg.Pool[Any],
) -> None:
    event_id = await make_seated_event(pool)
    actor, task = await start_actor(pool, event_id)
    try:
        ann = await bought_through(actor, "ann", A1, A2)
        await bought_through(actor, "bob", A3)
    finally:
        await stop_actor(actor, task)
    n = itertools.count()
    for quantity, seats in (
        (1, []),  # a seated hold's return names its seats
        (1, [A1, A2]),  # one per ticket
        (2, [A1, A1]),  # each once
        (1, [A3]),  # its own
        (1, ["stalls:A:9"]),  # sold to it
    ):
        with pytest.raises(asyncpg.CheckViolationError):
            await pool.execute(
                "INSERT INTO stock_returns (refund_id, event_id, hold_id, ticket_type, fan_id,"
                " quantity, seats) VALUES ($1, $2, $3, 'Front', 'ann', $4, $5)",
                f"bad-{next(n)}-{uuid.uuid4().hex}",
                event_id,
                ann,
                quantity,
                seats,
            )
    assert await seat_rows(pool, event_id) == {A1: "paid", A2: "paid", A3: "paid"}
    assert (await counts(pool, event_id))["Front"] == (0, 3, 9)


@pytest.mark.anyio
async def test_tickets_and_seats_given_back_can_be_taken_again_in_the_same_group_commit(
    pool: asyncpg.Pool[Any],
) -> None:
    # Both sent before the actor wakes: one batch, one transaction, the return first.
    seated = await make_seated_event(pool)
    standing = await make_event(pool, quantity=2, per_fan=2)
    refund_id = f"refund-{uuid.uuid4().hex}"
    actor, task = await start_actor(pool, seated)
    try:
        ann = await bought_through(actor, "ann", A1, A2)
        returned = actor.submit(Restock(refund_id, ann, "ann", "Front", 1, (A2,)))
        taken = actor.submit(pick("bob", A2))
        assert isinstance(await returned, Restocked)
        bob = await taken
        assert isinstance(bob, Reserved) and bob.hold.seats == (A2,)
        assert await seat_rows(pool, seated) == {A1: "paid", A2: "held"}
        assert (await counts(pool, seated))["Front"] == (1, 1, 9)
    finally:
        await stop_actor(actor, task)
    # Sold out, then a ticket back and sold again at once: sold goes down before held goes up.
    actor, task = await start_actor(pool, standing)
    try:
        reserved = await actor.ask(Reserve("ann", "ga", 2, "k-ann", None))
        assert isinstance(reserved, Reserved)
        assert isinstance(await actor.ask(Confirm(reserved.hold.id, "ann", "ch", "c")), Confirmed)
        returned = actor.submit(Restock(f"{refund_id}-ga", reserved.hold.id, "ann", "ga", 1))
        taken = actor.submit(Reserve("bob", "ga", 1, "k-bob", None))
        assert isinstance(await returned, Restocked)
        assert isinstance(await taken, Reserved)
        assert await held_sold(pool, standing) == (1, 1, 2)
    finally:
        await stop_actor(actor, task)
