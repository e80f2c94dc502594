"""The admission controller's arithmetic, pure: a token bucket and how many fans to admit now.

The loop (:mod:`admission.loop`) owns one :class:`TokenBucket` per event while it leads.
Every tick it calls :func:`decide` with the clock and the room's live state (configured rate,
``max_active``, active passes, paused, sold out) and admits at most the number returned;
then it :func:`take`\\ s exactly as many tokens as fans it really admitted (abandoned fans it
skipped cost nothing).

Guarantees, property-tested over arbitrary sequences of ticks, rate changes and completed
passes (``tests/admission/test_bucket.py``):

- over any interval, admissions <= the integral of the rate over it + the burst in force at
  its start (so a stalled loop catches up by at most ``burst``, never more);
- no admission ever takes the active passes above ``max_active``.

The burst is :data:`BURST_S` seconds of the rate, at least :data:`MIN_BURST` fans, so a loop
that stalls for less than that loses nothing. The floor of two (not one) matters for slow
rates: a bucket capped at exactly one token would drop the fraction that accrues between
the tick where it reached one and the tick that spends it, and 0.9/s would come out as
0.87/s. With two, every fraction is kept, and fractional rates (0.5/s) are exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

#: Seconds of the rate the bucket can hold: the largest catch-up after a stall.
BURST_S = 1.0
#: The least burst, in fans (see the module's docstring for why not one).
MIN_BURST = 2.0
#: Slack for float rounding of refills (0.1/s over 10 s is not exactly 1.0).
_EPSILON = 1e-9


def burst_for(rate: float) -> float:
    """The burst of a bucket refilling at ``rate`` per second: at least two whole fans."""
    return max(MIN_BURST, rate * BURST_S)


def whole(tokens: float) -> int:
    """Whole fans ``tokens`` pays for."""
    return max(0, math.floor(tokens + _EPSILON))


@dataclass(frozen=True, slots=True)
class TokenBucket:
    """Tokens (fans) available to admit, refilled at ``rate`` per second up to ``burst``."""

    rate: float
    burst: float
    tokens: float
    #: The clock reading (seconds, monotonic) the tokens were computed at.
    at: float

    @classmethod
    def start(cls, rate: float, now: float) -> TokenBucket:
        """A new bucket holding one token: the first fan goes at once, no burst at start."""
        burst = burst_for(rate)
        return cls(rate=rate, burst=burst, tokens=min(1.0, burst), at=now)


def refill(bucket: TokenBucket, now: float) -> TokenBucket:
    """``bucket`` as of ``now``; a clock that went back refills nothing and keeps ``at``."""
    if now <= bucket.at:
        return bucket
    tokens = min(bucket.burst, bucket.tokens + (now - bucket.at) * bucket.rate)
    return replace(bucket, tokens=tokens, at=now)


def retune(bucket: TokenBucket, rate: float, now: float) -> TokenBucket:
    """Change the rate at ``now``: the time so far refills at the old rate, the rest at the new.

    A lower rate also lowers the burst, and the tokens above it are dropped: slowing down
    takes effect at once instead of after the old burst drains.
    """
    if rate <= 0 or not math.isfinite(rate):
        raise ValueError(f"rate must be a positive number, not {rate!r}")
    current = refill(bucket, now)
    if rate == current.rate:
        return current
    burst = burst_for(rate)
    return replace(current, rate=rate, burst=burst, tokens=min(current.tokens, burst))


def take(bucket: TokenBucket, count: int) -> TokenBucket:
    """``bucket`` after admitting ``count`` fans (never more than it holds)."""
    if count < 0 or count > whole(bucket.tokens):
        raise ValueError(f"cannot take {count} from {bucket.tokens:.3f} tokens")
    return replace(bucket, tokens=max(0.0, bucket.tokens - count))


def admit_count(
    *, tokens: float, active: int, max_active: int, paused: bool, sold_out: bool
) -> int:
    """How many fans to admit now: none when paused or sold out, else what both the tokens
    and the free places under ``max_active`` allow."""
    if paused or sold_out:
        return 0
    return max(0, min(whole(tokens), max_active - active))


def decide(
    bucket: TokenBucket,
    now: float,
    *,
    rate: float,
    max_active: int,
    active: int,
    paused: bool,
    sold_out: bool,
) -> tuple[TokenBucket, int]:
    """The bucket brought to ``now`` at the configured ``rate``, and how many to admit."""
    current = retune(bucket, rate, now)
    count = admit_count(
        tokens=current.tokens,
        active=active,
        max_active=max_active,
        paused=paused,
        sold_out=sold_out,
    )
    return current, count
