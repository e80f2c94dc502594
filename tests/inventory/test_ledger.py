"""The pure ledger of an event's inventory: examples, then hypothesis against a naive model."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from inventory.ledger import (
    ALREADY_CONFIRMED,
    BAD_QUANTITY,
    FAN_LIMIT,
    HOLD_CANCELLED,
    HOLD_EXPIRED,
    IDEMPOTENCY_MISMATCH,
    NOT_YOUR_HOLD,
    PASS_USED,
    REFUSAL_STATUS,
    RETURN_EXCEEDS_SALE,
    SOLD_OUT,
    TICKETS_HELD,
    UNKNOWN_HOLD,
    UNKNOWN_TICKET_TYPE,
    Cancel,
    Cancelled,
    Command,
    Confirm,
    Confirmed,
    EventRules,
    Expire,
    Expired,
    Hold,
    Ledger,
    Refused,
    Reserve,
    Reserved,
    Result,
    TicketTypeRules,
    decode_result,
    encode_result,
    fingerprint,
)

T0 = 1_700_000_000.0
PASS_JTI = "jti-1"
TTL = 600
RULES = EventRules(
    event_id="evt",
    per_fan_limit=6,
    hold_ttl_s=TTL,
    ticket_types=(
        TicketTypeRules("GA", quantity=10, per_fan_limit=4, price_minor=5_000, currency="EUR"),
        TicketTypeRules("VIP", quantity=3, per_fan_limit=3, price_minor=20_000, currency="EUR"),
    ),
)


def counter(prefix: str = "h") -> Callable[[], str]:
    """Hold ids h1, h2, ... as the actor's uuid4 would, but predictable."""
    numbers = itertools.count(1)
    return lambda: f"{prefix}{next(numbers)}"


def no_new_ids() -> str:
    raise AssertionError("no hold may be created here")


class Desk:
    """A ledger with a clock and an id source, so examples read as sentences."""

    def __init__(self, rules: EventRules = RULES) -> None:
        self.ledger = Ledger(rules)
        self.now = T0
        self.new_id = counter()
        # Each reserve comes with a pass of its own unless one is named: a pass has one hold
        # cycle, and most examples here are about other rules.
        self.new_pass = counter("jti-")

    def do(self, command: Command) -> Result:
        return self.ledger.apply(command, self.now, self.new_id)

    def reserve(
        self,
        fan: str = "ann",
        ticket_type: str = "GA",
        quantity: int = 1,
        key: str | None = None,
        pass_jti: str | None = "",
    ) -> Result:
        jti = self.new_pass() if pass_jti == "" else pass_jti
        return self.do(Reserve(fan, ticket_type, quantity, key, jti))

    def hold_on(self, pass_jti: str | None, quantity: int = 1, fan: str = "ann") -> Hold:
        result = self.reserve(fan, "GA", quantity, pass_jti=pass_jti)
        assert isinstance(result, Reserved), result
        return result.hold

    def hold(self, fan: str = "ann", ticket_type: str = "GA", quantity: int = 1) -> Hold:
        result = self.reserve(fan, ticket_type, quantity)
        assert isinstance(result, Reserved), result
        return result.hold

    def confirm(self, hold: Hold, fan: str | None = None, key: str | None = None) -> Result:
        return self.do(Confirm(hold.id, fan or hold.fan_id, f"pay-{hold.id}", key))

    def cancel(self, hold: Hold, fan: str | None = None, key: str | None = None) -> Result:
        return self.do(Cancel(hold.id, fan or hold.fan_id, key))


def refused(result: Result, code: str) -> Refused:
    assert isinstance(result, Refused), result
    assert result.code == code, result
    return result


# --- reserving ---------------------------------------------------------------------------


def test_a_reservation_holds_tickets_until_the_deadline() -> None:
    desk = Desk()
    hold = desk.hold("ann", "GA", 2)
    assert hold == Hold("h1", "ann", "GA", 2, "held", T0 + TTL, "jti-1")
    assert desk.ledger.available("GA") == 8
    assert desk.ledger.availability() == {"GA": 8, "VIP": 3}
    assert desk.ledger.fan_count("ann") == 2
    assert desk.ledger.fan_count("ann", "GA") == 2
    assert desk.ledger.hold("h1") == hold
    assert desk.ledger.live_holds() == [hold]
    assert desk.ledger.next_deadline() == T0 + TTL


def test_a_fan_cannot_hold_more_than_the_per_fan_limit_of_a_ticket_type() -> None:
    desk = Desk()
    desk.hold("ann", "GA", 3)
    refusal = refused(desk.reserve("ann", "GA", 2), FAN_LIMIT)
    assert refusal.details == {
        "scope": "ticket_type",
        "ticket_type": "GA",
        "limit": 4,
        "current": 3,
    }
    assert refusal.status == 409
    assert isinstance(desk.reserve("ann", "GA", 1), Reserved)
    assert isinstance(desk.reserve("bob", "GA", 4), Reserved)


def test_a_fan_cannot_hold_more_than_the_per_fan_limit_of_the_event() -> None:
    desk = Desk()
    desk.hold("ann", "GA", 4)
    refusal = refused(desk.reserve("ann", "VIP", 3), FAN_LIMIT)
    assert refusal.details == {"scope": "event", "limit": 6, "current": 4}
    assert isinstance(desk.reserve("ann", "VIP", 2), Reserved)


def test_paid_holds_count_towards_the_limit_and_settled_ones_do_not() -> None:
    desk = Desk()
    paid = desk.hold("ann", "GA", 2)
    desk.confirm(paid)
    cancelled = desk.hold("ann", "GA", 2)
    desk.cancel(cancelled)
    assert desk.ledger.fan_count("ann") == 2
    refused(desk.reserve("ann", "GA", 3), FAN_LIMIT)
    assert isinstance(desk.reserve("ann", "GA", 2), Reserved)


def test_a_reservation_larger_than_what_is_left_is_refused_as_sold_out() -> None:
    desk = Desk()
    desk.confirm(desk.hold("ann", "VIP", 2))
    refusal = refused(desk.reserve("bob", "VIP", 2), SOLD_OUT)
    assert refusal.details == {"ticket_type": "VIP", "available": 1}
    assert refusal.status == 409
    assert isinstance(desk.reserve("bob", "VIP", 1), Reserved)
    assert desk.ledger.available("VIP") == 0


def test_while_held_tickets_may_come_back_the_refusal_says_so_not_sold_out() -> None:
    desk = Desk()
    held = desk.hold("ann", "VIP", 2)
    refusal = refused(desk.reserve("bob", "VIP", 2), TICKETS_HELD)
    assert refusal.details == {"ticket_type": "VIP", "available": 1, "held": 2}
    assert refusal.status == 409
    assert isinstance(desk.reserve("bob", "VIP", 1), Reserved)
    refused(desk.reserve("cy", "VIP", 1), TICKETS_HELD)
    desk.confirm(held)
    refused(desk.reserve("cy", "VIP", 1), TICKETS_HELD)  # bob's one may still lapse
    refused(desk.reserve("cy", "VIP", 2), SOLD_OUT)  # more than could ever come back


@pytest.mark.parametrize("quantity", [0, -1])
def test_a_quantity_below_one_is_refused(quantity: int) -> None:
    desk = Desk()
    refusal = refused(desk.reserve(quantity=quantity), BAD_QUANTITY)
    assert refusal.status == 422
    assert desk.ledger.all_holds() == []


def test_an_unknown_ticket_type_is_refused() -> None:
    desk = Desk()
    refusal = refused(desk.reserve(ticket_type="Backstage"), UNKNOWN_TICKET_TYPE)
    assert refusal.status == 422
    assert refusal.details["known"] == ["GA", "VIP"]


def test_new_ids_are_drawn_only_for_holds_actually_created() -> None:
    desk = Desk()
    refused(desk.reserve(quantity=0), BAD_QUANTITY)
    refused(desk.reserve(quantity=5), FAN_LIMIT)
    assert desk.hold().id == "h1"


# --- confirming and cancelling -----------------------------------------------------------


def test_confirming_a_hold_marks_it_paid_and_keeps_its_tickets_sold() -> None:
    desk = Desk()
    hold = desk.hold("ann", "GA", 2)
    result = desk.confirm(hold)
    assert result == Confirmed(msgspec.structs.replace(hold, status="paid", payment_ref="pay-h1"))
    assert desk.ledger.available("GA") == 8
    assert desk.ledger.next_deadline() is None
    desk.now += TTL * 2
    assert desk.do(Expire()) == Expired(())
    assert desk.ledger.available("GA") == 8


def test_cancelling_a_hold_gives_its_tickets_back() -> None:
    desk = Desk()
    hold = desk.hold("ann", "GA", 2)
    result = desk.cancel(hold)
    assert result == Cancelled(msgspec.structs.replace(hold, status="cancelled"))
    assert desk.ledger.available("GA") == 10
    assert desk.ledger.fan_count("ann") == 0
    assert desk.ledger.live_holds() == []


def test_confirming_after_the_deadline_expires_the_hold_right_there() -> None:
    desk = Desk()
    hold = desk.hold("ann", "GA", 2)
    desk.now = hold.expires_at  # the deadline itself is already too late
    refusal = refused(desk.confirm(hold), HOLD_EXPIRED)
    assert refusal.status == 410
    assert desk.ledger.hold(hold.id) == msgspec.structs.replace(hold, status="expired")
    assert desk.ledger.available("GA") == 10
    assert desk.ledger.drain_changes().new_holds[0].status == "expired"


def test_confirming_just_before_the_deadline_still_succeeds() -> None:
    desk = Desk()
    hold = desk.hold()
    desk.now = hold.expires_at - 0.001
    assert isinstance(desk.confirm(hold), Confirmed)


def test_cancelling_after_the_deadline_reports_the_hold_expired() -> None:
    desk = Desk()
    hold = desk.hold()
    desk.now += TTL + 1
    refused(desk.cancel(hold), HOLD_EXPIRED)
    assert desk.ledger.hold(hold.id) == msgspec.structs.replace(hold, status="expired")


def test_a_paid_hold_can_be_neither_confirmed_again_nor_cancelled() -> None:
    desk = Desk()
    hold = desk.hold()
    desk.confirm(hold)
    assert refused(desk.confirm(hold), ALREADY_CONFIRMED).status == 409
    refused(desk.cancel(hold), ALREADY_CONFIRMED)
    assert desk.ledger.hold(hold.id) == msgspec.structs.replace(
        hold, status="paid", payment_ref="pay-h1"
    )


def test_a_cancelled_hold_can_be_neither_confirmed_nor_cancelled_again() -> None:
    desk = Desk()
    hold = desk.hold()
    desk.cancel(hold)
    assert refused(desk.confirm(hold), HOLD_CANCELLED).status == 409
    refused(desk.cancel(hold), HOLD_CANCELLED)
    assert desk.ledger.available("GA") == 10


def test_an_expired_hold_can_be_neither_confirmed_nor_cancelled() -> None:
    desk = Desk()
    hold = desk.hold()
    desk.now += TTL
    desk.do(Expire())
    refused(desk.confirm(hold), HOLD_EXPIRED)
    refused(desk.cancel(hold), HOLD_EXPIRED)
    assert desk.ledger.hold(hold.id) == msgspec.structs.replace(hold, status="expired")


def test_an_unknown_hold_is_not_found() -> None:
    desk = Desk()
    refusal = refused(desk.do(Confirm("nope", "ann", "pay", None)), UNKNOWN_HOLD)
    assert refusal.status == 404
    refused(desk.do(Cancel("nope", "ann", None)), UNKNOWN_HOLD)


@pytest.mark.parametrize("settle", ["held", "paid", "cancelled", "expired"])
def test_a_fan_cannot_see_or_touch_another_fans_hold(settle: str) -> None:
    desk = Desk()
    hold = desk.hold("ann")
    if settle == "paid":
        desk.confirm(hold)
    elif settle == "cancelled":
        desk.cancel(hold)
    elif settle == "expired":
        desk.now += TTL
    unknown = refused(desk.do(Confirm("no-such-hold", "bob", "pay", None)), UNKNOWN_HOLD)
    assert NOT_YOUR_HOLD == UNKNOWN_HOLD
    for command in (Confirm(hold.id, "bob", "pay", None), Cancel(hold.id, "bob", None)):
        refusal = refused(desk.do(command), NOT_YOUR_HOLD)
        assert refusal.message == unknown.message
        assert refusal.details == {"hold_id": hold.id}
    untouched = desk.ledger.hold(hold.id)
    assert untouched is not None
    assert untouched.status == settle


# --- expiry ------------------------------------------------------------------------------


def test_expire_pops_only_the_holds_that_are_due() -> None:
    desk = Desk()
    first = desk.hold("ann")
    desk.now += 10
    second = desk.hold("bob")
    desk.now += 10
    third = desk.hold("cy")
    desk.cancel(third)
    desk.now = second.expires_at
    result = desk.do(Expire())
    assert result == Expired(
        (
            msgspec.structs.replace(first, status="expired"),
            msgspec.structs.replace(second, status="expired"),
        )
    )
    assert desk.do(Expire()) == Expired(())
    assert desk.ledger.live_holds() == []
    assert desk.ledger.next_deadline() is None
    assert desk.ledger.available("GA") == 10


def test_expire_leaves_holds_that_are_not_due_yet() -> None:
    desk = Desk()
    early = desk.hold("ann")
    desk.now += 30
    late = desk.hold("bob")
    desk.now = early.expires_at + 1
    assert desk.do(Expire()) == Expired((msgspec.structs.replace(early, status="expired"),))
    assert desk.ledger.live_holds() == [late]
    assert desk.ledger.next_deadline() == late.expires_at


def test_expired_holds_give_back_tickets_and_fan_counts() -> None:
    desk = Desk()
    desk.hold("ann", "GA", 4)
    refused(desk.reserve("ann", "GA", 1), FAN_LIMIT)
    desk.now += TTL
    desk.do(Expire())
    assert desk.ledger.fan_count("ann") == 0
    assert isinstance(desk.reserve("ann", "GA", 4), Reserved)


def test_a_reservation_after_a_deadline_sees_the_lapsed_tickets_without_waiting_for_expire() -> (
    None
):
    desk = Desk()
    lapsed = desk.hold("ann", "VIP", 3)
    refused(desk.reserve("bob", "VIP", 1), TICKETS_HELD)
    desk.now = lapsed.expires_at
    assert isinstance(desk.reserve("bob", "VIP", 3), Reserved)
    assert desk.ledger.hold(lapsed.id) == msgspec.structs.replace(lapsed, status="expired")


def test_next_deadline_skips_holds_that_were_settled() -> None:
    desk = Desk()
    first = desk.hold("ann")
    desk.now += 5
    second = desk.hold("bob")
    assert desk.ledger.next_deadline() == first.expires_at
    desk.confirm(first)
    assert desk.ledger.next_deadline() == second.expires_at
    desk.cancel(second)
    assert desk.ledger.next_deadline() is None


def test_sold_out_means_nothing_left_and_nothing_that_could_come_back() -> None:
    rules = EventRules("evt", 4, TTL, (TicketTypeRules("GA", 2, 2, 100, "EUR"),))
    desk = Desk(rules)
    assert not desk.ledger.sold_out()
    first = desk.hold("ann", "GA", 1)
    second = desk.hold("bob", "GA", 1)
    assert desk.ledger.available("GA") == 0
    assert not desk.ledger.sold_out()  # both holds may still lapse
    desk.confirm(first)
    assert not desk.ledger.sold_out()
    desk.confirm(second)
    assert desk.ledger.sold_out()


# --- idempotency -------------------------------------------------------------------------


def test_a_retry_with_the_same_key_returns_the_identical_result_and_changes_nothing() -> None:
    desk = Desk()
    first = desk.reserve("ann", "GA", 2, key="k1")
    desk.ledger.drain_changes()
    before = (desk.ledger.all_holds(), desk.ledger.availability())
    desk.now += 5
    assert desk.reserve("ann", "GA", 2, key="k1") == first
    assert (desk.ledger.all_holds(), desk.ledger.availability()) == before
    assert desk.ledger.drain_changes().empty()


def test_a_retry_of_a_confirm_and_of_a_cancel_returns_the_first_result() -> None:
    desk = Desk()
    paid = desk.hold("ann")
    confirmed = desk.confirm(paid, key="pay")
    assert isinstance(confirmed, Confirmed)
    assert desk.confirm(paid, key="pay") == confirmed
    gone = desk.hold("ann")
    cancelled = desk.cancel(gone, key="drop")
    assert isinstance(cancelled, Cancelled)
    assert desk.cancel(gone, key="drop") == cancelled


def test_a_refusal_is_the_first_result_too() -> None:
    desk = Desk()
    hold = desk.hold("ann", "VIP", 3)
    sold_out = refused(desk.reserve("bob", "VIP", 1, key="k"), TICKETS_HELD)
    desk.cancel(hold)
    assert desk.reserve("bob", "VIP", 1, key="k") == sold_out
    assert isinstance(desk.reserve("bob", "VIP", 1, key="another"), Reserved)


def test_a_retry_does_not_even_expire_holds_that_fell_due() -> None:
    desk = Desk()
    first = desk.reserve("ann", key="k")
    assert isinstance(first, Reserved)
    desk.ledger.drain_changes()
    desk.now += TTL * 2
    assert desk.reserve("ann", key="k") == first
    assert desk.ledger.hold(first.hold.id) == first.hold
    assert desk.ledger.drain_changes().empty()


def test_a_pass_reserves_no_more_once_its_holds_were_cancelled() -> None:
    desk = Desk()
    hold = desk.hold_on("pass-a", quantity=2)
    assert isinstance(desk.cancel(hold), Cancelled)
    assert desk.ledger.pass_used("ann", "pass-a")
    refused(desk.reserve(pass_jti="pass-a"), PASS_USED)
    assert desk.ledger.available("GA") == 10  # the tickets stay back on sale
    assert isinstance(desk.reserve(pass_jti="pass-b"), Reserved)  # a new pass may


def test_a_pass_reserves_no_more_once_its_hold_expired_or_was_paid() -> None:
    desk = Desk()
    desk.hold_on("pass-a")
    desk.now += TTL
    refused(desk.reserve(pass_jti="pass-a"), PASS_USED)
    paid = desk.hold_on("pass-b")
    desk.confirm(paid)
    refused(desk.reserve(pass_jti="pass-b"), PASS_USED)


def test_a_pass_with_a_hold_still_live_may_reserve_more() -> None:
    desk = Desk()
    first = desk.hold_on("pass-a")
    desk.hold_on("pass-a")
    desk.cancel(first)
    assert not desk.ledger.pass_used("ann", "pass-a")
    assert isinstance(desk.reserve(pass_jti="pass-a"), Reserved)


def test_a_pass_cycle_belongs_to_its_fan_and_commands_without_a_pass_have_none() -> None:
    desk = Desk()
    desk.cancel(desk.hold_on("pass-a"))
    assert isinstance(desk.reserve("bob", pass_jti="pass-a"), Reserved)
    assert isinstance(desk.cancel(desk.hold_on(None)), Cancelled)
    assert isinstance(desk.reserve(pass_jti=None), Reserved)


def test_only_the_newest_refusals_of_a_fan_are_kept_for_replay() -> None:
    desk = Desk()
    desk.ledger = Ledger(RULES, max_refusals_per_fan=2)
    first = refused(desk.reserve(ticket_type="Z", key="k1"), UNKNOWN_TICKET_TYPE)
    refused(desk.reserve(ticket_type="Z", key="k2"), UNKNOWN_TICKET_TYPE)
    assert desk.reserve(ticket_type="Z", key="k1") == first  # still kept: replayed
    refused(desk.reserve(ticket_type="Z", key="k3"), UNKNOWN_TICKET_TYPE)
    assert desk.ledger.stored_keys("ann") == 2
    # k1 was forgotten: the same key is a new request now, and it may succeed.
    assert isinstance(desk.reserve(key="k1"), Reserved)
    # Successes are never forgotten, whatever the refusals after them.
    success = desk.reserve(key="ok")
    for i in range(5):
        refused(desk.reserve(ticket_type="Z", key=f"r{i}"), UNKNOWN_TICKET_TYPE)
    assert desk.reserve(key="ok") == success


def test_restore_keeps_a_pass_cycle_over_from_its_settled_holds_or_the_used_list() -> None:
    desk = Desk()
    desk.cancel(desk.hold_on("pass-a"))
    desk.hold_on("pass-b")
    restored = Ledger.restore(RULES, desk.ledger.all_holds(), {})
    assert restored.pass_used("ann", "pass-a") and not restored.pass_used("ann", "pass-b")
    live_only = Ledger.restore(
        RULES, desk.ledger.live_holds(), {}, used_passes=[("ann", "pass-a"), ("ann", "pass-b")]
    )
    # pass-b still has a live hold: listed or not, its cycle is not over.
    assert live_only.pass_used("ann", "pass-a") and not live_only.pass_used("ann", "pass-b")


def test_reusing_a_key_for_a_different_request_is_refused() -> None:
    desk = Desk()
    first = desk.reserve("ann", "GA", 2, key="k1")
    refusal = refused(desk.reserve("ann", "GA", 3, key="k1"), IDEMPOTENCY_MISMATCH)
    assert refusal.status == 422
    assert refusal.details == {"idempotency_key": "k1"}
    assert isinstance(first, Reserved)
    refused(desk.cancel(first.hold, key="k1"), IDEMPOTENCY_MISMATCH)
    assert desk.ledger.hold(first.hold.id) == first.hold
    assert desk.ledger.all_holds() == [first.hold]
    assert desk.reserve("ann", "GA", 2, key="k1") == first


def test_keys_belong_to_one_fan() -> None:
    desk = Desk()
    ann = desk.reserve("ann", "GA", 1, key="same")
    bob = desk.reserve("bob", "GA", 1, key="same")
    assert isinstance(ann, Reserved)
    assert isinstance(bob, Reserved)
    assert ann.hold.id != bob.hold.id


def test_a_retry_with_a_refreshed_pass_is_still_the_same_request() -> None:
    desk = Desk()
    first = desk.reserve("ann", key="k", pass_jti="old-pass")
    assert desk.reserve("ann", key="k", pass_jti="new-pass") == first
    assert len(desk.ledger.all_holds()) == 1


def test_fingerprints_tell_requests_apart_but_ignore_the_key_and_pass() -> None:
    base = Reserve("ann", "GA", 2, "k1", "jti-1")
    assert fingerprint(base) == fingerprint(Reserve("ann", "GA", 2, "k2", None))
    assert fingerprint(base) != fingerprint(Reserve("ann", "GA", 3, "k1", "jti-1"))
    assert fingerprint(base) != fingerprint(Reserve("ann", "VIP", 2, "k1", "jti-1"))
    assert fingerprint(Cancel("h1", "ann", "k")) != fingerprint(Confirm("h1", "ann", "p", "k"))
    assert fingerprint(Confirm("h1", "ann", "p", "k")) != fingerprint(
        Confirm("h1", "ann", "q", "k")
    )
    assert len(fingerprint(base)) == 32


# --- persistence -------------------------------------------------------------------------


def test_drain_changes_reports_each_new_hold_once_with_its_final_status() -> None:
    desk = Desk()
    old = desk.hold("ann")
    desk.ledger.drain_changes()
    fresh = desk.hold("bob")
    paid = desk.confirm(fresh, key="pay")
    desk.cancel(old)
    changes = desk.ledger.drain_changes()
    assert isinstance(paid, Confirmed)
    assert changes.new_holds == [paid.hold]
    assert changes.updated_holds == [msgspec.structs.replace(old, status="cancelled")]
    confirm = Confirm(fresh.id, "bob", f"pay-{fresh.id}", "pay")
    assert changes.idempotency == [("bob", "pay", fingerprint(confirm), paid)]
    assert desk.ledger.drain_changes().empty()


def test_an_expired_hold_is_reported_as_an_update() -> None:
    desk = Desk()
    hold = desk.hold()
    desk.ledger.drain_changes()
    desk.now += TTL
    desk.do(Expire())
    changes = desk.ledger.drain_changes()
    assert changes.new_holds == []
    assert changes.updated_holds == [msgspec.structs.replace(hold, status="expired")]
    assert changes.idempotency == []


def test_restore_reproduces_availability_and_state_exactly() -> None:
    desk = Desk()
    paid = desk.hold("ann", "GA", 2)
    desk.confirm(paid)
    desk.hold("bob", "VIP", 2)
    dropped = desk.hold("cy", "GA", 1)
    desk.cancel(dropped)
    desk.now += 100
    keyed = desk.reserve("dee", "GA", 3, key="k")
    refused(desk.reserve("dee", "VIP", 2, key="k2"), TICKETS_HELD)
    changes = desk.ledger.drain_changes()
    idem = {
        (fan, key): (fp, decode_result(encode_result(r))) for fan, key, fp, r in changes.idempotency
    }

    restored = Ledger.restore(RULES, desk.ledger.all_holds(), idem)

    original = desk.ledger
    assert restored.availability() == original.availability() == {"GA": 5, "VIP": 1}
    assert restored.all_holds() == original.all_holds()
    assert restored.live_holds() == original.live_holds()
    assert restored.next_deadline() == original.next_deadline()
    assert restored.sold_out() == original.sold_out()
    for fan in ("ann", "bob", "cy", "dee"):
        assert restored.fan_count(fan) == original.fan_count(fan)
    assert restored.apply(Reserve("dee", "GA", 3, "k", None), desk.now, no_new_ids) == keyed
    assert restored.drain_changes().empty()
    # The actor may load only the live holds: the counts come out the same.
    live_only = Ledger.restore(RULES, original.live_holds(), idem)
    assert live_only.availability() == original.availability()
    assert live_only.fan_count("ann") == 2


def test_restore_refuses_a_state_that_oversells() -> None:
    holds = [Hold(f"h{i}", f"fan{i}", "VIP", 2, "paid", T0, None, "p") for i in range(2)]
    with pytest.raises(ValueError, match="oversold"):
        Ledger.restore(RULES, holds, {})


def test_restore_refuses_holds_of_an_unknown_ticket_type_or_a_duplicate_id() -> None:
    with pytest.raises(ValueError, match="unknown ticket type"):
        Ledger.restore(RULES, [Hold("h1", "ann", "Backstage", 1, "held", T0, None)], {})
    twice = Hold("h1", "ann", "GA", 1, "held", T0, None)
    with pytest.raises(ValueError, match="twice"):
        Ledger.restore(RULES, [twice, twice], {})


def test_commands_and_results_survive_the_wire() -> None:
    commands: list[Command] = [
        Reserve("ann", "GA", 2, "k", "jti"),
        Confirm("h1", "ann", "pay", None),
        Cancel("h1", "ann", "k2"),
        Expire(),
    ]
    for command in commands:
        wire = msgspec.msgpack.encode(command)
        assert msgspec.msgpack.decode(wire, type=Command) == command
    hold = Hold("h1", "ann", "GA", 2, "held", T0 + 0.1, "jti")
    results: list[Result] = [
        Reserved(hold),
        Confirmed(msgspec.structs.replace(hold, status="paid", payment_ref="p")),
        Cancelled(msgspec.structs.replace(hold, status="cancelled")),
        Expired((msgspec.structs.replace(hold, status="expired"),)),
        Refused(SOLD_OUT, "gone", {"available": 0, "ticket_type": "GA"}),
        Refused(TICKETS_HELD, "held", {"available": 0, "held": 2, "ticket_type": "GA"}),
    ]
    for result in results:
        assert decode_result(encode_result(result)) == result


def test_every_refusal_code_has_an_http_status() -> None:
    codes = {
        SOLD_OUT: 409,
        TICKETS_HELD: 409,
        FAN_LIMIT: 409,
        UNKNOWN_HOLD: 404,
        NOT_YOUR_HOLD: 404,
        HOLD_EXPIRED: 410,
        ALREADY_CONFIRMED: 409,
        HOLD_CANCELLED: 409,
        UNKNOWN_TICKET_TYPE: 422,
        BAD_QUANTITY: 422,
        IDEMPOTENCY_MISMATCH: 422,
        PASS_USED: 403,
        RETURN_EXCEEDS_SALE: 409,
        # Seated reserves (tests/inventory/test_seat_inventory.py).
        "seats_unavailable": 409,
        "seats_not_for_sale": 422,
        "unknown_seat": 422,
        "unknown_price_level": 422,
        "mixed_ticket_types": 422,
        "seats_required": 422,
        "not_enough_seats": 409,
        # Returns of seats (tests/inventory/test_seat_refunds.py).
        "return_seats_required": 422,
        "seats_not_in_hold": 422,
        "seats_already_returned": 409,
    }
    assert codes == REFUSAL_STATUS


# --- properties --------------------------------------------------------------------------

FANS = ("ann", "bob", "cy")
KEYS = st.none() | st.sampled_from(("k1", "k2", "k3", "k4"))
PASSES = ("jti-1", "jti-2")
#: A small cap on kept refusals, so that the machine reaches it.
MODEL_REFUSALS = 2
PAY_REFS = ("pay-1", "pay-2")
TYPE_NAMES = ("A", "B", "C")


@st.composite
def event_rules(draw: st.DrawFn) -> EventRules:
    count = draw(st.integers(1, len(TYPE_NAMES)))
    types = tuple(
        TicketTypeRules(
            name,
            quantity=draw(st.integers(1, 6)),
            per_fan_limit=draw(st.integers(1, 4)),
            price_minor=100,
            currency="EUR",
        )
        for name in TYPE_NAMES[:count]
    )
    return EventRules("evt", draw(st.integers(1, 6)), draw(st.integers(5, 30)), types)


@settings(max_examples=200, deadline=None)
@given(
    rules=event_rules(),
    steps=st.lists(
        st.tuples(
            st.sampled_from(FANS),
            st.sampled_from(TYPE_NAMES),
            st.integers(-1, 5),
            st.integers(0, 4),
        ),
        max_size=60,
    ),
)
def test_no_sequence_of_reservations_ever_oversells(
    rules: EventRules, steps: list[tuple[str, str, int, int]]
) -> None:
    ledger = Ledger(rules)
    new_id = counter()
    now = T0
    for fan, ticket_type, quantity, wait in steps:
        now += wait
        ledger.apply(Reserve(fan, ticket_type, quantity, None, None), now, new_id)
        for t in rules.ticket_types:
            taken = sum(h.quantity for h in ledger.live_holds() if h.ticket_type == t.name)
            assert taken <= t.quantity
            assert ledger.available(t.name) == t.quantity - taken >= 0


@st.composite
def commands(draw: st.DrawFn) -> Command:
    """Any command a batch may hold: keyed or not, for holds that exist or not."""
    fan = draw(st.sampled_from(FANS))
    key = draw(st.one_of(st.none(), st.sampled_from(("k1", "k2", "k3"))))
    hold_id = f"h{draw(st.integers(1, 8))}"
    kind = draw(st.sampled_from(("reserve", "reserve", "confirm", "cancel", "expire")))
    if kind == "reserve":
        return Reserve(fan, draw(st.sampled_from(TYPE_NAMES)), draw(st.integers(-1, 4)), key, None)
    if kind == "confirm":
        return Confirm(hold_id, fan, draw(st.sampled_from(("p1", "p2"))), key)
    if kind == "cancel":
        return Cancel(hold_id, fan, key)
    return Expire()


@settings(max_examples=300, deadline=None)
@given(
    rules=event_rules(),
    batches=st.lists(st.tuples(st.integers(0, 40), st.lists(commands(), max_size=12)), max_size=6),
)
def test_a_batch_applied_at_once_is_the_same_as_one_command_at_a_time(
    rules: EventRules, batches: list[tuple[int, list[Command]]]
) -> None:
    at_once, one_by_one = Ledger(rules), Ledger(rules)
    ids_at_once, ids_one_by_one = counter(), counter()
    now = T0
    for wait, batch in batches:
        now += wait
        results = at_once.apply_many(batch, now, ids_at_once)
        assert results == [one_by_one.apply(c, now, ids_one_by_one) for c in batch]
        assert at_once.drain_changes() == one_by_one.drain_changes()
        assert at_once.all_holds() == one_by_one.all_holds()
        assert at_once.availability() == one_by_one.availability()
        assert at_once.next_deadline() == one_by_one.next_deadline()


class LedgerAgainstModel(RuleBasedStateMachine):
    """The ledger against a naive model that recomputes everything from a dict of holds.

    Outside a batch, the ledger's changes are "persisted" after every step into a fake
    database the way the actor writes them (INSERT new holds, UPDATE only holds still 'held',
    one row per key), and a ledger restored from that database must be indistinguishable from
    the live one. Inside a batch (``begin_batch`` .. ``commit_batch``) changes pile up as they
    do in the actor's group commit, so one hold can be created and settled in the same batch.
    """

    def __init__(self) -> None:
        super().__init__()
        self.event = RULES
        self.ledger = Ledger(RULES)
        self.now = T0
        self.issued = 0
        # The model: holds by id, and per (fan, key) the request and the first result.
        self.holds: dict[str, Hold] = {}
        self.idem: dict[tuple[str, str], tuple[tuple[Any, ...], Result]] = {}
        self.keyed: list[Reserve | Confirm | Cancel] = []
        # The fake database.
        self.db_holds: dict[str, Hold] = {}
        self.db_idem: dict[tuple[str, str], tuple[bytes, Result]] = {}
        self.in_batch = False
        # Hold cycles: (fan, pass) whose last live hold was settled; refusal keys per fan.
        self.used: set[tuple[str, str]] = set()
        self.refusals: dict[str, list[str]] = {}
        self.forgotten: set[tuple[str, str]] = set()

    def new_id(self) -> str:
        self.issued += 1
        return f"h{self.issued:05d}"

    @initialize(rules=event_rules())
    def start(self, rules: EventRules) -> None:
        self.event = rules
        self.ledger = Ledger(rules, max_refusals_per_fan=MODEL_REFUSALS)

    # --- the model ---------------------------------------------------------------------

    def limits(self) -> dict[str, TicketTypeRules]:
        return {t.name: t for t in self.event.ticket_types}

    def taken(self, ticket_type: str) -> int:
        return sum(
            h.quantity
            for h in self.holds.values()
            if h.ticket_type == ticket_type and h.status in ("held", "paid")
        )

    def count(self, fan: str, ticket_type: str | None = None) -> int:
        return sum(
            h.quantity
            for h in self.holds.values()
            if h.fan_id == fan
            and h.status in ("held", "paid")
            and ticket_type in (None, h.ticket_type)
        )

    def model_expire(self) -> tuple[Hold, ...]:
        due = sorted(
            (h for h in self.holds.values() if h.status == "held" and h.expires_at <= self.now),
            key=lambda h: (h.expires_at, h.id),
        )
        for h in due:
            self.model_settle(msgspec.structs.replace(h, status="expired"))
        return tuple(self.holds[h.id] for h in due)

    def model_settle(self, hold: Hold) -> None:
        """Record a hold leaving 'held'; its pass's cycle ends with its last live hold."""
        self.holds[hold.id] = hold
        if hold.pass_jti is not None and not any(
            h.status == "held" and h.fan_id == hold.fan_id and h.pass_jti == hold.pass_jti
            for h in self.holds.values()
        ):
            self.used.add((hold.fan_id, hold.pass_jti))

    def model_execute(self, cmd: Reserve | Confirm | Cancel) -> Result | tuple[str, dict[str, Any]]:
        """The expected result, or (code, details) for a refusal."""
        if isinstance(cmd, Reserve):
            if cmd.pass_jti is not None and (cmd.fan_id, cmd.pass_jti) in self.used:
                return (PASS_USED, {})
            types = self.limits()
            if cmd.ticket_type not in types:
                return (UNKNOWN_TICKET_TYPE, {"ticket_type": cmd.ticket_type})
            if cmd.quantity < 1:
                return (BAD_QUANTITY, {"quantity": cmd.quantity})
            current = self.count(cmd.fan_id, cmd.ticket_type)
            limit = types[cmd.ticket_type].per_fan_limit
            if current + cmd.quantity > limit:
                return (FAN_LIMIT, {"limit": limit, "current": current})
            current = self.count(cmd.fan_id)
            limit = self.event.per_fan_limit
            if current + cmd.quantity > limit:
                return (FAN_LIMIT, {"limit": limit, "current": current})
            left = types[cmd.ticket_type].quantity - self.taken(cmd.ticket_type)
            if cmd.quantity > left:
                held = sum(
                    h.quantity
                    for h in self.holds.values()
                    if h.ticket_type == cmd.ticket_type and h.status == "held"
                )
                if cmd.quantity <= left + held:  # enough may still come back
                    return (TICKETS_HELD, {"available": left, "held": held})
                return (SOLD_OUT, {"available": left})
            hold = Hold(
                f"h{self.issued + 1:05d}",
                cmd.fan_id,
                cmd.ticket_type,
                cmd.quantity,
                "held",
                round(self.now + self.event.hold_ttl_s, 6),  # microseconds, as the ledger
                cmd.pass_jti,
            )
            self.holds[hold.id] = hold
            return Reserved(hold)
        hold_or_none = self.holds.get(cmd.hold_id)
        if hold_or_none is None or hold_or_none.fan_id != cmd.fan_id:
            return (UNKNOWN_HOLD, {"hold_id": cmd.hold_id})
        hold = hold_or_none
        if hold.status == "paid":
            return (ALREADY_CONFIRMED, {"hold_id": hold.id})
        if hold.status == "cancelled":
            return (HOLD_CANCELLED, {"hold_id": hold.id})
        if hold.status == "expired":
            return (HOLD_EXPIRED, {"hold_id": hold.id})
        if isinstance(cmd, Confirm):
            hold = msgspec.structs.replace(hold, status="paid", payment_ref=cmd.payment_ref)
            self.model_settle(hold)
            return Confirmed(hold)
        hold = msgspec.structs.replace(hold, status="cancelled")
        self.model_settle(hold)
        return Cancelled(hold)

    @staticmethod
    def request(cmd: Reserve | Confirm | Cancel) -> tuple[Any, ...]:
        if isinstance(cmd, Reserve):
            return ("reserve", cmd.ticket_type, cmd.quantity)
        if isinstance(cmd, Confirm):
            return ("confirm", cmd.hold_id, cmd.payment_ref)
        return ("cancel", cmd.hold_id)

    def run(self, cmd: Reserve | Confirm | Cancel) -> None:
        key = cmd.idempotency_key
        stored = None if key is None else self.idem.get((cmd.fan_id, key))
        issued = self.issued
        if stored is not None:
            before = (self.ledger.all_holds(), self.ledger.availability())
            result = self.ledger.apply(cmd, self.now, self.new_id)
            if stored[0] == self.request(cmd):
                assert result == stored[1]
            else:
                assert isinstance(result, Refused)
                assert result.code == IDEMPOTENCY_MISMATCH
            assert (self.ledger.all_holds(), self.ledger.availability()) == before
            if not self.in_batch:  # inside one, draining would take the batch's changes
                assert self.ledger.drain_changes().empty()
            assert self.issued == issued
            return
        self.model_expire()
        expected = self.model_execute(cmd)
        result = self.ledger.apply(cmd, self.now, self.new_id)
        if isinstance(expected, tuple):
            code, details = expected
            assert isinstance(result, Refused), (result, expected)
            assert result.code == code, (result, expected)
            assert details.items() <= result.details.items(), (result, expected)
            assert result.code in REFUSAL_STATUS
        else:
            assert result == expected
        assert self.issued == issued + isinstance(result, Reserved)
        if key is not None:
            self.idem[(cmd.fan_id, key)] = (self.request(cmd), result)
            self.keyed.append(cmd)
            if isinstance(result, Refused):
                # Past the cap, the fan's oldest refusal is forgotten: a retry of it is new.
                kept = self.refusals.setdefault(cmd.fan_id, [])
                kept.append(key)
                if len(kept) > MODEL_REFUSALS:
                    oldest = (cmd.fan_id, kept.pop(0))
                    del self.idem[oldest]
                    self.forgotten.add(oldest)
                    self.keyed = [
                        c for c in self.keyed if (c.fan_id, c.idempotency_key) in self.idem
                    ]

    def pick_hold(self, index: int, held_only: bool) -> str:
        """A known hold (a still-held one if asked and there is one), or a missing one."""
        ids = sorted(h.id for h in self.holds.values() if h.status == "held" or not held_only)
        if index < 0 or not ids:
            return "h-missing"
        return ids[index % len(ids)]

    # --- rules -------------------------------------------------------------------------

    @rule(
        fan=st.sampled_from(FANS),
        type_index=st.integers(0, 9),
        # Mostly sensible quantities, so that the machine gets somewhere.
        quantity=st.sampled_from((1, 1, 1, 1, 2, 2, 3, 4, 0, -1)),
        key=KEYS,
        pass_jti=st.sampled_from((None, *PASSES)),
    )
    def reserve(
        self, fan: str, type_index: int, quantity: int, key: str | None, pass_jti: str | None
    ) -> None:
        names = [t.name for t in self.event.ticket_types]
        # Mostly the event's own ticket types; now and then one it does not have.
        ticket_type = "Z" if type_index == 9 else names[type_index % len(names)]
        self.run(Reserve(fan, ticket_type, quantity, key, pass_jti))

    @precondition(lambda self: bool(self.holds))
    @rule(
        fan=st.sampled_from(FANS),
        index=st.integers(-1, 1000),
        held_only=st.booleans(),
        pay=st.sampled_from(PAY_REFS),
        key=KEYS,
        owner=st.integers(0, 3),
    )
    def confirm(
        self, fan: str, index: int, held_only: bool, pay: str, key: str | None, owner: int
    ) -> None:
        hold_id = self.pick_hold(index, held_only)
        if owner > 0 and hold_id in self.holds:
            fan = self.holds[hold_id].fan_id
        self.run(Confirm(hold_id, fan, pay, key))

    @precondition(lambda self: bool(self.holds))
    @rule(
        fan=st.sampled_from(FANS),
        index=st.integers(-1, 1000),
        held_only=st.booleans(),
        key=KEYS,
        owner=st.integers(0, 3),
    )
    def cancel(self, fan: str, index: int, held_only: bool, key: str | None, owner: int) -> None:
        hold_id = self.pick_hold(index, held_only)
        if owner > 0 and hold_id in self.holds:
            fan = self.holds[hold_id].fan_id
        self.run(Cancel(hold_id, fan, key))

    @rule()
    def expire(self) -> None:
        expected = self.model_expire()
        assert self.ledger.apply(Expire(), self.now, self.new_id) == Expired(expected)

    @rule(seconds=st.integers(0, 6) | st.floats(0, 2, allow_nan=False))
    def advance_time(self, seconds: float) -> None:
        self.now += seconds

    @precondition(lambda self: any(h.status == "held" for h in self.holds.values()))
    @rule(past=st.sampled_from((0.0, 0.5, 5.0)), then_expire=st.booleans())
    def advance_to_the_next_deadline(self, past: float, then_expire: bool) -> None:
        # Exactly onto a deadline (or just past it): where off-by-one expiry bugs live. Any
        # other command would expire the due holds itself, so Expire gets its turn here.
        self.now = min(h.expires_at for h in self.holds.values() if h.status == "held") + past
        if then_expire:
            self.expire()

    @precondition(lambda self: bool(self.keyed))
    @rule(index=st.integers(0, 1000), new_pass=st.booleans())
    def retry(self, index: int, new_pass: bool) -> None:
        cmd = self.keyed[index % len(self.keyed)]
        if new_pass and isinstance(cmd, Reserve):
            cmd = msgspec.structs.replace(cmd, pass_jti="refreshed")
        self.run(cmd)

    @precondition(lambda self: not self.in_batch)
    @rule()
    def begin_batch(self) -> None:
        self.in_batch = True

    @precondition(lambda self: self.in_batch)
    @rule()
    def commit_batch(self) -> None:
        self.in_batch = False

    # --- after every step ----------------------------------------------------------------

    @invariant()
    def persisted_ledger_matches_the_model_and_survives_a_restart(self) -> None:
        # One invariant, because the order matters: persist first, then compare.
        self.ledger_matches_the_model()
        if not self.in_batch:
            self.persist_what_changed()
            self.database_matches_the_ledger()
            self.restoring_from_the_database_changes_nothing()

    def persist_what_changed(self) -> None:
        changes = self.ledger.drain_changes()
        for hold in changes.new_holds:
            assert hold.id not in self.db_holds
            self.db_holds[hold.id] = hold
        new_ids = {h.id for h in changes.new_holds}
        for hold in changes.updated_holds:
            assert hold.id not in new_ids
            old = self.db_holds[hold.id]
            # What the PostgreSQL trigger allows: a status change away from 'held' only.
            assert old.status == "held"
            assert hold.status != "held"
            assert msgspec.structs.replace(old, status=hold.status, payment_ref=None) == (
                msgspec.structs.replace(hold, payment_ref=None)
            )
            self.db_holds[hold.id] = hold
        for fan, key, fp, result in changes.idempotency:
            # A key is recorded twice only after its refusal was forgotten (the cap); the
            # database then replaces the row, which moves it to the end (created_at).
            assert (fan, key) not in self.db_idem or (fan, key) in self.forgotten
            self.db_idem.pop((fan, key), None)
            self.db_idem[(fan, key)] = (fp, decode_result(encode_result(result)))

    def database_matches_the_ledger(self) -> None:
        assert {h.id: h for h in self.ledger.all_holds()} == self.db_holds

    def ledger_matches_the_model(self) -> None:
        ledger = self.ledger
        assert {h.id: h for h in ledger.all_holds()} == self.holds
        any_left = False
        for t in self.event.ticket_types:
            taken = self.taken(t.name)
            assert taken <= t.quantity
            assert ledger.available(t.name) == t.quantity - taken >= 0
            any_left = any_left or taken < t.quantity
        held = [h for h in self.holds.values() if h.status == "held"]
        assert ledger.sold_out() == (not any_left and not held)
        assert ledger.next_deadline() == min((h.expires_at for h in held), default=None)
        for fan in FANS:
            assert ledger.fan_count(fan) == self.count(fan) <= self.event.per_fan_limit
            for t in self.event.ticket_types:
                assert ledger.fan_count(fan, t.name) == self.count(fan, t.name) <= t.per_fan_limit
            for jti in PASSES:
                assert ledger.pass_used(fan, jti) == ((fan, jti) in self.used)
            refusals = sum(
                isinstance(r, Refused) for (f, _), (_, r) in self.idem.items() if f == fan
            )
            assert refusals <= MODEL_REFUSALS
            assert ledger.stored_keys(fan) == sum(1 for f, _ in self.idem if f == fan)
        # No hold was ever created on a pass after its cycle ended.
        for fan, jti in self.used:
            assert not any(
                h.status == "held" and h.fan_id == fan and h.pass_jti == jti
                for h in self.holds.values()
            )

    def restoring_from_the_database_changes_nothing(self) -> None:
        restored = Ledger.restore(
            self.event, self.db_holds.values(), self.db_idem, max_refusals_per_fan=MODEL_REFUSALS
        )
        assert restored.availability() == self.ledger.availability()
        assert sorted(restored.all_holds(), key=lambda h: h.id) == sorted(
            self.ledger.all_holds(), key=lambda h: h.id
        )
        assert restored.next_deadline() == self.ledger.next_deadline()
        assert restored.sold_out() == self.ledger.sold_out()
        for fan in FANS:
            assert restored.fan_count(fan) == self.ledger.fan_count(fan)
            for jti in PASSES:
                assert restored.pass_used(fan, jti) == self.ledger.pass_used(fan, jti)
        live_only = Ledger.restore(self.event, self.ledger.live_holds(), {})
        assert live_only.availability() == self.ledger.availability()
        # The live holds plus the passes whose cycle is over (what load_ledger reads) are
        # enough to keep every cycle as it was.
        with_passes = Ledger.restore(
            self.event, self.ledger.live_holds(), {}, used_passes=self.used
        )
        for fan in FANS:
            for jti in PASSES:
                assert with_passes.pass_used(fan, jti) == self.ledger.pass_used(fan, jti)
        # Every stored key answers a retry after the restart exactly as before it.
        for cmd in self.keyed:
            assert cmd.idempotency_key is not None
            request, first = self.idem[(cmd.fan_id, cmd.idempotency_key)]
            if request == self.request(cmd):
                assert restored.apply(cmd, self.now, no_new_ids) == first
        assert restored.drain_changes().empty()


LedgerAgainstModel.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None
)
test_the_ledger_behaves_like_the_naive_model = LedgerAgainstModel.TestCase
