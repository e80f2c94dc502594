"""The waitlist's pure core: how many fans to offer returned tickets to, and the phase."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from admission.waitlist import Phase, follow, offer_claims, parse_available

counts = st.integers(min_value=0, max_value=500)
limits = st.integers(min_value=1, max_value=10)


@given(available=counts, offered=counts, per_fan_limit=limits, most=counts)
def test_offers_never_claim_more_than_the_returned_stock_not_yet_offered(
    available: int, offered: int, per_fan_limit: int, most: int
) -> None:
    claims = offer_claims(
        available=available, offered=offered, per_fan_limit=per_fan_limit, most=most
    )
    free = available - offered
    assert sum(claims) <= max(0, free)
    assert len(claims) <= most
    # Every fan offered can buy at least one ticket and at most the per-fan limit.
    assert all(1 <= c <= per_fan_limit for c in claims)
    # And no fan who could have been offered a ticket is kept waiting.
    assert len(claims) == most or sum(claims) == max(0, free)


@given(
    returns=st.lists(st.integers(min_value=0, max_value=20), min_size=1, max_size=30),
    per_fan_limit=limits,
)
def test_offers_made_tick_after_tick_never_exceed_the_tickets_that_came_back(
    returns: list[int], per_fan_limit: int
) -> None:
    """Tickets trickle back; each tick offers what is free; offers stay open (nobody buys).
    The open claims never exceed the tickets there, and every ticket ends up offered."""
    available = 0
    open_claims: list[int] = []
    for back in returns:
        available += back
        claims = offer_claims(
            available=available,
            offered=sum(open_claims),
            per_fan_limit=per_fan_limit,
            most=1_000,
        )
        open_claims += claims
        assert sum(open_claims) <= available
    assert sum(open_claims) == available


def test_offers_by_tickets_are_conservative_with_a_per_fan_limit() -> None:
    assert offer_claims(available=5, offered=0, per_fan_limit=4, most=10) == [4, 1]
    assert offer_claims(available=1, offered=0, per_fan_limit=4, most=10) == [1]
    assert offer_claims(available=10, offered=3, per_fan_limit=1, most=5) == [1] * 5
    assert offer_claims(available=3, offered=3, per_fan_limit=1, most=5) == []
    assert offer_claims(available=2, offered=5, per_fan_limit=1, most=5) == []
    with pytest.raises(ValueError):
        offer_claims(available=1, offered=0, per_fan_limit=0, most=1)


@given(
    looks=st.lists(st.tuples(st.one_of(st.none(), st.integers(0, 50)), st.booleans()), max_size=40)
)
def test_returned_counts_every_rise_of_the_availability_once_waitlisting(
    looks: list[tuple[int | None, bool]],
) -> None:
    phase = Phase()
    expected = 0
    last: int | None = None
    for available, sold_out in looks:
        was = phase.waitlisting
        phase = follow(phase, enabled=True, available=available, sold_out=sold_out)
        if not was:
            assert phase.waitlisting == (sold_out or available == 0)
            last = available or 0 if phase.waitlisting else None
        elif available is not None:
            assert last is not None
            expected += max(0, available - last)
            last = available
        assert phase.returned == expected
    assert follow(phase, enabled=False, available=3, sold_out=False) == Phase()


def test_the_availability_published_is_summed_over_ticket_types() -> None:
    assert parse_available([]) is None
    assert parse_available([b"3", b"0", "2"]) == 5
    assert parse_available([b"-1", b"x", b"4"]) == 4
