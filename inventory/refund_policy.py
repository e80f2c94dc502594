"""An event's refund policy and what a refund is worth: pure rules, no I/O.

A policy is a list of tiers, each "``percent`` back until ``until_days_before`` days before
the event starts", e.g. ``[{"until_days_before": 30, "percent": 100},
{"until_days_before": 7, "percent": 50}]``: everything back until 30 days before, half until
7 days before, nothing after that. It is set per event by an operator
(``PUT /v1/admin/events/{id}/refund-policy``, ``waitroom refunds policy``); an event without
one takes no refunds. ``requires_approval`` makes every request wait for an operator.

Which tier applies: the best one whose deadline has not passed, that is the highest
``percent`` among tiers with ``until_days_before <= days left``. Taking the maximum makes the
rate never grow as the event comes closer whatever the tiers say (and the API also refuses
tiers whose percent grows towards the event, so what an operator writes is what applies).
Days left are exact (seconds / 86,400), not whole calendar days: "until 7 days before" ends
exactly 7 x 24 hours before ``starts_at``. An event without a start time is treated as far
away (the most generous tier); once it has started, no tier applies.

Amounts are integer minor units. A refund of ``n`` tickets at ``price`` each at ``percent`` is
``floor(price * n * percent / 100)``: rounded down, so a refund never gives back more than
was paid, and the fan loses less than one minor unit per refund to rounding. Since
``floor(a) + floor(b) <= floor(a + b)``, refunds of parts of an order sum to at most a refund
of all of it at once, which is at most what the order cost.
"""

from __future__ import annotations

import itertools
import re
from datetime import datetime
from typing import Annotated

import msgspec
from msgspec import Meta

#: Most tiers one policy may have.
MAX_TIERS = 10
#: Longest ``until_days_before`` (ten years).
MAX_DAYS = 3650
_DAY_S = 86_400.0
_TIER_RE = re.compile(r"^(\d{1,4}):(\d{1,3})$")


class Tier(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``percent`` back until ``until_days_before`` days before the event starts."""

    until_days_before: Annotated[int, Meta(ge=0, le=MAX_DAYS)]
    percent: Annotated[int, Meta(ge=0, le=100)]


class RefundPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An event's refund policy (the body of ``PUT /v1/admin/events/{id}/refund-policy``)."""

    tiers: Annotated[list[Tier], Meta(min_length=1, max_length=MAX_TIERS)]
    #: Every request waits for an operator's approval.
    requires_approval: bool = False


def check_policy(policy: RefundPolicy) -> str | None:
    """Why ``policy`` makes no sense (a message), or None when it is good.

    Two tiers may not share a deadline, and a later deadline may not give back more than an
    earlier one (refunds only shrink as the event comes closer).
    """
    tiers = sorted(policy.tiers, key=lambda t: -t.until_days_before)
    for earlier, later in itertools.pairwise(tiers):
        if earlier.until_days_before == later.until_days_before:
            return f"two tiers end {later.until_days_before} days before the event"
        if later.percent > earlier.percent:
            return (
                f"the tier until {later.until_days_before} days before gives back more"
                f" ({later.percent}%) than the one until {earlier.until_days_before}"
                f" ({earlier.percent}%)"
            )
    return None


def days_before(starts_at: datetime | None, now: datetime) -> float:
    """Days left until ``starts_at`` (negative once it started; infinite without a date)."""
    if starts_at is None:
        return float("inf")
    return (starts_at - now).total_seconds() / _DAY_S


def percent_at(policy: RefundPolicy, starts_at: datetime | None, now: datetime) -> int:
    """The share (0-100) refunded at ``now`` for an event starting at ``starts_at``."""
    left = days_before(starts_at, now)
    return max((t.percent for t in policy.tiers if left >= t.until_days_before), default=0)


def refund_amount(price_minor: int, tickets: int, percent: int) -> int:
    """What ``tickets`` tickets bought at ``price_minor`` each give back at ``percent``,
    rounded down to a whole minor unit."""
    if price_minor < 0 or tickets < 0 or not 0 <= percent <= 100:
        raise ValueError("price, tickets and percent must be non-negative, percent <= 100")
    return price_minor * tickets * percent // 100


def parse_tier(raw: str) -> Tier:
    """``"30:100"`` (days before : percent), as ``waitroom refunds policy --tier`` takes it."""
    match = _TIER_RE.match(raw.strip())
    if match is None:
        raise ValueError(f"a tier is DAYS:PERCENT, such as 30:100, not {raw!r}")
    days, percent = int(match.group(1)), int(match.group(2))
    if days > MAX_DAYS or percent > 100:
        raise ValueError(f"days must be at most {MAX_DAYS} and percent at most 100: {raw!r}")
    return Tier(days, percent)
