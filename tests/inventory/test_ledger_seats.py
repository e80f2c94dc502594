"""The ledger of holds with a seat map: whatever fans do (refunds included), its ticket counts and
its seats agree, and a ledger restored from its holds and returns is the same (the pure core;
hypothesis)."""

from __future__ import annotations

import itertools
from typing import Any

import msgspec
from hypothesis import event, given, settings
from hypothesis import strategies as st

from inventory.ledger import (
    Cancel,
    Command,
    Confirm,
    EventRules,
    Hold,
    Ledger,
    Refused,
    Reserve,
    Reserved,
    Restock,
    Restocked,
    TicketTypeRules,
    decode_result,
    encode_result,
    fingerprint,
)
from inventory.venue import SeatMap
from tests.inventory.seating import BACK, FRONT, seat_map_document

SEAT_MAP = msgspec.convert(seat_map_document(), SeatMap)
RULES = EventRules(
    event_id="e",
    per_fan_limit=4,
    hold_ttl_s=10,
    ticket_types=(
        TicketTypeRules("Front", 9, 3, 5000, "EUR"),
        TicketTypeRules("Back", 9, 4, 3000, "EUR"),
        TicketTypeRules("ga", 30, 4, 2000, "EUR"),
    ),
)
FANS = ("ann", "bob", "cy", "dee")
SEATS = (*FRONT, *BACK, "stalls:A:10", "stalls:B:1", "stalls:C:1")

picks = st.builds(
    lambda fan, seats, key: Reserve(fan, "", len(seats), key, None, seats=tuple(seats)),
    st.sampled_from(FANS),
    st.lists(st.sampled_from(SEATS), min_size=1, max_size=3),
    st.none() | st.sampled_from(("k1", "k2")),
)
bests = st.builds(
    lambda fan, level, count, key: Reserve(fan, "", count, key, None, level=level),
    st.sampled_from(FANS),
    st.sampled_from(("front", "back", "gods")),
    st.integers(0, 4),
    st.none() | st.sampled_from(("k3", "k4")),
)
standing = st.builds(
    lambda fan, tt, q: Reserve(fan, tt, q, None, None),
    st.sampled_from(FANS),
    st.sampled_from(("ga", "Front")),
    st.integers(1, 3),
)
# Settling commands name a hold by its number among those created so far; a payment
# ("pay"), by its number among those still held, so that many plans sell seats.
settles = st.tuples(st.sampled_from(("confirm", "cancel", "pay")), st.integers(0, 20))
# A refund of a paid hold (by its number among the paid ones): the positions of its seats
# given back (a standing hold: as many tickets), any of them possibly given back before.
restocks = st.tuples(
    st.just("restock"),
    st.integers(0, 20),
    st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True),
)
# Settles and refunds twice as often as each kind of reserve, so that many plans sell seats
# and then give some of them back.
steps = st.lists(
    st.tuples(
        st.one_of(picks, bests, standing, settles, settles, restocks, restocks), st.floats(0, 4)
    ),
    min_size=15,
    max_size=40,
)


def kept(ledger: Ledger, hold: Hold) -> tuple[str, ...]:
    """The seats ``hold`` still has: those no refund gave back."""
    returned = ledger.returned_seats(hold.id)
    return tuple(s for s in hold.seats if s not in returned)


def check(ledger: Ledger) -> None:
    seats = ledger.seats
    assert seats is not None
    live = [h for h in ledger.all_holds() if h.status in ("held", "paid")]
    # Tickets a live hold still counts: those no refund gave back.
    counted = {h.id: h.quantity - ledger.returned(h.id) for h in live}
    for name in ("Front", "Back"):
        level = "front" if name == "Front" else "back"
        # Tickets available == seats free; held + sold == seats taken by live holds.
        assert ledger.available(name) == seats.available(level)
        taken = sum(counted[h.id] for h in live if h.ticket_type == name)
        assert taken == 9 - seats.available(level)
    owners: dict[str, str] = {}
    for hold in live:
        if hold.ticket_type in ("Front", "Back"):
            # The hold keeps the seats it sold; the returned ones are its refunds'.
            assert len(hold.seats) == hold.quantity
            assert len(ledger.returned_seats(hold.id)) == ledger.returned(hold.id)
            assert set(ledger.returned_seats(hold.id)) <= set(hold.seats)
            seat_hold = seats.hold_of(hold.id)
            assert seat_hold is not None and seat_hold.seats == kept(ledger, hold)
            for seat in kept(ledger, hold):
                assert seat not in owners  # never in two live holds
                owners[seat] = hold.id
                expected = "held" if hold.status == "held" else "sold"
                assert seats.state(seat) == expected and seats.holder(seat) == hold.id
        else:
            assert hold.seats == () and ledger.returned_seats(hold.id) == ()
    for fan in FANS:
        assert ledger.fan_count(fan) <= RULES.per_fan_limit
        assert ledger.fan_count(fan) == sum(counted[h.id] for h in live if h.fan_id == fan)
        assert seats.fan_seats(fan) == sum(
            len(kept(ledger, h)) for h in live if h.fan_id == fan and h.seats
        )
    for seat in seats.seat_ids():
        state = seats.state(seat)
        assert (state in ("held", "sold")) == (seat in owners)


def restock_of(ledger: Ledger, hold: Hold, positions: list[int], refund_id: str) -> Restock:
    """A refund of ``hold``'s seats at ``positions`` (a standing hold: that many tickets)."""
    if not hold.seats:
        return Restock(refund_id, hold.id, hold.fan_id, hold.ticket_type, len(positions))
    seats = tuple(hold.seats[p] for p in positions if p < len(hold.seats))
    return Restock(refund_id, hold.id, hold.fan_id, hold.ticket_type, len(seats), seats)


def may_restock(ledger: Ledger, hold: Hold, command: Restock) -> bool:
    """The model: a paid hold gives back at least one ticket, no more than it has left, and
    only seats it still has."""
    return (
        hold.status == "paid"
        and 1 <= command.quantity <= hold.quantity - ledger.returned(hold.id)
        and not set(command.seats) & set(ledger.returned_seats(hold.id))
    )


@settings(max_examples=300, deadline=None)
@given(steps)
def test_tickets_and_seats_always_agree_and_a_restored_ledger_is_the_same(
    plan: list[tuple[Any, float]],
) -> None:
    ledger = Ledger(RULES, seat_map=SEAT_MAP)
    counter = itertools.count()
    created: list[str] = []
    now = 1000.0
    for number, (step, wait) in enumerate(plan):
        now += wait
        command: Command
        if isinstance(step, tuple):
            kind, n = step[:2]
            if not created:
                continue
            # A refund picks among the paid holds when there are some (the others refuse),
            # a payment among the held ones.
            wanted = {"restock": "paid", "pay": "held"}.get(kind)
            live = [h.id for h in ledger.live_holds() if h.status == wanted]
            choices = live or created
            hold = ledger.hold(choices[n % len(choices)])
            assert hold is not None
            if kind == "restock":
                command = restock_of(ledger, hold, step[2], f"refund-{number}")
                expected = may_restock(ledger, hold, command)
                result = ledger.apply(command, now, lambda: f"h{next(counter)}")
                assert isinstance(result, Restocked) == expected, result
                if isinstance(result, Restocked):
                    event("seats given back" if command.seats else "standing tickets given back")
                    assert result.seats == command.seats
                    for seat in command.seats:  # on sale again
                        assert ledger.seats is not None and ledger.seats.state(seat) == "free"
                check(ledger)
                continue
            command = (
                Confirm(hold.id, hold.fan_id, f"pay-{n}", None)
                if kind in ("confirm", "pay")
                else Cancel(hold.id, hold.fan_id, None)
            )
        else:
            command = step
        result = ledger.apply(command, now, lambda: f"h{next(counter)}")
        if isinstance(result, Reserved) and result.hold.id not in created:
            created.append(result.hold.id)
            if isinstance(command, Reserve) and command.seats:
                assert result.hold.seats == command.seats
        if isinstance(result, Refused) and isinstance(command, Reserve) and command.seats:
            assert result.code in {
                "seats_unavailable",
                "seats_not_for_sale",
                "unknown_seat",
                "mixed_ticket_types",
                "bad_quantity",
                "fan_limit",
                "idempotency_key_reused",
            }
        check(ledger)
    returns = ledger.drain_changes().restocks
    restored = Ledger.restore(RULES, ledger.all_holds(), {}, returns=returns, seat_map=SEAT_MAP)
    check(restored)
    assert restored.seats is not None and ledger.seats is not None
    assert restored.seats.states() == ledger.seats.states()
    assert restored.availability() == ledger.availability()
    for hold in ledger.live_holds():
        assert restored.returned_seats(hold.id) == ledger.returned_seats(hold.id)
        assert restored.seats.hold_of(hold.id) == ledger.seats.hold_of(hold.id)
    for fan in FANS:
        assert restored.fan_count(fan) == ledger.fan_count(fan)
        assert restored.seats.fan_seats(fan) == ledger.seats.fan_seats(fan)
    # A refund retried after the rebuild answers as it first did and changes nothing.
    for command in returns:
        assert restored.apply(command, now, str) == ledger.apply(command, now, str)
    assert restored.seats.states() == ledger.seats.states()


def test_seated_commands_and_results_cross_processes_and_storage_unchanged() -> None:
    # Forwarded to the owner over Redis (msgpack), stored with their key (JSON).
    for command in (
        Reserve("ann", "", 2, "k", "jti", seats=(FRONT[0], FRONT[1])),
        Reserve("ann", "", 3, "k", "jti", level="back"),
    ):
        wire = msgspec.msgpack.encode(command)
        assert msgspec.msgpack.decode(wire, type=Command) == command
    ledger = Ledger(RULES, seat_map=SEAT_MAP)
    result = ledger.apply(Reserve("ann", "", 2, "k", None, level="front"), 1.0, lambda: "h1")
    assert isinstance(result, Reserved) and len(result.hold.seats) == 2
    assert decode_result(encode_result(result)) == result
    # A pick and a best-available of the same seats are different requests for one key.
    assert fingerprint(Reserve("ann", "", 1, "k", None, seats=(FRONT[0],))) != fingerprint(
        Reserve("ann", "", 1, "k", None, level="front")
    )
