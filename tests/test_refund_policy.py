"""The refund policy's rules: what a refund is worth, by tier, time and tickets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from inventory.refund_policy import (
    RefundPolicy,
    Tier,
    check_policy,
    days_before,
    parse_tier,
    percent_at,
    refund_amount,
)

START = datetime(2027, 6, 1, 20, 0, tzinfo=UTC)
POLICY = RefundPolicy([Tier(30, 100), Tier(7, 50)])

tiers = st.lists(st.builds(Tier, st.integers(0, 400), st.integers(0, 100)), min_size=1, max_size=10)
policies = st.builds(RefundPolicy, tiers, st.booleans())
prices = st.integers(0, 10**9)
offsets = st.floats(-50, 500, allow_nan=False)  # days before the event


def at(days: float) -> datetime:
    return START - timedelta(days=days)


def test_the_tiers_of_the_issue_give_everything_then_half_then_nothing() -> None:
    assert percent_at(POLICY, START, at(31)) == 100
    assert percent_at(POLICY, START, at(30)) == 100  # until 30 days before: inclusive
    assert percent_at(POLICY, START, at(29.99)) == 50
    assert percent_at(POLICY, START, at(7)) == 50
    assert percent_at(POLICY, START, at(6.5)) == 0
    assert percent_at(POLICY, START, at(-1)) == 0  # the event has started
    assert percent_at(POLICY, None, at(0)) == 100  # no date: as far away as it gets


def test_amounts_are_rounded_down_to_a_whole_minor_unit() -> None:
    assert refund_amount(999, 1, 50) == 499
    assert refund_amount(1000, 3, 50) == 1500
    assert refund_amount(333, 3, 33) == 329  # 329.67 rounded down
    with pytest.raises(ValueError):
        refund_amount(100, 1, 101)


@given(policies, prices, st.integers(0, 100), offsets)
def test_a_refund_never_gives_back_more_than_was_paid(
    policy: RefundPolicy, price: int, tickets: int, days: float
) -> None:
    amount = refund_amount(price, tickets, percent_at(policy, START, at(days)))
    assert 0 <= amount <= price * tickets


@given(policies, prices, st.integers(1, 100), offsets, offsets)
def test_a_later_request_never_gets_more_back(
    policy: RefundPolicy, price: int, tickets: int, a: float, b: float
) -> None:
    earlier, later = max(a, b), min(a, b)  # days before: more days is earlier
    assert percent_at(policy, START, at(later)) <= percent_at(policy, START, at(earlier))
    assert refund_amount(price, tickets, percent_at(policy, START, at(later))) <= refund_amount(
        price, tickets, percent_at(policy, START, at(earlier))
    )


@given(policies, prices, st.lists(st.integers(1, 10), min_size=1, max_size=10), st.data())
def test_partial_refunds_sum_to_at_most_the_order(
    policy: RefundPolicy, price: int, parts: list[int], data: st.DataObject
) -> None:
    # Refunds of parts of one order, each at its own time: never more than the order cost,
    # and never more than the whole order refunded at once at the best of those times.
    times = [data.draw(offsets) for _ in parts]
    given_back = [
        refund_amount(price, n, percent_at(policy, START, at(t)))
        for n, t in zip(parts, times, strict=True)
    ]
    order = price * sum(parts)
    assert sum(given_back) <= order
    best = max(percent_at(policy, START, at(t)) for t in times)
    assert sum(given_back) <= refund_amount(price, sum(parts), best)


def test_a_policy_whose_refund_grows_towards_the_event_is_refused() -> None:
    assert check_policy(POLICY) is None
    assert check_policy(RefundPolicy([Tier(7, 50)])) is None
    assert "more" in (check_policy(RefundPolicy([Tier(30, 50), Tier(7, 100)])) or "")
    assert "two tiers" in (check_policy(RefundPolicy([Tier(7, 50), Tier(7, 40)])) or "")


def test_tiers_are_read_from_the_command_line_form() -> None:
    assert parse_tier("30:100") == Tier(30, 100)
    assert parse_tier(" 0:10 ") == Tier(0, 10)
    for bad in ("30", "30:101", "-1:50", "a:b", "30:100:1", "9999:10"):
        with pytest.raises(ValueError):
            parse_tier(bad)


def test_a_policy_body_is_validated_field_by_field() -> None:
    decode = msgspec.json.Decoder(RefundPolicy).decode
    assert decode(b'{"tiers": [{"until_days_before": 30, "percent": 100}]}') == RefundPolicy(
        [Tier(30, 100)]
    )
    for bad in (
        b'{"tiers": []}',
        b'{"tiers": [{"until_days_before": -1, "percent": 100}]}',
        b'{"tiers": [{"until_days_before": 1, "percent": 101}]}',
        b'{"tiers": [{"until_days_before": 1, "percent": 1, "x": 1}]}',
    ):
        with pytest.raises(msgspec.ValidationError):
            decode(bad)


def test_days_before_are_exact_not_calendar_days() -> None:
    assert days_before(START, START - timedelta(hours=36)) == 1.5
    assert days_before(None, START) == float("inf")
